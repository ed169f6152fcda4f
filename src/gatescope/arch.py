"""Find the gated MLPs of a Hugging Face causal language model, and hook them in place.

A gated MLP (SwiGLU, GEGLU) computes ``down_proj(act(gate_proj(x)) * up_proj(x))``, or with a
fused projection (Phi-3) ``gate, up = gate_up_proj(x).chunk(2, dim=-1)``. It is found by its
structure, not by a list of class names, so new families with the same layout work as they are.

Nothing here copies weights or replaces modules: the weights are views of the model's own
parameters, and :meth:`GatedMLP.capture` puts forward hooks on the model's own ``nn.Linear``
projections, so the values seen are exactly those the model computes.

Shapes: ``d_model`` is the residual width (hidden_size), ``d_mlp`` the number of neurons per
layer (intermediate_size), ``vocab`` the vocabulary size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from gatescope.errors import GatescopeError
from gatescope.experts import ExpertsCapture, RoutedExperts, find_routed_experts
from gatescope.experts import refusal as experts_refusal

__all__ = [
    "CaptureHandle",
    "ExpertForward",
    "ExpertLayer",
    "GatedMLP",
    "RoutedForward",
    "find_expert_layers",
    "find_gated_mlps",
    "find_mlp_layers",
    "glu_flips",
    "refactor_glu",
    "refactor_problem",
    "refactored_glu",
    "unembedding",
]

logger: logging.Logger = logging.getLogger(__name__)

#: Called once per forward of a gated MLP with ``gate: [..., d_mlp]`` and ``up: [..., d_mlp]``.
CaptureCallback = Callable[[Tensor, Tensor], None]
#: The same, with the model's own ``act(gate)`` ([..., d_mlp]) as a third argument, or None
#: for a forward in which the activation was not seen applied to the gate.
CaptureActCallback = Callable[[Tensor, Tensor, Tensor | None], None]

_NEEDS = "gatescope needs gate_proj/up_proj/down_proj or gate_up_proj/down_proj"

# Attributes under which Hugging Face MLPs keep their activation function.
_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")

# Class names of activation modules outside torch.nn and transformers.activations.
_ACT_NAME = re.compile(r"act|gelu|silu|swish|relu|tanh|sigmoid|mish", re.IGNORECASE)


class CaptureHandle:
    """The hooks registered by :meth:`GatedMLP.capture`; ``remove()`` takes them all off.

    Also a context manager: ``with mlp.capture(cb): model(ids)`` removes the hooks on exit.
    """

    def __init__(self, handles: Sequence[_Removable]) -> None:
        self._handles = list(handles)

    def remove(self) -> None:
        """Remove every hook this handle registered (calling it twice is harmless)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> CaptureHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class _Removable(Protocol):
    def remove(self) -> None: ...


@dataclass(frozen=True)
class GluWeights:
    """Views of one gated MLP's weights (an MLP, or one expert of a mixture), one row or
    column per neuron: what :func:`refactor_glu` reads and flips in place."""

    w_gate: Tensor  # [neurons, d_model]
    w_in: Tensor  # [neurons, d_model]
    b_in: Tensor | None  # [neurons], the up projection's bias
    w_out: Tensor  # [d_model, neurons]


