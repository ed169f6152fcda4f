"""gatescope serve: the neuron table against a brute force, neuron pages on demand and from
the cache, the JSON API, and every bad request answered with a sentence."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient

import gatescope
from gatescope.cli import cli
from gatescope.constants import CASES, QUANTITIES
from gatescope.errors import GatescopeError
from gatescope.serve.app import create_app
from gatescope.serve.catalog import CACHE_DIR, Catalog
from gatescope.serve.table import NeuronTable, parse_filter
from gatescope.weights import ModelWeights, weight_lens
from tests.test_pages import hostile_atlas


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """An atlas of a tiny random model over texts that are attacks (no fixtures needed)."""
    root = tmp_path_factory.mktemp("serve")
    return hostile_atlas(root), root


@pytest.fixture(scope="module")
def client(hostile):
    _, root = hostile
    return TestClient(create_app(Catalog.open([root / "atlas"])))


def brute_force_rows(atlas) -> list[dict]:
    """Every neuron's frequencies and largest |hook_post| per case, from atlas.neuron."""
    rows = []
    for layer in range(atlas.num_layers):
        for n in range(atlas.d_mlp):
            s = atlas.neuron(layer, n)
            row = {"layer": layer, "neuron": n}
            for case in CASES:
                row[f"freq:{case}"] = s.freq[case]
                extremes = [abs(s.max[case]["hook_post"]), abs(s.min[case]["hook_post"])]
                row[f"max:{case}"] = None if np.isnan(extremes).all() else np.nanmax(extremes)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ the table


def test_the_table_filters_and_sorts_like_a_brute_force(hostile):
    atlas, _ = hostile
    table = NeuronTable(atlas)
    rows = brute_force_rows(atlas)
    assert len(table) == len(rows) == atlas.num_layers * atlas.d_mlp

    case = "gate-_in-"
    key = f"freq:{case}"
    threshold = float(np.median([r[key] for r in rows]))
    expected = [r for r in rows if r[key] > threshold and 1 <= r["layer"] <= 2]
    expected.sort(key=lambda r: -r[key])  # stable: model order among ties
    page = table.page(f"{case} frequency > {threshold} and layer 1-2", sort=key,
                      descending=True, size=7)  # fmt: skip
    assert page.total == len(expected) > 7
    keys = [c.key for c in page.columns]
    shown = [dict(zip(keys, r, strict=True)) for r in page.rows]
    assert [(r["layer"], r["neuron"]) for r in shown] == [
        (r["layer"], r["neuron"]) for r in expected[:7]
    ]
    for got, want in zip(shown, expected, strict=False):
        assert got[key] == pytest.approx(want[key])
        max_key = f"max:{case}"
        assert (got[max_key] is None) == (want[max_key] is None)
        if want[max_key] is not None:
            assert got[max_key] == pytest.approx(want[max_key], rel=1e-6)
    # The last page holds the rest.
    last = table.page(f"{case} frequency > {threshold} and layer 1-2", sort=key,
                      descending=True, size=7, page=page.pages)  # fmt: skip
    assert len(last.rows) == len(expected) - 7 * (page.pages - 1)


def test_filter_words_in_any_order_and_every_operator(hostile):
    atlas, _ = hostile
    table = NeuronTable(atlas)
    columns = table.columns
    for text in (
        "frequency gate+_in+ >= 0.25",
        "gate+_in+ freq>=0.25",
        "GATE+_IN+ Frequency >= .25",
    ):
        (condition,) = parse_filter(text, columns)
        assert (condition.column, condition.op, condition.value) == ("freq:gate+_in+", ">=", 0.25)
    rows = brute_force_rows(atlas)
    for op, check in (("<", np.less), ("<=", np.less_equal), ("=", np.equal), ("!=", np.not_equal)):
        expected = sum(bool(check(r["layer"], 1)) for r in rows)
        assert table.page(f"layer {op} 1", size=1).total == expected


def test_a_column_is_named_by_enough_of_its_words(hostile):
    atlas, _ = hostile
    table = NeuronTable(atlas)
    full = table.page("gate+_in+ p99 |hook_post| > 0.5 and gate-_in- max |hook_post| < 2")
    short = table.page("p99 gate+_in+ > 0.5 and max gate-_in- < 2")
    assert full.rows == short.rows and 0 < full.total < len(table)
    with pytest.raises(GatescopeError, match="no column 'p99'"):
        table.page("p99 > 0.5")  # four columns have these words


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("gate-_in- frequency", "cannot read"),
        ("colour > 3", "no column 'colour'"),
        ("layer > 1 and", "cannot read"),
        ("layer >> 1", "cannot read"),
    ],
)
def test_a_bad_filter_is_refused_with_a_sentence(hostile, text, says):
    atlas, _ = hostile
    with pytest.raises(GatescopeError, match=says):
        NeuronTable(atlas).page(text)


