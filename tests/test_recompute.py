"""gatescope.recompute: the recomputed activations reproduce what the atlas stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gatescope
from gatescope.constants import CASES, QUANTITIES, TOP_LISTS
from gatescope.corpus import TokenizedCorpus
from gatescope.errors import GatescopeError
from gatescope.loading import load_model
from gatescope.recompute import recompute
from tests.models import tiny_model
from tests.test_scan import random_corpus

K = 4


def assert_recomputed_equals_atlas(atlas, loaded, corpus, layer, neurons, rtol=1e-5) -> int:
    """Every stored (text, position) of the neurons' lists, recomputed; returns how many."""
    texts = set()
    summaries = {n: atlas.neuron(layer, n) for n in neurons}
    for summary in summaries.values():
        for lists in summary.top.values():
            texts |= {e.text for examples in lists.values() for e in examples}
    refactor = atlas.meta.options.refactor_glu
    acts = recompute(loaded, corpus, layer, neurons, sorted(texts), refactor_glu=refactor)
    assert set(acts) == texts
    checked = 0
    for i, n in enumerate(neurons):
        for lst, (c, q) in enumerate(TOP_LISTS):
            for e in summaries[n].top[CASES[c]][QUANTITIES[q]]:
                values = acts[e.text].values[i]  # [quantity, pos]
                np.testing.assert_allclose(values[q, e.position], e.value, rtol=rtol, atol=1e-7)
                # The stored token is the text's strongest of the case.
                g, u = values[0], values[1]
                in_case = ((g > 0) if c < 2 else (g < 0)) & ((u > 0) if c % 2 == 0 else (u < 0))
                in_case[0] = False  # BOS is not counted by default
                strongest = np.abs(values[q][in_case]).max()
                assert abs(e.value) == pytest.approx(strongest, rel=rtol), (n, lst, e)
                checked += 1
    return checked


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
@pytest.mark.parametrize("refactor", [False, True], ids=["plain", "refactored"])
def test_recomputed_values_equal_the_atlas(family, refactor):
    model = tiny_model(family, dtype=torch.float32)
    corpus = random_corpus(n_texts=17)
    atlas = gatescope.scan(model, corpus, k=K, batch_size=5, refactor_glu=refactor, progress=False)
    loaded = load_model(model)
    checked = assert_recomputed_equals_atlas(
        atlas, loaded, TokenizedCorpus.open(corpus), layer=1, neurons=[0, 7, 63]
    )
    assert checked > 3 * 10


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_texts_cut_short_keep_their_values_exactly(family):
    """A causal model's tokens do not depend on later ones: computing a text only up to a
    point gives the same values there as computing all of it, up to the rounding that any
    other shape of forward brings (~1e-7 here, even in float64: as between batch sizes)."""
    model = tiny_model(family, dtype=torch.float64)
    corpus = TokenizedCorpus.open(random_corpus(n_texts=9))
    loaded = load_model(model)
    texts = list(range(9))
    whole = recompute(loaded, corpus, 1, [0, 5, 63], texts, batch_size=4)
    ends = {t: int(corpus.lengths[t]) // (t + 2) + 1 for t in texts}
    ends[3] = None  # the whole text
    cut = recompute(loaded, corpus, 1, [0, 5, 63], texts, batch_size=4, ends=ends)
    for t in texts:
        length = int(corpus.lengths[t]) if ends[t] is None else ends[t]
        assert cut[t].input_ids == whole[t].input_ids  # every token, to show
        assert cut[t].values.shape[-1] == length
        torch.testing.assert_close(
            torch.from_numpy(cut[t].values), torch.from_numpy(whole[t].values[..., :length]),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip


def test_bad_requests_are_one_sentence():
    model = tiny_model("llama", dtype=torch.float32)
    corpus = TokenizedCorpus.open(random_corpus())
    loaded = load_model(model)
    with pytest.raises(GatescopeError, match="layer 5 is out of range"):
        recompute(loaded, corpus, 5, [0], [0])
    with pytest.raises(GatescopeError, match="neuron 64 is out of range"):
        recompute(loaded, corpus, 0, [64], [0])
    with pytest.raises(GatescopeError, match="another corpus"):
        recompute(loaded, corpus, 0, [1], [999])


def test_fixture_model(stories260k, tinystories, tmp_path):
    from gatescope.corpus import build_corpus, save_corpus

    corpus = build_corpus(tinystories, stories260k, max_length=128, tokens=6_000, seed=1)
    save_corpus(corpus, tmp_path / "corpus")
    atlas = gatescope.scan(
        stories260k, tmp_path / "corpus", out=tmp_path / "atlas", k=8, progress=False
    )
    loaded = load_model(stories260k, device="cpu")
    texts = TokenizedCorpus.open(tmp_path / "corpus")
    assert assert_recomputed_equals_atlas(atlas, loaded, texts, layer=3, neurons=[5, 100]) > 100