@dataclass
class GatedMLP:
    """One gated MLP of a model: its projections, activation and weight views.

    Exactly one of (``gate_proj`` and ``up_proj``) or ``gate_up_proj`` is set. In a fused
    ``gate_up_proj`` (Phi-3) the first ``d_mlp`` output features are the gate and the last
    ``d_mlp`` the up ("in") projection, as ``Phi3MLP.forward`` splits them with ``chunk(2)``.

    Attributes:
        layer: Index among the model's gated MLPs, in module order (0 = closest to the input).
        name: Module path in the model, e.g. ``"model.layers.3.mlp"``.
        module: The MLP module itself.
        gate_proj: ``d_model -> d_mlp`` gate projection, or None when fused.
        up_proj: ``d_model -> d_mlp`` up ("in") projection, or None when fused.
        gate_up_proj: Fused ``d_model -> 2 * d_mlp`` projection, or None when separate.
        down_proj: ``d_mlp -> d_model`` output projection.
        act_fn: The model's own activation, applied to the gate (SiLU, GELU, GELU-tanh, ...).
    """

    layer: int
    name: str
    module: nn.Module = field(repr=False)
    gate_proj: nn.Linear | None = field(repr=False)
    up_proj: nn.Linear | None = field(repr=False)
    gate_up_proj: nn.Linear | None = field(repr=False)
    down_proj: nn.Linear = field(repr=False)
    act_fn: Callable[[Tensor], Tensor] = field(repr=False)

    @property
    def d_mlp(self) -> int:
        """Number of neurons (the width of gate, up and the input of down_proj)."""
        return self.down_proj.in_features

    @property
    def d_model(self) -> int:
        """Residual stream width (the input of gate/up, the output of down_proj)."""
        return self.down_proj.out_features

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the gate projection's weight, and so of ``g`` and ``act(g)``."""
        return self.w_gate().dtype

    @property
    def weight_device(self) -> torch.device:
        """Where the weights are ("meta" for a layer accelerate offloads until it runs)."""
        return self.down_proj.weight.device

    @property
    def act_name(self) -> str:
        """The activation's name, for the atlas."""
        return type(self.act_fn).__name__

    @property
    def fused(self) -> bool:
        """Whether gate and up come from one fused ``gate_up_proj``."""
        return self.gate_up_proj is not None

    def _separate(self) -> tuple[nn.Linear, nn.Linear]:
        """``(gate_proj, up_proj)`` of an MLP that is not fused (both are set then)."""
        assert self.gate_proj is not None and self.up_proj is not None, "set when not fused"
        return self.gate_proj, self.up_proj

    def w_gate(self) -> Tensor:
        """Gate weights, one row per neuron: ``[d_mlp, d_model]`` (a view, no copy)."""
        if self.gate_up_proj is not None:
            return self.gate_up_proj.weight.detach()[: self.d_mlp]
        gate_proj, _ = self._separate()
        return gate_proj.weight.detach()

    def w_in(self) -> Tensor:
        """Up ("in") weights, one row per neuron: ``[d_mlp, d_model]`` (a view, no copy)."""
        if self.gate_up_proj is not None:
            return self.gate_up_proj.weight.detach()[self.d_mlp :]
        _, up_proj = self._separate()
        return up_proj.weight.detach()

    def w_out(self) -> Tensor:
        """Output weights, one column per neuron: ``[d_model, d_mlp]`` (a view, no copy)."""
        return self.down_proj.weight.detach()

    def b_gate(self) -> Tensor | None:
        """Gate bias ``[d_mlp]`` (a view), or None when the projection has no bias."""
        if self.gate_up_proj is not None:
            bias = self.gate_up_proj.bias
            return None if bias is None else bias.detach()[: self.d_mlp]
        gate_proj, _ = self._separate()
        bias = gate_proj.bias
        return None if bias is None else bias.detach()

    def b_in(self) -> Tensor | None:
        """Up ("in") bias ``[d_mlp]`` (a view), or None when the projection has no bias."""
        if self.gate_up_proj is not None:
            bias = self.gate_up_proj.bias
            return None if bias is None else bias.detach()[self.d_mlp :]
        _, up_proj = self._separate()
        bias = up_proj.bias
        return None if bias is None else bias.detach()

    def glu_weights(self) -> list[GluWeights]:
        """The MLP's weights as :func:`refactor_glu` flips them (one block)."""
        return [GluWeights(self.w_gate(), self.w_in(), self.b_in(), self.w_out())]

    def capture(self, callback: CaptureCallback) -> CaptureHandle:
        """Call ``callback(gate, up)`` once for every forward of this MLP.

        ``gate`` is the gate projection's output and ``up`` the up projection's, both
        ``[..., d_mlp]``: the very tensors the model computed (or, when fused, the two
        ``chunk(2, dim=-1)`` views of its output). The callback must not modify them.

        Args:
            callback: Receives ``gate: [..., d_mlp]`` and ``up: [..., d_mlp]``.

        Returns:
            A handle whose ``remove()`` removes every hook registered here.
        """
        return self.capture_with_act(lambda gate, up, _act: callback(gate, up), watch_act=False)

    def capture_with_act(
        self, callback: CaptureActCallback, *, watch_act: bool = True
    ) -> CaptureHandle:
        """Call ``callback(gate, up, act)`` once for every forward of this MLP, where
        ``act`` is the model's own ``act_fn(gate)`` output, or None.

        The activation is watched when it is a module (a forward hook): its output counts
        only if its input is the captured gate itself (same memory, shape and strides). A
        pair whose activation is not seen (the model activates something else, or a copy)
        is called back with None when the next pair starts or the MLP's forward returns,
        whichever comes first. A functional activation is never seen: ``act`` is always
        None. ``watch_act=False`` never watches (``capture``).

        Returns:
            A handle whose ``remove()`` removes every hook registered here.
        """
        watch_act = watch_act and isinstance(self.act_fn, nn.Module)
        pending: dict[str, Tensor] = {}
        needed = {"gate", "up", "act"} if watch_act else {"gate", "up"}

        def flush() -> None:
            """Calls back with the pending pair, if whole, and starts afresh."""
            pair = pending.copy()
            pending.clear()
            if {"gate", "up"} <= pair.keys():
                callback(pair["gate"], pair["up"], pair.get("act"))

        def reset(_module: nn.Module, _inputs: object) -> None:
            # A forward that raised half-way must not leak into the next.
            pending.clear()

        def store(outputs: dict[str, Tensor]) -> None:
            if outputs.keys() & pending.keys():  # a new pair before the last was whole
                flush()
            pending.update(outputs)
            if needed <= pending.keys():
                flush()

        hooks = [self.module.register_forward_pre_hook(reset)]
        if self.gate_up_proj is not None:

            def fused_hook(_module: nn.Module, _inputs: object, output: Tensor) -> None:
                gate, up = output.chunk(2, dim=-1)
                store({"gate": gate, "up": up})

            hooks.append(self.gate_up_proj.register_forward_hook(fused_hook))
        else:
            gate_proj, up_proj = self._separate()

            def storing(key: str) -> Callable[[nn.Module, object, Tensor], None]:
                return lambda _module, _inputs, output: store({key: output})

            hooks += [
                gate_proj.register_forward_hook(storing("gate")),
                up_proj.register_forward_hook(storing("up")),
            ]
        if watch_act:
            assert isinstance(self.act_fn, nn.Module)

            def act_hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                gate = pending.get("gate")
                if gate is not None and inputs and _same_view(inputs[0], gate):
                    store({"act": output})

            def without_act(_module: nn.Module, _inputs: object, _output: object) -> None:
                flush()  # a pair whose activation was not seen

            hooks += [
                self.act_fn.register_forward_hook(act_hook),
                self.module.register_forward_hook(without_act),
            ]
        return CaptureHandle(hooks)