# ------------------------------------------------------------------------------ the app


def test_the_index_and_the_api_list_the_atlases(client, hostile):
    atlas, _ = hostile
    (listed,) = client.get("/api/atlases").json()
    assert listed["name"] == "atlas" and listed["layers"] == atlas.num_layers
    assert listed["d_mlp"] == atlas.d_mlp and listed["distributions"] is True
    page = client.get("/")
    assert page.status_code == 200 and 'href="/atlas/atlas/"' in page.text


def test_the_table_page_and_its_json(client, hostile):
    atlas, _ = hostile
    api = client.get("/api/atlas/atlas/neurons", params={"size": 5, "sort": "freq:gate-_in-",
                                                         "order": "desc"}).json()  # fmt: skip
    assert api["total"] == atlas.num_layers * atlas.d_mlp and len(api["rows"]) == 5
    freqs = [row[[c["key"] for c in api["columns"]].index("freq:gate-_in-")] for row in api["rows"]]
    assert freqs == sorted(freqs, reverse=True)
    page = client.get("/atlas/atlas/", params={"filter": "layer = 1", "size": 3})
    assert page.status_code == 200
    links = re.findall(r'href="neuron/(\d+)\.(\d+)"', page.text)
    assert links == [("1", "0"), ("1", "1"), ("1", "2")]
    assert "page 1 of" in page.text and "next →</a>" in page.text


def test_a_neuron_page_is_made_once_then_served_from_the_cache(hostile):
    atlas, root = hostile
    first = Catalog.open([root / "atlas"])
    client = TestClient(create_app(first))
    page = client.get("/atlas/atlas/neuron/1.3")
    assert page.status_code == 200 and "Neuron 1.3" in page.text
    assert 'href="1.4"' in page.text and 'href="0.3"' in page.text  # the neighbours
    assert 'href="../"' in page.text  # back to the table
    summary = atlas.neuron(1, 3)
    shown = re.findall(r'data-text="(\d+)" data-position="(\d+)" data-value="([^"]+)"', page.text)
    expected = {(e.text, e.position) for case in CASES for q in summary.top[case].values()
                for e in q}  # fmt: skip
    assert {(int(t), int(p)) for t, p, _ in shown} == expected
    cached = list((root / "atlas" / CACHE_DIR).glob("*/L1-N3.page-*.json"))
    assert len(cached) == 1
    # The rendered page is kept too, and served as it was rendered.
    (html_file,) = (root / "atlas" / CACHE_DIR).glob("*/L1-N3.*.html")
    assert html_file.read_text() == page.text
    assert client.get("/atlas/atlas/neuron/1.3").text == page.text
    assert page.headers["content-encoding"] == "gzip"  # httpx asks for gzip, as browsers do
    for refusing in ("identity", "gzip;q=0, identity", "br"):
        plain = client.get("/atlas/atlas/neuron/1.3", headers={"accept-encoding": refusing})
        assert "content-encoding" not in plain.headers and plain.text == page.text

    # A new server on the same atlas serves the page without loading the model.
    again = Catalog.open([root / "atlas"])
    served = TestClient(create_app(again)).get("/api/atlas/atlas/neuron/1.3").json()
    assert again.get("atlas")._source is None
    assert served["layer"] == 1 and served["neuron"] == 3
    assert served["cases"] == json.loads(json.dumps(served["cases"]))
    assert [c["freq"] for c in served["cases"]] == pytest.approx([summary.freq[c] for c in CASES])


