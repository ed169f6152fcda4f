"""The atlases a server serves, each with what it loads lazily and what it caches on disk.

An atlas is opened (memory-mapped) when the server starts. Its model, corpus and tokenizer
load on the first request that needs a recomputation, once, and stay; its model's weights
(:mod:`gatescope.weights`, memory-mapped safetensors; a mixture of experts' from the loaded
model) open on the first request that needs them. Each neuron's page data and weight lens,
and the whole model's weight figures, are computed once and kept on disk: in
``ATLAS/serve-cache/``, or under the user's cache folder when the atlas folder is
read-only, in a folder named after a hash of the atlas's ``atlas.json`` (a rescanned atlas
gets fresh pages).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from gatescope import __version__
from gatescope.constants import ATLAS_JSON
from gatescope.errors import GatescopeError
from gatescope.files import temporary_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from gatescope.atlas import Atlas
    from gatescope.loading import LoadedModel
    from gatescope.pages import PageSource
    from gatescope.serve.probe import ProbeResult
    from gatescope.serve.search import SearchResult, TokenIndex, Vocabulary
    from gatescope.serve.table import NeuronTable
    from gatescope.weights import ModelWeights, WeightFigures

__all__ = ["Catalog", "ServedAtlas"]

logger = logging.getLogger(__name__)

CACHE_DIR = "serve-cache"
#: gzip's level for cached pages: 1 compresses a 2 MB page to a third in ~30 ms, where 6
#: takes five times as long (on the first request) for a fifth less.
GZIP_LEVEL = 1


@dataclass
class ServedAtlas:
    """One atlas of the server, by its URL ``name``."""

    name: str
    path: Path
    atlas: Atlas
    model: str | None = None  # where the model is, if not where the atlas says
    corpus: str | None = None  # likewise the corpus folder
    _source: PageSource | None = field(default=None, repr=False)
    _loaded: LoadedModel | None = field(default=None, repr=False)
    _table: NeuronTable | None = field(default=None, repr=False)
    _weights: ModelWeights | None = field(default=None, repr=False)
    _figures: WeightFigures | None = field(default=None, repr=False)
    _tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)
    _index: TokenIndex | None = field(default=None, repr=False)
    _vocabulary: Vocabulary | None = field(default=None, repr=False)
    _figures_read: bool = field(default=False, repr=False)  # _figures is final (maybe None)
    #: Why the weights cannot be read (None: not tried yet, or they can).
    weights_problem: str | None = field(default=None, repr=False)
    # One recomputation at a time: they share the model, and the machine's cores. The
    # table, the weights and the search have locks of their own, so that each answers
    # while another works; a lock is only taken for work not done yet.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _table_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _figures_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _open_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _lens_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _index_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def title(self) -> str:
        return self.atlas.meta.model.name or self.name

    def table(self) -> NeuronTable:
        """Every neuron's row, computed on first use."""
        from gatescope.serve.table import NeuronTable

        with self._table_lock:
            if self._table is None:
                self._table = NeuronTable(self.atlas, self.weight_figures())
            return self._table

    def neuron_page(self, layer: int, neuron: int) -> dict[str, Any]:
        """The page data of a neuron (:func:`gatescope.pages.neuron_page`, without links)."""
        return orjson.loads(self.neuron_page_json(layer, neuron))

    def neuron_page_json(self, layer: int, neuron: int) -> bytes:
        """The page data as JSON: from the disk cache, else recomputed (loading the model on
        first use) and cached."""
        self.atlas.check_neuron(layer, neuron)

        def recompute() -> bytes:
            from gatescope.pages import layer_pages

            ((_, page),) = layer_pages(self._page_source(), layer, [neuron], lambda _: {})
            return plain_json(page)

        return self._cached(f"L{layer}-N{neuron}.page-{self._model_digest}.json", recompute,
                            self._lock)  # fmt: skip

    def neuron_html(
        self, layer: int, neuron: int, render: Callable[[], str], *, gzipped: bool = False
    ) -> bytes:
        """A neuron's served page, ``render()``ed once and cached, also gzipped (a page of
        2 MB is about 0.7 MB so); not cached while the weights cannot be read (they may be
        there on the next start)."""
        if self.weight_figures() is None:
            html = render().encode()
            return gzip.compress(html, GZIP_LEVEL) if gzipped else html
        name = f"L{layer}-N{neuron}.{self._model_digest}.html"
        html = self._cached(name, lambda: render().encode())
        if not gzipped:
            return html
        return self._cached(name + ".gz", lambda: gzip.compress(html, GZIP_LEVEL))

    def _cached(
        self, name: str, make: Callable[[], bytes], lock: threading.Lock | None = None
    ) -> bytes:
        """The bytes of cache file ``name``, made (under ``lock``) and written if absent. A
        cache that cannot be written costs the next request a recomputation, nothing more."""
        path = self.cache_dir / name
        with contextlib.suppress(OSError):
            return path.read_bytes()
        with lock or contextlib.nullcontext():
            with contextlib.suppress(OSError):
                return path.read_bytes()  # another request made it meanwhile
            data = make()
            tmp = temporary_name(path)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
            except OSError as error:
                logger.warning("could not cache %s: %s", path, error)
                tmp.unlink(missing_ok=True)
            return data

    def probe(self, text: str, layer: int, neuron: int, position: int | None = None) -> ProbeResult:
        """``text`` through the model up to ``layer``: :func:`~gatescope.serve.probe.run_probe`
        (loading the model on first use)."""
        from gatescope.serve.probe import run_probe

        self.atlas.check_neuron(layer, neuron)
        with self._lock:
            loaded = self._loaded_model()
            tokenizer = self._lens_tokenizer()
            refactor = self.atlas.meta.options.refactor_glu
            return run_probe(
                loaded, tokenizer, text, layer, neuron, position, refactor_glu=refactor
            )

    def _loaded_model(self) -> LoadedModel:
        """The model, loaded once (call under ``_lock``)."""
        from gatescope.pages import load_atlas_model

        if self._loaded is None:
            self._loaded = load_atlas_model(self.atlas, self.model)
        return self._loaded

    def _page_source(self) -> PageSource:
        from gatescope.pages import PageSource

        if self._source is None:
            self._source = PageSource.open(
                self.atlas, model=self.model, corpus=self.corpus, loaded=self._loaded_model()
            )
        return self._source

    @cached_property
    def cache_dir(self) -> Path:
        """Where this atlas's neuron pages are cached (made on first use)."""
        # Named after the atlas and this gatescope: a rescan or an upgrade starts afresh.
        stamp = (self.path / ATLAS_JSON).read_bytes() + __version__.encode()
        digest = hashlib.sha256(stamp).hexdigest()[:16]
        for root in (self.path / CACHE_DIR, _user_cache() / self.name):
            folder = root / digest
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(folder, os.W_OK):
                return folder
        raise GatescopeError(f"no writable cache folder for the atlas at {self.path}.")

    def weight_figures(self) -> WeightFigures | None:
        """Every neuron's weight cosines and norms (from the disk cache, else read from the
        weights once and cached), or None, with :attr:`weights_problem` saying why, when
        the weights cannot be read or are not the atlas's model's."""
        if not self._figures_read:
            with self._figures_lock:
                if not self._figures_read:
                    self._figures = self._read_figures()
                    self._figures_read = True
        return self._figures

    def _read_figures(self) -> WeightFigures | None:
        from gatescope.weights import WeightFigures

        path = self.cache_dir / f"weights-{self._model_digest}.safetensors"
        figures = WeightFigures.load(path)
        if figures is None:
            weights = self._open_weights()
            if weights is None:
                return None
            try:
                figures = weights.figures()
            except GatescopeError as error:
                self.weights_problem = str(error)
                return None
            with contextlib.suppress(OSError):
                figures.save(path)
        expected = (self.atlas.num_layers, self.atlas.d_mlp)
        if figures.shape != expected:
            self.weights_problem = (
                f"the model's weights have {figures.shape[0]} layers of {figures.shape[1]} "
                f"neurons, the atlas {expected[0]} of {expected[1]}: they are another model's."
            )
            return None
        return figures

    def neuron_weights(self, layer: int, neuron: int) -> dict[str, Any] | None:
        """A neuron's weight lens (token strings included) and related neurons, as JSON
        data (cached on disk), or None when the weights cannot be read."""
        self.atlas.check_neuron(layer, neuron)
        figures = self.weight_figures()
        weights = self._open_weights() if figures is not None else None
        if figures is None or weights is None:
            return None

        def lens() -> bytes:
            from gatescope.pages import token_strings
            from gatescope.weights import related_neurons, weight_lens

            found = _plain(weight_lens(weights, figures, layer, neuron))
            tokenizer = self._lens_tokenizer()
            for projection in found["projections"]:
                for end in ("top", "bottom"):
                    ids = [token for token, _ in projection[end]]
                    texts = token_strings(tokenizer, ids)
                    projection[end] = [
                        {"token": token, "text": text, "score": score}
                        for (token, score), text in zip(projection[end], texts, strict=True)
                    ]
            related = _plain(related_neurons(weights, figures, layer, neuron))
            for entries in related.values():  # each as addressed (layer.expert.neuron)
                for entry in entries:
                    entry["name"] = self.atlas.neuron_name(entry["layer"], entry["neuron"])
            return plain_json({"lens": found, "related": related})

        name = f"L{layer}-N{neuron}.lens-{self._model_digest}.json"
        return orjson.loads(self._cached(name, lens, self._lens_lock))

    def search(self, query: str, case: str | None = None) -> SearchResult:
        """The neurons whose top examples peak on the tokens ``query`` names
        (:class:`~gatescope.serve.search.TokenIndex`, built on first use and cached)."""
        from gatescope.serve.search import SearchResult

        index, vocabulary = self._token_index()
        tokens = vocabulary.ids(query)
        named = tuple((token, vocabulary.texts[token]) for token in tokens)
        return SearchResult(query, case, named, tuple(index.find(tokens, case)))

    def _token_index(self) -> tuple[TokenIndex, Vocabulary]:
        from gatescope.pages import load_tokenizer, open_corpus
        from gatescope.serve.search import TokenIndex, Vocabulary

        with self._index_lock:
            if self._index is None or self._vocabulary is None:
                corpus = open_corpus(self.atlas, self.corpus)
                path = self.cache_dir / "token-index.safetensors"
                index = TokenIndex.load(path)
                if index is None:
                    index = TokenIndex.build(self.atlas, corpus)
                    index.save(path)
                name = corpus.tokenizer or self._model_name
                if not name:
                    raise GatescopeError("the corpus does not name its tokenizer: pass --model.")
                self._vocabulary = Vocabulary(load_tokenizer(name))
                self._index = index
            return self._index, self._vocabulary

    @property
    def _model_name(self) -> str | None:
        return self.model or self.atlas.meta.model.name

    @cached_property
    def _model_digest(self) -> str:
        """Names the cached data after the model it came from: its folder (resolved) or hub
        id, and the revision the atlas records for it."""
        name = str(self._model_name)
        if Path(name).is_dir():
            name = str(Path(name).resolve())
        revision = None if self.model else self.atlas.meta.model.revision
        return hashlib.sha256(f"{name}@{revision}".encode()).hexdigest()[:8]

    def _open_weights(self) -> ModelWeights | None:
        """The model's weights, opened once; None, with :attr:`weights_problem` set, when
        they cannot be read."""
        from gatescope.weights import ModelWeights

        if self._weights is not None or self.weights_problem is not None:
            return self._weights
        with self._open_lock:
            if self._weights is None and self.weights_problem is None:
                name = self._model_name
                revision = None if self.model else self.atlas.meta.model.revision
                refactor = self.atlas.meta.options.refactor_glu
                try:
                    if not name:
                        raise GatescopeError("the atlas does not name its model: pass --model.")
                    if self.atlas.meta.experts is not None:  # experts: from the loaded model
                        with self._lock:
                            model = self._loaded_model().model
                        # A recomputation flips the weights in place under _lock: copies of
                        # them are taken under it too.
                        self._weights = ModelWeights.of_model(model, refactor_glu=refactor,
                                                              lock=self._lock)  # fmt: skip
                    else:
                        self._weights = ModelWeights.open(name, revision=revision,
                                                          refactor_glu=refactor)  # fmt: skip
                except GatescopeError as error:
                    self.weights_problem = str(error)
        return self._weights

    def _lens_tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's own tokenizer (the weight lens reads its vocabulary)."""
        from gatescope.pages import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(str(self._model_name))
        return self._tokenizer