def _same_view(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are the same values in memory (a view of one and the same)."""
    return (
        isinstance(a, Tensor)
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def find_gated_mlps(model: nn.Module) -> list[GatedMLP]:
    """All gated MLPs of ``model``, ordered by layer.

    A gated MLP is a module whose direct children include an ``nn.Linear`` ``down_proj`` and
    either ``nn.Linear`` ``gate_proj`` and ``up_proj`` or an ``nn.Linear`` ``gate_up_proj``, and
    an activation (an ``act_fn`` / ``activation_fn`` attribute or an activation child).

    Args:
        model: A Hugging Face ``*ForCausalLM`` (or any ``nn.Module`` containing gated MLPs).

    Returns:
        One :class:`GatedMLP` per layer, ``layer`` = its order in ``model.named_modules()``.

    Raises:
        GatescopeError: If the model has no gated MLP (the message names the MLPs found), or
            if it is a mixture of experts (:func:`find_routed_experts`): its dense and
            shared-expert MLPs alone would misrepresent it.
    """
    experts = find_routed_experts(model)
    if experts:
        raise GatescopeError(experts_refusal(model, experts))
    return _gated_mlps(model)


def _gated_mlps(model: nn.Module) -> list[GatedMLP]:
    """:func:`find_gated_mlps` of a model known to have no routed experts."""
    mlps: list[GatedMLP] = []
    for name, module in model.named_modules():
        mlp = _as_gated_mlp(len(mlps), name, module)
        if mlp is not None:
            mlps.append(mlp)
    if not mlps:
        raise GatescopeError(_no_gated_mlp_message(model))
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n_layers, int) and n_layers != len(mlps):
        # Layer indices are positions among the gated MLPs; say so when they may not be the
        # decoder layer numbers (e.g. a mixture-of-experts model with some dense layers).
        logger.warning(
            "Found %d gated MLPs in a model with %d layers; gatescope numbers them 0..%d in "
            "module order.",
            len(mlps),
            n_layers,
            len(mlps) - 1,
        )
    logger.debug("Found %d gated MLPs, d_mlp=%d.", len(mlps), mlps[0].d_mlp)
    return mlps


@dataclass(frozen=True)
class ExpertLayer:
    """A decoder layer of a mixture-of-experts model: its routed experts, and the gated MLP
    beside them that every token goes through (its shared experts), if any."""

    layer: int  # index among the model's MLP layers, dense ones included, in module order
    name: str  # the decoder layer's module path
    module: nn.Module = field(repr=False)  # the decoder layer
    routed: RoutedExperts
    shared: GatedMLP | None

    @property
    def d_mlp(self) -> int:
        """Neurons of the layer: every routed expert's, then the shared experts'."""
        shared = self.shared.d_mlp if self.shared is not None else 0
        return self.routed.n_experts * self.routed.d_ff + shared

    def act_fn(self, gate: Tensor) -> Tensor:
        """act(x_gate) of the routed experts (the shared ones' is checked to be the same)."""
        return self.routed.act(gate)

    @property
    def act_name(self) -> str:
        return self.routed.act_name

    @property
    def weight_device(self) -> torch.device:
        down = self.routed.module.get_parameter("down_proj")  # [expert, d_model, d_ff]
        return down.device

    def glu_weights(self) -> list[GluWeights]:
        """Every routed expert's weights, then the shared experts', in the layer's neuron
        order (what :func:`refactor_glu` flips, and the weight lens reads)."""
        blocks = [GluWeights(*self.routed.glu_weights(e)) for e in range(self.routed.n_experts)]
        return blocks + (self.shared.glu_weights() if self.shared is not None else [])

    def capture(
        self, callback: Callable[[RoutedForward], None], *, watch_act: bool = False
    ) -> CaptureHandle:
        """Call ``callback`` once per forward of the decoder layer with what its routed
        experts (:class:`~gatescope.experts.ExpertsCapture`: exactly the values that
        produce the output) and its shared experts computed; the shared experts' act(g)
        where ``watch_act`` (:meth:`GatedMLP.capture_with_act`), else None."""
        current = RoutedForward([], None)

        def routed(expert: int, token: Tensor, gate: Tensor, up: Tensor, act: Tensor,
                   weight: Tensor) -> None:  # fmt: skip
            current.experts.append(ExpertForward(expert, token, gate, up, act, weight))

        def shared(gate: Tensor, up: Tensor, act: Tensor | None) -> None:
            rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
            current.shared = (rows(gate), rows(up), None if act is None else rows(act))

        def start(_module: nn.Module, _inputs: object) -> None:
            current.experts.clear()
            current.shared = None

        def done(_module: nn.Module, _inputs: object, _output: object) -> None:
            callback(RoutedForward(list(current.experts), current.shared))
            start(_module, _inputs)

        handles: list[_Removable] = [
            self.module.register_forward_pre_hook(start),
            ExpertsCapture(self.routed, routed),
            self.module.register_forward_hook(done),
        ]
        if self.shared is not None:
            handles.append(self.shared.capture_with_act(shared, watch_act=watch_act))
        return CaptureHandle(handles)


@dataclass
class RoutedForward:
    """What an :class:`ExpertLayer` computed in one forward, over the rows of the flattened
    batch (row = text * positions + position)."""

    experts: list[ExpertForward]  # the experts that got tokens, in order
    # The shared experts' gate, up [rows, shared neurons] and the model's act(gate) (None:
    # not seen, see GatedMLP.capture_with_act); None without shared experts.
    shared: tuple[Tensor, Tensor, Tensor | None] | None


class ExpertForward(NamedTuple):
    """What one routed expert computed in a forward."""

    expert: int
    token: Tensor  # [routed] its rows of the batch, ascending
    gate: Tensor  # [routed, d_ff]
    up: Tensor  # [routed, d_ff]
    act: Tensor  # [routed, d_ff] the model's own act(gate)
    weight: Tensor  # [routed] the router's weight of the expert for each token


def find_expert_layers(
    model: nn.Module, experts: Sequence[RoutedExperts] | None = None
) -> list[GatedMLP | ExpertLayer]:
    """The MLP of every decoder layer of a mixture-of-experts model, ordered: an
    :class:`ExpertLayer` where the layer has routed experts, else its dense gated MLP
    (DeepSeek's first layers). A decoder layer is an element of a ``nn.ModuleList``.

    Args:
        model: The model.
        experts: Its :func:`find_routed_experts`, if already found.

    Raises:
        GatescopeError: If the model has no routed experts, or a layer has more than one
            gated MLP beside them.
    """
    lists = {n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    experts = find_routed_experts(model) if experts is None else experts
    routed = {_decoder_layer(lists, e.name): e for e in experts}
    if not routed:
        raise GatescopeError("the model has no routed experts: use find_gated_mlps.")
    dense: dict[str, list[GatedMLP]] = {}  # decoder layer -> its gated MLPs
    for name, module in model.named_modules():
        mlp = _as_gated_mlp(0, name, module)
        if mlp is not None:
            dense.setdefault(_decoder_layer(lists, name), []).append(mlp)
    layers: list[GatedMLP | ExpertLayer] = []
    for prefix, decoder in model.named_modules():
        if prefix not in routed and prefix not in dense:
            continue
        mlps = [dataclasses.replace(mlp, layer=len(layers)) for mlp in dense.get(prefix, [])]
        if len(mlps) > 1:
            names = ", ".join(mlp.name for mlp in mlps)
            raise GatescopeError(f"{prefix} has {len(mlps)} gated MLPs ({names}); gatescope "
                                 "expects routed experts with at most one shared MLP.")  # fmt: skip
        if prefix in routed:
            shared = mlps[0] if mlps else None
            layers.append(ExpertLayer(len(layers), prefix, decoder, routed[prefix], shared))
        else:
            layers.append(mlps[0])
    return layers


def find_mlp_layers(model: nn.Module) -> list[GatedMLP] | list[GatedMLP | ExpertLayer]:
    """A model's MLP layers: :func:`find_expert_layers` for a mixture of experts, else
    :func:`find_gated_mlps`."""
    experts = find_routed_experts(model)
    return find_expert_layers(model, experts) if experts else _gated_mlps(model)


def _decoder_layer(lists: set[str], name: str) -> str:
    """The path of the decoder layer holding module ``name``: its deepest ancestor that is
    an element of one of the ``nn.ModuleList`` paths ``lists`` ("" if none)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        parent = ".".join(parts[: end - 1])
        if parent in lists:
            return ".".join(parts[:end])
    return ""


def unembedding(model: nn.Module) -> Tensor:
    """The unembedding matrix ``[vocab, d_model]``: ``model.get_output_embeddings().weight``.

    A view of the parameter (for tied embeddings it is the input embedding itself). Any final
    norm, logit scaling or soft-capping of the model is not part of it.

    Raises:
        GatescopeError: If the model has no output embedding.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise GatescopeError(
            f"{type(model).__name__} has no output embedding (get_output_embeddings() gave "
            f"{type(head).__name__}); load the model with AutoModelForCausalLM."
        )
    return weight.detach()


def refactor_glu(mlps: Sequence[GatedMLP | ExpertLayer]) -> int:
    """Flip the sign of every neuron whose gate and in weights point apart, in place.

    For each neuron with ``cos(w_gate, w_in) < 0``, multiplies its ``w_in`` row (and up bias)
    and its ``w_out`` column by -1. Since ``act(g) * (-u) @ (-w_out) = act(g) * u @ w_out``,
    the model computes the same function, and afterwards ``cos(w_gate, w_in) >= 0`` for every
    neuron. Negation is exact in floating point, so flipping again restores the weights. In a
    mixture of experts every expert's neurons (and the shared experts') are flipped alike.

    Args:
        mlps: The MLP layers to refactor, from :func:`find_mlp_layers`.

    Returns:
        The number of neurons flipped, over all layers.
    """
    return sum(int(flip.sum()) for flip in _apply_flips(mlps, None))


@contextlib.contextmanager
def refactored_glu(mlps: Sequence[GatedMLP | ExpertLayer]) -> Iterator[int]:
    """Apply :func:`refactor_glu` inside the block and restore the exact weights on exit.

    Args:
        mlps: The MLP layers to refactor, from :func:`find_mlp_layers`.

    Yields:
        The number of neurons flipped.
    """
    flips = _apply_flips(mlps, None)
    try:
        yield sum(int(flip.sum()) for flip in flips)
    finally:
        # Flip the same neurons back rather than recomputing cosines: bit-exact by design.
        _apply_flips(mlps, flips)


def refactor_problem(mlps: Sequence[GatedMLP | ExpertLayer]) -> str | None:
    """Why :func:`refactor_glu` cannot refactor these layers, in one sentence (None: it
    can): gpt-oss's experts, whose x_in is not a projection."""
    problems = (mlp.routed.refactor_problem() for mlp in mlps if isinstance(mlp, ExpertLayer))
    return next((problem for problem in problems if problem), None)


def glu_flips(w_gate: Tensor, w_in: Tensor) -> Tensor:
    """The neurons that :func:`refactor_glu` flips: ``cos(w_gate, w_in) < 0``.

    Args:
        w_gate: ``[d_mlp, d_model]`` gate weights.
        w_in: ``[d_mlp, d_model]`` up ("in") weights.

    Returns:
        A bool mask ``[d_mlp]``.
    """
    # Cosines in float32 at least: bf16 rounding must not decide a sign near 0.
    dtype = torch.promote_types(w_in.dtype, torch.float32)
    cos = torch.nn.functional.cosine_similarity(w_gate.to(dtype), w_in.to(dtype), dim=1)
    return cos < 0


def _apply_flips(
    mlps: Sequence[GatedMLP | ExpertLayer], flips: Sequence[Tensor] | None
) -> list[Tensor]:
    """Negate the in row and out column of flagged neurons, one vectorized step per MLP (or
    expert).

    Args:
        mlps: The MLP layers.
        flips: Per layer a bool mask ``[d_mlp]`` of the neurons to negate, in the layer's
            neuron order; None computes it as ``cos(w_gate, w_in) < 0``.

    Returns:
        The masks used, per layer.
    """
    problem = refactor_problem(mlps)
    if problem:  # before any flip
        raise GatescopeError(problem)
    used: list[Tensor] = []
    layers = [mlp.glu_weights() for mlp in mlps]
    with torch.no_grad():
        for i, (mlp, blocks) in enumerate(zip(mlps, layers, strict=True)):
            given = None if flips is None else flips[i].split([b.w_in.shape[0] for b in blocks])
            flip = [
                _flip(block, None if given is None else given[j]) for j, block in enumerate(blocks)
            ]
            used.append(torch.cat([f.cpu() for f in flip]))
            logger.debug("Layer %d: flipped %d of %d neurons.", mlp.layer, int(used[-1].sum()),
                         len(used[-1]))  # fmt: skip
    return used


def _flip(block: GluWeights, flip: Tensor | None) -> Tensor:
    """Negates ``block``'s flagged neurons (``flip``, or where ``cos(w_gate, w_in) < 0``);
    returns the mask used."""
    w_in = block.w_in
    flip = glu_flips(block.w_gate, w_in) if flip is None else flip.to(w_in.device)
    # A +-1 factor per neuron: multiplying by 1 or -1 is exact, and one mul_ per tensor
    # avoids both a per-neuron loop and boolean-index copies.
    sign = 1 - 2 * flip.to(w_in.dtype)
    w_in.mul_(sign[:, None])
    if block.b_in is not None:
        block.b_in.mul_(sign.to(block.b_in.dtype))
    w_out = block.w_out
    w_out.mul_(sign.to(device=w_out.device, dtype=w_out.dtype)[None, :])
    return flip


def _as_gated_mlp(layer: int, name: str, module: nn.Module) -> GatedMLP | None:
    """``module`` as a :class:`GatedMLP` if it has the gated layout, else None."""
    children = dict(module.named_children())
    down = children.get("down_proj")
    gate, up, gate_up = (children.get(k) for k in ("gate_proj", "up_proj", "gate_up_proj"))
    if down is None and gate_up is None:
        down, gate_up = _fused_linears(children)
    if down is None or not ((gate is not None and up is not None) or gate_up is not None):
        return None
    projections = [p for p in (down, gate, up, gate_up) if p is not None]
    if not all(isinstance(p, nn.Linear) for p in projections):
        # The gated layout is there but quantized or otherwise wrapped projections would make
        # the weight views and hooks wrong, so say what to do rather than silently skip it.
        odd = next(p for p in projections if not isinstance(p, nn.Linear))
        raise GatescopeError(
            f"{name} ({type(module).__name__}) has a {type(odd).__name__} projection where "
            f"gatescope needs torch.nn.Linear; load the model unquantized (e.g. in bfloat16)."
        )
    act = _activation(module)
    if act is None:
        logger.debug("%s has gated projections but no activation; skipped.", name)
        return None
    # Every projection present is an nn.Linear (checked above): narrow them for the type checker.
    assert isinstance(down, nn.Linear)
    if gate_up is not None and (gate is None or up is None):
        assert isinstance(gate_up, nn.Linear)
        return GatedMLP(layer, name, module, None, None, gate_up, down, act)
    assert isinstance(gate, nn.Linear) and isinstance(up, nn.Linear)
    return GatedMLP(layer, name, module, gate, up, None, down, act)


def _fused_linears(children: dict[str, nn.Module]) -> tuple[nn.Module | None, nn.Module | None]:
    """GraniteMoE's shared-expert naming of a fused gated MLP: ``input_linear`` (d_model ->
    2 x d_mlp, gate then up) and ``output_linear`` (d_mlp -> d_model), both ``nn.Linear``
    (JetMoE's ``input_linear`` holds experts: not this)."""
    into, out = children.get("input_linear"), children.get("output_linear")
    if not (isinstance(into, nn.Linear) and isinstance(out, nn.Linear)):
        return None, None
    if into.out_features != 2 * out.in_features or into.in_features != out.out_features:
        return None, None
    return out, into


def _activation(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The activation of an MLP: its ``act_fn``-like attribute, else an activation child."""
    for attr in _ACT_ATTRS:
        act: Callable[[Tensor], Tensor] | None = getattr(module, attr, None)
        if act is not None and callable(act) and not isinstance(act, nn.Linear):
            return act
    for child in module.children():
        if _is_activation(child):
            return child
    return None


def _is_activation(module: nn.Module) -> bool:
    """Whether ``module`` looks like a parameter-free activation function."""
    if isinstance(module, (nn.Linear, nn.Dropout)) or any(True for _ in module.parameters()):
        return False
    home = type(module).__module__
    if home.startswith(("torch.nn.modules.activation", "transformers.activations")):
        return True
    return bool(_ACT_NAME.search(type(module).__name__))


def _no_gated_mlp_message(model: nn.Module) -> str:
    """One sentence naming the model and the (non-gated) MLPs it has."""
    config = getattr(model, "config", None)
    model_name = getattr(config, "model_type", None) or type(model).__name__
    found: dict[str, tuple[str, int]] = {}  # class name -> (layout, count)
    seen: set[int] = set()
    for name, module in model.named_modules():
        is_mlp = name.rsplit(".", 1)[-1] == "mlp" or type(module).__name__.upper().endswith("MLP")
        if not is_mlp or id(module) in seen:
            continue
        seen.add(id(module))
        cls = type(module).__name__
        layout, count = found.get(cls, (_layout(module), 0))
        found[cls] = (layout, count + 1)
    if not found:
        return f"{model_name} has no gated MLP and no module named mlp or *MLP; {_NEEDS}."
    total = sum(count for _, count in found.values())
    uses = " and ".join(f"{cls} ({layout})" for cls, (layout, _) in found.items())
    layers = "layer" if total == 1 else f"{total} layers"
    return f"{model_name} has no gated MLP: its {layers} use {uses}; {_NEEDS}."


def _layout(module: nn.Module) -> str:
    """An MLP's children in data-flow order, e.g. ``"c_fc -> act -> c_proj"``.

    Projections that widen (in the usual d_model -> d_mlp direction) come before the
    activation, those that narrow after it; registration order is not data-flow order
    (GPT-2 registers c_proj before act).
    """
    widen: list[str] = []
    narrow: list[str] = []
    acts: list[str] = []
    for child_name, child in module.named_children():
        weight = getattr(child, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            n_in, n_out = _in_out(child, weight)
            (widen if n_out >= n_in else narrow).append(child_name)
        elif _is_activation(child):
            acts.append(child_name)
    for attr in _ACT_ATTRS:
        # Activations kept as plain functions are attributes, not children.
        if attr not in acts and callable(getattr(module, attr, None)):
            acts.append(attr)
    parts = widen + acts[:1] + narrow
    return " -> ".join(parts) if parts else "no projections"


def _in_out(module: nn.Module, weight: Tensor) -> tuple[int, int]:
    """(in, out) features of a projection: nn.Linear stores [out, in], GPT-2's Conv1D [in, out]."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D, without importing it
        return weight.shape[0], weight.shape[1]
    return weight.shape[1], weight.shape[0]