def test_hostile_corpus_text_stays_inert_on_a_served_page(client):
    page = client.get("/atlas/atlas/neuron/0.0").text
    assert "<script>alert" not in page and "<img" not in page
    assert html.escape("web:<script>alert(1)</script>") in page


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/atlas/nope/", 404, "no atlas 'nope'"),
        ("/atlas/atlas/neuron/1000000000.0", 404, "is not a neuron"),
        ("/atlas/atlas/neuron/999999999.0", 404, "layer 999999999 is out of range"),
        ("/atlas/atlas/neuron/0.99999", 404, "neuron 99999 is out of range"),
        ("/atlas/atlas/neuron/-1.5", 404, "is not a neuron"),
        ("/atlas/atlas/neuron/abc", 404, "is not a neuron"),
        ("/api/atlas/atlas/neuron/3", 404, "is not a neuron"),
        ("/static/../../etc/passwd", 404, "nothing at"),
        ("/static/%2e%2e/%2e%2e/etc/passwd", 404, "nothing at"),
        ("/static/%252e%252e/%252e%252e/etc/passwd", 404, "nothing at"),
        ("/atlas/atlas/?size=10000000", 422, "size"),
        ("/api/atlas/atlas/neurons?size=0", 422, "size"),
        ("/api/atlas/atlas/neurons?page=0", 422, "page"),
        ("/api/atlas/atlas/neurons?page=two", 422, "page"),
        ("/api/atlas/atlas/neurons?order=sideways", 422, "order"),
        ("/api/atlas/atlas/neurons?sort=colour", 400, "cannot sort by 'colour'"),
        ("/api/atlas/atlas/neurons?filter=colour%3E1", 400, "no column 'colour'"),
        ("/api/atlas/atlas/neurons?filter=" + "x" * 2000, 422, "filter"),
    ],
)
def test_every_bad_request_gets_a_sentence_and_the_server_lives_on(client, path, status, says):
    answer = client.get(path)
    assert answer.status_code == status, answer.text
    if path.startswith("/api/"):
        assert says in answer.json()["detail"]
    else:
        assert says in html.unescape(answer.text) and "<h1>" in answer.text
    assert "Traceback" not in answer.text and "/etc/passwd:" not in answer.text
    assert client.get("/api/atlases").status_code == 200


def test_openapi_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    documented = {
        "/api/atlases",
        "/api/atlas/{name}/neurons",
        "/api/atlas/{name}/neuron/{spec}",
        "/api/atlas/{name}/neuron/{spec}/weights",
    }
    assert documented <= set(schema["paths"])
    # /docs is a page of our own (FastAPI's Swagger UI loads its script from a CDN).
    docs = client.get("/docs")
    assert docs.status_code == 200 and "http" not in docs.text.replace("http://testserver", "")
    for path in documented:
        assert f"<code>GET {path}</code>" in docs.text
    assert "<code>POST /api/atlas/{name}/probe</code>" in docs.text
    assert "<code>text</code></th><td>JSON body</td><td>string</td><td>yes" in docs.text


def test_every_page_works_without_a_network(client):
    """No page loads anything from elsewhere: every script, style and plot is inline."""
    paths = ["/", "/atlas/atlas/", "/atlas/atlas/neuron/0.1", "/atlas/atlas/layers",
             "/atlas/atlas/search?token=a", "/atlas/atlas/probe", "/docs"]  # fmt: skip
    for path in paths:
        page = client.get(path)
        assert page.status_code == 200, path
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), path
        assert "@import" not in page.text and "url(http" not in page.text, path


def test_serve_refuses_a_missing_atlas_in_one_sentence(tmp_path):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------ weights


def test_the_table_filters_and_sorts_by_the_weight_cosines(hostile):
    atlas, root = hostile
    figures = ModelWeights.open(root / "model").figures()
    table = NeuronTable(atlas, figures)
    cos_in_out = figures.cos_in_out.reshape(-1)  # model order, as the table's rows
    cos_gate_in = figures.cos_gate_in.reshape(-1)
    kept = [i for i in range(len(cos_in_out)) if cos_in_out[i] < 0]
    kept.sort(key=lambda i: -cos_gate_in[i])
    page = table.page("cos in-out < 0", sort="cos:gate_in", descending=True, size=500)
    keys = table.keys
    assert page.total == len(kept)
    assert [(r[0], r[1]) for r in page.rows] == [divmod(i, atlas.d_mlp) for i in kept]
    got = [r[keys.index("cos:in_out")] for r in page.rows]
    assert got == pytest.approx([float(cos_in_out[i]) for i in kept])


