"""Mixture-of-experts atlases beyond the scan: recomputed expert neurons with their tokens'
router weights, --refactor-glu per expert neuron, and neurons addressed layer.expert.neuron;
each against a brute force from the raw 3-D weights and the router's own choice."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

import gatescope
from gatescope.arch import ExpertLayer, find_expert_layers
from gatescope.corpus import TokenizedCorpus
from gatescope.errors import GatescopeError
from gatescope.loading import load_model
from gatescope.recompute import recompute
from tests.models import tiny_model, tiny_moe_model
from tests.test_moe_scan import per_text_moe_activations
from tests.test_recompute import assert_recomputed_equals_atlas
from tests.test_scan import assert_atlas_matches, random_corpus

K = 4


def router_weights(model, corpus, layer: int) -> list[np.ndarray]:
    """Per text [tokens, experts] the router's weight of each expert (NaN: not chosen), as
    the MoE block hands it to its experts, each text run alone."""
    experts = find_expert_layers(model)[layer]
    assert isinstance(experts, ExpertLayer)
    seen: list[tuple] = []
    handle = experts.routed.module.register_forward_pre_hook(lambda _m, a: seen.append(a))
    found = []
    try:
        for ids in corpus["input_ids"]:
            seen.clear()
            with torch.no_grad():
                model(torch.tensor([ids]))
            _hidden, index, weight = seen[0]
            table = np.full((len(ids), experts.routed.n_experts), np.nan)
            for slot in range(index.shape[1]):
                table[np.arange(len(ids)), index[:, slot].numpy()] = weight[:, slot].numpy()
            found.append(table)
    finally:
        handle.remove()
    return found


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss"])
def test_recomputed_expert_neurons_carry_their_tokens_router_weights(family):
    model = tiny_moe_model(family, num_layers=2).double()
    corpus = random_corpus(n_texts=7)
    atlas = gatescope.scan(model, corpus, batch_size=3, k=K, progress=False)
    record = atlas.meta.experts
    assert record is not None
    loaded, texts = load_model(model), TokenizedCorpus.open(corpus)
    neurons = [0, record.d_ff + 5, 3 * record.d_ff + 31]  # experts 0, 1, 3
    if record.shared:
        neurons.append(record.n_experts * record.d_ff + 2)
    # The atlas's top examples recompute to their stored values (routers weigh in float32).
    assert assert_recomputed_equals_atlas(atlas, loaded, texts, 1, neurons, rtol=1e-4) > 20
    expected, _, _ = per_text_moe_activations(model, corpus, atlas.d_mlp)
    weights = router_weights(model, corpus, 1)
    acts = recompute(loaded, texts, 1, neurons, list(range(7)), batch_size=3)
    skipped = 0
    for text, values in acts.items():
        brute = expected[1][text][1]  # quantity -> [pos (BOS left out), neuron]
        for i, neuron in enumerate(neurons):
            for q, quantity in enumerate(("hook_pre", "hook_pre_linear", "swish", "hook_post")):
                np.testing.assert_allclose(values.values[i, q, 1:], brute[quantity][:, neuron],
                                           rtol=1e-4, atol=1e-6)  # fmt: skip
            assert values.router_weight is not None
            expert, _ = record.address(1, neuron) or (None, None)
            want = weights[text][:, expert] if isinstance(expert, int) else math.nan
            np.testing.assert_allclose(values.router_weight[i], np.broadcast_to(
                want, values.router_weight[i].shape), rtol=1e-6)  # fmt: skip
            if isinstance(expert, int):  # tokens not routed to the expert: values 0
                unrouted = np.isnan(values.router_weight[i])
                assert not values.values[i][:, unrouted].any()
                skipped += int(unrouted.sum())
    assert skipped > 0


def test_a_dense_layer_of_an_moe_model_recomputes_without_router_weights():
    model = tiny_moe_model("deepseek_v2", num_layers=2)  # layer 0 is a dense MLP
    acts = recompute(load_model(model), TokenizedCorpus.open(random_corpus(n_texts=3)), 0,
                     [0, 63], [0, 1, 2])  # fmt: skip
    assert all(a.router_weight is None and a.values.shape[0] == 2 for a in acts.values())


def flipped_neurons(model) -> int:
    """Neurons with cos(w_gate, w_in) < 0, counted from the raw parameters: every routed
    expert's rows of gate_up_proj, and the dense and shared MLPs' gate and up weights."""
    count = 0
    for name, parameter in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):  # [expert, 2 x d_ff, d_model]
            gate, up = parameter.detach().chunk(2, dim=1)
            count += int((torch.cosine_similarity(gate, up, dim=-1) < 0).sum())
        elif name.endswith("gate_proj.weight"):
            up = dict(model.named_parameters())[name.replace("gate_proj", "up_proj")]
            count += int((torch.cosine_similarity(parameter, up, dim=-1) < 0).sum())
    return count


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "olmoe"])
def test_refactor_glu_flips_every_expert_neuron_and_restores_the_weights(family):
    """Per expert neuron (and shared and dense ones): the scan's statistics are the brute
    force's on the flipped weights, the model computes the same function with them, and the
    weights come back bit for bit."""
    from gatescope.arch import refactored_glu

    model = tiny_moe_model(family, num_layers=2).double()
    corpus = random_corpus(n_texts=6)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.tensor([corpus["input_ids"][0]])
    with torch.no_grad():
        logits = model(ids).logits
    expected_flips = flipped_neurons(model)
    atlas = gatescope.scan(model, corpus, batch_size=3, k=K, refactor_glu=True, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert atlas.meta.options.refactored_neurons == expected_flips > 0
    with refactored_glu(find_expert_layers(model)) as flipped:
        assert flipped == expected_flips and flipped_neurons(model) == 0
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, logits, rtol=1e-10, atol=1e-12)
        texts, _, _ = per_text_moe_activations(model, corpus, atlas.d_mlp)
    assert_atlas_matches(atlas, texts, K, rtol=1e-4, atol=1e-6)  # as test_moe_scan
    loaded = load_model(model)  # pages recompute with the same flips
    assert assert_recomputed_equals_atlas(atlas, loaded, TokenizedCorpus.open(corpus), 1,
                                          [0, 40, 127], rtol=1e-4) > 10  # fmt: skip


def test_refactor_glu_refuses_gpt_oss_experts_in_one_sentence():
    model = tiny_moe_model("gpt_oss", num_layers=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(GatescopeError, match=r"clamp\(up\) \+ 1.*cannot refactor"):
        gatescope.scan(model, random_corpus(n_texts=3), k=K, refactor_glu=True, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_neurons_are_found_by_layer_expert_neuron():
    model = tiny_moe_model("deepseek_v3", num_layers=2)  # dense layer 0, 4 x 32 + 32 shared
    atlas = gatescope.scan(model, random_corpus(n_texts=3), k=K, progress=False)
    assert atlas.find_neuron("1.2.5") == (1, 69) and atlas.neuron_name(1, 69) == "1.2.5"
    assert atlas.find_neuron("1.shared.4") == (1, 132) and atlas.neuron_name(1, 132) == "1.shared.4"
    assert atlas.find_neuron("0.dense.63") == (0, 63) == atlas.find_neuron("0.63")
    assert atlas.neuron_name(0, 63) == "0.dense.63" and atlas.find_neuron(" 1.69 ") == (1, 69)
    for name, message in (
        ("1.4.0", "layer 1 has no neuron 4.0"), ("1.shared.32", "has no neuron shared.32"),
        ("0.0.1", "layer 0 has no neuron 0.1"), ("2.0.1", "layer 2 is out of range"),
        ("0.100", "layer 0 has neurons 0-63; 100 is only padding"),
        ("1.x.3", "EXPERT.NEURON, e.g. 3.5.17"), ("1", "3.shared.4"),
        ("1.2." + "9" * 5000, "is not a neuron"), ("1.2.\u0665", "is not a neuron"),
    ):  # fmt: skip
        with pytest.raises(GatescopeError, match=message):
            atlas.find_neuron(name)
    summary = atlas.neuron(1, 69)
    routing = summary.routing
    assert routing is not None and (routing.expert, routing.neuron) == (2, 5) and routing.routed
    routed = int(atlas.tensor("routed")[1, 2])
    assert routing.seen == routed and routing.share == pytest.approx(routed / atlas.tokens)
    assert routing.router_weight_mean == pytest.approx(
        float(atlas.tensor("router_weight")[1, 2]) / routed
    )
    for case in routing.freq:
        assert routing.freq[case] * routed == pytest.approx(summary.freq[case] * atlas.tokens)
    shared = atlas.neuron(1, 132).routing
    assert shared is not None and shared.expert == "shared" and not shared.routed
    assert shared.seen == atlas.tokens and math.isnan(shared.router_weight_mean)
    dense = gatescope.scan(tiny_model("llama"), random_corpus(n_texts=2), k=K, progress=False)
    assert dense.neuron(0, 3).routing is None and dense.find_neuron("0.3") == (0, 3)
    with pytest.raises(GatescopeError, match=r"write LAYER\.NEURON, e\.g\. 31\.9634"):
        dense.find_neuron("0.1.3")


def moe_site_folders(root, family: str, texts: list[str] | None = None, **model_args):
    """A saved tiny MoE model of ``family`` (``model_args`` for :func:`tiny_moe_model`) with a
    character tokenizer, a corpus of ``texts`` (default: texts with HTML in them), and its
    atlas scanned through the CLI; returns the model, the corpus and the folders."""
    import datasets
    from click.testing import CliRunner

    from gatescope.cli import cli
    from gatescope.corpus import save_corpus
    from gatescope.records import CorpusRecipe
    from tests.tokenizers import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(root / "model")
    model = tiny_moe_model(family, num_layers=2, **model_args)
    model.save_pretrained(root / "model")
    texts = texts or [f"text {i}: the <b>quick</b> fox & {'ab' * i}" for i in range(8)]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    sources = [str(i) for i in range(len(texts))]
    corpus = datasets.Dataset.from_dict({"input_ids": ids, "source_id": sources})
    save_corpus(corpus, root / "corpus", recipe=CorpusRecipe(tokenizer=str(root / "model")))
    folders = {name: str(root / name) for name in ("model", "corpus", "atlas")}
    args = ["--model", folders["model"], "--corpus", folders["corpus"], "--out", folders["atlas"]]
    scan = CliRunner().invoke(cli, ["scan", *args, "--k", "4"])
    assert scan.exit_code == 0, scan.output
    return model, corpus, folders


def test_an_expert_neurons_page_shows_its_routing_and_each_tokens_router_weight(tmp_path):
    """`gatescope page --neurons 1.2.5 1.shared.3`: the expert's routing, frequencies among its
    tokens and among all, every example's router weight (that of the router's own choice),
    its unrouted tokens marked; a shared neuron has none of the expert's."""
    from click.testing import CliRunner

    from gatescope.atlas import Atlas
    from gatescope.cli import cli
    from gatescope.pages import page_file
    from tests.test_pages import page_data, shown_examples

    model, corpus, folders = moe_site_folders(tmp_path, "qwen2_moe")  # routed and shared
    run = CliRunner().invoke
    site = tmp_path / "site"
    result = run(cli, ["page", folders["atlas"], "--neurons", "1.2.5", "1.shared.3",
                       "--out", str(site)])  # fmt: skip
    assert result.exit_code == 0, result.output
    atlas = Atlas.load(folders["atlas"])
    weights = router_weights(model, corpus, 1)  # per text [token, expert]
    expert_page = site / page_file(folders["model"], 1, 2 * 32 + 5)
    html = expert_page.read_text()
    assert "<h1>Neuron 1.2.5</h1>" in html and "expert 2 · neuron 5" in html
    assert "frequency among the expert's tokens" in html and "among all tokens" in html
    routed = int(atlas.tensor("routed")[1, 2])
    assert f"was routed {routed:,} of the counted tokens" in html
    data = page_data(expert_page)
    shown = shown_examples(expert_page)
    assert shown
    stated = [float(w) for w in re.findall(r"· router weight ([0-9.e-]+)", html)]
    assert len(stated) >= len(shown)  # every top example (and typical one) states its weight
    for text, position, _value in shown:
        want = weights[text][position, 2]
        assert not math.isnan(want)  # an expert neuron's examples are tokens routed to it
        assert data["texts"][str(text)]["weights"][position] == pytest.approx(want, rel=1e-3)
    for key, text in data["texts"].items():  # null exactly where the expert did not get it
        got = np.array([np.nan if w is None else w for w in text["weights"]])
        computed = len(text["values"][0])
        np.testing.assert_allclose(got[:computed], weights[int(key)][:computed, 2], rtol=1e-3)
    shared_page = site / page_file(folders["model"], 1, 4 * 32 + 3)
    html = shared_page.read_text()
    assert "<h1>Neuron 1.shared.3</h1>" in html and "· router weight" not in html
    assert "computes every token" in html
    assert all("weights" not in t for t in page_data(shared_page)["texts"].values())
    index = (site / "index.html").read_text()
    assert ">1.2.5</a>" in index and ">1.shared.3</a>" in index and 'data-label="2.5"' in index
    listed = {p["name"]: p["neuron"] for p in json.loads((site / "site.json").read_text())["pages"]}
    assert listed == {"1.2.5": 69, "1.shared.3": 131}
    bad = run(cli, ["page", folders["atlas"], "-n", "1.4.0", "--out", str(site)])
    assert bad.exit_code == 1 and "layer 1 has no neuron 4.0" in bad.output
    assert "Traceback" not in bad.output


