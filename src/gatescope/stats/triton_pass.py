"""The statistics pass as one fused Triton kernel: the GPU twin of the numba CPU kernel.

One program per (text, block of neurons) walks the text's positions in tiles, reading ``g``
and ``u`` once in the model's dtype (bf16, fp16 or fp32), forming ``act(g)`` and
``act(g) * u`` in float32 registers with the model's own activation (SiLU, GELU or
GELU-tanh, recognized by what it computes), and keeps per (case, quantity) the strongest
|value| and its first position, the weakest |value|, float64 sums and per case the counts.
It writes them per text; torch then reduces the texts (float64 sums, int64 counts) into the
layer's totals on the device, without a host synchronisation.

The distributions (histograms, typical draws) are still computed by the torch pass's
functions on this batch's quantities: correct, not yet fused (issue 14's next step).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
from torch import Tensor

from gatescope.constants import CASES, QUANTITIES
from gatescope.stats.batch import PerText, Totals
from gatescope.stats.triton_kernel import stats_kernel

__all__ = ["ACTIVATIONS", "TritonPass", "activation_kind"]

N_CASES = len(CASES)
N_QUANTITIES = len(QUANTITIES)
PAIRS = N_CASES * N_QUANTITIES

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
    ) -> PerText:
        """The :class:`~gatescope.stats.batch.StatisticsPass` contract; ``gate``, ``up`` and
        ``swish`` may be in the model's dtype (bf16, fp16, fp32): they are read as they are."""
        texts, length, neurons = gate.shape
        gate, up = gate.contiguous(), up.contiguous()
        has_swish = swish is not None
        swish = swish.contiguous() if swish is not None else gate  # unread when absent
        empty = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=gate.device)  # noqa: E731
        strength = empty(PAIRS, texts, neurons, dtype=torch.float32)
        position = empty(PAIRS, texts, neurons, dtype=torch.int32)
        weakest = empty(PAIRS, texts, neurons, dtype=torch.float32)
        sums = empty(PAIRS, texts, neurons, dtype=torch.float64)
        count = empty(N_CASES, texts, neurons, dtype=torch.int32)
        block_n = min(128, triton.next_power_of_2(neurons))
        grid = (texts, triton.cdiv(neurons, block_n))
        kernel: Any = stats_kernel  # a Triton kernel: launched by its grid
        kernel[grid](
            gate, up, swish, valid.to(torch.uint8).contiguous(),
            strength, position, weakest, sums, count,
            texts, length, neurons,
            ACT=ACTIVATIONS[self.kind], HAS_SWISH=has_swish, BLOCK_P=16, BLOCK_N=block_n,
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
        if totals.histogram is None and salt is None:
            return per_text
        return self._distributions(gate, up, valid, totals, salt, swish if has_swish else None,
                                   per_text)  # fmt: skip

    def _distributions(
        self, gate: Tensor, up: Tensor, valid: Tensor, totals: Totals, salt: Tensor | None,
        swish: Tensor | None, per_text: PerText,
    ) -> PerText:  # fmt: skip
        """The histograms and typical draws, by the torch pass's functions on this batch's
        quantities (not yet in the kernel)."""
        from gatescope.stats.torch_pass import _add_histograms, _draw_typical

        counted = valid.unsqueeze(-1)
        g = gate.to(self.dtype) * counted  # uncounted tokens: g = 0, in no case
        u = up.to(self.dtype)
        a = self.act(g) if swish is None else swish.to(self.dtype) * counted
        q = torch.stack([g, u, a, a * u])  # [quantity, text, pos, neuron]
        in_case = (q[0] != 0) & (q[1] != 0) & ~q[0].isnan() & ~q[1].isnan()
        case = ((q[0] < 0).to(torch.int64) * 2 + (q[1] < 0).to(torch.int64)) * in_case
        if totals.histogram is not None and totals.joint is not None:
            _add_histograms(q, case, in_case, totals.histogram, totals.joint)
        if salt is None:
            return per_text
        texts, _, neurons = gate.shape
        typical_position = torch.empty(N_CASES, texts, neurons, dtype=torch.int64,
                                       device=gate.device)  # fmt: skip
        typical_value = torch.empty(N_CASES, N_QUANTITIES, texts, neurons, dtype=self.dtype,
                                    device=gate.device)  # fmt: skip
        _draw_typical(q, case, in_case, salt, typical_position, typical_value)
        return PerText(per_text.strength, per_text.position, typical_position, typical_value)
