"""Per-token activations of a few neurons on a few texts: what a neuron page shows.

An atlas keeps, per neuron, only each text's strongest token. A page colors every token of
the top texts, so their activations are computed again, here: one batched forward over the
texts that stops right after the neurons' layer (the later layers and the unembedding
never run), with the same quantities as the scan (``g``, ``u``, ``act(g)``, ``act(g) * u``
in the statistics' dtype, :mod:`gatescope.stats.quantities`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gatescope.constants import QUANTITIES
from gatescope.corpus import TokenizedCorpus
from gatescope.errors import GatescopeError
from gatescope.loading import LoadedModel
from gatescope.stats.quantities import gated_quantities, stats_dtype

__all__ = ["ProbeValues", "TextActivations", "probe", "recompute"]


@dataclass
class TextActivations:
    """One text's tokens and the activations of the requested neurons on them."""

    text: int  # corpus index
    input_ids: list[int]  # the whole text
    # [neuron, quantity, pos]: the requested neurons, in the order given, on the text's
    # first ``values.shape[-1]`` tokens (all of them unless cut short by ``ends``)
    values: np.ndarray
    # [neuron, pos] in a mixture-of-experts layer: the router's weight of each token for the
    # neuron's expert, NaN where the expert did not get the token (its values are 0 there)
    # and for shared experts' neurons; None in a dense layer.
    router_weight: np.ndarray | None = None


class _Stop(Exception):
    """Raised by the capture hook: the forward is not needed past the layer."""


def recompute(
    loaded: LoadedModel,
    corpus: TokenizedCorpus,
    layer: int,
    neurons: Sequence[int],
    texts: Sequence[int],
    *,
    refactor_glu: bool = False,
    batch_size: int = 16,
    ends: Mapping[int, int | None] | None = None,
) -> dict[int, TextActivations]:
    """Activations of ``neurons`` of ``layer`` on every token of ``texts``.

    Args:
        loaded: The model the atlas was scanned with.
        corpus: The atlas's corpus.
        layer: The neurons' layer.
        neurons: Neuron indices in that layer.
        texts: Corpus indices of the texts (duplicates are computed once).
        refactor_glu: Apply ``--refactor-glu`` as the scan did (undone afterwards).
        batch_size: Texts per forward.
        ends: Text -> how many of its first tokens to compute (None or absent: all). The
            model is causal, so a token's values do not depend on later tokens: a cut
            text's values are those of the whole text (rounded as another batch would be).

    Returns:
        Corpus index -> :class:`TextActivations`, values [neuron, quantity, pos] with the
        quantities of :data:`~gatescope.constants.QUANTITIES`.
    """
    wanted = sorted(set(texts))
    corpus.check_texts(wanted)
    full = {t: int(corpus.lengths[t]) for t in wanted}
    computed = {t: min(full[t], (ends or {}).get(t) or full[t]) for t in wanted}
    # Longest first, as the scan batches them: little padding.
    order = sorted(wanted, key=lambda t: -computed[t])
    result: dict[int, TextActivations] = {}
    with _layer_reader(loaded, layer, neurons, refactor_glu=refactor_glu) as (read, act):
        for start in range(0, len(order), batch_size):
            batch = np.asarray(order[start : start + batch_size])
            input_ids, _ = corpus.batch(batch, device=loaded.device)  # whole texts
            lengths = [computed[t] for t in batch.tolist()]
            longest = max(lengths)
            positions = torch.arange(longest, device=loaded.device)
            mask = positions[None, :] < torch.tensor(lengths, device=loaded.device)[:, None]
            g, u, weight = read(input_ids[:, :longest], mask.long())  # [batch, pos, neuron]
            # [batch, neuron, quantity, pos]
            values = gated_quantities(g, u, act).permute(1, 3, 0, 2).cpu().numpy()
            weights = None if weight is None else weight.transpose(1, 2).cpu().numpy()
            for row, text in enumerate(batch.tolist()):
                result[text] = TextActivations(
                    text=text,
                    input_ids=input_ids[row, : full[text]].tolist(),
                    values=values[row, :, :, : lengths[row]],
                    router_weight=None if weights is None else weights[row, :, : lengths[row]],
                )
    return result


@dataclass
class ProbeValues:
    """One text read at one layer (:func:`probe`)."""

    neuron: np.ndarray  # [quantity, pos] the chosen neuron on every token
    position: int  # the chosen token
    at_position: np.ndarray  # [quantity, neuron] every neuron of the layer on that token