def test_the_server_serves_an_moe_atlas_by_layer_expert_neuron(tmp_path):
    """The table has a row per expert neuron (no padding rows), its expert, routing and
    frequencies among its tokens, filters by expert (``shared``, ``dense`` by name); pages,
    probe and search address neurons layer.expert.neuron; what needs dense weights says so."""
    from fastapi.testclient import TestClient

    from gatescope.serve.app import create_app
    from gatescope.serve.catalog import Catalog

    _, _, folders = moe_site_folders(tmp_path, "deepseek_v3")  # dense layer 0, 4 x 32 + 32
    client = TestClient(create_app(Catalog.open([folders["atlas"]])))
    atlas = Catalog.open([folders["atlas"]]).get("atlas")
    assert atlas is not None
    record = atlas.atlas.meta.experts
    assert record is not None and record.dense_layers == (0,)

    def rows(filter_: str) -> dict:
        answer = client.get("/api/atlas/atlas/neurons", params={"filter": filter_, "size": 500})
        assert answer.status_code == 200, answer.text
        return answer.json()

    whole = rows("")
    assert whole["total"] == 64 + 4 * 32 + 32  # layer 0's padding (64-159) has no rows
    keys = [c["key"] for c in whole["columns"]]
    assert {"expert", "routing:share", "routing:weight", "routed:gate-_in-"} <= set(keys)
    assert whole["names"][:2] == ["0.dense.0", "0.dense.1"] and whole["names"][64] == "1.0.0"
    assert whole["names"][-1] == "1.shared.31"
    column = {key: [row[i] for row in whole["rows"]] for i, key in enumerate(keys)}
    routed = atlas.atlas.tensor("routed")[1]
    for i in (64, 64 + 33, 64 + 127):
        expert = (i - 64) // 32
        assert column["expert"][i] == expert
        assert column["routing:share"][i] == pytest.approx(int(routed[expert]) / atlas.atlas.tokens)
        count = atlas.atlas.tensor("count")[1, 3, i - 64]
        assert column["routed:gate-_in-"][i] == pytest.approx(int(count) / int(routed[expert]))
    assert rows("expert = shared")["total"] == 32 and rows("expert = dense")["total"] == 64
    assert rows("expert = 2 and layer = 1")["names"][0] == "1.2.0"
    assert rows("expert 0-1")["total"] == 64
    bad = client.get("/api/atlas/atlas/neurons", params={"filter": "expert = banana"})
    assert bad.status_code == 400 and "named values: shared or dense" in bad.json()["detail"]

    page = client.get("/atlas/atlas/neuron/1.2.5")
    assert page.status_code == 200 and "<h1>Neuron 1.2.5</h1>" in page.text
    assert "· router weight" in page.text and "No weight lens" not in page.text
    assert {"cos:gate_in", "cos:in_out"} <= set(keys)  # the experts' weights, from the model
    lens = client.get("/api/atlas/atlas/neuron/1.2.5/weights").json()
    related = lens["related"]["writes_gate"][0]
    assert related["name"] == atlas.atlas.neuron_name(related["layer"], related["neuron"])
    assert f'href="{related["name"]}"' in page.text
    assert 'href="1.2.4"' in page.text and 'href="1.2.6"' in page.text
    assert client.get("/atlas/atlas/neuron/1.69").text == page.text  # the layer's index
    shared = client.get("/api/atlas/atlas/neuron/1.shared.3")
    assert shared.status_code == 200 and shared.json()["name"] == "1.shared.3"
    assert client.get("/atlas/atlas/neuron/0.63").status_code == 200
    for spec, says in (("0.100", "only padding"), ("1.4.0", "layer 1 has no neuron 4.0")):
        answer = client.get(f"/api/atlas/atlas/neuron/{spec}")
        assert answer.status_code == 404 and says in answer.json()["detail"]
    probe = client.post("/atlas/atlas/probe", data={"text": "the quick fox", "layer": 1,
                                                    "neuron": 69, "position": ""})  # fmt: skip
    assert probe.status_code == 200 and 'href="neuron/1.2.5"' in probe.text
    assert client.get("/atlas/atlas/search", params={"token": "q"}).status_code == 200
    layers = client.get("/api/atlas/atlas/layer/1/correlation").json()
    assert layers["neurons"] == 4 * 32 + 32 and layers["r"] is not None
    # P(x_gate > 0) among the tokens each neuron computes: its expert's, for an expert's.
    gate_positive = column["routed:gate+_in+"][64 + 69] + column["routed:gate+_in-"][64 + 69]
    assert layers["gate_positive"][69] == pytest.approx(gate_positive)
    frequencies = client.get("/api/atlas/atlas/frequencies").json()["cases"]["gate-_in-"]
    routed_freq = np.array(column["routed:gate-_in-"][64:], dtype=float)  # layer 1
    assert frequencies[1][2] == pytest.approx(float(np.nanmedian(routed_freq)))
    assert "among the tokens routed to its expert" in client.get("/atlas/atlas/layers").text


