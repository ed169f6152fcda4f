"""The Triton statistics pass, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set in conftest.py): against the torch pass and a float64 brute force, for every activation
and input dtype, then whole scans against the other passes."""

from __future__ import annotations

import pytest
import torch

from gatescope.constants import CASES, QUANTITIES
from gatescope.stats.batch import Totals
from gatescope.stats.torch_pass import TorchPass

triton_pass = pytest.importorskip("gatescope.stats.triton_pass", reason="triton is not installed")

ACTS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def totals(neurons: int) -> Totals:
    return Totals(
        torch.zeros(len(CASES), neurons, dtype=torch.int64),
        torch.zeros(len(CASES), len(QUANTITIES), neurons, dtype=torch.float64),
        torch.full((len(CASES), len(QUANTITIES), neurons), float("inf")),
    )


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
