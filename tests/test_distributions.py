"""The distributions: bins, the two passes against each other, the typical examples' draw
(seeded, uniform), quantiles, and atlases, pages and exports with and without them.

The histograms and draws against the brute force are in test_stats (synthetic batches)
and test_scan (every family, the fixture model).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

import gatescope
from gatescope.constants import CASES, QUANTILES, QUANTITIES
from gatescope.stats import NeuronStats, cpu_int32, distributions
from tests.reference import BIN_EDGES, JOINT_EDGES, bin_of, case_mask, text_priority
from tests.test_scan import per_text_activations, random_corpus
from tests.test_stats import batches_of, make_batch

from tests.models import tiny_model  # isort: skip

# Chi-square critical values at p = 0.001: a correct draw fails one test in a thousand runs
# of different seeds; the seeds here are fixed, so these tests are deterministic.
CHI2_CRITICAL_001 = {9: 27.88, 19: 43.82}


def edge_values(dtype: torch.dtype) -> torch.Tensor:
    """Every bin edge, its neighbours one ulp away, zero, a subnormal, inf and NaN."""
    edges = torch.tensor(BIN_EDGES[1:-1], dtype=dtype)
    around = [edges, torch.nextafter(edges, torch.tensor(0.0, dtype=dtype)),
              torch.nextafter(edges, torch.tensor(float("inf"), dtype=dtype))]  # fmt: skip
    special = torch.tensor([0.0, 1e-40, 3.0, 1e30, float("inf"), float("nan")], dtype=dtype)
    values = torch.cat([*around, special])
    return torch.cat([values, -values])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bins_are_those_of_the_edges(dtype):
    values = edge_values(dtype)
    magnitude = values.abs().double().numpy()
    expected, expected_joint = bin_of(BIN_EDGES, magnitude), bin_of(JOINT_EDGES, magnitude)
    assert distributions.magnitude_bins(values).tolist() == expected.tolist()
    assert distributions.joint_bins(values).tolist() == expected_joint.tolist()
    # The numba kernel's own bins and counters, on the same values.
    magnitude_bins, joint_bins, counters = kernel_bins(values.numpy())
    assert magnitude_bins.tolist() == expected.tolist()
    assert joint_bins.tolist() == expected_joint.tolist()
    np.testing.assert_array_equal(counters, expected_counters(expected, expected_joint))
    np.testing.assert_array_equal(distributions.bin_edges(), BIN_EDGES)
    np.testing.assert_array_equal(distributions.joint_edges(), JOINT_EDGES)


@numba.njit
def kernel_bins(values):
    """cpu_int32's bins of ``values``, and their counters for every case and two neurons of a
    block, in a case and not: [value, case, counter, neuron, in case (0) or not (1)], the
    counters of the four quantities, then the joint cells of (value, 1.0) and (1.0, value)."""
    n, one = len(values), values.dtype.type(1.0)
    magnitude, joint = np.empty(n, np.int64), np.empty(n, np.int64)
    counters = np.empty((n, 4, 6, 2, 2), np.int64)
    for i in range(n):
        v = values[i]
        magnitude[i], joint[i] = cpu_int32.magnitude_bin(v), cpu_int32.joint_bin(v)
        for case in range(4):
            for j, neuron in enumerate((0, cpu_int32.BLOCK - 1)):
                for not_in_case, in_case in enumerate((True, False)):
                    at = counters[i, case, :, j, not_in_case]
                    at[0] = cpu_int32.magnitude_counter(v, case, 0, neuron, in_case)
                    at[1] = cpu_int32.magnitude_counter(v, case, 1, neuron, in_case)
                    at[2] = cpu_int32.magnitude_counter(v, case, 2, neuron, in_case)
                    at[3] = cpu_int32.magnitude_counter(v, case, 3, neuron, in_case)
                    at[4] = cpu_int32.joint_counter(v, one, case, neuron, in_case)
                    at[5] = cpu_int32.joint_counter(one, v, case, neuron, in_case)
    return magnitude, joint, counters


def expected_counters(magnitude: np.ndarray, joint: np.ndarray) -> np.ndarray:
    """kernel_bins' counters from the bins, by the layout of a block's counts that cpu_int32
    states: rows of BLOCK neurons; the spare row for a token in no case."""
    block, n_bins, n_joint = cpu_int32.BLOCK, distributions.N_BINS, distributions.N_JOINT_BINS
    case = np.arange(4).reshape(1, 4, 1)
    m, jb = magnitude.reshape(-1, 1, 1), joint.reshape(-1, 1, 1)
    one = bin_of(JOINT_EDGES, np.array([1.0]))[0]
    rows = [(4 * case + quantity) * n_bins + m for quantity in range(4)]
    rows += [cpu_int32.HISTOGRAM_ROWS + (case * n_joint + g) * n_joint + u
             for g, u in ((jb, one), (one, jb))]  # fmt: skip
    rows = np.concatenate(np.broadcast_arrays(*rows), axis=2)  # [value, case, counter]
    neuron = np.array([0, block - 1])
    in_case = rows[..., None] * block + neuron
    spare = np.broadcast_to(cpu_int32.SPARE_ROW * block + neuron, in_case.shape)
    return np.stack([in_case, spare], axis=-1)


@numba.njit
def kernel_token_priorities(salts, positions):
    out = np.empty(len(salts), np.int64)
    for i in range(len(salts)):
        out[i] = cpu_int32.token_priority(salts[i], positions[i])
    return out


def test_the_kernels_token_priority_is_distributions():
    generator = torch.Generator().manual_seed(0)
    salts = torch.cat([torch.tensor([0, 1, 2**31, 2**32 - 1]),
                       torch.randint(0, 2**32, (2000,), generator=generator)])  # fmt: skip
    positions = torch.cat([torch.tensor([0, 2**31 - 1, 1, 12345]),
                           torch.randint(0, 2**31, (2000,), generator=generator)])  # fmt: skip
    expected = distributions.token_priority(salts, positions)
    assert kernel_token_priorities(salts.numpy(), positions.numpy()).tolist() == expected.tolist()


def test_the_passes_agree_in_float32():
    """The numba kernel and the torch pass: identical histograms and draws, in float32."""
    d, layout = 150, [[30, 17, 25], [9, 30], [12, 3, 28, 30]]
    states = []
    for kernel in ("cpu", "torch"):
        stats = NeuronStats(d, torch.nn.functional.silu, k=4, kernel=kernel, seed=7, layer=3)
        for text_index, (gate, up, valid) in batches_of(5, layout, d):
            stats.update(gate.float(), up.float(), text_index, valid)
        states.append(stats.state_dict())
    cpu, torch_ = states
    for name in ("count", "histogram", "joint", "typical_text", "typical_position"):
        assert torch.equal(cpu[name], torch_[name]), name
    torch.testing.assert_close(cpu["typical_value"], torch_["typical_value"], rtol=0, atol=0)
    assert (cpu["typical_text"] >= 0).any()


def draw(seed: int, batches, d: int, k: int, kernel: str = "cpu") -> dict[str, torch.Tensor]:
    stats = NeuronStats(d, torch.nn.functional.silu, k=k, dtype=torch.float64, kernel=kernel,
                        seed=seed)  # fmt: skip
    for text_index, (gate, up, valid) in batches:
        stats.update(gate, up, text_index, valid)
    return stats.state_dict()


def test_typical_examples_are_seeded():
    d, batches = 24, batches_of(2, [[9, 5, 12], [12, 3], [7, 7, 7, 2]], 24)
    first, again, other = draw(0, batches, d, 3), draw(0, batches, d, 3), draw(1, batches, d, 3)
    for name in ("typical_text", "typical_position"):
        assert torch.equal(first[name], again[name])
    assert not torch.equal(first["typical_text"], other["typical_text"])
    # In the other order, the same draw (batch grouping: test_scan; shards, ranks: test_scale).
    reversed_ = draw(0, batches[::-1], d, 3)
    for name in ("typical_text", "typical_position", "histogram", "joint"):
        assert torch.equal(first[name], reversed_[name]), name


def known_membership(n_texts: int, length: int, d: int):
    """g > 0 and u > 0 (case gate+_in+) exactly at even positions of texts whose index is a
    multiple of 3; every other counted token in gate-_in-."""
    batches = []
    for start in range(0, n_texts, 8):
        index = torch.arange(start, min(start + 8, n_texts))
        gate, up, valid = make_batch(start, [length] * len(index), d)
        sign = torch.full((len(index), length, 1), -1.0, dtype=gate.dtype)
        sign[(index % 3 == 0).nonzero().flatten()[:, None], torch.arange(0, length, 2)] = 1.0
        gate, up = gate.abs() * sign + 0.01 * sign, up.abs() * sign + 0.01 * sign
        valid[:] = True
        batches.append((index, (gate, up, valid)))
    return batches


def chi_square(observed: np.ndarray) -> float:
    expected = observed.sum() / len(observed)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
def test_typical_examples_are_uniform(kernel):
    """Over 2,000 neurons (independent draws), texts are drawn uniformly among those where
    the case occurs, and tokens uniformly among the case's tokens."""
    n_texts, length, d, k = 60, 20, 2000, 4
    state = draw(3, known_membership(n_texts, length, d), d, k, kernel)
    case = CASES.index("gate+_in+")
    texts = state["typical_text"][case].flatten().numpy()
    positions = state["typical_position"][case].flatten().numpy()
    assert (texts >= 0).all() and (texts % 3 == 0).all()  # only texts where it occurs
    assert (positions % 2 == 0).all()  # only its tokens
    # Each neuron draws k distinct texts of the 20 eligible.
    assert all(len(set(row)) == k for row in state["typical_text"][case].tolist())
    by_text = np.bincount(texts // 3, minlength=n_texts // 3)
    assert chi_square(by_text) < CHI2_CRITICAL_001[19]
    by_position = np.bincount(positions // 2, minlength=length // 2)
    assert chi_square(by_position) < CHI2_CRITICAL_001[9]


def test_the_draw_follows_the_documented_hash():
    """The priorities the accumulator ranks by are those of the contract's hash."""
    texts = torch.tensor([0, 5, 2**31 - 2])
    ours = distributions.text_priority(
        11, 4, torch.arange(4).view(-1, 1, 1), torch.arange(3).view(1, 1, -1), texts.view(1, -1, 1)
    )
    for c in range(4):
        for i, text in enumerate(texts.tolist()):
            for n in range(3):
                assert int(ours[c, i, n]) == text_priority(11, 4, c, n, text)


def test_quantiles_bracket_the_brute_force_within_one_bin():
    model = tiny_model("llama", dtype=torch.float64)
    corpus = random_corpus(seed=6, n_texts=30)
    atlas = gatescope.scan(model, corpus, batch_size=4, k=4, progress=False)
    levels = [level for _, level in QUANTILES]
    for layer, texts in enumerate(per_text_activations(model, corpus)):
        brackets = atlas.layer(layer).quantiles()  # [d, case, quantity, level, 2]
        assert brackets is not None
        for c, case in enumerate(CASES):
            for q, quantity in enumerate(QUANTITIES):
                for n in range(atlas.d_mlp):
                    values = np.concatenate([
                        np.abs(qs[quantity][case_mask(qs["hook_pre"], qs["hook_pre_linear"],
                                                      case)[:, n], n])
                        for _, qs in texts
                    ])  # fmt: skip
                    if len(values) == 0:
                        assert brackets[n, c, q].isnan().all()
                        continue
                    truth = np.quantile(values, levels, method="inverted_cdf")
                    low, high = brackets[n, c, q, :, 0].numpy(), brackets[n, c, q, :, 1].numpy()
                    slack = 1e-7 * truth  # the extremes that clip a bracket are float32
                    assert (low - slack <= truth).all() and (truth <= high + slack).all()
                    # Within one bin: the bracket's ends fall in one bin (or on its edge).
                    bins = bin_of(BIN_EDGES, np.nextafter(high, 0)) - bin_of(BIN_EDGES, low)
                    assert (bins <= 0).all()


def test_without_distributions(tmp_path):
    from gatescope.export import to_hf_dataset
    from gatescope.gluscope import to_gluscope_dataset

    model, corpus = tiny_model("qwen3"), random_corpus(seed=7)
    with_them = gatescope.scan(model, corpus, batch_size=4, k=4, progress=False)
    without = gatescope.scan(model, corpus, batch_size=4, k=4, distributions=False,
                             progress=False)  # fmt: skip
    assert with_them.has_distributions and not without.has_distributions
    assert without.meta.options.seed is None
    assert without.neuron(0, 3).distributions is None
    summary = with_them.neuron(0, 3)
    assert summary.distributions is not None
    for case in CASES:
        assert sum(summary.distributions.histogram[case]["hook_post"]) == summary.count[case]
    for name in ("count", "top_text", "top_position", "top_value"):
        assert torch.equal(with_them.tensor(name), without.tensor(name)), name
    # Quantile columns in our export only, never in GLUScope's schema.
    assert "gate-_in-_hook_post_p90" in to_hf_dataset(with_them).column_names
    assert "gate-_in-_hook_post_p90" not in to_hf_dataset(without).column_names
    assert not any(c.endswith("_p50") for c in to_gluscope_dataset(with_them).column_names)
    # Saved and loaded, the atlas without them stays without them.
    without.save(tmp_path / "atlas")
    assert not gatescope.Atlas.load(tmp_path / "atlas").has_distributions


def test_a_corpus_beyond_the_int32_counts_is_refused_before_any_work(monkeypatch):
    from gatescope.errors import GatescopeError
    from gatescope.loading import ModelSpec
    from gatescope.stats import accumulator

    monkeypatch.setattr(accumulator, "MAX_HISTOGRAM_TOKENS", 10)
    monkeypatch.setattr(ModelSpec, "load", lambda self: pytest.fail("loaded"))
    with pytest.raises(GatescopeError, match="--no-distributions"):
        gatescope.scan(tiny_model("llama"), random_corpus(), progress=False)


def test_statistics_of_another_seed_or_layer_do_not_merge():
    def stats(seed: int, layer: int) -> NeuronStats:
        return NeuronStats(8, torch.nn.functional.silu, k=2, seed=seed, layer=layer)

    for other in (stats(1, 0), stats(0, 1)):
        with pytest.raises(ValueError, match="seed, layer, neurons or experts"):
            stats(0, 0).merge(other)
