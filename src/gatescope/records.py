"""Typed records of what gatescope writes beside its results, and what makes two runs one.

* :class:`CorpusMeta` is a corpus folder's ``gatescope_corpus.json``: how the corpus was
  built (:class:`CorpusRecipe`) and what it holds.
* :class:`AtlasMeta` is an atlas folder's ``atlas.json``: the model, the corpus, the
  options, the shape and the provenance of the statistics.
* :class:`RunIdentity` is the one rule for which of those must agree before a scan resumes
  into an atlas folder, or atlases of parts of a corpus are merged.

Records are frozen dataclasses, checked when made; ``to_dict``/``from_dict`` convert them to
and from JSON, and ``from_dict`` also reads the files of earlier releases. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from gatescope.constants import CASES, QUANTITIES, TOP_LISTS
from gatescope.errors import GatescopeError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ATLAS_FORMAT",
    "ATLAS_FORMAT_VERSION",
    "DENSE",
    "PADDING",
    "SHARED",
    "AtlasMeta",
    "AtlasOptions",
    "CorpusMeta",
    "CorpusRecipe",
    "CorpusRef",
    "ExpertsRecord",
    "ModelRecord",
    "RunIdentity",
    "ShardSet",
    "SiteMeta",
    "SitePage",
    "expert_label",
    "finite",
    "moe_address",
]

ATLAS_FORMAT = "gatescope-atlas"
#: 1: the first release (untyped); 2: these records. Both load.
ATLAS_FORMAT_VERSION = 3
CORPUS_FORMAT_VERSION = 1

R = TypeVar("R")


def finite(x: float) -> float | None:
    """A number as JSON holds it: None where it is NaN or infinite (JSON has neither)."""
    return x if math.isfinite(x) else None


def _known(cls: type[R], data: Mapping[str, Any], renames: Mapping[str, str] = {}) -> R:
    """``cls`` from the entries of ``data`` that are its fields (JSON names renamed first);
    entries of other releases are left aside."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {renames.get(key, key): value for key, value in data.items()}
    return cls(**{key: value for key, value in values.items() if key in names})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise GatescopeError(message)


# ------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusRecipe:
    """How a corpus was built from a text source (:func:`gatescope.build_corpus`)."""

    source: str | None = None  # path or dataset name, as given
    tokenizer: str | None = None  # name or path of the tokenizer
    max_length: int | None = None  # most tokens per text, BOS included
    tokens_budget: int | None = None  # token budget of the corpus (None: every text)
    seed: int | None = None  # shuffle seed
    text_column: str | None = None
    split: str | None = None
    separator: str | None = None  # between texts in a .txt file

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorpusRecipe:
        return _known(cls, data)