def raw_expert_weights(layer: ExpertLayer, expert: int):
    """w_gate, w_in [d_ff, d_model] and w_out [d_model, d_ff] of one expert, straight from
    the raw 3-D parameters (gpt-oss: transposed, gate and up interleaved)."""
    module = layer.routed.module
    gate_up, down = module.gate_up_proj[expert].detach(), module.down_proj[expert].detach()
    if layer.routed.transposed:
        return gate_up[:, 0::2].T, gate_up[:, 1::2].T, down.T
    d_ff = layer.routed.d_ff
    return gate_up[:d_ff], gate_up[d_ff:], down


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe"])
def test_an_moe_models_weights_are_its_experts_neurons_in_the_atlas_order(family):
    from gatescope.weights import ModelWeights

    model = tiny_moe_model(family, num_layers=2)
    weights = ModelWeights.of_model(model)
    layers = find_expert_layers(model)
    width = max(layer.d_mlp for layer in layers)
    assert (weights.num_layers, weights.d_mlp) == (2, width)
    for index, layer in enumerate(layers):
        found = weights.layer(index)
        if not isinstance(layer, ExpertLayer):  # DeepSeek's dense first layer, zero-padded
            torch.testing.assert_close(found.w_gate[: layer.d_mlp], layer.w_gate())
            assert not found.w_gate[layer.d_mlp :].any() and not found.w_out[:, layer.d_mlp :].any()
            continue
        d_ff = layer.routed.d_ff
        for expert in range(layer.routed.n_experts):
            columns = slice(expert * d_ff, (expert + 1) * d_ff)
            w_gate, w_in, w_out = raw_expert_weights(layer, expert)
            torch.testing.assert_close(found.w_gate[columns], w_gate)
            torch.testing.assert_close(found.w_in[columns], w_in)
            torch.testing.assert_close(found.w_out[:, columns], w_out)
        if layer.shared is not None:
            start = layer.routed.n_experts * d_ff
            torch.testing.assert_close(found.w_in[start : start + layer.shared.d_mlp],
                                       layer.shared.w_in())  # fmt: skip
    figures = weights.figures()
    assert figures.shape == (2, width)
    w_gate, w_in, _ = raw_expert_weights(layers[1], 3)  # expert 3, neuron 7
    cos = torch.cosine_similarity(w_gate[7], w_in[7], dim=0)
    assert figures.cos_gate_in[1, 3 * layers[1].routed.d_ff + 7] == pytest.approx(float(cos))