def test_a_neuron_page_shows_its_weight_lens_and_related_neurons(client, hostile):
    _, root = hostile
    weights = ModelWeights.open(root / "model")
    lens = weight_lens(weights, weights.figures(), 1, 3)
    data = client.get("/api/atlas/atlas/neuron/1.3/weights").json()
    first = data["lens"]["projections"][0]
    assert (first["vector"], first["through"]) == ("w_out", "unembedding")
    assert [t["token"] for t in first["top"]] == [t for t, _ in lens.projections[0].top]
    assert data["lens"]["cos_gate_in"] == pytest.approx(lens.cos_gate_in)
    page = client.get("/atlas/atlas/neuron/1.3").text
    assert 'id="weight-lens"' in page and "w_gate · embedding" in page
    for related in data["related"]["writes_gate"]:
        assert f'href="{related["layer"]}.{related["neuron"]}"' in page
    # The lens shows tokens of the character vocabulary, "<" among them: escaped.
    assert "<script>alert" not in page and "<img" not in page


def test_without_the_models_weights_an_atlas_is_served_without_the_lens(hostile):
    _, root = hostile
    catalog = Catalog.open([root / "atlas"], model=str(root / "nowhere"))
    served = TestClient(create_app(catalog))
    columns = served.get("/api/atlas/atlas/neurons").json()["columns"]
    assert "freq:gate-_in-" in [c["key"] for c in columns]
    assert "cos:in_out" not in [c["key"] for c in columns]
    answer = served.get("/api/atlas/atlas/neuron/1.2/weights")
    assert answer.status_code == 400 and "not on this machine" in answer.json()["detail"]
    page = served.get("/atlas/atlas/neuron/1.2")  # its texts need the model too
    assert page.status_code == 400 and "could not load the model" in page.text


def test_weights_gone_after_their_figures_were_cached_are_a_sentence(hostile, tmp_path):
    import shutil

    _, root = hostile
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    first = TestClient(create_app(Catalog.open([root / "atlas"], model=str(model))))
    assert first.get("/api/atlas/atlas/neuron/1.6").status_code == 200  # the texts, cached
    assert "cos:in_out" in first.get("/api/atlas/atlas/neurons").text  # the figures, cached
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    served = TestClient(create_app(Catalog.open([root / "atlas"], model=str(model))))
    answer = served.get("/api/atlas/atlas/neuron/1.5/weights")
    assert answer.status_code == 400 and "no safetensors weights" in answer.json()["detail"]
    page = served.get("/atlas/atlas/neuron/1.6")
    assert page.status_code == 200 and "No weight lens" in page.text
    assert "no safetensors weights" in page.text


def test_another_models_weights_are_not_shown_as_the_atlases(hostile, tmp_path):
    from tests.models import tiny_model
    from tests.tokenizers import char_tokenizer

    _, root = hostile
    other = tiny_model("llama", d_mlp=96, vocab=len(char_tokenizer()))
    other.save_pretrained(tmp_path / "other")
    char_tokenizer().save_pretrained(tmp_path / "other")
    served = TestClient(create_app(Catalog.open([root / "atlas"], model=str(tmp_path / "other"))))
    table = served.get("/api/atlas/atlas/neurons")
    assert table.status_code == 200
    assert "cos:in_out" not in [c["key"] for c in table.json()["columns"]]
    answer = served.get("/api/atlas/atlas/neuron/1.50/weights")
    assert answer.status_code == 400 and "another model's" in answer.json()["detail"]
    assert "another model&#39;s" in served.get("/atlas/atlas/layers").text


# ------------------------------------------------------------------------------ model-wide views


def test_the_frequency_summaries_are_each_layers_quantiles(client, hostile):
    atlas, _ = hostile
    data = client.get("/api/atlas/atlas/frequencies").json()
    assert data["levels"] == [0.05, 0.25, 0.5, 0.75, 0.95]
    for case in CASES:
        for layer in range(atlas.num_layers):
            freq = [atlas.neuron(layer, n).freq[case] for n in range(atlas.d_mlp)]
            expected = np.quantile(freq, data["levels"])
            assert data["cases"][case][layer] == pytest.approx(expected.tolist())


