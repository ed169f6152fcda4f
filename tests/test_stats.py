"""gatescope.stats against the brute-force reference, on synthetic activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gatescope.constants import CASES, QUANTITIES, TOP_LISTS
from gatescope.stats import NeuronStats
from tests.reference import reference_stats

K = 4


def clipped_silu(g: torch.Tensor) -> torch.Tensor:
    """SiLU that underflows to exactly 0 below -1.5, like GELU-tanh does far out: exercises
    ranked values of exactly 0."""
    return torch.where(g < -1.5, torch.zeros_like(g), torch.nn.functional.silu(g))


def make_batch(seed: int, lengths: list[int], d: int, dtype=torch.float64):
    """Right-padded random gate/up with some exact zeros; the first position is uncounted."""
    gen = torch.Generator().manual_seed(seed)
    batch, positions = len(lengths), max(lengths)
    gate = torch.randn(batch, positions, d, generator=gen, dtype=dtype)
    up = torch.randn(batch, positions, d, generator=gen, dtype=dtype)
    gate[torch.rand(gate.shape, generator=gen) < 0.03] = 0
    up[torch.rand(up.shape, generator=gen) < 0.03] = 0
    # Repeated values inside and across texts: ties must go to the first position / lower text.
    gate[:, 1::7] = gate[:1, 1:2].clone()
    valid = torch.arange(positions)[None, :] < torch.tensor(lengths)[:, None]
    valid[:, 0] = False
    return gate, up, valid


def brute_force_inputs(batches, act):
    texts = []
    for text_index, (gate, up, valid) in batches:
        for b in range(gate.shape[0]):
            rows = valid[b].nonzero().flatten()
            g, u = gate[b, rows].double(), up[b, rows].double()
            a = act(g)
            texts.append(
                (
                    int(text_index[b]),
                    {
                        "hook_pre": g.numpy(),
                        "hook_pre_linear": u.numpy(),
                        "swish": a.numpy(),
                        "hook_post": (a * u).numpy(),
                        "position": rows.numpy(),
                    },
                )
            )
    return texts


def assert_matches_reference(stats: NeuronStats, ref) -> None:
    assert int(stats.tokens) == ref.tokens
    for c, case in enumerate(CASES):
        np.testing.assert_array_equal(stats.count[c].numpy(), ref.count[case])
        for q, quantity in enumerate(QUANTITIES):
            mean = stats.sum[c, q].numpy() / np.maximum(stats.count[c].numpy(), 1)
            mean = np.where(stats.count[c].numpy() > 0, mean, np.nan)
            np.testing.assert_allclose(mean, ref.mean[case, quantity], rtol=1e-10, atol=1e-12)
            # act(g) may differ by an ulp between torch's vectorized and scalar code paths.
            for extreme, expected in (("maximum", ref.maximum), ("minimum", ref.minimum)):
                np.testing.assert_allclose(
                    getattr(stats, extreme)[c, q].numpy(), expected[case, quantity],
                    rtol=1e-12, err_msg=extreme,
                )  # fmt: skip
    if stats.distributions:
        assert_distributions_match(stats, ref)
    for lst, (c, q) in enumerate(TOP_LISTS):
        expected = ref.top[CASES[c], QUANTITIES[q]]
        for n, entries in enumerate(expected):
            values, texts, positions = zip(*entries, strict=True)
            np.testing.assert_array_equal(stats.top_text[lst, n].numpy(), texts)
            np.testing.assert_array_equal(stats.top_position[lst, n].numpy(), positions)
            np.testing.assert_allclose(stats.top_value[lst, n].numpy(), values, rtol=1e-12)


def assert_distributions_match(stats: NeuronStats, ref) -> None:
    """Histograms bin for bin; typical examples text, position and values."""
    state = stats.state_dict()
    for c, case in enumerate(CASES):
        for q, quantity in enumerate(QUANTITIES):
            histogram = state["histogram"][c, q].T.numpy()  # [neuron, bin]
            np.testing.assert_array_equal(histogram, ref.histogram[case, quantity])
            assert (histogram.sum(axis=1) == ref.count[case]).all()  # every token in one bin
        np.testing.assert_array_equal(state["joint"][c].permute(2, 0, 1).numpy(), ref.joint[case])
        for n, expected in enumerate(ref.typical[case]):
            texts, positions, values = zip(*expected, strict=True)
            np.testing.assert_array_equal(state["typical_text"][c, n].numpy(), texts)
            np.testing.assert_array_equal(state["typical_position"][c, n].numpy(), positions)
            np.testing.assert_allclose(
                state["typical_value"][c, :, n].T.numpy(), np.array(values), rtol=1e-12
            )


@pytest.fixture(params=[torch.nn.functional.silu, clipped_silu], ids=["silu", "clipped"])
def act(request):
    return request.param


def batches_of(seed: int, layout: list[list[int]], d: int, indices=None):
    """Batches with the given text lengths; text indices in a shuffled (non-sorted) order."""
    n_texts = sum(len(b) for b in layout)
    order = indices if indices is not None else np.random.default_rng(seed).permutation(n_texts)
    out, start = [], 0
    for i, lengths in enumerate(layout):
        idx = torch.as_tensor(order[start : start + len(lengths)])
        out.append((idx, make_batch(seed * 100 + i, lengths, d)))
        start += len(lengths)
    return out


@pytest.fixture(params=["cpu", "torch"])
def kernel(request):
    """Both passes: the fused CPU kernel and the torch operations (the GPU path)."""
    return request.param


# The torch pass in chunks of one text, a few texts and the whole batch; the fused CPU pass
# (no chunks) over neurons in one partial block and in several blocks with a partial tail.
@pytest.mark.parametrize("k", [K, 20], ids=["k4", "k_exceeds_texts"])
@pytest.mark.parametrize(
    ("kernel", "chunk_elements", "d"),
    [("torch", 1, 24), ("torch", 10_000, 24), ("torch", 2**20, 24), ("cpu", None, 24),
     ("cpu", None, 150)],
)  # fmt: skip
def test_matches_brute_force(act, kernel, chunk_elements, d, k):
    layout = [[9, 5, 12], [12, 3], [7, 7, 7, 2], [10], [4, 11, 6]]
    batches = batches_of(0, layout, d)
    stats = NeuronStats(
        d, act, k=k, dtype=torch.float64, kernel=kernel, chunk_elements=chunk_elements
    )
    for text_index, (gate, up, valid) in batches:
        stats.update(gate, up, text_index, valid)
    ref = reference_stats(brute_force_inputs(batches, act), k)
    assert_matches_reference(stats, ref)
    if act is clipped_silu and k > K:
        # The exact-zero values of the clipped act are ranked (and placed) too.
        assert ((stats.top_value == 0) & (stats.top_text >= 0)).any()


def test_fewer_texts_than_k_leaves_empty_slots():
    d = 8
    batches = batches_of(1, [[6, 4]], d)
    stats = NeuronStats(d, torch.nn.functional.silu, k=5, dtype=torch.float64)
    for text_index, (gate, up, valid) in batches:
        stats.update(gate, up, text_index, valid)
    assert (stats.top_text[..., 2:] == -1).all()
    assert (stats.top_position[..., 2:] == -1).all()
    assert (stats.top_value[..., 2:] == 0).all()


def test_case_that_never_occurs_is_empty(kernel):
    d = 6
    gate = torch.rand(2, 5, d, dtype=torch.float64) + 0.1  # g > 0 everywhere
    up = torch.randn(2, 5, d, dtype=torch.float64)
    valid = torch.ones(2, 5, dtype=torch.bool)
    stats = NeuronStats(d, torch.nn.functional.silu, k=3, dtype=torch.float64, kernel=kernel)
    stats.update(gate, up, torch.tensor([0, 1]), valid)
    assert (stats.count[2:] == 0).all()
    for lst, (c, _) in enumerate(TOP_LISTS):
        if CASES[c].startswith("gate-"):
            assert (stats.top_text[lst] == -1).all()


def test_merge_equals_single_pass_in_any_grouping(act):
    d = 16
    layout = [[8, 3], [5, 9, 2], [6], [7, 7]]
    batches = batches_of(2, layout, d)
    whole = NeuronStats(d, act, k=K, dtype=torch.float64)
    parts = [NeuronStats(d, act, k=K, dtype=torch.float64) for _ in batches]
    for part, (text_index, (gate, up, valid)) in zip(parts, batches, strict=True):
        whole.update(gate, up, text_index, valid)
        part.update(gate, up, text_index, valid)
    left = parts[0]
    left.merge(parts[1])
    right = parts[2]
    right.merge(parts[3])
    left.merge(right)  # (0 + 1) + (2 + 3)
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(left.state_dict()[name], tensor, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    d = 10
    batches = batches_of(3, [[5, 6], [4], [9, 2]], d)
    straight = NeuronStats(d, torch.nn.functional.silu, k=K, dtype=torch.float64)
    for text_index, (gate, up, valid) in batches:
        straight.update(gate, up, text_index, valid)
    first = NeuronStats(d, torch.nn.functional.silu, k=K, dtype=torch.float64)
    first.update(batches[0][1][0], batches[0][1][1], batches[0][0], batches[0][1][2])
    resumed = NeuronStats(d, torch.nn.functional.silu, k=K, dtype=torch.float64)
    resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    for text_index, (gate, up, valid) in batches[1:]:
        resumed.update(gate, up, text_index, valid)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_float32_inputs_from_bfloat16(kernel):
    d = 12
    ((text_index, (gate, up, valid)),) = batches_of(4, [[6, 6]], d)
    stats = NeuronStats(d, torch.nn.functional.silu, k=K, kernel=kernel)
    stats.update(gate.bfloat16(), up.bfloat16(), text_index, valid)
    ref = reference_stats(
        brute_force_inputs(
            [(text_index, (gate.bfloat16().double(), up.bfloat16().double(), valid))],
            torch.nn.functional.silu,
        ),
        K,
    )
    for c, case in enumerate(CASES):
        np.testing.assert_array_equal(stats.count[c].numpy(), ref.count[case])
    np.testing.assert_array_equal(
        stats.top_text[0, 0].numpy(), [e[1] for e in ref.top[CASES[0], QUANTITIES[0]][0]]
    )


@pytest.mark.parametrize("length", [16, 37])
def test_float32_ranking_equals_float64_ranking(act, kernel, length):
    """The float32 path packs keys and text indices into one sort; float64 sorts twice.
    Both must rank identically, ties (repeated values) included."""
    d = 20
    layout = [[length, 9, 30], [12, length], [length, 5, 7, 2]]
    batches = [
        (idx, tuple(t.float() if t.is_floating_point() else t for t in batch))
        for idx, batch in batches_of(5, layout, d)
    ]
    single = NeuronStats(d, act, k=K, dtype=torch.float32, kernel=kernel)
    double = NeuronStats(d, act, k=K, dtype=torch.float64, kernel=kernel)
    for text_index, (gate, up, valid) in batches:
        single.update(gate, up, text_index, valid)
        double.update(gate.double(), up.double(), text_index, valid)
    assert torch.equal(single.count, double.count)
    assert torch.equal(single.top_text, double.top_text)
    assert torch.equal(single.top_position, double.top_position)
    torch.testing.assert_close(single.top_value.double(), double.top_value, rtol=1e-6, atol=0)


def test_a_batch_of_many_more_texts_than_k(kernel):
    """A batch of ten times k texts, then a small one: the merges keep the k strongest."""
    d = 6
    layout = [[5, 3, 4] * 14, [6, 2]]  # 42 texts, then 2
    batches = batches_of(6, layout, d)
    stats = NeuronStats(d, torch.nn.functional.silu, k=K, dtype=torch.float64, kernel=kernel)
    for text_index, (gate, up, valid) in batches:
        stats.update(gate, up, text_index, valid)
    ref = reference_stats(brute_force_inputs(batches, torch.nn.functional.silu), K)
    assert_matches_reference(stats, ref)


def test_cpu_and_torch_passes_agree_in_float32(act):
    """The two passes on the same float32 batches: identical counts and ranked lists (the
    values are the same float32 numbers), sums equal to float64 rounding."""
    d = 200  # three full blocks of the CPU kernel and a partial one
    layout = [[40, 17, 33], [25, 40], [9, 31, 31, 2]]
    batches = [
        (idx, tuple(t.float() if t.is_floating_point() else t for t in batch))
        for idx, batch in batches_of(7, layout, d)
    ]
    fused = NeuronStats(d, act, k=K, kernel="cpu")
    plain = NeuronStats(d, act, k=K, kernel="torch")
    for text_index, (gate, up, valid) in batches:
        fused.update(gate, up, text_index, valid)
        plain.update(gate, up, text_index, valid)
    assert torch.equal(fused.count, plain.count)
    for name in ("top_text", "top_position", "top_value", "maximum", "minimum"):
        torch.testing.assert_close(
            getattr(fused, name), getattr(plain, name), rtol=0, atol=0, equal_nan=True, msg=name
        )
    torch.testing.assert_close(fused.sum, plain.sum, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_merges_equal_the_torch_merges(dtype):
    """Candidates with many ties (values from a small set) and gaps (text -1, NO_KEY),
    merged batch after batch: the CPU's insertions keep the very lists torch's topk does."""
    from gatescope.stats import distributions

    d, n, gen = 37, 5, torch.Generator().manual_seed(11)
    silu = torch.nn.functional.silu
    cpu, plain = (
        NeuronStats(d, silu, k=K, dtype=dtype, kernel=kernel) for kernel in ("cpu", "torch")
    )
    texts = torch.randperm(1000, generator=gen)
    for batch in range(6):
        lists = (len(TOP_LISTS), n, d)
        value = torch.randint(-3, 4, lists, generator=gen).to(dtype) / 2
        text = texts[batch * n : (batch + 1) * n].view(1, n, 1).expand(lists).clone()
        text[torch.rand(lists, generator=gen) < 0.2] = -1
        position = torch.randint(0, 50, lists, generator=gen)
        cases = (len(CASES), n, d)
        key = (torch.randint(0, 64, cases, generator=gen) << 31) | text[: len(CASES)]
        key[text[: len(CASES)] < 0] = distributions.NO_KEY
        typical_value = torch.randn(len(CASES), len(QUANTITIES), n, d, generator=gen, dtype=dtype)
        for stats in (cpu, plain):
            stats._add_candidates(value, text, position)
            stats._merge_typical(key, text[: len(CASES)].to(torch.int32), position[: len(CASES)],
                                 typical_value)  # fmt: skip
    for name in ("top_value", "top_text", "top_position", "_typical_key", "_typical_text",
                 "_typical_position", "_typical_value"):  # fmt: skip
        torch.testing.assert_close(getattr(cpu, name), getattr(plain, name), rtol=0, atol=0,
                                   msg=name)  # fmt: skip


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
def test_the_models_own_activation_is_used_as_computed(kernel):
    """update(..., swish=act(g)) equals update(...); a swish in another dtype than the
    statistics' is not used (act is applied to g in the statistics' dtype). Exactly on the
    CPU pass, which applies act to g as given; the torch pass applies it to a padded copy,
    where torch's vectorized and scalar SiLU may round differently in the last place."""
    d, act = 70, torch.nn.functional.silu
    given, applied = (NeuronStats(d, act, k=K, kernel=kernel) for _ in range(2))
    for text_index, (gate, up, valid) in batches_of(5, [[9, 14, 3], [12, 12]], d):
        gate, up = gate.float(), up.float()
        given.update(gate, up, text_index, valid, swish=act(gate))
        applied.update(gate, up, text_index, valid)
    exact = kernel == "cpu"
    for name, tensor in applied.state_dict().items():
        torch.testing.assert_close(given.state_dict()[name], tensor, equal_nan=True, msg=name,
                                   **({"rtol": 0, "atol": 0} if exact else {}))  # fmt: skip
    ignored, used = (NeuronStats(d, act, k=K, kernel=kernel) for _ in range(2))
    for text_index, (gate, up, valid) in batches_of(5, [[9, 14, 3], [12, 12]], d):
        gate, up = gate.float(), up.float()
        ignored.update(gate, up, text_index, valid, swish=act(gate).double())
        used.update(gate, up, text_index, valid, swish=2 * act(gate))
    assert torch.equal(ignored.top_value, applied.top_value)
    # A swish in the statistics' dtype is taken as act(g), not recomputed.
    swish, post = QUANTITIES.index("swish"), QUANTITIES.index("hook_post")
    for quantity in (swish, post):
        torch.testing.assert_close(used.sum[:, quantity], 2 * applied.sum[:, quantity])
    with pytest.raises(ValueError, match="swish has shape"):
        used.update(gate, up, text_index, valid, swish=act(gate)[:, :-1])


def test_lists_of_no_entries_are_refused():
    with pytest.raises(ValueError, match="k must be at least 1"):
        NeuronStats(4, torch.nn.functional.silu, k=0)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="kernel"):
        NeuronStats(4, torch.nn.functional.silu, kernel="fast")
