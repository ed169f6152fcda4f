"""The statistics pass as one fused Triton kernel: the GPU twin of the numba CPU kernel.

One program per (text, block of neurons) walks the text's positions in tiles, reading ``g``
and ``u`` once in the model's dtype (bf16, fp16 or fp32), forming ``act(g)`` and
``act(g) * u`` in float32 registers with the model's own activation (SiLU, GELU or
GELU-tanh, recognized by what it computes), and keeps per (case, quantity) the strongest
|value| and its first position, the weakest |value|, float64 sums and per case the counts.
It writes them per text; torch then reduces the texts (float64 sums, int64 counts) into the
layer's totals on the device, without a host synchronisation.

The distributions are fused too: every token adds to its bins with an atomic add, and per
(case, text, neuron) the kernel keeps the smallest draw key of the typical examples; only
the drawn tokens' four values are gathered afterwards (four per text and neuron).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import torch
import triton
from torch import Tensor

from gatescope.constants import CASES, QUANTITIES
from gatescope.stats import distributions
from gatescope.stats.batch import PerText, Totals
from gatescope.stats.triton_kernel import stats_kernel, tuned_stats_kernel

__all__ = ["ACTIVATIONS", "TritonPass", "activation_kind"]

N_CASES = len(CASES)
N_QUANTITIES = len(QUANTITIES)
PAIRS = N_CASES * N_QUANTITIES

#: The interpreter's tile: positions, and neurons per program at most.
INTERPRETED_BLOCK_P, INTERPRETED_BLOCK_N = 16, 128

assert distributions.BINS_PER_OCTAVE == 2 and distributions.JOINT_OCTAVES == 2, "out of date"
#: The kernel's copy of the distributions' rules.
_DISTRIBUTION_CONSTANTS = {
    "LOWEST": distributions.LOWEST,
    "HALF_OCTAVE": distributions.HALF_OCTAVE,
    "N_BINS": distributions.N_BINS,
    "JOINT_LOWEST": distributions.JOINT_LOWEST,
    "N_JOINT": distributions.N_JOINT_BINS,
    "MIX_MULTIPLIER": distributions.MIX_MULTIPLIER,
    "KEY_LOW_BITS": distributions.KEY_LOW_BITS,
}

#: The activations the kernel computes itself, by name: its ``ACT`` constant.
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def activation_kind(act: Callable[[Tensor], Tensor]) -> str | None:
    """Which of :data:`ACTIVATIONS` ``act`` computes (compared on a grid of values in
    float32), or None for any other function."""
    x = torch.linspace(-8, 8, 257, dtype=torch.float32)
    with torch.no_grad():
        try:
            y = act(x)
        except Exception:  # an activation that refuses a plain CPU tensor is not one of ours
            return None
    references = {
        "silu": torch.nn.functional.silu(x),
        "gelu": torch.nn.functional.gelu(x),
        "gelu_tanh": torch.nn.functional.gelu(x, approximate="tanh"),
    }
    for name, reference in references.items():
        if isinstance(y, Tensor) and y.shape == x.shape and torch.allclose(y, reference, atol=1e-6):
            return name
    return None


class TritonPass:
    """The :class:`~gatescope.stats.batch.StatisticsPass` of the Triton kernel.

    Args:
        act: The model's activation; one of :data:`ACTIVATIONS` (see :func:`activation_kind`).
        device: Where the tensors live (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        dtype: The statistics' dtype: float32 (the kernel computes in float32).
    """

    def __init__(self, act: Callable[[Tensor], Tensor], *, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        kind = activation_kind(act)
        if kind is None:
            raise ValueError("the Triton pass computes SiLU, GELU and GELU-tanh only")
        if dtype != torch.float32:
            raise ValueError(f"the Triton pass computes in float32, not {dtype}")
        self.act, self.kind, self.device, self.dtype = act, kind, device, dtype

    def __call__(
        self,
        gate: Tensor,
        up: Tensor,
        valid: Tensor,
        totals: Totals,
        salt: Tensor | None,
        swish: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> PerText:
        """The :class:`~gatescope.stats.batch.StatisticsPass` contract; ``gate``, ``up`` and
        ``swish`` may be in the model's dtype (bf16, fp16, fp32): they are read as they are."""
        texts, length, neurons = gate.shape
        gate, up = gate.contiguous(), up.contiguous()
        swish = swish.contiguous() if swish is not None else None
        empty = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=gate.device)  # noqa: E731
        strength = empty(PAIRS, texts, neurons, dtype=torch.float32)
        position = empty(PAIRS, texts, neurons, dtype=torch.int32)
        weakest = empty(PAIRS, texts, neurons, dtype=torch.float32)
        sums = empty(PAIRS, texts, neurons, dtype=torch.float64)
        count = empty(N_CASES, texts, neurons, dtype=torch.int32)
        key = empty(N_CASES, texts, neurons, dtype=torch.int64) if salt is not None else count
        histograms = totals.histogram is not None and totals.joint is not None
        unused = count  # the pointer of an output the kernel does not touch
        launch, tile, on_device = _launcher(gate.device, texts, neurons)
        with on_device:
            launch(
                gate, up, swish if swish is not None else unused,
                _valid(valid, positions), strength, position, weakest, sums, count,
                totals.histogram if histograms else unused,
                totals.joint if histograms else unused,
                salt.contiguous() if salt is not None else unused, key,
                texts, length, neurons,
                ACT=ACTIVATIONS[self.kind], HAS_SWISH=swish is not None, HISTOGRAMS=histograms,
                TYPICAL=salt is not None, PACKED=positions is not None,
                **_DISTRIBUTION_CONSTANTS, **tile,
            )  # fmt: skip
        # The texts' partials into the layer's totals, on the device.
        totals.count.add_(count.sum(dim=1, dtype=torch.int64))
        totals.sums.add_(sums.sum(dim=1).view(N_CASES, N_QUANTITIES, neurons))
        torch.minimum(
            totals.weakest,
            weakest.amin(dim=1).view(N_CASES, N_QUANTITIES, neurons).to(totals.weakest.dtype),
            out=totals.weakest,
        )
        per_text = PerText(strength.to(self.dtype), position.to(torch.int64))
        if salt is None:
            return per_text
        typical_position, typical_value = self._typical(gate, up, swish, key)
        return PerText(per_text.strength, per_text.position, typical_position, typical_value)

    def _typical(
        self, gate: Tensor, up: Tensor, swish: Tensor | None, key: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The drawn tokens from the kernel's smallest keys [case, text, neuron]: their
        positions (-1: none) and [case, quantity, text, neuron] four values (0: none),
        gathered from ``gate`` and ``up`` (a few values per text: act(g) as the other passes
        compute it)."""
        found = key != distributions.NO_KEY
        position = torch.where(found, key & (2**distributions.KEY_LOW_BITS - 1), -1)
        # [text, case, neuron]: each text's g, u (and act(g)) at its four drawn tokens
        at = position.clamp(min=0).transpose(0, 1)
        g, u = gate.gather(1, at).to(self.dtype), up.gather(1, at).to(self.dtype)
        a = self.act(g) if swish is None else swish.gather(1, at).to(self.dtype)
        value = torch.stack([g, u, a, a * u]).transpose(1, 2)  # [quantity, case, text, neuron]
        return position, value.transpose(0, 1).where(found.unsqueeze(1), 0)


def _valid(valid: Tensor, positions: Tensor | None) -> Tensor:
    """The kernel's ``valid``: uint8 0/1, or where the tokens are packed (``positions``)
    int32, each counted token's position in its text and -1 for the others (one load for
    both)."""
    if positions is None:
        return valid.to(torch.uint8).contiguous()
    return torch.where(valid, positions, -1).to(torch.int32).contiguous()


def _launcher(
    device: torch.device, texts: int, neurons: int
) -> tuple[Any, dict[str, int], contextlib.AbstractContextManager]:
    """The kernel launched over its grid, the tile arguments it takes, and the context to
    launch it in: on a GPU the autotuned kernel (the tile measured fastest for this neuron
    count) on the tensors' own GPU (Triton launches on the current one); in Triton's
    interpreter (the tests) one fixed tile."""
    if device.type == "cuda":
        grid = lambda tile: (texts, triton.cdiv(neurons, tile["BLOCK_N"]))  # noqa: E731
        return tuned_stats_kernel[grid], {}, torch.cuda.device(device)
    block_n = min(INTERPRETED_BLOCK_N, triton.next_power_of_2(neurons))
    tile = {"BLOCK_P": INTERPRETED_BLOCK_P, "BLOCK_N": block_n}
    launch = cast(Any, stats_kernel)[(texts, triton.cdiv(neurons, block_n))]
    return launch, tile, contextlib.nullcontext()