def test_the_scatter_plot_is_pearsons_correlation_of_the_layer(client, hostile):
    atlas, root = hostile
    figures = ModelWeights.open(root / "model").figures()
    layer = 1
    freqs = [atlas.neuron(layer, n).freq for n in range(atlas.d_mlp)]
    gate_positive = [f["gate+_in+"] + f["gate+_in-"] for f in freqs]
    cos = figures.cos_in_out[layer].astype(np.float64)
    data = client.get(f"/api/atlas/atlas/layer/{layer}/correlation").json()
    assert data["gate_positive"] == pytest.approx(gate_positive)
    assert data["r"] == pytest.approx(np.corrcoef(cos, gate_positive)[0, 1], rel=1e-6)
    # The p-value of r under independence, from Student's t with n - 2 degrees of freedom.
    n, r = atlas.d_mlp, data["r"]
    t = r * np.sqrt((n - 2) / (1 - r * r))
    from scipy.stats import t as student

    assert data["p"] == pytest.approx(2 * student.sf(abs(t), n - 2), rel=1e-6)
    page = client.get(f"/atlas/atlas/layers?layer={layer}").text
    points = re.findall(r'<a href="neuron/(\d+)\.(\d+)"><circle', page)
    assert points == [(str(layer), str(n)) for n in range(atlas.d_mlp)]
    assert f"Pearson r = <b>{r:.4g}</b>" in page


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/atlas/atlas/layers?layer=2", 404),
        ("/atlas/atlas/layers?layer=-1", 422),
        ("/atlas/atlas/layers?layer=10000000000", 422),
        ("/api/atlas/atlas/layer/2/correlation", 404),
        ("/api/atlas/atlas/layer/x/correlation", 422),
    ],
)
def test_a_layer_that_does_not_exist_gets_a_sentence(client, path, status):
    answer = client.get(path)
    assert answer.status_code == status and "Traceback" not in answer.text


def test_without_weights_the_layers_page_explains_the_missing_scatter(hostile):
    _, root = hostile
    catalog = Catalog.open([root / "atlas"], model=str(root / "nowhere"))
    page = TestClient(create_app(catalog)).get("/atlas/atlas/layers").text
    assert "No scatter plot" in page and "not on this machine" in page
    assert page.count('class="box"') == 4 * 2  # the frequencies need no weights


# ------------------------------------------------------------------------------ search by token


def brute_force_search(atlas, corpus, tokens: set[int]) -> set[tuple]:
    """(layer, neuron, case, hits, examples) of every neuron whose top hook_post examples
    of a case peak on one of ``tokens``, from atlas.neuron and the corpus's rows."""
    found = set()
    for layer in range(atlas.num_layers):
        for n in range(atlas.d_mlp):
            top = atlas.neuron(layer, n).top
            for case in CASES:
                examples = top[case]["hook_post"]
                peaks = [corpus.dataset[e.text]["input_ids"][e.position] for e in examples]
                for token in tokens & set(peaks):
                    found.add((layer, n, case, token, peaks.count(token), len(examples)))
    return found


def test_search_by_token_finds_what_a_brute_force_finds(client, hostile):
    from gatescope.corpus import TokenizedCorpus

    atlas, root = hostile
    corpus = TokenizedCorpus.open(root / "corpus")
    answer = client.get("/api/atlas/atlas/search", params={"token": "A"}).json()
    tokens = {t["token"] for t in answer["tokens"]}
    assert {t["text"] for t in answer["tokens"]} == {"a", "A"}  # case is ignored
    got = {(h["layer"], h["neuron"], h["case"], h["token"], h["hits"], h["examples"])
           for h in answer["hits"]}  # fmt: skip
    assert got and got == brute_force_search(atlas, corpus, tokens)
    ranked = [(h["hits"], h["hits"] / h["examples"]) for h in answer["hits"]]
    assert ranked == sorted(ranked, reverse=True)
    one_case = client.get("/api/atlas/atlas/search", params={"token": "a", "case": "gate-_in-"})
    assert {h["case"] for h in one_case.json()["hits"]} == {"gate-_in-"}
    by_id = client.get("/api/atlas/atlas/search", params={"token": f"#{min(tokens)}"}).json()
    assert [t["token"] for t in by_id["tokens"]] == [min(tokens)]


def test_the_token_index_is_built_once_and_read_from_the_cache(hostile, client, monkeypatch):
    from gatescope.serve.search import TokenIndex

    _, root = hostile
    client.get("/api/atlas/atlas/search", params={"token": "a"})  # built and cached
    assert list((root / "atlas" / CACHE_DIR).glob("*/token-index.safetensors"))

    def no_build(*_):
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(TokenIndex, "build", no_build)
    again = TestClient(create_app(Catalog.open([root / "atlas"])))
    assert again.get("/api/atlas/atlas/search", params={"token": "a"}).json()["hits"]


