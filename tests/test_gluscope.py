"""GLUScope interop on the fixture model: its data made as its own script makes it (first
token counted, refactored weights, zero-padded lists, no positions, no token count), read
back faithfully, pages found by recomputation, our data written in its exact schema."""

from __future__ import annotations

import re

import datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gatescope.atlas import Atlas
from gatescope.cli import cli
from gatescope.corpus import TokenizedCorpus, build_corpus, load_corpus
from tests.reference import CASES, QUANTITIES, ranked, reference_stats
from tests.test_scan import per_text_activations

K = 16
# GLUScope's column order, written out from its code (summary_dict_to_hf_dataset.py builds
# columns in the order of its summary dict: per case freq, then per quantity max, mean).
ORDER = ("hook_post", "hook_pre_linear", "hook_pre", "swish")
SCHEMA = [("layer", "int64"), ("neuron", "int64")]
for _case in CASES:
    SCHEMA.append((f"{_case}_freq", "float32"))
    for _q in ORDER:
        if ranked(_case, _q):
            SCHEMA += [(f"{_case}_{_q}_max_values", "list<float32>"),
                       (f"{_case}_{_q}_max_indices", "list<int64>")]  # fmt: skip
        SCHEMA.append((f"{_case}_{_q}_mean", "float32"))


def invoke(*args: object):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def imported(source, out, corpus, model, *flags: str) -> Atlas:
    """`gatescope import SOURCE OUT --corpus CORPUS --model MODEL [flags]`, as a user would."""
    result = invoke("import", source, out, "--corpus", corpus, "--model", model, *flags)
    assert result.exit_code == 0, result.output
    return Atlas.load(out)


def negative(case: str, quantity: str) -> bool:
    """GLUScope's sign of a list: hook_post negative where exactly one factor is."""
    gate, in_ = case.startswith("gate-"), case.endswith("in-")
    return {"hook_pre": gate, "hook_pre_linear": in_, "swish": gate, "hook_post": gate != in_}[
        quantity
    ]


def gluscope_data(per_layer, n_texts: int):
    """What GLUScope's script computes, from the brute force: the columns of its dataset,
    and its summary dict."""
    refs = [reference_stats(texts, K) for texts in per_layer]
    layers, d = len(refs), len(refs[0].count[CASES[0]])
    columns = {
        "layer": np.repeat(np.arange(layers), d).astype(np.int64),
        "neuron": np.tile(np.arange(d), layers).astype(np.int64),
    }
    summary = {}
    for case in CASES:
        freq = np.stack([r.count[case] / r.tokens for r in refs]).astype(np.float32)  # [L, d]
        columns[f"{case}_freq"] = freq.reshape(-1)
        summary[case, "freq"] = torch.from_numpy(freq)
        for q in ORDER:
            if ranked(case, q):
                values = np.zeros((layers, d, K), dtype=np.float32)
                texts = np.zeros((layers, d, K), dtype=np.int64)
                for layer, ref in enumerate(refs):
                    for n, entries in enumerate(ref.top[case, q]):
                        listed = [t for _, t, _ in entries if t >= 0]
                        unused = (t for t in range(n_texts) if t not in listed)
                        for i, (value, text, _) in enumerate(entries):
                            if text >= 0:
                                values[layer, n, i], texts[layer, n, i] = value, text
                            else:  # every text is a candidate: zeros at other texts
                                values[layer, n, i] = -0.0 if negative(case, q) else 0.0
                                texts[layer, n, i] = next(unused)
                columns[f"{case}_{q}_max_values"] = values.reshape(layers * d, K)
                columns[f"{case}_{q}_max_indices"] = texts.reshape(layers * d, K)
                summary[case, q, "max"] = {
                    "values": torch.from_numpy(values).permute(2, 0, 1).contiguous(),
                    "indices": torch.from_numpy(texts).permute(2, 0, 1).contiguous(),
                }
            mean = np.stack([r.mean[case, q] for r in refs]).astype(np.float32)
            columns[f"{case}_{q}_mean"] = mean.reshape(-1)
            summary[case, q, "sum"] = torch.from_numpy(mean)  # GLUScope's "sum" is a mean
    features = datasets.Features({
        name: datasets.List(datasets.Value(kind[5:-1])) if kind.startswith("list")
        else datasets.Value(kind)
        for name, kind in SCHEMA
    })  # fmt: skip
    ordered = {name: columns[name] for name, _ in SCHEMA}
    return datasets.Dataset.from_dict(ordered, features=features), summary, refs


@pytest.fixture(scope="module")
def glu(stories260k, tinystories, tmp_path_factory):
    """A tokenized corpus like dolma-small (EOS-as-BOS first, right-padded with an
    attention mask), GLUScope's data of it with refactored weights, and the brute force."""
    from gatescope.arch import find_gated_mlps, refactored_glu
    from gatescope.loading import load_model

    root = tmp_path_factory.mktemp("gluscope")
    rows = build_corpus(tinystories, stories260k, max_length=48, tokens=2500, seed=1)["input_ids"]
    longest = max(len(r) for r in rows)
    padded = [r + [0] * (longest - len(r)) for r in rows]
    masks = [[1] * len(r) + [0] * (longest - len(r)) for r in rows]
    datasets.Dataset.from_dict({"input_ids": padded, "attention_mask": masks}).save_to_disk(
        root / "dolma-small"
    )
    model = load_model(stories260k, dtype="float64", device="cpu").model
    with refactored_glu(find_gated_mlps(model)):
        per_layer = per_text_activations(model, {"input_ids": rows}, include_bos=True)
    dataset, summary, refs = gluscope_data(per_layer, len(rows))
    dataset.save_to_disk(root / "activation_dataset")  # as summary_dict_to_hf_dataset.py
    torch.save(summary, root / "summary_refactored.pt")
    result = invoke("corpus", root / "dolma-small", "--tokenizer", stories260k,
                    "--out", root / "corpus")  # fmt: skip
    assert result.exit_code == 0, result.output
    return root, rows, refs


def test_a_tokenized_corpus_keeps_its_rows(glu):
    root, rows, _ = glu
    corpus = load_corpus(root / "corpus")
    assert corpus["input_ids"] == rows  # in order, padding stripped, no BOS added
    assert corpus["source_id"][3] == "dolma-small/train:3"


@pytest.mark.parametrize("source", ["activation_dataset", "summary_refactored.pt"])
def test_import_reads_gluscope_faithfully(glu, stories260k, source, tmp_path):
    root, rows, refs = glu
    atlas = imported(root / source, tmp_path / "atlas", root / "corpus", stories260k,
                     "--refactor-glu")  # fmt: skip
    assert atlas.meta.options.include_bos and atlas.meta.options.refactor_glu
    assert atlas.tokens == sum(len(r) for r in rows)  # every token, the first too
    assert atlas.meta.corpus.fingerprint == TokenizedCorpus.open(root / "corpus").fingerprint
    for layer, ref in enumerate(refs):
        count = atlas.tensor("count")[layer].numpy()
        for c, case in enumerate(CASES):
            np.testing.assert_array_equal(count[c], ref.count[case])
        for n in (0, 17, 101):
            summary = atlas.neuron(layer, n)
            for case in CASES:
                for q in QUANTITIES:
                    np.testing.assert_allclose(summary.mean[case][q], ref.mean[case, q][n],
                                               rtol=1e-6, equal_nan=True)  # fmt: skip
                    if not ranked(case, q):
                        continue
                    listed = [(v, t) for v, t, _ in ref.top[case, q][n] if t >= 0]
                    got = [(e.value, e.text) for e in summary.top[case][q]]
                    # No empty slot became an example; positions are unknown until pages.
                    assert [t for _, t in got] == [t for _, t in listed]
                    np.testing.assert_allclose([v for v, _ in got], [v for v, _ in listed],
                                               rtol=1e-6)  # fmt: skip
                    assert all(e.position == -1 for e in summary.top[case][q])


def test_pages_outline_the_strongest_token(glu, stories260k, tmp_path):
    root, _, refs = glu
    imported(root / "activation_dataset", tmp_path / "atlas", root / "corpus", stories260k,
             "--refactor-glu")  # fmt: skip
    result = invoke("page", tmp_path / "atlas", "--neurons", "2.17", "4.101",
                    "--out", tmp_path / "site")  # fmt: skip
    assert result.exit_code == 0, result.output
    for layer, neuron in [(2, 17), (4, 101)]:
        html = next((tmp_path / "site").glob(f"*-L{layer}-N{neuron}.html")).read_text()
        assert "first token counted" in html and "refactored GLU" in html
        shown = re.findall(r'data-text="(\d+)" data-position="(-?\d+)"', html)
        expected = {
            (text, position)
            for key in refs[layer].top
            for _, text, position in refs[layer].top[key][neuron]
            if text >= 0
        }
        assert shown and {(int(t), int(p)) for t, p in shown} <= expected


def test_a_corpus_in_another_order_is_refused(glu, stories260k, tmp_path):
    root, rows, _ = glu
    shuffled = datasets.Dataset.from_dict({"input_ids": rows[::-1]})
    shuffled.save_to_disk(tmp_path / "shuffled-rows")
    assert invoke("corpus", tmp_path / "shuffled-rows", "--tokenizer", stories260k,
                  "--out", tmp_path / "shuffled").exit_code == 0  # fmt: skip
    imported(root / "activation_dataset", tmp_path / "atlas", tmp_path / "shuffled", stories260k,
             "--refactor-glu")  # fmt: skip
    result = invoke("page", tmp_path / "atlas", "--neurons", "1.5", "--out", tmp_path / "site")
    assert result.exit_code == 1
    assert "do not recompute to their stored values" in result.output
    assert "the corpus, the model or the refactoring (--refactor-glu) does not match" in (
        result.output.replace("\n", " ")
    )
    # Unrefactored weights do not reproduce a neuron that refactoring flips either.
    imported(root / "activation_dataset", tmp_path / "plain", root / "corpus", stories260k)
    flipped = f"1.{flipped_neuron(stories260k, layer=1)}"
    result = invoke("page", tmp_path / "plain", "--neurons", flipped, "--out", tmp_path / "site2")
    assert result.exit_code == 1 and "do not recompute" in result.output


def flipped_neuron(model_path, layer: int) -> int:
    """A neuron of ``layer`` whose gate and in weights point apart (refactoring flips it)."""
    from gatescope.arch import find_gated_mlps
    from gatescope.loading import load_model

    mlp = find_gated_mlps(load_model(model_path, device="cpu").model)[layer]
    cos = torch.nn.functional.cosine_similarity(mlp.w_gate(), mlp.w_in(), dim=1)
    return int(torch.nonzero(cos < 0)[0, 0])


def test_without_a_corpus_the_token_count_is_unknown(glu, tmp_path):
    root, _, _ = glu
    assert invoke("import", root / "activation_dataset", tmp_path / "atlas").exit_code == 0
    atlas = Atlas.load(tmp_path / "atlas")
    assert atlas.tokens is None and atlas.neuron(0, 0).count is None
    assert atlas.meta.options.include_bos and not atlas.meta.options.refactor_glu


def test_export_in_gluscope_schema_round_trips(glu, stories260k, tmp_path):
    root, _, _ = glu
    original = datasets.load_from_disk(str(root / "activation_dataset"))
    imported(root / "activation_dataset", tmp_path / "atlas", root / "corpus", stories260k,
             "--refactor-glu")  # fmt: skip
    result = invoke("export", tmp_path / "atlas", tmp_path / "export", "--format", "gluscope")
    assert result.exit_code == 0 and "note:" not in result.output
    exported = datasets.load_from_disk(str(tmp_path / "export"))
    # Exactly GLUScope's columns, order and dtypes: the schema of its own dataset.
    assert exported.column_names == [name for name, _ in SCHEMA]
    assert exported.features == original.features
    assert exported.data.table.schema.equals(original.data.table.schema, check_metadata=False)
    for name in exported.column_names:  # values, padding, NaN means: all the same
        got = exported.data.table.column(name).combine_chunks()
        want = original.data.table.column(name).combine_chunks()
        if name.endswith(("_values", "_indices")):
            got, want = got.flatten(), want.flatten()
        np.testing.assert_array_equal(got.to_numpy(), want.to_numpy(), err_msg=name)
    # And back: the same lists and frequencies.
    assert invoke("import", tmp_path / "export", tmp_path / "again").exit_code == 0
    again, atlas = Atlas.load(tmp_path / "again"), Atlas.load(tmp_path / "atlas")
    for name in ("count", "top_value", "top_text"):
        assert torch.equal(again.tensor(name), atlas.tensor(name)), name
    assert again.tokens == atlas.tokens


def test_export_of_an_atlas_without_the_first_token_says_so(stories260k, tmp_path):
    import gatescope

    corpus = datasets.Dataset.from_dict({"input_ids": [[1, 5, 9, 12, 7], [1, 30, 2, 8]]})
    gatescope.scan(stories260k, corpus, out=tmp_path / "atlas", k=2, progress=False)
    result = invoke("export", tmp_path / "atlas", tmp_path / "export", "--format", "gluscope")
    assert result.exit_code == 0
    assert "frequencies leave each text's first token out" in result.output
    description = datasets.load_from_disk(str(tmp_path / "export")).info.description
    assert "leave each text's first token out" in description
