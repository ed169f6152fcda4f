"""What a neuron's weights say without running the model: the weight lens, the cosines
between its three weight vectors, and the neurons of other layers it reads from or writes to.

A gated neuron has three weight vectors in the residual stream's space (``d_model``):
``w_gate`` and ``w_in`` (rows of ``gate_proj``/``up_proj``: what it reads) and ``w_out`` (a
column of ``down_proj``: what it writes). Everything here is computed from those vectors,
the embedding ``[vocab, d_model]``, the unembedding ``[vocab, d_model]`` and the final
norm's per-dimension scale:

* the **weight lens**: the vocabulary tokens scoring highest and lowest when a vector is
  read through a vocabulary matrix. ``w_out`` goes through the final norm's scale and the
  unembedding (the logits it promotes and suppresses, as the logit lens reads them);
  ``w_gate`` and ``w_in`` through the unembedding and through the embedding (which tokens'
  directions, and which input tokens' embeddings, they read);
* the **cosines** cos(w_gate, w_in), cos(w_gate, w_out), cos(w_in, w_out) and the three
  norms, for every neuron of the model (:class:`WeightFigures`);
* **related neurons**: the neurons of later layers whose ``w_gate`` or ``w_in`` has the
  largest |cosine| with this neuron's ``w_out`` (they read what it writes), and the neurons
  of earlier layers whose ``w_out`` has the largest |cosine| with its ``w_gate`` or
  ``w_in`` (they write what it reads). Plain weight cosines: the norms between layers are
  not applied.

The weights are read from the checkpoint's safetensors files, memory-mapped, one tensor at
a time; the model is never loaded. Which tensor is which is found the way :mod:`arch` finds
it in a loaded model, on a copy of the model built on the ``meta`` device (no memory). A
mixture of experts' weights are read from the loaded model instead (its checkpoint stores
the experts in its family's own layout, which transformers converts as it loads): each
expert's neurons are neurons like a dense MLP's, in the atlas's order. An atlas scanned with
``--refactor-glu`` gets the refactored signs (:func:`arch.glu_flips`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from gatescope.errors import GatescopeError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from transformers import PreTrainedModel

    from gatescope.arch import ExpertLayer, GatedMLP

__all__ = [
    "LayerWeights",
    "ModelWeights",
    "Projection",
    "RelatedNeuron",
    "RelatedNeurons",
    "WeightFigures",
    "WeightLens",
    "related_neurons",
    "weight_lens",
]

logger = logging.getLogger(__name__)

#: Tokens listed at each end of a projection.
LENS_TOKENS = 10
#: Related neurons listed for each path.
RELATED = 10
#: Rows of a vocabulary matrix converted to float32 at a time (bounds the temporary memory).
_VOCAB_CHUNK = 8192


@dataclass(frozen=True)
class LayerWeights:
    """One layer's MLP weights in float32, refactored when the atlas is."""

    w_gate: Tensor  # [d_mlp, d_model]
    w_in: Tensor  # [d_mlp, d_model]
    w_out: Tensor  # [d_model, d_mlp]

    def __post_init__(self) -> None:
        d_mlp, d_model = self.w_gate.shape
        if self.w_in.shape != (d_mlp, d_model) or self.w_out.shape != (d_model, d_mlp):
            raise GatescopeError(
                f"inconsistent MLP weights: w_gate {tuple(self.w_gate.shape)}, w_in "
                f"{tuple(self.w_in.shape)}, w_out {tuple(self.w_out.shape)}."
            )