class Catalog:
    """The served atlases by name: each atlas folder's name, made URL-safe and unique."""

    def __init__(self, atlases: Sequence[ServedAtlas]) -> None:
        self._by_name = {a.name: a for a in atlases}

    @classmethod
    def open(
        cls, paths: Sequence[str | Path], *, model: str | None = None, corpus: str | None = None
    ) -> Catalog:
        """Opens the atlases at ``paths`` (``model``/``corpus`` override every atlas's)."""
        from gatescope.atlas import Atlas

        if not paths:
            raise GatescopeError("name at least one atlas to serve.")
        served: list[ServedAtlas] = []
        for path in map(Path, paths):
            name = _unique(_slug(path.resolve().name), {a.name for a in served})
            atlas = Atlas.load(path)
            served.append(ServedAtlas(name, path, atlas, model, corpus))
        return cls(served)

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> ServedAtlas | None:
        return self._by_name.get(name)


def _plain(value: Any) -> Any:
    """Page data as JSON has it: dataclasses as dicts, tuples as lists, keys as strings,
    NaN and inf as None (the templates read either form; JSON answers allow no NaN)."""
    return orjson.loads(plain_json(value))


def plain_json(value: Any) -> bytes:
    """``value`` as JSON bytes (orjson: a page's hundreds of thousands of values take
    milliseconds, not the second the standard library takes)."""
    options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    return orjson.dumps(value, option=options)


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gatescope" / "serve"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "atlas"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate
