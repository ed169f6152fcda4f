"""gatescope.scan end to end: every statistic against the brute force, on every family."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

import gatescope
from gatescope.arch import find_gated_mlps
from gatescope.atlas import Atlas
from gatescope.constants import CASES, QUANTITIES, TOP_LISTS
from gatescope.errors import GatescopeError
from tests.models import FAMILIES, VARIANTS, tiny_model
from tests.reference import reference_stats

K = 4


def random_corpus(seed: int = 0, n_texts: int = 13, vocab: int = 128, bos: int = 1):
    """Texts of varied lengths (BOS first, a 1-token text among them) as a datasets.Dataset.

    Each text has its own first token: texts with equal prefixes would have equal values
    there, and such exact ties are broken by last-ulp noise that depends on batch shapes
    (the tie rule itself is tested in test_stats).
    """
    rng = np.random.default_rng(seed)
    lengths = [1, *rng.integers(2, 24, size=n_texts - 1)]
    firsts = rng.permutation(vocab)[:n_texts].tolist()
    rows = [
        [bos, first, *rng.integers(0, vocab, size=max(n - 2, 0)).tolist()][:n]
        for n, first in zip(lengths, firsts, strict=True)
    ]
    return datasets.Dataset.from_dict(
        {"input_ids": rows, "source_id": [str(i) for i in range(n_texts)]}
    )


def per_text_activations(model, corpus, *, include_bos: bool = False):
    """Brute force input: each text alone (no padding), per layer g, u, act(g), act(g) * u.

    The MLP input x is taken from a pre-hook and projected here, independently of the
    scan's hooks on the projections.
    """
    mlps = find_gated_mlps(model)
    texts_per_layer = [[] for _ in mlps]
    inputs = {}
    handles = [
        mlp.module.register_forward_pre_hook(
            lambda module, args, i=i: inputs.__setitem__(i, args[0].detach())
        )
        for i, mlp in enumerate(mlps)
    ]
    try:
        for text_index, ids in enumerate(corpus["input_ids"]):
            with torch.no_grad():
                model(torch.tensor([ids]))
            first = 0 if include_bos else 1
            positions = np.arange(first, len(ids))
            for i, mlp in enumerate(mlps):
                x = inputs[i][0, first:].double()
                g = x @ mlp.w_gate().double().T
                u = x @ mlp.w_in().double().T
                if mlp.b_gate() is not None:
                    g, u = g + mlp.b_gate().double(), u + mlp.b_in().double()
                a = mlp.act_fn(g)
                texts_per_layer[i].append(
                    (
                        text_index,
                        {
                            "hook_pre": g.numpy(),
                            "hook_pre_linear": u.numpy(),
                            "swish": a.numpy(),
                            "hook_post": (a * u).numpy(),
                            "position": positions,
                        },
                    )
                )
    finally:
        for handle in handles:
            handle.remove()
    return texts_per_layer


def assert_atlas_matches(
    atlas: Atlas, texts_per_layer, k: int, rtol: float = 1e-5, atol: float = 1e-7
) -> None:
    """Counts, positions and texts exactly; values to ``rtol`` (the ranked lists' near-zero
    ones to ``atol``).

    Not to float64 rounding even for float64 models: Hugging Face's RMSNorm computes in
    float32, so padding (a batch instead of one text) can move x by one float32 ulp.
    """
    for layer, texts in enumerate(texts_per_layer):
        texts = [t for t in texts if len(t[1]["position"])]
        seed = atlas.meta.options.seed or 0
        ref = reference_stats(texts, k, seed=seed, layer=layer, rtol=rtol, atol=1e-6)
        if atlas.has_distributions:
            assert_distributions_match(atlas, layer, ref, rtol)
        assert atlas.tokens == ref.tokens
        count = atlas.tensor("count")[layer].numpy()
        sums = atlas.tensor("sum")[layer].numpy()
        for c, case in enumerate(CASES):
            np.testing.assert_array_equal(count[c], ref.count[case])
            for q, quantity in enumerate(QUANTITIES):
                mean = np.where(count[c] > 0, sums[c, q] / np.maximum(count[c], 1), np.nan)
                np.testing.assert_allclose(mean, ref.mean[case, quantity], rtol=rtol, atol=1e-12)
                # The weakest values are near-zero dot products: their float32 noise is
                # absolute (about 1e-7), not relative.
                for extreme in ("max", "min"):
                    expected = getattr(ref, {"max": "maximum", "min": "minimum"}[extreme])
                    np.testing.assert_allclose(
                        atlas.tensor(extreme)[layer, c, q].numpy(),
                        expected[case, quantity], rtol=rtol, atol=1e-6, err_msg=extreme,
                    )  # fmt: skip
        value = atlas.tensor("top_value")[layer].numpy()  # [neuron, list, k]
        text = atlas.tensor("top_text")[layer].numpy()
        position = atlas.tensor("top_position")[layer].numpy()
        for lst, (c, q) in enumerate(TOP_LISTS):
            for n, entries in enumerate(ref.top[CASES[c], QUANTITIES[q]]):
                values, texts_, positions = zip(*entries, strict=True)
                np.testing.assert_array_equal(text[n, lst], texts_)
                np.testing.assert_array_equal(position[n, lst], positions)
                np.testing.assert_allclose(value[n, lst], values, rtol=rtol, atol=atol)


def assert_distributions_match(atlas: Atlas, layer: int, ref, rtol: float) -> None:
    """Histograms bin for bin but for the tokens within rounding of a bin's edge (the
    reference's slack); every token in one bin; typical examples exactly, values to rtol."""
    stats = atlas.layer(layer)
    assert stats.histogram is not None and stats.joint is not None
    assert stats.typical_text is not None and stats.typical_position is not None
    assert stats.typical_value is not None
    for c, case in enumerate(CASES):
        count = atlas.tensor("count")[layer, c].numpy()
        for q, quantity in enumerate(QUANTITIES):
            histogram = stats.histogram[:, c, q].numpy()  # [neuron, bin]
            assert (histogram.sum(axis=1) == count).all()
            off = np.abs(histogram - ref.histogram[case, quantity])
            assert (off <= ref.histogram_slack[case, quantity]).all(), (case, quantity)
        joint = stats.joint[:, c].numpy()
        assert (joint.sum(axis=(1, 2)) == count).all()
        assert (np.abs(joint - ref.joint[case]) <= ref.joint_slack[case]).all(), case
        for n, expected in enumerate(ref.typical[case]):
            texts, positions, values = zip(*expected, strict=True)
            np.testing.assert_array_equal(stats.typical_text[n, c].numpy(), texts)
            np.testing.assert_array_equal(stats.typical_position[n, c].numpy(), positions)
            np.testing.assert_allclose(
                stats.typical_value[n, c].T.numpy(), np.array(values), rtol=rtol, atol=1e-6
            )