@dataclass(frozen=True)
class WeightFigures:
    """Every neuron's weight cosines and norms, ``[layers, d_mlp]`` float32 arrays."""

    cos_gate_in: np.ndarray
    cos_gate_out: np.ndarray
    cos_in_out: np.ndarray
    norm_gate: np.ndarray
    norm_in: np.ndarray
    norm_out: np.ndarray

    def __post_init__(self) -> None:
        shapes = {getattr(self, f.name).shape for f in fields(self)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise GatescopeError(f"weight figures of different shapes: {sorted(shapes)}.")

    @property
    def shape(self) -> tuple[int, int]:
        return self.cos_gate_in.shape  # type: ignore[return-value]

    @classmethod
    def of_layers(cls, layers: Iterator[LayerWeights]) -> WeightFigures:
        """The figures of a model's layers, in order."""
        rows: dict[str, list[np.ndarray]] = {f.name: [] for f in fields(cls)}
        for weights in layers:
            w_out = weights.w_out.T  # [d_mlp, d_model]: one row per neuron, like the others
            norms = {
                "norm_gate": weights.w_gate.norm(dim=1),
                "norm_in": weights.w_in.norm(dim=1),
                "norm_out": w_out.norm(dim=1),
            }
            for name, norm in norms.items():
                rows[name].append(norm.numpy())
            pairs = {
                "cos_gate_in": (weights.w_gate, weights.w_in, norms["norm_gate"], norms["norm_in"]),
                "cos_gate_out": (weights.w_gate, w_out, norms["norm_gate"], norms["norm_out"]),
                "cos_in_out": (weights.w_in, w_out, norms["norm_in"], norms["norm_out"]),
            }
            for name, (a, b, norm_a, norm_b) in pairs.items():
                rows[name].append(_cosines((a * b).sum(dim=1), norm_a, norm_b).numpy())
        return cls(**{name: np.stack(layer_rows) for name, layer_rows in rows.items()})

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        from gatescope.files import write_atomic

        arrays = {f.name: np.ascontiguousarray(getattr(self, f.name)) for f in fields(self)}
        write_atomic(path, lambda tmp: save_file(arrays, str(tmp)))

    @classmethod
    def load(cls, path: Path) -> WeightFigures | None:
        """Figures saved by :meth:`save`, or None if the file is absent or not readable."""
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
            return cls(**{f.name: arrays[f.name] for f in fields(cls)})
        except (OSError, KeyError, ValueError, GatescopeError):
            return None


@dataclass(frozen=True)
class Projection:
    """A weight vector read through a vocabulary matrix: the ``LENS_TOKENS`` tokens with the
    highest and the lowest scores (dot products), highest (resp. lowest) first."""

    vector: str  # "w_out", "w_gate" or "w_in"
    through: str  # "unembedding" or "embedding"
    top: tuple[tuple[int, float], ...]  # (token id, score)
    bottom: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class WeightLens:
    """A neuron's weight lens, cosines and norms."""

    layer: int
    neuron: int
    projections: tuple[Projection, ...]
    cos_gate_in: float
    cos_gate_out: float
    cos_in_out: float
    norm_gate: float
    norm_in: float
    norm_out: float
    final_norm: bool  # whether w_out was scaled by the final norm before the unembedding


@dataclass(frozen=True)
class RelatedNeuron:
    layer: int
    neuron: int
    cos: float


@dataclass(frozen=True)
class RelatedNeurons:
    """The neurons most strongly connected to one, by |cosine|, strongest first."""

    reads_out_via_gate: tuple[RelatedNeuron, ...]  # later layers: cos(their w_gate, its w_out)
    reads_out_via_in: tuple[RelatedNeuron, ...]  # later layers: cos(their w_in, its w_out)
    writes_gate: tuple[RelatedNeuron, ...]  # earlier layers: cos(their w_out, its w_gate)
    writes_in: tuple[RelatedNeuron, ...]  # earlier layers: cos(their w_out, its w_in)


class ModelWeights:
    """A model's MLP weights and vocabulary matrices: read from its checkpoint's safetensors
    files (:meth:`open`, the model never loaded), or from a loaded model (:meth:`of_model`:
    a mixture of experts, whose checkpoints store experts in each family's own layout and
    transformers converts them as it loads).

    Tensors are read when asked for; only the vocabulary matrices and the final norm's scale
    are kept.
    """

    def __init__(self, source: _Checkpoint | _Loaded, *, refactor_glu: bool) -> None:
        self._source = source
        self.refactor_glu = refactor_glu
        self._sign_cache: dict[int, Tensor] = {}

    @classmethod
    def open(
        cls, model: str | Path, *, revision: str | None = None, refactor_glu: bool = False
    ) -> ModelWeights:
        """The weights of ``model`` (a local folder or a hub id available offline)."""
        folder = _model_folder(str(model), revision)
        tensors = _Tensors(folder)
        return cls(_Checkpoint(tensors, _Layout.of(folder, tensors)), refactor_glu=refactor_glu)

    @classmethod
    def of_model(
        cls, model: nn.Module, *, refactor_glu: bool = False,
        lock: AbstractContextManager[object] | None = None,
    ) -> ModelWeights:  # fmt: skip
        """The weights of a loaded model (dense or a mixture of experts: a layer's neurons
        are then every routed expert's in turn, then the shared experts', and a narrower
        layer's are followed by zero rows up to the widest, as in its atlas).

        Args:
            model: The model.
            refactor_glu: Give the refactored signs, as the atlas was scanned.
            lock: Held while a layer's weights are copied out, where the model's weights
                may be flipped in place meanwhile (a recomputation with ``--refactor-glu``).

        Raises:
            GatescopeError: For ``refactor_glu`` with experts it cannot refactor (gpt-oss).
        """
        from gatescope.arch import find_mlp_layers, refactor_problem

        layers = find_mlp_layers(model)
        problem = refactor_problem(layers) if refactor_glu else None
        if problem:
            raise GatescopeError(problem)
        return cls(_Loaded(model, layers, lock), refactor_glu=refactor_glu)

    @property
    def num_layers(self) -> int:
        return self._source.num_layers

    @property
    def d_mlp(self) -> int:
        return self._source.d_mlp

    def layer(self, layer: int) -> LayerWeights:
        """Layer ``layer``'s weights (float32; refactored signs when ``refactor_glu``)."""
        return LayerWeights(*(self.matrix(layer, which) for which in ("gate", "in", "out")))

    def matrix(self, layer: int, which: str) -> Tensor:
        """One of layer ``layer``'s weights, float32, refactored when ``refactor_glu``:
        ``"gate"`` or ``"in"`` ``[d_mlp, d_model]``, ``"out"`` ``[d_model, d_mlp]``."""
        if which == "gate":
            return self._source.stored(layer, "gate")
        if which == "in":
            return self._source.stored(layer, "in") * self._signs(layer)[:, None]
        if which == "out":
            return self._source.stored(layer, "out") * self._signs(layer)[None, :]
        raise ValueError(f"no weight '{which}': gate, in or out")

    def _signs(self, layer: int) -> Tensor:
        """[d_mlp] +1, or -1 for the neurons ``refactor_glu`` flips (exact: a product by
        +-1), found once per layer."""
        if layer not in self._sign_cache:
            from gatescope.arch import glu_flips

            signs = torch.ones(self.d_mlp)
            if self.refactor_glu:
                stored = self._source.stored
                flips = glu_flips(stored(layer, "gate"), stored(layer, "in"))
                signs = 1 - 2 * flips.float()
            self._sign_cache[layer] = signs
        return self._sign_cache[layer]

    def layers(self) -> Iterator[LayerWeights]:
        return (self.layer(layer) for layer in range(self.num_layers))

    def figures(self) -> WeightFigures:
        """Every neuron's cosines and norms (reads every MLP weight once)."""
        return WeightFigures.of_layers(self.layers())

    @cached_property
    def unembedding(self) -> Tensor:
        """``[vocab, d_model]`` in the model's dtype (the embedding itself when tied)."""
        return self._source.unembedding()

    @cached_property
    def embedding(self) -> Tensor:
        """``[vocab, d_model]`` in the model's dtype."""
        return self._source.embedding()

    @cached_property
    def final_scale(self) -> Tensor | None:
        """``[d_model]`` the final norm's per-dimension scale, or None when the model has no
        final norm that gatescope recognizes."""
        return self._source.final_scale()


class _Checkpoint:
    """A checkpoint's weights, from its safetensors files (:meth:`ModelWeights.open`)."""

    def __init__(self, tensors: _Tensors, layout: _Layout) -> None:
        self._tensors = tensors
        self._layout = layout
        self.num_layers = len(layout.mlps)
        self.d_mlp = layout.d_mlp

    def stored(self, layer: int, which: str) -> Tensor:
        """A weight as the checkpoint stores it (float32, signs unchanged)."""
        gate_key, in_key, out_key = self._layout.mlps[layer]
        d = self.d_mlp
        fused = gate_key == in_key  # one gate_up_proj: the gate's rows first
        if which == "gate":
            return self._tensors.get(gate_key, rows=slice(0, d) if fused else None)
        if which == "in":
            return self._tensors.get(in_key, rows=slice(d, 2 * d) if fused else None)
        return self._tensors.get(out_key)

    def unembedding(self) -> Tensor:
        if self._layout.unembedding == self._layout.embedding:
            return self.embedding()
        return self._tensors.get(self._layout.unembedding, keep_dtype=True)

    def embedding(self) -> Tensor:
        return self._tensors.get(self._layout.embedding, keep_dtype=True)

    def final_scale(self) -> Tensor | None:
        return self._layout.final_scale(self._tensors)


class _Loaded:
    """A loaded model's weights (:meth:`ModelWeights.of_model`), copied to the CPU in
    float32 one layer at a time."""

    def __init__(
        self, model: nn.Module, layers: Sequence[GatedMLP | ExpertLayer],
        lock: AbstractContextManager[object] | None,
    ) -> None:  # fmt: skip
        self._model = model
        self._layers = layers
        self._lock = lock or contextlib.nullcontext()
        self.num_layers = len(layers)
        self.d_mlp = max(layer.d_mlp for layer in layers)

    def stored(self, layer: int, which: str) -> Tensor:
        """A layer's weight, every block's (an expert's, the shared or dense MLP's) rows or
        columns in the layer's neuron order, zeros up to the widest layer: a copy, made
        under the lock."""
        blocks = self._layers[layer].glu_weights()
        with self._lock:
            if which == "out":  # [d_model, neurons]
                found = torch.cat([b.w_out.float().cpu() for b in blocks], dim=1)
                return nn.functional.pad(found, (0, self.d_mlp - found.shape[1]))
            rows = [(b.w_gate if which == "gate" else b.w_in).float().cpu() for b in blocks]
            found = torch.cat(rows)  # [neurons, d_model]
        return nn.functional.pad(found, (0, 0, 0, self.d_mlp - found.shape[0]))

    def unembedding(self) -> Tensor:
        from gatescope.arch import unembedding

        return unembedding(self._model).cpu()

    def embedding(self) -> Tensor:
        embeddings = self._model.get_input_embeddings()  # pyright: ignore[reportCallIssue]
        return embeddings.weight.detach().cpu()

    def final_scale(self) -> Tensor | None:
        import copy

        _, norm = _final_norm(self._model)
        if norm is None:
            return None
        d_model = self._layers[0].glu_weights()[0].w_gate.shape[1]
        return _norm_scale(copy.deepcopy(norm).float().cpu(), d_model)


def weight_lens(
    weights: ModelWeights, figures: WeightFigures, layer: int, neuron: int
) -> WeightLens:
    """Neuron ``layer.neuron``'s weight lens, with its cosines and norms from ``figures``."""
    w = weights.layer(layer)
    w_gate, w_in, w_out = w.w_gate[neuron], w.w_in[neuron], w.w_out[:, neuron]  # [d_model]
    scale = weights.final_scale
    read_out = w_out if scale is None else w_out * scale
    projections = [Projection("w_out", "unembedding", *_ends(weights.unembedding, read_out))]
    for name, vector in (("w_gate", w_gate), ("w_in", w_in)):
        for through in ("unembedding", "embedding"):
            matrix = getattr(weights, through)
            projections.append(Projection(name, through, *_ends(matrix, vector)))
    figure = {f.name: float(getattr(figures, f.name)[layer, neuron]) for f in fields(figures)}
    return WeightLens(layer, neuron, tuple(projections), **figure, final_norm=scale is not None)


def related_neurons(
    weights: ModelWeights, figures: WeightFigures, layer: int, neuron: int, k: int = RELATED
) -> RelatedNeurons:
    """The ``k`` neurons of later layers that read most strongly what ``layer.neuron``
    writes, per path, and the ``k`` of earlier layers that write most strongly into its
    gate and its in."""
    own = weights.layer(layer)
    # [d_model] each: what the neuron writes, and what its gate and its in read.
    w_out, w_gate, w_in = own.w_out[:, neuron], own.w_gate[neuron], own.w_in[neuron]
    found: dict[str, list[tuple[int, Tensor]]] = {f.name: [] for f in fields(RelatedNeurons)}
    for other in range(layer + 1, weights.num_layers):  # they read what it writes
        for path, which, norms in (("reads_out_via_gate", "gate", figures.norm_gate),
                                   ("reads_out_via_in", "in", figures.norm_in)):  # fmt: skip
            dots = weights.matrix(other, which) @ w_out
            found[path].append((other, _cosines(dots, norms[other], w_out.norm())))
    for other in range(layer):  # they write what it reads
        out = weights.matrix(other, "out")
        for path, vector in (("writes_gate", w_gate), ("writes_in", w_in)):
            cos = _cosines(vector @ out, figures.norm_out[other], vector.norm())
            found[path].append((other, cos))
    return RelatedNeurons(**{path: _strongest(cos, k) for path, cos in found.items()})


def _cosines(dots: Tensor, norm_a, norm_b) -> Tensor:
    """dots / (norm_a * norm_b), 0 where a norm is 0 (a dead neuron points nowhere)."""
    as32 = torch.float32
    norms = torch.as_tensor(norm_a, dtype=as32) * torch.as_tensor(norm_b, dtype=as32)
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def _strongest(per_layer: Sequence[tuple[int, Tensor]], k: int) -> tuple[RelatedNeuron, ...]:
    """The ``k`` largest |cosines| over several layers' ``[d_mlp]`` cosines."""
    if not per_layer:
        return ()
    layers = torch.tensor([layer for layer, _ in per_layer])
    cos = torch.stack([c for _, c in per_layer])  # [layers, d_mlp]
    flat = cos.abs().flatten()
    # Stable ranking: among equal |cos| the earlier layer and neuron first.
    best = torch.sort(flat, descending=True, stable=True).indices[:k]
    d = cos.shape[1]
    return tuple(
        RelatedNeuron(int(layers[i // d]), int(i % d), float(cos.flatten()[i]))
        for i in best.tolist()
    )


def _ends(
    matrix: Tensor, vector: Tensor, k: int = LENS_TOKENS
) -> tuple[tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
    """The ``k`` highest and ``k`` lowest rows of ``matrix @ vector`` as (row, score)."""
    scores = torch.cat(
        [chunk.float() @ vector for chunk in matrix.split(_VOCAB_CHUNK)]
    )  # [vocab]; float32 chunks keep the temporary memory small
    k = min(k, len(scores))
    top = torch.topk(scores, k)
    bottom = torch.topk(scores, k, largest=False)

    def pairs(found) -> tuple[tuple[int, float], ...]:
        return tuple(zip(found.indices.tolist(), found.values.tolist(), strict=True))

    return pairs(top), pairs(bottom)


class _Tensors:
    """The tensors of a checkpoint's safetensors files, by name: each read from its file
    when asked for (safetensors memory-maps the file and copies out that one tensor)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import SafetensorError, safe_open

        index = folder / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self._files = {name: folder / file for name, file in weight_map.items()}
            else:
                self._files = {}
                for file in sorted(folder.glob("*.safetensors")):
                    with safe_open(str(file), framework="pt") as opened:
                        self._files.update(dict.fromkeys(opened.keys(), file))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            raise GatescopeError(f"the weights in {folder} cannot be read: {error}") from error
        if not self._files:
            raise GatescopeError(
                f"the model at {folder} has no safetensors weights, which the weight lens reads."
            )

    def names(self) -> Iterator[str]:
        return iter(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str, *, rows: slice | None = None, keep_dtype: bool = False) -> Tensor:
        """Tensor ``name`` (only ``rows`` of it when given), float32 unless ``keep_dtype``."""
        from safetensors import SafetensorError, safe_open

        file = self._files[name]
        try:
            with safe_open(str(file), framework="pt") as opened:
                tensor = opened.get_tensor(name) if rows is None else opened.get_slice(name)[rows]
        except (OSError, SafetensorError) as error:
            raise GatescopeError(f"the weights in {file} cannot be read: {error}") from error
        return tensor if keep_dtype else tensor.float()


@dataclass(frozen=True)
class _Layout:
    """Which checkpoint tensors a model's MLPs and vocabulary matrices are."""

    mlps: tuple[tuple[str, str, str], ...]  # per layer (gate, in, out) names; gate == in: fused
    d_model: int
    d_mlp: int
    embedding: str
    unembedding: str
    final_norm: nn.Module | None  # built on the meta device
    final_norm_name: str

    @classmethod
    def of(cls, folder: Path, tensors: _Tensors) -> _Layout:
        """The layout of the model in ``folder``, found on a copy built on the meta device."""
        from gatescope.arch import find_gated_mlps

        model = _meta_model(folder)
        names = {id(module): name for name, module in model.named_modules()}
        checkpoint = _Names(tensors)

        def weight(module: nn.Module | None, what: str) -> str:
            if module is None or id(module) not in names:
                raise GatescopeError(f"{type(model).__name__} has no {what} gatescope can find.")
            return checkpoint.find(f"{names[id(module)]}.weight", what)

        gated = find_gated_mlps(model)
        mlps = []
        for mlp in gated:
            if mlp.gate_up_proj is not None:
                fused = weight(mlp.gate_up_proj, "gate_up_proj")
                gate = up = fused
            else:
                gate, up = weight(mlp.gate_proj, "gate_proj"), weight(mlp.up_proj, "up_proj")
            mlps.append((gate, up, weight(mlp.down_proj, "down_proj")))
        embedding = weight(model.get_input_embeddings(), "input embedding")
        head = model.get_output_embeddings()
        # Tied embeddings: the checkpoint may hold the matrix once, under the embedding's name.
        try:
            unembedding = weight(head, "output embedding")
        except GatescopeError:
            unembedding = embedding
        norm_name, norm = _final_norm(model)
        d_model, d_mlp = gated[0].d_model, gated[0].d_mlp
        return cls(tuple(mlps), d_model, d_mlp, embedding, unembedding, norm, norm_name)

    def final_scale(self, tensors: _Tensors) -> Tensor | None:
        """The final norm's scale per dimension (:func:`_norm_scale`), its parameters read
        from the checkpoint."""
        if self.final_norm is None:
            return None
        norm = self.final_norm.to_empty(device="cpu").float()
        checkpoint = _Names(tensors)
        state = {
            name: tensors.get(checkpoint.find(f"{self.final_norm_name}.{name}", "final norm"))
            for name, _ in norm.named_parameters()
        }
        norm.load_state_dict(state, strict=False)
        return _norm_scale(norm, self.d_model)


def _norm_scale(norm: nn.Module, d_model: int) -> Tensor | None:
    """A final norm's scale per dimension (float32, on the CPU): its output for a zero-mean
    input of alternating signs ``x = c * sign``, minus that for ``-x``, over ``2 * sign``. For
    an RMSNorm ``w * x / rms(x)`` (Gemma: ``(1 + w)``) and a LayerNorm ``w * (x - mean) /
    std + b`` this is ``w`` (resp. ``1 + w``), whatever the norm's class; ``c`` is large so
    that the norm's epsilon changes nothing. None where it cannot be read so."""
    if d_model % 2:  # no zero-mean input of alternating signs
        return None
    sign = torch.ones(d_model)
    sign[1::2] = -1
    x = 1024.0 * sign
    with torch.no_grad():
        scale = (norm(x[None]) - norm(-x[None]))[0] / (2 * sign)
    return scale if bool(torch.isfinite(scale).all()) else None


class _Names:
    """Finds a module's parameter among a checkpoint's names, which may lack the module's
    leading prefix (e.g. ``model.``) or carry another."""

    def __init__(self, tensors: _Tensors) -> None:
        self._tensors = tensors

    def find(self, name: str, what: str) -> str:
        if name in self._tensors:
            return name
        parts = name.split(".")
        for start in range(1, len(parts) - 1):
            suffix = ".".join(parts[start:])
            matches = [n for n in self._tensors.names() if n == suffix or n.endswith("." + suffix)]
            if len(matches) == 1:
                return matches[0]
        raise GatescopeError(f"the checkpoint has no tensor for the {what} ('{name}').")


def _final_norm(model: nn.Module) -> tuple[str, nn.Module | None]:
    """The norm applied before the unembedding: the last module named like a norm that
    is not inside the decoder's list of layers."""
    in_layers: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            in_layers.add(name + ".")
    found: tuple[str, nn.Module | None] = ("", None)
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in in_layers):
            continue
        if "norm" in type(module).__name__.lower() and not list(module.children()):
            found = (name, module)
    if found[1] is None:
        logger.warning("%s has no final norm gatescope recognizes.", type(model).__name__)
    return found


def _meta_model(folder: Path) -> PreTrainedModel:
    """The model of ``folder`` built from its config on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise GatescopeError(f"could not read the model config in {folder}: {error}") from error


def _model_folder(model: str, revision: str | None) -> Path:
    """The folder holding ``model``'s files: itself, or its snapshot in the hub cache."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as error:  # the hub raises several unrelated types for "not here"
        raise GatescopeError(
            f"the weights of '{model}' are not on this machine (give --model a local folder)."
        ) from error
