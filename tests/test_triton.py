"""The Triton statistics pass, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set in conftest.py): against the torch pass and a float64 brute force, for every activation
and input dtype, then whole scans against the other passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gatescope.constants import CASES, QUANTITIES
from gatescope.stats import distributions
from gatescope.stats.batch import Totals
from gatescope.stats.torch_pass import TorchPass

triton_pass = pytest.importorskip("gatescope.stats.triton_pass", reason="triton is not installed")

ACTS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def totals(neurons: int, with_distributions: bool = False) -> Totals:
    cases, quantities = len(CASES), len(QUANTITIES)
    bins, joint = distributions.N_BINS, distributions.N_JOINT_BINS
    return Totals(
        torch.zeros(cases, neurons, dtype=torch.int64),
        torch.zeros(cases, quantities, neurons, dtype=torch.float64),
        torch.full((cases, quantities, neurons), float("inf")),
        torch.zeros(cases, quantities, bins, neurons, dtype=torch.int32)
        if with_distributions else None,
        torch.zeros(cases, joint, joint, neurons, dtype=torch.int32)
        if with_distributions else None,
    )  # fmt: skip


def salts(texts: int, neurons: int, seed: int = 0) -> torch.Tensor:
    """[case, text, neuron] random token-draw salts below 2**32, a quarter -1 (not drawn)."""
    generator = torch.Generator().manual_seed(seed)
    salt = torch.randint(0, 2**32, (len(CASES), texts, neurons), generator=generator)
    drop = torch.rand(salt.shape, generator=generator) < 0.25
    return salt.masked_fill_(drop, -1)


def batch(dtype: torch.dtype, texts=3, length=37, neurons=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(texts, length, neurons, generator=generator).to(dtype)
    u = torch.randn(texts, length, neurons, generator=generator).to(dtype)
    g[0, 3, :4] = 0  # zeros are in no case
    u[1, 5, 2:6] = 0
    valid = torch.ones(texts, length, dtype=torch.bool)
    valid[:, 0] = False  # BOS not counted
    valid[2, 30:] = False  # padding
    return g, u, valid


def test_the_activations_are_recognized_by_what_they_compute():
    from transformers.activations import ACT2FN

    kind = triton_pass.activation_kind
    assert kind(torch.nn.SiLU()) == kind(ACT2FN["silu"]) == "silu"
    assert kind(ACT2FN["gelu"]) == kind(torch.nn.GELU()) == "gelu"
    assert kind(ACT2FN["gelu_pytorch_tanh"]) == kind(ACTS["gelu_tanh"]) == "gelu_tanh"
    assert kind(torch.relu) is None and kind(torch.tanh) is None


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernel_equals_the_torch_pass_and_a_brute_force(act, dtype):
    g, u, valid = batch(dtype)
    fn = ACTS[act]
    ours, theirs = totals(g.shape[2]), totals(g.shape[2])
    got = triton_pass.TritonPass(fn, device=g.device, dtype=torch.float32)(g, u, valid, ours, None)
    expected = TorchPass(fn, device=g.device, dtype=torch.float32)(
        g.float(), u.float(), valid, theirs, None
    )
    assert torch.equal(ours.count, theirs.count)
    finite = expected.strength != float("-inf")
    assert torch.equal(got.strength == float("-inf"), ~finite)
    # act(g) in the kernel's float32 may differ from torch's in the last bits of 1 + erf(x)
    # or of exp: relatively small, absolutely a few float32 ulps of 1 where act(g) is tiny.
    torch.testing.assert_close(
        got.strength[finite], expected.strength[finite], rtol=1e-5, atol=1e-6
    )
    assert torch.equal(got.position[finite], expected.position[finite])
    torch.testing.assert_close(ours.weakest, theirs.weakest, rtol=1e-5, atol=1e-6)
    # Sums: the brute force in float64 of the float32 quantities.
    g32, u32 = g.float() * valid.unsqueeze(-1), u.float()
    a32 = fn(g32)
    quantities = torch.stack([g32, u32, a32, a32 * u32]).double()  # [q, text, pos, neuron]
    case = (g32 < 0).long() * 2 + (u32 < 0).long()
    in_any = (g32 != 0) & (u32 != 0)
    for c in range(len(CASES)):
        mask = (in_any & (case == c)).double()
        brute = (quantities * mask).sum(dim=(1, 2))  # [q, neuron]
        torch.testing.assert_close(ours.sums[c], brute, rtol=1e-6, atol=1e-5)
        assert torch.equal(ours.count[c], mask.sum(dim=(0, 1)).long())


def test_the_models_own_act_is_read_when_given():
    g, u, valid = batch(torch.bfloat16, seed=1)
    swish = torch.nn.functional.silu(g.float())
    ours, theirs = totals(g.shape[2]), totals(g.shape[2])
    run = triton_pass.TritonPass(torch.nn.functional.silu, device=g.device, dtype=torch.float32)
    got = run(g, u, valid, ours, None, swish=swish)
    expected = TorchPass(torch.nn.functional.silu, device=g.device, dtype=torch.float32)(
        g.float(), u.float(), valid, theirs, None, swish=swish
    )
    assert torch.equal(got.position, expected.position)
    torch.testing.assert_close(ours.sums, theirs.sums, rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf and NaN
def test_the_kernels_bins_are_those_of_the_edges():
    """Every bin edge, its float32 neighbours, zero, subnormals, inf and NaN, as g (u = 1)
    and as u (g = 1): each counted value lands in its bin of g's (u's) histogram and of the
    joint; zero and NaN in no case."""
    from tests.reference import BIN_EDGES, JOINT_EDGES, bin_of
    from tests.test_distributions import edge_values

    values = edge_values(torch.float32)
    counted = (values != 0) & ~values.isnan()
    magnitude = values[counted].abs().double().numpy()
    bins = torch.from_numpy(bin_of(BIN_EDGES, magnitude))
    joint_bins = torch.from_numpy(bin_of(JOINT_EDGES, magnitude))
    one_bin = int(bin_of(JOINT_EDGES, torch.ones(1, dtype=torch.float64).numpy())[0])
    negative = (values[counted] < 0).long()
    for quantity, (g, u) in enumerate([(values, torch.ones_like(values)),
                                        (torch.ones_like(values), values)]):  # fmt: skip
        ours = totals(1, with_distributions=True)
        valid = torch.ones(1, len(values), dtype=torch.bool)
        triton_pass.TritonPass(ACTS["silu"], device=g.device, dtype=torch.float32)(
            g.view(1, -1, 1), u.view(1, -1, 1), valid, ours, None
        )
        case = negative * 2 if quantity == 0 else negative  # g < 0: cases 2, 3; u < 0: 1, 3
        expected = torch.zeros(len(CASES), distributions.N_BINS, dtype=torch.int32)
        expected.index_put_((case, bins), torch.ones_like(bins, dtype=torch.int32),
                            accumulate=True)  # fmt: skip
        assert ours.histogram is not None and ours.joint is not None
        assert torch.equal(ours.histogram[:, quantity, :, 0], expected)
        expected_joint = torch.zeros(len(CASES), distributions.N_JOINT_BINS,
                                     distributions.N_JOINT_BINS, dtype=torch.int32)  # fmt: skip
        cell = (joint_bins, torch.full_like(joint_bins, one_bin))[:: 1 if quantity == 0 else -1]
        expected_joint.index_put_((case, *cell), torch.ones_like(case, dtype=torch.int32),
                                  accumulate=True)  # fmt: skip
        assert torch.equal(ours.joint[..., 0], expected_joint)


def near_bin_edges(x: torch.Tensor) -> int:
    """How many of ``x`` lie within a relative 1e-6 of a magnitude bin's edge (where act(g)
    computed by the kernel and by torch, a few ulps apart, may fall in neighbouring bins)."""
    edges = torch.from_numpy(distributions.bin_edges()[1:-1])
    relative = (x.abs().double().unsqueeze(-1) / edges - 1).abs()
    return int((relative < 1e-6).any(dim=-1).sum())


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_distributions_equal_the_torch_pass(act, dtype):
    """Histograms, joint histograms and the typical draw (positions identical, values
    within the rounding of act(g)); with the model's own act(g), histograms identical."""
    g, u, valid = batch(dtype, texts=4, length=45, neurons=37, seed=4)
    fn, salt = ACTS[act], salts(4, 37, seed=5)
    g32 = g.float()
    for swish in (None, fn(g32)):
        ours, theirs = totals(37, True), totals(37, True)
        got = triton_pass.TritonPass(fn, device=g.device, dtype=torch.float32)(
            g, u, valid, ours, salt, swish
        )
        expected = TorchPass(fn, device=g.device, dtype=torch.float32)(
            g32, u.float(), valid, theirs, salt, swish
        )
        assert torch.equal(ours.joint, theirs.joint)
        assert torch.equal(ours.histogram[:, :2], theirs.histogram[:, :2])  # g and u
        a = fn(g32 * valid.unsqueeze(-1))
        near = 0 if swish is not None else near_bin_edges(a) + near_bin_edges(a * u.float())
        assert int((ours.histogram - theirs.histogram).abs().sum()) <= 2 * near
        assert int(ours.histogram.sum()) == int(theirs.histogram.sum())
        assert torch.equal(got.typical_position, expected.typical_position)
        torch.testing.assert_close(got.typical_value, expected.typical_value, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    drawn = got.typical_position >= 0
    assert drawn.any() and (salt[~drawn] == -1).sum() > 0  # some drawn, some not asked for


def test_the_kernels_draw_is_the_documented_hash():
    """Each drawn token has the smallest token priority (then position) among its case's
    tokens, by the contract's hash (tests.reference), brute force over one neuron."""
    from tests.reference import token_priority

    g, u, valid = batch(torch.float32, neurons=3, seed=6)  # 3 texts of 37 tokens
    priority = salts(3, 3, seed=7)  # the texts' draw priorities (-1: not drawn)
    salt = torch.where(priority >= 0, distributions.token_salt(priority), -1)
    got = triton_pass.TritonPass(ACTS["gelu"], device=g.device, dtype=torch.float32)(
        g, u, valid, totals(3), salt
    )
    for c in range(len(CASES)):
        for text in range(3):
            for neuron in range(3):
                gs, us = g[text, :, neuron], u[text, :, neuron]
                case = (gs < 0).long() * 2 + (us < 0).long()
                tokens = [p for p in range(37) if valid[text, p] and gs[p] != 0 and us[p] != 0
                          and case[p] == c]  # fmt: skip
                text_priority = int(priority[c, text, neuron])
                keys = [(token_priority(text_priority, p), p) for p in tokens]
                keys = keys if text_priority >= 0 else []
                expected = min(keys)[1] if keys else -1
                assert int(got.typical_position[c, text, neuron]) == expected


def test_other_activations_and_float64_are_refused():
    with pytest.raises(ValueError, match="SiLU, GELU"):
        triton_pass.TritonPass(torch.relu, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="float32"):
        triton_pass.TritonPass(torch.nn.functional.silu, device=torch.device("cpu"),
                               dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gemma"])  # SiLU; GELU-tanh
def test_an_atlas_scanned_with_triton_equals_numba_and_torch(family):
    """Counts, ranked lists and positions identical; sums, extremes and values within the
    rounding of act(g); histograms and typical examples identical."""
    import gatescope
    from gatescope.options import ScanOptions
    from tests.models import tiny_model
    from tests.test_scan import random_corpus

    model = tiny_model(family, dtype=torch.bfloat16, num_layers=2, d_mlp=48)
    corpus = random_corpus(n_texts=9)
    atlases = {}
    for backend in ("triton", "numba", "torch"):
        options = ScanOptions(k=4, batch_size=4, stats_backend=backend)
        atlases[backend] = gatescope.scan(model, corpus, options, progress=False)
    assert {b: a.meta.options.stats_backend for b, a in atlases.items()} == {
        "triton": "triton",
        "numba": "numba",
        "torch": "torch",
    }
    ours = atlases["triton"]
    for other in ("numba", "torch"):
        theirs = atlases[other]
        for name in ("count", "top_text", "top_position", "histogram", "joint",
                     "typical_text", "typical_position"):  # fmt: skip
            assert torch.equal(ours.tensor(name), theirs.tensor(name)), (other, name)
        for name in ("sum", "max", "min", "top_value", "typical_value"):
            got, expected = ours.tensor(name), theirs.tensor(name)
            message = f"{other} {name}"
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True,
                                       msg=message)  # fmt: skip


def test_what_each_kernel_cannot_do_is_one_sentence(monkeypatch):
    import sys

    from gatescope.stats.accumulator import kernel_problem

    cpu, cuda, silu = torch.device("cpu"), torch.device("cuda"), ACTS["silu"]
    assert "runs on the CPU, not on cuda" in kernel_problem("cpu", cuda, torch.float32)
    assert kernel_problem("torch", cuda, torch.float64) is None
    assert kernel_problem("triton", cpu, torch.float32, silu) is None  # TRITON_INTERPRET=1
    assert "float32" in kernel_problem("triton", cuda, torch.float64, silu)
    assert "SiLU, GELU and GELU-tanh" in kernel_problem("triton", cuda, torch.float32, torch.relu)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA GPUs, not on cpu" in kernel_problem("triton", cpu, torch.float32, silu)
    monkeypatch.setitem(sys.modules, "gatescope.stats.triton_pass", None)  # not installed
    assert "pip install gatescope[gpu]" in kernel_problem("triton", cuda, torch.float32, silu)


def test_stats_backend_is_an_option_of_the_scan_command():
    from click.testing import CliRunner

    from gatescope.cli import cli

    help_text = CliRunner().invoke(cli, ["scan", "--help"]).output
    assert "--stats-backend [auto|triton|numba|torch]" in help_text
    bad = CliRunner().invoke(cli, ["scan", "m", "c", "--out", "o", "--stats-backend", "cuda"])
    assert bad.exit_code == 2 and "cuda" in bad.output


def test_an_automatic_triton_choice_falls_back_to_torch_if_the_kernel_fails(monkeypatch):
    """A GPU whose Triton cannot compile the kernel still scans (with a warning)."""
    from gatescope.stats import NeuronStats

    g, u, valid = batch(torch.float32, seed=3)
    stats = NeuronStats(g.shape[2], torch.nn.functional.silu, k=3, kernel="triton")
    stats._auto_triton = True  # as "auto" sets it on CUDA

    def broken(*_, **__):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(stats, "_pass", broken)
    reference = NeuronStats(g.shape[2], torch.nn.functional.silu, k=3, kernel="torch")
    texts = torch.arange(g.shape[0])
    with pytest.warns(UserWarning, match="Triton kernel failed"):
        stats.update(g, u, texts, valid)
    reference.update(g, u, texts, valid)
    assert stats.kernel == "torch"
    assert torch.equal(stats.count, reference.count)
    assert torch.equal(stats.top_position, reference.top_position)
    stats._auto_triton = False
    monkeypatch.setattr(stats, "_pass", broken)
    with pytest.raises(RuntimeError, match="cannot compile"):  # asked for: no fallback
        stats.update(g, u, texts, valid)


def test_every_tuned_tile_compiles_for_hopper_without_spilling():
    """What the interpreter cannot show: the kernel compiles for the GPU it is tuned on
    (sm_90, ahead of time with Triton's own ptxas), for every tile, activation and with or
    without the distributions, and its state fits in registers (a spill would send it
    through local memory)."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "scripts" / "kernel_resources.py"
    out = subprocess.run([sys.executable, script, "--all"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    from gatescope.stats.triton_kernel import TILES

    # (distributions: yes, yes with an expert's packed positions, no) x (act(g) or the model's)
    assert len(lines) == len(TILES) * len(triton_pass.ACTIVATIONS) * 3 * 2
    assert all("stack    0 B" in line for line in lines), out.stdout