@dataclass(frozen=True)
class CorpusMeta:
    """A corpus folder's ``gatescope_corpus.json``: its recipe and its content."""

    num_texts: int
    num_tokens: int
    fingerprint: str  # sha256 of the token content (gatescope.corpus.fingerprint)
    recipe: CorpusRecipe = field(default_factory=CorpusRecipe)
    gatescope_version: str | None = None
    format_version: int = CORPUS_FORMAT_VERSION

    def __post_init__(self) -> None:
        _check(self.num_texts >= 0 and self.num_tokens >= 0, "a corpus cannot hold less than 0.")

    def to_dict(self) -> dict[str, Any]:
        """Flat, as the first release wrote it: the recipe's fields beside the counts."""
        return {
            "format_version": self.format_version,
            **self.recipe.to_dict(),
            "num_texts": self.num_texts,
            "num_tokens": self.num_tokens,
            "fingerprint": self.fingerprint,
            "gatescope_version": self.gatescope_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorpusMeta:
        try:
            return cls(
                num_texts=int(data["num_texts"]),
                num_tokens=int(data["num_tokens"]),
                fingerprint=str(data["fingerprint"]),
                recipe=CorpusRecipe.from_dict(data),
                gatescope_version=data.get("gatescope_version"),
                format_version=int(data.get("format_version", 1)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise GatescopeError(f"the corpus description lacks or mangles {error}.") from error


@dataclass(frozen=True)
class CorpusRef:
    """What an atlas records of its corpus."""

    fingerprint: str | None = None  # None: unknown (an imported dataset)
    path: str | None = None  # the corpus folder, absolute
    texts: int | None = None
    tokens: int | None = None  # every token, BOS included (the atlas counts fewer)
    meta: CorpusMeta | None = None  # the folder's gatescope_corpus.json, if it had one

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "texts": self.texts,
            "tokens": self.tokens,
            "metadata": self.meta.to_dict() if self.meta else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorpusRef:
        built = data.get("metadata")  # {} in the first release when there was none
        return cls(
            fingerprint=data.get("fingerprint"),
            path=data.get("path"),
            texts=data.get("texts"),
            tokens=data.get("tokens"),
            meta=CorpusMeta.from_dict(built) if built else None,
        )


# ------------------------------------------------------------------------------- atlas


@dataclass(frozen=True)
class ModelRecord:
    """The model an atlas describes."""

    name: str | None = None  # hub id or absolute local path (None: unknown)
    revision: str | None = None  # the checkpoint's commit hash, where known
    class_name: str | None = None  # e.g. LlamaForCausalLM
    dtype: str | None = None  # the dtype it ran in, e.g. "bfloat16"
    act: str | None = None  # its activation module, e.g. SiLUActivation

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["class"] = data.pop("class_name")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRecord:
        return _known(cls, data, renames={"class": "class_name"})


@dataclass(frozen=True)
class AtlasOptions:
    """The scan options an atlas records (``k`` is part of the shape: :attr:`AtlasMeta.k`)."""

    include_bos: bool = False  # position 0 counted (GLUScope counts it)
    refactor_glu: bool = False  # neurons with cos(w_gate, w_in) < 0 flipped first
    batch_size: int | None = None  # texts per forward (does not change the result)
    refactored_neurons: int | None = None  # how many neurons refactor_glu flipped
    # Histograms and typical examples stored (atlases before format 3 have none), and the
    # seed of the typical examples' draw.
    distributions: bool = False
    seed: int | None = None
    # The statistics pass that ran: triton, numba or torch (does not change the result;
    # None: not recorded, before format 3's second release).
    stats_backend: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AtlasOptions:
        return _known(cls, data)


def moe_address(index: int, n_experts: int, d_ff: int, shared: int) -> tuple[int | str, int] | None:
    """(expert, neuron) of neuron ``index`` of a mixture-of-experts layer, whose neurons are
    every routed expert's ``d_ff`` in turn, then the ``shared`` experts': the routed
    expert's number or ``"shared"``; None beyond them (padding)."""
    routed = n_experts * d_ff
    if index < routed:
        return divmod(index, d_ff)
    return ("shared", index - routed) if index < routed + shared else None


#: :meth:`ExpertsRecord.layout`'s codes for neurons outside the routed experts: the shared
#: experts', a dense layer's, and the padding that widens a narrower layer to the atlas's width.
SHARED, DENSE, PADDING = -1, -2, -3


def expert_label(code: int) -> int | str:
    """An expert code as a neuron's address names it: the routed expert's number,
    ``"shared"`` or ``"dense"``."""
    return {SHARED: "shared", DENSE: "dense"}.get(code, code)


@dataclass(frozen=True)
class ExpertsRecord:
    """How a mixture-of-experts atlas lays out a layer's neurons: ``n_experts`` routed experts
    of ``d_ff`` neurons each (expert ``e``'s neuron ``n`` is at ``e * d_ff + n``), then
    ``shared`` neurons of the shared experts; the ``dense_layers`` have an ordinary MLP of
    ``dense_d_mlp`` neurons. Every layer is as wide as the widest (:attr:`width`); a
    narrower layer's neurons come first, then padding that holds nothing. Statistics of an
    expert's neurons are over the tokens routed to it."""

    n_experts: int
    d_ff: int
    shared: int = 0
    top_k: int = 1  # experts per token
    dense_layers: tuple[int, ...] = ()
    dense_d_mlp: int = 0

    def __post_init__(self) -> None:
        _check(
            self.n_experts >= 1 and self.d_ff >= 1 and self.shared >= 0
            and 1 <= self.top_k <= self.n_experts,
            f"{self.n_experts} experts of {self.d_ff} neurons, {self.shared} shared and "
            f"{self.top_k} per token are not a mixture of experts.",
        )  # fmt: skip

    @property
    def width(self) -> int:
        """Neurons per layer in the atlas (the widest layer's)."""
        return max(self.n_experts * self.d_ff + self.shared, self.dense_d_mlp)

    def neurons(self, layer: int) -> int:
        """The layer's own neurons (the rest of the atlas's width is padding)."""
        if layer in self.dense_layers:
            return self.dense_d_mlp
        return self.n_experts * self.d_ff + self.shared

    def address(self, layer: int, index: int) -> tuple[int | str, int] | None:
        """(expert, neuron) of a layer's neuron ``index``: ``expert`` is the routed expert's
        number, ``"shared"`` or ``"dense"``; None for padding."""
        if layer in self.dense_layers:
            return ("dense", index) if index < self.dense_d_mlp else None
        return moe_address(index, self.n_experts, self.d_ff, self.shared)

    def index(self, layer: int, expert: int | str, neuron: int) -> int:
        """The inverse of :meth:`address`.

        Raises:
            GatescopeError: For an address the layer does not have.
        """
        where = f"layer {layer} has no neuron {expert}.{neuron}"
        if layer in self.dense_layers:
            _check(expert == "dense" and 0 <= neuron < self.dense_d_mlp, f"{where} (dense).")
            return neuron
        if expert == "shared":
            _check(0 <= neuron < self.shared, f"{where}.")
            return self.n_experts * self.d_ff + neuron
        _check(isinstance(expert, int) and 0 <= expert < self.n_experts
               and 0 <= neuron < self.d_ff, f"{where}.")  # fmt: skip
        return int(expert) * self.d_ff + neuron

    def layout(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """[width] each neuron's expert code in ``layer`` (the routed expert's number, or
        :data:`SHARED`, :data:`DENSE`, :data:`PADDING`) and its neuron within the expert:
        :meth:`address` for a whole layer at once."""
        import numpy as np

        index = np.arange(self.width, dtype=np.int64)
        if layer in self.dense_layers:
            return np.where(index < self.dense_d_mlp, DENSE, PADDING), index
        routed = self.n_experts * self.d_ff
        code = np.select([index < routed, index < routed + self.shared],
                         [index // self.d_ff, SHARED], PADDING)  # fmt: skip
        return code, np.where(index < routed, index % self.d_ff, index - routed)

    @property
    def labels(self) -> list[str]:
        """Every expert's label, in the order of :meth:`places`: "0", "1", ..., "shared",
        "dense" (the export's ``expert`` column)."""
        return [str(e) for e in range(self.n_experts)] + ["shared", "dense"]

    def places(self, code: np.ndarray) -> np.ndarray:
        """[n] each expert code's place in :attr:`labels`."""
        import numpy as np

        return np.select([code >= 0, code == SHARED], [code, self.n_experts], self.n_experts + 1)

    def codes(self, place: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`places`."""
        import numpy as np

        return np.select([place < self.n_experts, place == self.n_experts], [place, SHARED], DENSE)

    def layouts(self, layers: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`layout` of layers ``0 .. layers - 1``, flattened layer-major."""
        import numpy as np

        found = [self.layout(layer) for layer in range(layers)]
        return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"dense_layers": list(self.dense_layers)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertsRecord:
        record = _known(cls, data)
        return dataclasses.replace(record, dense_layers=tuple(record.dense_layers))


@dataclass(frozen=True)
class ShardSet:
    """The parts of a corpus (``--shard i/N``) an atlas holds; absent from a whole scan."""

    count: int
    parts: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(sorted(int(p) for p in self.parts)))
        _check(
            self.count >= 1
            and len(set(self.parts)) == len(self.parts) > 0
            and all(0 <= p < self.count for p in self.parts),
            f"shards {list(self.parts)} of {self.count} are not parts of one corpus.",
        )

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.count

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "parts": list(self.parts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardSet:
        return cls(int(data["count"]), tuple(data["parts"]))


@dataclass(frozen=True)
class RunIdentity:
    """What makes two scans the same scan: a resume, or parts to merge, must agree in all
    of it. The batch size, the device and the checkpoint interval do not change the result
    and are not part of it."""

    model: str | None  # name or absolute path
    revision: str | None
    dtype: str | None  # the dtype the model runs in
    corpus: str | None  # the corpus's fingerprint
    k: int
    include_bos: bool
    refactor_glu: bool
    distributions: bool = False
    seed: int | None = None  # of the typical examples (None: no distributions)

    def first_difference(self, other: RunIdentity) -> tuple[str, str, str] | None:
        """The first field in which ``self`` and ``other`` differ, for a message: its name,
        the value here and the value there (``("k", "16", "5")``); None if they agree."""
        for name, label in _IDENTITY_LABELS.items():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return label, _shown(mine), _shown(theirs)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunIdentity:
        return cls(**{name: data.get(name) for name in _IDENTITY_LABELS})  # type: ignore[arg-type]


_IDENTITY_LABELS = {
    "model": "model",
    "revision": "model revision",
    "dtype": "dtype",
    "corpus": "corpus",
    "k": "k",
    "include_bos": "include_bos",
    "refactor_glu": "refactor_glu",
    "distributions": "distributions",
    "seed": "seed",
}


def _shown(value: Any) -> str:
    """A value for a message: fingerprints shortened to 12 hex digits."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return repr(value)


@dataclass(frozen=True)
class AtlasMeta:
    """An atlas's ``atlas.json``: its shape, its model, corpus and options, its provenance.

    The stored tensors' shapes are ``layers``, ``d_mlp`` and ``k`` (see
    :mod:`gatescope.atlas`); ``tokens`` is the number of counted tokens, the denominator of
    every frequency, or None where it is not known (a dataset imported without its corpus:
    GLUScope's records frequencies only).
    """

    layers: int
    d_mlp: int
    k: int
    tokens: int | None
    model: ModelRecord = field(default_factory=ModelRecord)
    corpus: CorpusRef = field(default_factory=CorpusRef)
    options: AtlasOptions = field(default_factory=AtlasOptions)
    # Where ``tokens`` is unknown: what the stored counts divide by into frequencies
    # (2**53 for imports; the first release stored counts over a nominal 10**9 tokens).
    count_scale: int | None = None
    shards: ShardSet | None = None  # only for an atlas of some parts of a corpus
    created: str | None = None  # ISO 8601, UTC
    scan_seconds: float | None = None
    imported_from: str | None = None  # the dataset an imported atlas came from
    gatescope_version: str | None = None
    experts: ExpertsRecord | None = None  # a mixture-of-experts model's layout

    def __post_init__(self) -> None:
        _check(
            self.layers >= 1
            and self.d_mlp >= 1
            and self.k >= 1
            and (self.tokens is None or self.tokens >= 0),
            f"an atlas of {self.layers} layers x {self.d_mlp} neurons, k {self.k} and "
            f"{self.tokens} tokens is not possible.",
        )

    def identity(self) -> RunIdentity:
        return RunIdentity(
            model=self.model.name,
            revision=self.model.revision,
            dtype=self.model.dtype,
            corpus=self.corpus.fingerprint,
            k=self.k,
            include_bos=self.options.include_bos,
            refactor_glu=self.options.refactor_glu,
            distributions=self.options.distributions,
            seed=self.options.seed,
        )

    def replace(self, **changes: Any) -> AtlasMeta:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": ATLAS_FORMAT,
            "format_version": ATLAS_FORMAT_VERSION,
            "gatescope_version": self.gatescope_version,
            "layers": self.layers,
            "d_mlp": self.d_mlp,
            "k": self.k,
            "tokens": self.tokens,
            "count_scale": self.count_scale,
            # The layout, for readers without gatescope: names of the tensors' axes.
            "cases": list(CASES),
            "quantities": list(QUANTITIES),
            "lists": [[CASES[c], QUANTITIES[q]] for c, q in TOP_LISTS],
            "model": self.model.to_dict(),
            "corpus": self.corpus.to_dict(),
            "options": self.options.to_dict(),
            "created": self.created,
            "scan_seconds": self.scan_seconds,
            "imported_from": self.imported_from,
        }
        if self.shards is not None:
            data["shards"] = self.shards.to_dict()
        if self.experts is not None:
            data["experts"] = self.experts.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AtlasMeta:
        """Reads format versions 1 to 3 (distributions arrived in 3).

        Raises:
            GatescopeError: not an atlas description, a newer format, or malformed.
        """
        if data.get("format") != ATLAS_FORMAT:
            raise GatescopeError("it is not a gatescope atlas description.")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > ATLAS_FORMAT_VERSION:
            raise GatescopeError(
                f"it was written by a newer gatescope (format {version}): upgrade gatescope."
            )
        layout = (data.get("cases", list(CASES)), data.get("quantities", list(QUANTITIES)))
        if layout != (list(CASES), list(QUANTITIES)):
            raise GatescopeError("its cases or quantities are not gatescope's.")
        try:
            shards, experts = data.get("shards"), data.get("experts")
            return cls(
                layers=int(data["layers"]),
                d_mlp=int(data["d_mlp"]),
                k=int(data["k"]),
                tokens=_tokens(data),
                count_scale=_count_scale(data),
                model=ModelRecord.from_dict(data.get("model") or {}),
                corpus=CorpusRef.from_dict(data.get("corpus") or {}),
                options=AtlasOptions.from_dict(data.get("options") or {}),
                shards=ShardSet.from_dict(shards) if shards else None,
                created=data.get("created"),
                scan_seconds=data.get("scan_seconds"),
                imported_from=data.get("imported_from"),
                gatescope_version=data.get("gatescope_version"),
                experts=ExpertsRecord.from_dict(experts) if experts else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise GatescopeError(f"it lacks or mangles the entry {error}.") from error


def _tokens(data: Mapping[str, Any]) -> int | None:
    """The token count of an atlas.json; the first release wrote a nominal count with
    ``"tokens_exact": false`` where it knew none."""
    if data["tokens"] is None or data.get("tokens_exact", True) is False:
        return None
    return int(data["tokens"])


def _count_scale(data: Mapping[str, Any]) -> int | None:
    """What counts divide by where the token count is unknown: recorded since format 2,
    the first release's nominal count before."""
    if data.get("count_scale") is not None:
        return int(data["count_scale"])
    if data.get("tokens_exact", True) is False:
        return int(data["tokens"])
    return None


# ------------------------------------------------------------------------------- site

SITE_FORMAT = "gatescope-site"


@dataclass(frozen=True)
class SitePage:
    """One neuron page of a site folder."""

    model: str  # the atlas's model name (pages of several models may share a site)
    layer: int
    neuron: int
    file: str  # file name inside the site folder
    note: str | None = None  # a line for the index, e.g. why the neuron was chosen
    # How the neuron is addressed where that is not "layer.neuron": "3.5.17" in a mixture
    # of experts (None: layer.neuron).
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.layer}.{self.neuron}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SitePage:
        return _known(cls, data)


@dataclass(frozen=True)
class SiteMeta:
    """A site folder's ``site.json``: every page it holds, from which its index is made."""

    pages: tuple[SitePage, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"format": SITE_FORMAT, "pages": [page.to_dict() for page in self.pages]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteMeta:
        if data.get("format") != SITE_FORMAT:
            raise GatescopeError("it is not a gatescope site description.")
        try:
            return cls(tuple(SitePage.from_dict(page) for page in data.get("pages", [])))
        except TypeError as error:
            raise GatescopeError(f"a page entry is mangled ({error}).") from error