@pytest.mark.parametrize("family", FAMILIES + VARIANTS)
def test_scan_matches_brute_force(family):
    model = tiny_model(family, dtype=torch.float64)
    corpus = random_corpus()
    atlas = gatescope.scan(model, corpus, batch_size=4, k=K, progress=False)
    assert atlas.num_layers == 2 and atlas.d_mlp == 64
    assert_atlas_matches(atlas, per_text_activations(model, corpus), K)


def test_the_scan_hands_the_models_own_activation_to_the_statistics(monkeypatch):
    """A float32 model's act(g), as its activation module computed it, reaches update."""
    from gatescope.stats import NeuronStats

    model = tiny_model("llama", dtype=torch.float32)
    computed, given = [], []
    for mlp in find_gated_mlps(model):
        mlp.act_fn.register_forward_hook(lambda _module, _inputs, out: computed.append(out))
    update = NeuronStats.update

    def spy(self, gate, up, text_index, valid, swish=None):
        given.append(swish)
        return update(self, gate, up, text_index, valid, swish)

    monkeypatch.setattr(NeuronStats, "update", spy)
    gatescope.scan(model, random_corpus(), batch_size=4, k=K, progress=False)
    assert given and all(any(swish is act for act in computed) for swish in given)


def test_batch_size_and_padding_do_not_change_the_result():
    model = tiny_model("llama", dtype=torch.float64)
    corpus = random_corpus(seed=1, n_texts=11)
    one = gatescope.scan(model, corpus, batch_size=1, k=K, progress=False)
    many = gatescope.scan(model, corpus, batch_size=5, k=K, progress=False)
    exact = ("count", "top_text", "top_position", "histogram", "joint", "typical_text",
             "typical_position")  # fmt: skip
    for name in exact:
        assert torch.equal(one.tensor(name), many.tensor(name)), name
    torch.testing.assert_close(one.tensor("sum"), many.tensor("sum"), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(one.tensor("top_value"), many.tensor("top_value"))


def test_include_bos_counts_every_token():
    model = tiny_model("qwen3", dtype=torch.float64)
    corpus = random_corpus(seed=2)
    atlas = gatescope.scan(model, corpus, batch_size=3, k=K, include_bos=True, progress=False)
    assert atlas.tokens == sum(len(ids) for ids in corpus["input_ids"])
    assert atlas.meta.options.include_bos is True
    assert_atlas_matches(atlas, per_text_activations(model, corpus, include_bos=True), K)


def test_refactor_glu_swaps_in_signs_and_restores_the_model():
    model = tiny_model("llama", dtype=torch.float64)
    before = {name: p.clone() for name, p in model.named_parameters()}
    corpus = random_corpus(seed=3)
    plain = gatescope.scan(model, corpus, batch_size=4, k=K, progress=False)
    refactored = gatescope.scan(model, corpus, batch_size=4, k=K, refactor_glu=True, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} was not restored"

    mlp = find_gated_mlps(model)[0]
    cos = torch.nn.functional.cosine_similarity(mlp.w_gate(), mlp.w_in(), dim=1)
    flipped = cos < 0
    assert refactored.meta.options.refactored_neurons == int(
        sum(
            (torch.nn.functional.cosine_similarity(m.w_gate(), m.w_in(), dim=1) < 0).sum()
            for m in find_gated_mlps(model)
        )
    )
    assert flipped.any() and (~flipped).any()
    # Flipping w_in flips u: in+ and in- trade places, gate signs stay.
    swap = [1, 0, 3, 2]
    count_plain, count_ref = plain.tensor("count")[0], refactored.tensor("count")[0]
    assert torch.equal(count_ref[:, flipped], count_plain[swap][:, flipped])
    assert torch.equal(count_ref[:, ~flipped], count_plain[:, ~flipped])


def test_neuron_summary_is_readable():
    model = tiny_model("gemma", dtype=torch.float64)
    atlas = gatescope.scan(model, random_corpus(seed=4), batch_size=4, k=K, progress=False)
    summary = atlas.neuron(1, 7)
    assert set(summary.freq) == set(CASES)
    assert math.isclose(sum(summary.freq.values()), 1.0, rel_tol=0, abs_tol=0.05)
    for case, lists in summary.top.items():
        assert summary.count[case] > 0 or all(not examples for examples in lists.values())
        assert ("swish" in lists) == case.startswith("gate-")
        for examples in lists.values():
            strengths = [abs(e.value) for e in examples]
            assert strengths == sorted(strengths, reverse=True)
    with pytest.raises(GatescopeError, match="out of range"):
        atlas.neuron(2, 0)


def test_fixture_model_matches_brute_force(stories260k, tinystories, tmp_path):
    from gatescope.corpus import build_corpus, save_corpus
    from gatescope.loading import load_model

    corpus = build_corpus(tinystories, stories260k, max_length=64, tokens=2_000, seed=5)
    save_corpus(corpus, tmp_path / "corpus")
    atlas = gatescope.scan(
        stories260k,
        tmp_path / "corpus",
        out=tmp_path / "atlas",
        batch_size=8,
        k=8,
        dtype="float64",
        progress=False,
    )
    model = load_model(stories260k, dtype="float64", device="cpu").model
    assert atlas.num_layers == 5 and atlas.d_mlp == 172
    assert_atlas_matches(atlas, per_text_activations(model, corpus), 8)
    # The real model exercises all four cases.
    assert (atlas.tensor("count").sum(dim=(0, 2)) > 0).all()
