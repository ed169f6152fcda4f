"""The routed experts of mixture-of-experts models: found by structure, captured exactly.

transformers 5.x keeps a layer's routed experts in one module (``MixtralExperts``,
``Qwen2MoeExperts``, ``GptOssExperts``, ...) whose 3-D parameters hold every expert's gated
MLP: ``gate_up_proj`` [expert, 2 x d_ff, d_model] and ``down_proj`` [expert, d_model, d_ff]
(gpt-oss: transposed, [expert, d_model, 2 x d_ff] with biases, gate and up interleaved). The
layer's MoE block routes first and calls it as ``experts(hidden [token, d_model],
top_k_index [token, k], top_k_weights [token, k])``. Shared (always-on) experts and the
dense layers of some MoE models are ordinary gated MLPs (:mod:`gatescope.arch`).

**The gate.** Every experts module turns a row of ``gate_up`` into the product with its
``_apply_gate``. The default one is ``act(gate) * up`` with ``gate, up = chunk(2)``: there
x_gate is ``gate`` and x_in is ``up``. gpt-oss clamps both and adds 1 to up:
``g = min(gate, limit)``, ``act(g) = g * sigmoid(alpha * g)``, ``u = clamp(up, -limit,
limit) + 1``: its four quantities are those factors of the product it computes. Any other
gate is refused by name.

**Capture.** While captured, an experts module runs :func:`_routed_forward` instead of its
own forward: the computation of transformers' eager experts (per expert, its tokens'
``gate_up`` projection, the gate, the down projection, weighted by the router and added
back), with the gate split as above, so the g and u seen are exactly those that produce the
layer's output (one matmul per expert, as the model does; no second one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gatescope.errors import GatescopeError

__all__ = ["ExpertsCallback", "RoutedExperts", "find_routed_experts", "refusal"]

#: Called once per expert and forward with the expert's index and, for its routed tokens:
#: ``token`` [tokens] int64 (rows of the flattened batch), ``gate``, ``up``, ``act``
#: [tokens, d_ff] (x_gate, x_in, act(x_gate)) and ``weight`` [tokens] (the router's weight).
ExpertsCallback = Callable[[int, Tensor, Tensor, Tensor, Tensor, Tensor], None]


@dataclass(frozen=True)
class RoutedExperts:
    """The routed experts of one mixture-of-experts layer."""

    name: str
    module: nn.Module = field(repr=False)
    n_experts: int
    d_ff: int  # neurons per expert
    gate: str = "default"  # "default" or gpt-oss's "clamped" (see the module docstring)

    def __post_init__(self) -> None:
        if self.n_experts < 1 or self.d_ff < 1:
            raise ValueError(f"{self.name}: {self.n_experts} experts of {self.d_ff} neurons")
        if self.gate not in ("default", "clamped"):
            raise ValueError(f"{self.name}: unknown gate {self.gate!r}")

    @property
    def transposed(self) -> bool:
        """Whether the weights are [expert, in, out] (gpt-oss) rather than [expert, out, in]."""
        return bool(getattr(self.module, "is_transposed", False))

    def gate_up(self, expert: int, x: Tensor) -> Tensor:
        """[tokens, 2 x d_ff] the gate and up projections of ``x`` [tokens, d_model]."""
        return self._project(x, expert, "gate_up_proj")

    def down(self, expert: int, y: Tensor) -> Tensor:
        """[tokens, d_model] the down projection of ``y`` [tokens, d_ff]."""
        return self._project(y, expert, "down_proj")

    def _project(self, x: Tensor, expert: int, name: str) -> Tensor:
        weight = getattr(self.module, name)[expert]
        bias = getattr(self.module, f"{name}_bias", None)
        bias = bias[expert] if bias is not None else None
        if self.transposed:
            return x @ weight if bias is None else x @ weight + bias
        return nn.functional.linear(x, weight, bias)

    def glu_weights(self, expert: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Views of expert ``expert``'s weights, one row (or column) per neuron: ``w_gate``
        and ``w_in`` [d_ff, d_model] (the rows of gate_up that x_gate and x_in come from),
        the up bias [d_ff] or None, ``w_out`` [d_model, d_ff]."""
        gate_up = self.module.get_parameter("gate_up_proj").detach()[expert]
        down = self.module.get_parameter("down_proj").detach()[expert]
        if self.transposed:  # [d_model, 2 x d_ff] and [d_ff, d_model]
            gate_up, down = gate_up.T, down.T
        bias = getattr(self.module, "gate_up_proj_bias", None)
        # gpt-oss interleaves gate and up; the default gate has them as two halves.
        gate, up = (slice(0, None, 2), slice(1, None, 2)) if self.gate == "clamped" else (
            slice(0, self.d_ff), slice(self.d_ff, None))  # fmt: skip
        b_in = None if bias is None else bias.detach()[expert, up]
        return gate_up[gate], gate_up[up], b_in, down

    def refactor_problem(self) -> str | None:
        """Why ``--refactor-glu`` cannot flip these experts' neurons (None: it can)."""
        if self.gate == "default":
            return None
        return (
            f"{self.name} computes x_in = clamp(up) + 1 (gpt-oss), which a flip of up's sign "
            "does not negate: --refactor-glu cannot refactor its experts."
        )

    def split_gate(self, gate_up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x_gate, x_in and act(x_gate) [tokens, d_ff] of a ``gate_up`` [tokens, 2 x d_ff],
        as the module's own ``_apply_gate`` forms them (its result is ``act * x_in``)."""
        module: Any = self.module
        if self.gate == "clamped":  # gpt-oss
            gate = gate_up[..., ::2].clamp(min=None, max=module.limit)
            up = gate_up[..., 1::2].clamp(min=-module.limit, max=module.limit)
            return gate, up + 1, self.act(gate)
        gate, up = gate_up.chunk(2, dim=-1)
        return gate, up, self.act(gate)

    def act(self, gate: Tensor) -> Tensor:
        """act(x_gate), as the module's gate applies it (gpt-oss: ``g * sigmoid(alpha g)``
        of the clamped gate)."""
        module: Any = self.module
        if self.gate == "clamped":
            return gate * torch.sigmoid(gate * module.alpha)
        return module.act_fn(gate)

    @property
    def act_name(self) -> str:
        """The activation's name, for the atlas: its class, or gpt-oss's clamped SwiGLU."""
        module: Any = self.module
        if self.gate == "clamped":
            return f"clamped SwiGLU (alpha {module.alpha}, limit {module.limit})"
        return type(module.act_fn).__name__


def find_routed_experts(model: nn.Module) -> list[RoutedExperts]:
    """Every module of ``model`` that holds routed experts: 3-D ``down_proj`` and
    ``gate_up_proj`` parameters, one matrix per expert, in module order. Found by structure,
    as :func:`gatescope.arch.find_gated_mlps` finds dense MLPs.

    Raises:
        GatescopeError: For experts whose gate gatescope cannot split into x_gate and x_in,
            or whose projections are separate 3-D ``gate_proj`` and ``up_proj``.
    """
    found = []
    for name, module in model.named_modules():
        weights = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
        down = weights.get("down_proj")
        separate = {"gate_proj", "up_proj"} <= weights.keys()
        if down is None or not ("gate_up_proj" in weights or separate):
            continue
        kind, gate = type(module).__name__, _gate_kind(module)
        if separate or gate is None:
            what = "separate gate_proj and up_proj" if separate else f"{kind}._apply_gate"
            raise GatescopeError(
                f"{name} ({kind}) holds routed experts whose gate ({what}) gatescope cannot "
                "split into x_gate and x_in; it knows gate_up_proj with transformers' default "
                "gate and gpt-oss's clamped one."
            )
        # down_proj maps d_ff -> d_model: [experts, d_model, d_ff], or [experts, d_ff, d_model]
        # where the module says its weights are transposed.
        d_ff = down.shape[1] if getattr(module, "is_transposed", False) else down.shape[2]
        found.append(RoutedExperts(name, module, down.shape[0], int(d_ff), gate))
    return found


def refusal(model: nn.Module, experts: Sequence[RoutedExperts]) -> str:
    """One sentence: the model is a mixture of experts, what its experts are, and that what
    takes dense MLPs alone (``find_gated_mlps``, reading weights from the checkpoint's files)
    does not take it."""
    config = getattr(model, "config", None)
    model_name = getattr(config, "model_type", None) or type(model).__name__
    first = experts[0]
    shapes = sorted({(e.n_experts, e.d_ff) for e in experts})
    sizes = " or ".join(f"{n} experts of {d} neurons" for n, d in shapes)
    return (
        f"{model_name} is a mixture-of-experts model ({len(experts)} layers of {sizes}, the "
        f"first in {first.name}, {type(first.module).__name__}): its weights are read from "
        "the loaded model, not from its checkpoint's files, which hold its experts in its "
        "family's own layout (and its dense or shared-expert MLPs alone would misrepresent it)."
    )


class ExpertsCapture:
    """Runs an experts module's routed computation with a callback per expert, until
    :meth:`remove` (or the end of a ``with`` block) gives it back its own forward.

    Under accelerate (a device map, offloading) the module's ``forward`` is accelerate's
    hook, which moves the weights and then calls ``_old_forward``: that one is replaced
    instead, so the weights still arrive where the computation runs."""

    def __init__(self, experts: RoutedExperts, callback: ExpertsCallback) -> None:
        self._module = experts.module
        # nn.Module.__call__ looks an instance attribute up before the class's forward.
        self._slot = "_old_forward" if hasattr(self._module, "_hf_hook") else "forward"
        self._saved = self._module.__dict__.get(self._slot)

        def forward(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
            return _routed_forward(experts, hidden, top_k_index, top_k_weights, callback)

        setattr(self._module, self._slot, forward)

    def remove(self) -> None:
        """Gives the module the forward it had back (calling it twice is harmless)."""
        if self._saved is not None:
            setattr(self._module, self._slot, self._saved)
        else:
            self._module.__dict__.pop(self._slot, None)

    def __enter__(self) -> ExpertsCapture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _routed_forward(
    experts: RoutedExperts, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
    callback: ExpertsCallback,
) -> Tensor:  # fmt: skip
    """transformers' eager experts computation, one expert at a time, calling ``callback``
    with each expert's tokens (ascending) and values. The tokens are grouped by expert with
    one sort, and the host learns the group sizes once per call.

    Args:
        hidden: [tokens, d_model] the layer's (flattened) input.
        top_k_index: [tokens, k] each token's experts.
        top_k_weights: [tokens, k] their router weights.

    Returns:
        [tokens, d_model] the weighted sum of each token's experts' outputs.
    """
    module: Any = experts.module
    k = top_k_index.shape[-1]
    choice = top_k_index.reshape(-1)  # [tokens * k]: (token, slot) pairs, token-major
    pairs = torch.argsort(choice, stable=True)  # by expert, then token
    sizes = torch.bincount(choice, minlength=experts.n_experts).tolist()
    out = torch.zeros_like(hidden)
    start = 0
    for expert, size in enumerate(sizes[: experts.n_experts]):
        if size == 0:
            continue
        pair = pairs[start : start + size]
        start += size
        token, weight = pair // k, top_k_weights.reshape(-1)[pair]  # [routed]
        gate, up, act = experts.split_gate(experts.gate_up(expert, hidden[token]))
        callback(expert, token, gate, up, act, weight)
        y = experts.down(expert, act * up)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        out.index_add_(0, token, (y * weight.unsqueeze(-1)).to(out.dtype))
    return out


def _gate_kind(module: nn.Module) -> str | None:
    """``"default"`` (act(gate) * up of gate_up's two halves), ``"clamped"`` (gpt-oss), or
    None for a gate gatescope does not know."""
    try:  # transformers' default gate (5.x)
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is _default_apply_gate and callable(getattr(module, "act_fn", None)):
        return "default"
    concatenated = getattr(module, "is_concatenated", True)
    if not concatenated and all(hasattr(module, a) for a in ("alpha", "limit")):
        return "clamped"
    return None