def probe(
    loaded: LoadedModel,
    input_ids: Sequence[int],
    layer: int,
    neuron: int,
    position: int | None = None,
    *,
    refactor_glu: bool = False,
) -> ProbeValues:
    """Neuron ``layer.neuron`` on every token of one text, and every neuron of the layer on
    token ``position`` (default: the neuron's strongest |hook_post|, the first if tied).
    Only those two slices of the four quantities are formed: a long text times a wide
    layer times four would be gigabytes.

    Args:
        loaded: The model.
        input_ids: The text's tokens (BOS first, as in a corpus), within the model's context.
        layer: The layer.
        neuron: The neuron.
        position: The token whose neurons are read, or None.
        refactor_glu: Apply ``--refactor-glu`` as the scan did (undone afterwards).
    """
    ids = torch.as_tensor([list(input_ids)], device=loaded.device)
    with _layer_reader(loaded, layer, None, refactor_glu=refactor_glu) as (read, act):
        g, u, _ = read(ids, torch.ones_like(ids))  # [1, pos, neuron]
        if not 0 <= neuron < g.shape[-1]:
            raise GatescopeError(f"layer {layer} has neurons 0-{g.shape[-1] - 1}, not {neuron}.")
        own = gated_quantities(g[0, :, neuron], u[0, :, neuron], act)  # [quantity, pos]
        if position is None:
            position = int(own[QUANTITIES.index("hook_post")].abs().argmax())
        if not 0 <= position < ids.shape[1]:
            raise GatescopeError(f"the text has tokens 0-{ids.shape[1] - 1}, not {position}.")
        at = gated_quantities(g[0, position], u[0, position], act)  # [quantity, neuron]
    return ProbeValues(own.cpu().numpy(), position, at.cpu().numpy())


# read(input_ids, attention_mask) -> g, u [batch, pos, neuron] and, in a mixture of
# experts, the router's weights [batch, pos, neuron] (see _layer_reader).
_Values = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
_Read = Callable[[torch.Tensor, torch.Tensor], _Values]


@contextlib.contextmanager
def _layer_reader(
    loaded: LoadedModel, layer: int, neurons: Sequence[int] | None, *, refactor_glu: bool
) -> Iterator[tuple[_Read, Callable[[torch.Tensor], torch.Tensor]]]:
    """Yields ``(read, act)``: ``read(input_ids, attention_mask)`` gives ``g`` and ``u``
    [batch, pos, neuron] of ``neurons`` (all when None) of ``layer`` in the statistics'
    dtype (and, in a mixture-of-experts layer, each token's router weight for each neuron's
    expert: :func:`~gatescope.stats.routed.layer_values`), by a forward that stops after the
    layer, with the weights refactored while the block runs if ``refactor_glu``; ``act`` is
    the layer's activation, for :func:`~gatescope.stats.quantities.gated_quantities`."""
    from gatescope.arch import ExpertLayer, RoutedForward, find_mlp_layers, refactored_glu
    from gatescope.stats.routed import layer_values

    mlps = find_mlp_layers(loaded.model)
    if not 0 <= layer < len(mlps):
        raise GatescopeError(f"layer {layer} is out of range: the model has {len(mlps)} layers.")
    mlp = mlps[layer]
    bad = [n for n in neurons or () if not 0 <= n < mlp.d_mlp]
    if bad:
        raise GatescopeError(
            f"neuron {bad[0]} is out of range: layer {layer} has neurons 0-{mlp.d_mlp - 1}."
        )
    dtype = stats_dtype(loaded.dtype)
    index = None if neurons is None else torch.as_tensor(list(neurons), device=loaded.device)
    captured: list[_Values] = []
    batch_shape: list[int] = []  # [texts, positions] of the forward under way

    def keep(gate: torch.Tensor, up: torch.Tensor) -> None:
        if index is not None:
            gate, up = gate[..., index], up[..., index]
        captured.append((gate.to(dtype), up.to(dtype), None))
        raise _Stop

    def keep_routed(forward: RoutedForward) -> None:
        assert isinstance(mlp, ExpertLayer)
        rows = batch_shape[0] * batch_shape[1]
        columns = mlp.d_mlp if neurons is None else list(neurons)
        gate, up, weight = layer_values(forward, mlp.routed.n_experts, mlp.routed.d_ff,
                                        rows, columns, dtype=dtype, device=loaded.device,
                                        weights=True)  # fmt: skip
        assert weight is not None
        shape = (*batch_shape, -1)
        captured.append((gate.view(shape), up.view(shape), weight.view(shape)))
        raise _Stop

    def read(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Values:
        captured.clear()
        batch_shape[:] = input_ids.shape
        with contextlib.suppress(_Stop):
            loaded.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
        return captured[0]

    refactor = refactored_glu(mlps) if refactor_glu else contextlib.nullcontext()
    capture = mlp.capture(keep_routed) if isinstance(mlp, ExpertLayer) else mlp.capture(keep)
    with torch.inference_mode(), refactor, capture:
        yield read, mlp.act_fn