def test_a_page_of_an_expert_the_router_never_chose_says_so(tmp_path):
    """16 experts for a handful of tokens: some expert sees none; its page (static and
    served) shows no frequencies among its tokens rather than failing."""
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from gatescope.atlas import Atlas
    from gatescope.cli import cli
    from gatescope.serve.app import create_app
    from gatescope.serve.catalog import Catalog

    _, _, folders = moe_site_folders(tmp_path, "qwen3_moe", ["ab", "cd"], experts=16, d_ff=8)
    atlas = Atlas.load(folders["atlas"])
    never = [e for e in range(16) if int(atlas.tensor("routed")[1, e]) == 0]
    assert never
    name = f"1.{never[0]}.0"
    result = CliRunner().invoke(cli, ["page", folders["atlas"], "-n", name, "--out",
                                      str(tmp_path / "site")])  # fmt: skip
    assert result.exit_code == 0, result.output
    client = TestClient(create_app(Catalog.open([folders["atlas"]])))
    page = client.get(f"/atlas/atlas/neuron/{name}")
    assert page.status_code == 200 and "was routed 0 of the counted tokens" in page.text
    assert "no tokens" in page.text and "nan" not in page.text.lower().split("<script")[0]


def test_top_neurons_of_a_layer_leave_its_padding_out():
    from gatescope.pages import top_neurons

    model = tiny_moe_model("deepseek_v3", num_layers=2)  # dense layer 0: 64 of 160 neurons
    atlas = gatescope.scan(model, random_corpus(n_texts=4), k=K, progress=False)
    for by in ("strongest", "gate-_in-"):
        found = top_neurons(atlas, 0, 100, by)
        assert len(found) == 64 and max(found) == 63


def test_an_moe_models_weights_are_copied_under_the_given_lock():
    """A recomputation flips a model's weights in place under the server's lock: the weights
    are copied out under it too."""
    import threading

    from gatescope.weights import ModelWeights

    lock = threading.Lock()
    model = tiny_moe_model("olmoe", num_layers=2)
    weights = ModelWeights.of_model(model, lock=lock)
    lock.acquire()
    reader = threading.Thread(target=weights.layer, args=(1,))
    reader.start()
    reader.join(timeout=0.5)
    assert reader.is_alive()  # waits for the lock
    lock.release()
    reader.join(timeout=10)
    assert not reader.is_alive()
    with pytest.raises(GatescopeError, match=r"clamp\(up\) \+ 1"):
        ModelWeights.of_model(tiny_moe_model("gpt_oss", num_layers=2), refactor_glu=True)
