"""The four quantities of a gated neuron, and the dtype they are computed in.

For a token with gate pre-activation ``g`` and in pre-activation ``u`` (docs/architecture.md,
"The math"): ``hook_pre = g``, ``hook_pre_linear = u``, ``swish = act(g)`` with the model's
own activation, ``hook_post = act(g) * u``. The scan's statistics passes and the
recomputation of a page's texts all use this definition; the numba kernel forms the product
``act(g) * u`` itself, in the same dtype, and is tested equal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["fill_quantities", "gated_quantities", "sign_cases", "stats_dtype", "strongest_token"]


def stats_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics: float32 for float32/bfloat16/float16 models (their
    values round no further), float64 for float64 models."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def fill_quantities(q: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """Completes ``q`` in place and returns it.

    Args:
        q: [quantity, ...] with ``g`` in ``q[0]`` and ``u`` in ``q[1]``; ``q[2]`` becomes
            ``act(g)`` and ``q[3]`` ``act(g) * u``.
        act: The model's activation function.
    """
    q[2].copy_(act(q[0]))
    torch.mul(q[2], q[1], out=q[3])
    return q


def gated_quantities(gate: Tensor, up: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """[quantity, *gate.shape]: ``g``, ``u``, ``act(g)``, ``act(g) * u`` in the dtype of
    ``gate`` (already the statistics' dtype)."""
    q = torch.empty((4, *gate.shape), dtype=gate.dtype, device=gate.device)
    q[0].copy_(gate)
    q[1].copy_(up)
    return fill_quantities(q, act)


def sign_cases(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The sign case of each (g, u): its index into :data:`~gatescope.constants.CASES`,
    ``2 * (g < 0) + (u < 0)``, or -1 where g or u is 0 or NaN (a token of no case).

    Args:
        g: ``hook_pre`` values, any shape.
        u: ``hook_pre_linear`` values, the same shape.
    """
    cases = 2 * (g < 0) + (u < 0)
    in_a_case = (g != 0) & (u != 0) & ~np.isnan(g) & ~np.isnan(u)
    return np.where(in_a_case, cases, -1).astype(np.int8)


def strongest_token(values: np.ndarray, case: int, quantity: int, first: int = 0) -> int | None:
    """A text's strongest token of a sign case, as the ranked lists pick it.

    Args:
        values: [quantity, pos] one neuron's ``g``, ``u``, ``act(g)``, ``act(g) * u`` on one
            text (:func:`gated_quantities`).
        case: Index into :data:`~gatescope.constants.CASES`.
        quantity: Index into :data:`~gatescope.constants.QUANTITIES`.
        first: The first counted position (1 when the first token is not counted).

    Returns:
        The first position of the largest ``|value|`` among the case's counted tokens, or
        None where the case does not occur in the text.
    """
    in_case = sign_cases(values[0, first:], values[1, first:]) == case
    if not in_case.any():
        return None
    strength = np.where(in_case, np.abs(values[quantity, first:]), -np.inf)
    return first + int(np.argmax(strength))