def test_the_search_page_escapes_tokens_and_links_neurons(client):
    page = client.get("/atlas/atlas/search", params={"token": "<"}).text
    assert "<code>&lt;</code>" in page and "<script>alert" not in page
    assert re.search(r'<a href="neuron/\d+\.\d+">', page)
    unknown = client.get("/atlas/atlas/search", params={"token": "no such token"}).text
    assert "no token of the vocabulary reads as" in unknown


@pytest.mark.parametrize(
    ("params", "status", "says"),
    [
        ({"token": "#999999"}, 400, "there is no token #999999"),
        ({"token": "a", "case": "gate"}, 400, "no case 'gate'"),
        ({"token": " "}, 400, "name a token"),
        ({"token": "x" * 300}, 422, "token"),
        ({}, 422, "token"),
    ],
)
def test_a_bad_search_gets_a_sentence(client, params, status, says):
    answer = client.get("/api/atlas/atlas/search", params=params)
    assert answer.status_code == status and says in answer.json()["detail"]


def test_tokens_at_refuses_positions_outside_the_corpus(hostile):
    from gatescope.corpus import TokenizedCorpus

    _, root = hostile
    corpus = TokenizedCorpus.open(root / "corpus")
    first = corpus.dataset[0]["input_ids"]
    got = corpus.tokens_at(np.array([0, 0, 1]), np.array([0, len(first) - 1, 2]))
    assert got.tolist() == [first[0], first[-1], corpus.dataset[1]["input_ids"][2]]
    with pytest.raises(GatescopeError, match="tokens the corpus does not have"):
        corpus.tokens_at(np.array([0]), np.array([len(first)]))


# ------------------------------------------------------------------------------ probe


def hooked_quantities(model, layer: int, ids: list[int]) -> np.ndarray:
    """[quantity, pos, neuron] of a Llama-layout layer from forward hooks on its own
    projections: the brute force of the probe."""
    mlp = model.model.layers[layer].mlp
    seen = {}
    handles = [
        mlp.gate_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("g", out)),
        mlp.up_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("u", out)),
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    g, u = seen["g"][0].double(), seen["u"][0].double()
    act = torch.nn.functional.silu(g)
    return torch.stack([g, u, act, act * u]).numpy()


def test_the_probe_reads_the_layer_as_the_models_own_projections(hostile):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, root = hostile
    catalog = Catalog.open([root / "atlas"])
    text = "once <b>upon</b> a time"
    found = catalog.get("atlas").probe(text, 1, 3)
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert list(found.input_ids) == [tokenizer.bos_token_id, *ids]
    assert "".join(found.tokens[1:]) == text
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    expected = hooked_quantities(model, 1, list(found.input_ids))  # [q, pos, neuron]
    np.testing.assert_allclose(found.values, expected[:, :, 3], rtol=1e-5, atol=1e-6)
    post = expected[3, found.position]
    assert found.position == int(np.argmax(np.abs(expected[3, :, 3])))
    g, u = expected[0, found.position], expected[1, found.position]
    for c, case in enumerate(CASES):
        members = [n for n in range(len(g)) if (2 * (g[n] < 0) + (u[n] < 0)) == c]
        members.sort(key=lambda n: -abs(post[n]))
        assert [t.neuron for t in found.top[case]] == members[:10]


def test_the_probe_page_colors_tokens_and_keeps_hostile_text_inert(client):
    attack = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    page = client.post("/atlas/atlas/probe", data={"text": attack, "layer": "1", "neuron": "3"})
    assert page.status_code == 200 and 'id="probe-tokens"' in page.text
    assert "<script>alert" not in page.text and "<img" not in page.text
    data = json.loads(re.search(r'id="page-data">(.*?)</script>', page.text, re.S)[1])
    assert "".join(data["texts"]["probe"]["tokens"][1:]) == attack  # shown as text nodes
    assert re.search(r'<a href="neuron/1\.\d+">', page.text)
    form = client.get("/atlas/atlas/probe", params={"layer": 1, "neuron": 3}).text
    assert 'name="neuron" min="0" max="63" value="3"' in form


def test_a_probe_beyond_the_context_is_cut_with_a_note(client):
    long = "ab " * 200  # 600 characters, one token each, beyond the 128 positions
    answer = client.post("/api/atlas/atlas/probe", json={"text": long, "layer": 0, "neuron": 1})
    data = answer.json()
    assert data["truncated"] and data["limit"] == 128 and len(data["tokens"]) == 128
    assert data["given_tokens"] == 601
    page = client.post("/atlas/atlas/probe", data={"text": long, "layer": "0", "neuron": "1"})
    assert "cut to its first 128 tokens" in page.text and "it has 601." in page.text


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"text": "x" * 1_000_000, "layer": 0, "neuron": 0}, 422, "at most 100000 characters"),
        ({"text": "ab", "layer": 0, "neuron": 0, "position": 9}, 400, "tokens 0-2, not 9"),
        ({"text": "ab", "layer": 5, "neuron": 0}, 404, "layer 5 is out of range"),
        ({"text": "ab", "layer": 0, "neuron": 64}, 404, "neuron 64 is out of range"),
        ({"text": "ab", "layer": -1, "neuron": 0}, 422, "layer"),
        ({"text": "   ", "layer": 0, "neuron": 0}, 400, "type a text"),
        ({"layer": 0, "neuron": 0}, 422, "text"),
    ],
)
def test_a_bad_probe_gets_a_sentence(client, body, status, says):
    answer = client.post("/api/atlas/atlas/probe", json=body)
    assert answer.status_code == status and says in answer.json()["detail"]
    assert client.get("/api/atlases").status_code == 200


@pytest.mark.parametrize("position", ["²", "-1", "two", "9"])
def test_a_bad_token_position_in_the_probe_form_gets_a_sentence(client, position):
    form = {"text": "ab", "layer": "0", "neuron": "0", "position": position}
    answer = client.post("/atlas/atlas/probe", data=form)
    assert answer.status_code == 400 and "<h1>" in answer.text and "Traceback" not in answer.text


def test_a_megabyte_probe_form_is_refused(client):
    form = {"text": "x" * 1_000_000, "layer": "0", "neuron": "0"}
    answer = client.post("/atlas/atlas/probe", data=form)
    assert answer.status_code == 422 and "at most 100000 characters" in answer.text


# ------------------------------------------------------------------------------ the fixture


def test_the_fixture_models_neuron_page_is_served(stories260k, tinystories, tmp_path):
    from gatescope.corpus import build_corpus, save_corpus

    corpus = build_corpus(tinystories, stories260k, max_length=128, tokens=4_000, seed=2)
    save_corpus(corpus, tmp_path / "corpus")
    atlas = gatescope.scan(stories260k, tmp_path / "corpus", out=tmp_path / "atlas", k=4,
                           progress=False)  # fmt: skip
    client = TestClient(create_app(Catalog.open([tmp_path / "atlas"])))
    layer, neuron = 2, int(atlas.layer(2).count[CASES.index("gate-_in-")].argmax())
    data = client.get(f"/api/atlas/atlas/neuron/{layer}.{neuron}").json()
    summary = atlas.neuron(layer, neuron)
    case = data["cases"][CASES.index("gate-_in-")]
    assert case["freq"] == pytest.approx(summary.freq["gate-_in-"])
    assert case["stats"]["hook_post"]["max"] == pytest.approx(
        summary.max["gate-_in-"]["hook_post"], rel=1e-4
    )
    # The recomputed tokens carry the stored values of the strongest example.
    best = summary.top["gate-_in-"]["hook_post"][0]
    values = data["data"]["texts"][str(best.text)]["values"][QUANTITIES.index("hook_post")]
    assert values[best.position] == pytest.approx(best.value, rel=1e-3, abs=1e-6)
    rows = client.get("/api/atlas/atlas/neurons", params={"filter": f"layer = {layer}",
                                                          "size": 500}).json()  # fmt: skip
    assert rows["total"] == atlas.d_mlp
    weights = client.get(f"/api/atlas/atlas/neuron/{layer}.{neuron}/weights").json()
    assert len(weights["lens"]["projections"]) == 5 and weights["related"]["reads_out_via_gate"]
    layers = client.get("/atlas/atlas/layers?layer=4")
    assert layers.status_code == 200 and "Pearson r = <b>" in layers.text
    text = "Once upon a time, there was a little girl named Lily."
    probe = client.post("/api/atlas/atlas/probe", json={"text": text, "layer": layer,
                                                         "neuron": neuron}).json()  # fmt: skip
    assert "".join(probe["tokens"][1:]).strip() == text and not probe["truncated"]
    assert len(probe["values"]["hook_post"]) == len(probe["tokens"])
