"""Neuron pages: an atlas's summary of a neuron plus its top (and typical) texts, recomputed
and rendered, and its distributions drawn where the atlas has them.

``write_pages`` loads the atlas's model, corpus and tokenizer once, recomputes each layer's
requested neurons in one pass (:mod:`gatescope.recompute`), renders one self-contained HTML
file per neuron (:mod:`gatescope.render`) and keeps ``site.json``, the list of every page
the site folder holds, from which ``index.html`` is rebuilt: re-running adds pages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gatescope.atlas import Atlas, Example, NeuronDistributions, NeuronRouting, NeuronSummary
from gatescope.constants import CASES, QUANTILES, QUANTITIES
from gatescope.errors import GatescopeError
from gatescope.files import SITE, claim_output, write_json_atomic, write_text_atomic
from gatescope.progress import progress_bar
from gatescope.records import SiteMeta, SitePage, finite

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import torch
    from transformers import PreTrainedTokenizerBase

    from gatescope.corpus import TokenizedCorpus
    from gatescope.loading import LoadedModel

__all__ = ["PageSource", "layer_pages", "page_file", "top_neurons", "write_pages"]

SITE_JSON = "site.json"

#: The share of a page's examples whose recomputed value may miss the stored one (a batch
#: of other texts rounds differently) before the page is refused as showing unrelated texts.
MISMATCH_SHARE = 0.1

#: Tokens of context shown before and after an example's strongest token.
CONTEXT_BEFORE, CONTEXT_AFTER = 24, 4


@dataclass
class PageSource:
    """What the pages of one atlas are computed from, loaded once."""

    atlas: Atlas
    loaded: LoadedModel
    corpus: TokenizedCorpus
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def open(
        cls,
        atlas: Atlas,
        *,
        model: str | None = None,
        corpus: str | Path | None = None,
        loaded: LoadedModel | None = None,
    ) -> PageSource:
        """Loads the atlas's model (unless ``loaded``), corpus and tokenizer
        (``model``/``corpus`` override where they are)."""
        model = model or atlas.meta.model.name
        if not model:
            raise GatescopeError("the atlas does not name its model: pass --model.")
        texts = open_corpus(atlas, corpus)
        loaded = loaded or load_atlas_model(atlas, model)
        return cls(atlas, loaded, texts, load_tokenizer(texts.tokenizer or model))


def load_atlas_model(atlas: Atlas, model: str | None = None) -> LoadedModel:
    """The atlas's model (``model`` overrides where it is), in the dtype it was scanned in."""
    from gatescope.loading import load_model

    model = model or atlas.meta.model.name
    if not model:
        raise GatescopeError("the atlas does not name its model: pass --model.")
    return load_model(model, dtype=atlas.meta.model.dtype or "auto")


def open_corpus(atlas: Atlas, corpus: str | Path | None = None) -> TokenizedCorpus:
    """The corpus the atlas was scanned on (``corpus`` overrides where it is), refused
    when its fingerprint is not the atlas's."""
    from gatescope.corpus import TokenizedCorpus

    corpus = corpus or atlas.meta.corpus.path
    if not corpus:
        raise GatescopeError("the atlas does not name its corpus folder: pass --corpus.")
    texts = TokenizedCorpus.open(corpus)
    expected = atlas.meta.corpus.fingerprint
    if expected and texts.fingerprint != expected:
        raise GatescopeError(
            f"the corpus at {corpus} is not the one the atlas was scanned on "
            "(its fingerprint differs)."
        )
    return texts


def load_tokenizer(name: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer by hub id or folder, or a sentence saying it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError) as error:
        raise GatescopeError(f"could not load the tokenizer '{name}'.") from error


def top_neurons(atlas: Atlas, layer: int, n: int, by: str = "strongest") -> list[int]:
    """The ``n`` neurons of ``layer`` ranked ``by`` "strongest" (largest |hook_post| of any
    case) or by a case name (the case's frequency)."""
    import torch

    from gatescope.records import PADDING

    check_ranking(by)
    stats = atlas.layer(layer)  # this layer only: an atlas may hold hundreds of thousands
    if by == "strongest":
        score = stats.strongest("hook_post")  # [neuron]
    else:
        score = stats.count[CASES.index(by)].double()  # [neuron]
    order = score.argsort(descending=True, stable=True)
    routing = atlas.routing(layer)  # a mixture of experts' padding is no neuron
    if routing is not None:
        order = order[torch.from_numpy(routing.code != PADDING)[order]]
    ranked: list[int] = order[:n].tolist()
    return ranked


def check_ranking(by: str) -> None:
    """Refuses a ``--by`` that :func:`top_neurons` does not know."""
    if by != "strongest" and by not in CASES:
        raise GatescopeError(f"cannot rank by '{by}': use strongest or one of {', '.join(CASES)}.")


def page_file(model: str, layer: int, neuron: int) -> str:
    """The page's file name inside the site folder."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model)).name or str(model)).strip("_")
    return f"{slug or 'model'}-L{layer}-N{neuron}.html"


def write_pages(
    source: PageSource,
    neurons: Sequence[tuple[int, int]],
    out: str | Path,
    *,
    notes: Mapping[tuple[int, int], str] | None = None,
    progress: bool = False,
) -> list[Path]:
    """Writes the pages of ``neurons`` ((layer, index) pairs) and the site's index.

    ``notes``: a line for the index per (layer, neuron), e.g. why it was chosen (a page
    rewritten without one keeps its earlier note). ``progress`` shows a progress bar.

    Returns:
        The pages written, in the order given.
    """
    from gatescope.render import render_index

    out = Path(out)
    claim_output(out, SITE, resume=True)  # an existing site gains pages
    out.mkdir(parents=True, exist_ok=True)
    atlas = source.atlas
    for layer, neuron in neurons:
        atlas.check_neuron(layer, neuron)  # range errors before any work
    model = atlas.meta.model.name or "model"
    pages = {page.file: page for page in _read_site(out).pages}  # by file name
    planned = list(dict.fromkeys(neurons))
    existing = {(p.model, p.layer, p.neuron) for p in pages.values()}
    existing |= {(model, layer, neuron) for layer, neuron in planned}

    written: dict[tuple[int, int], Path] = {}
    with progress_bar(total=len(planned), desc="pages", unit="page", enabled=progress) as bar:
        for layer, layer_neurons in _by_layer(planned).items():
            for neuron, path in _write_layer(source, layer, layer_neurons, out, existing):
                written[layer, neuron] = path
                earlier = pages.get(path.name)
                note = (notes or {}).get((layer, neuron)) or (earlier and earlier.note)
                name = atlas.neuron_name(layer, neuron)  # an expert's: layer.expert.neuron
                named = None if name == f"{layer}.{neuron}" else name
                pages[path.name] = SitePage(model, layer, neuron, path.name, note or None, named)
                bar.update()
    _refresh_neighbours(atlas, model, out, pages.values(), written, existing)
    site = SiteMeta(tuple(sorted(pages.values(), key=lambda p: (p.model, p.layer, p.neuron))))
    write_text_atomic(out / "index.html", render_index(site))
    write_json_atomic(out / SITE_JSON, site.to_dict())
    return [written[pair] for pair in planned]


def _by_layer(neurons: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """(layer, neuron) pairs grouped by layer, in the order given."""
    grouped: dict[int, list[int]] = defaultdict(list)
    for layer, neuron in neurons:
        grouped[layer].append(neuron)
    return grouped


def _write_layer(
    source: PageSource, layer: int, neurons: list[int], out: Path,
    existing: Set[tuple[str, int, int]],
) -> Iterator[tuple[int, Path]]:  # fmt: skip
    """Writes the pages of some neurons of one layer; yields (neuron, page) as each is
    written."""
    from gatescope.render import render_neuron

    model = source.atlas.meta.model.name or "model"
    links = lambda neuron: _links(source.atlas, model, layer, neuron, existing)  # noqa: E731
    for neuron, page in layer_pages(source, layer, neurons, links):
        path = out / page_file(model, layer, neuron)
        write_text_atomic(path, render_neuron(page))
        yield neuron, path


def layer_pages(
    source: PageSource,
    layer: int,
    neurons: Sequence[int],
    links: Callable[[int], dict[str, str | None]],
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The page data (:func:`neuron_page`) of some neurons of one layer, from one
    recomputation of the union of their top and typical texts; yields (neuron, page).

    Args:
        links: A neuron -> its page's links (see :func:`neuron_page`).
    """
    from gatescope.recompute import recompute

    atlas = source.atlas
    summaries = {n: atlas.neuron(layer, n) for n in neurons}
    ends = _shown_ends(summaries.values())
    acts = recompute(source.loaded, source.corpus, layer, list(neurons), sorted(ends),
                     refactor_glu=atlas.meta.options.refactor_glu, ends=ends)  # fmt: skip
    texts = sorted(ends)
    tokens = {t: token_strings(source.tokenizer, a.input_ids) for t, a in acts.items()}
    sources = source.corpus.source_ids(texts)
    rtol = _relative_precision(source.loaded.dtype)
    for i, neuron in enumerate(neurons):
        values = {t: a.values[i] for t, a in acts.items()}  # text -> [quantity, pos]
        summary = located(summaries[neuron], values, atlas.meta.options.include_bos, rtol)
        routing = summary.routing
        weights = None  # text -> [pos] router weights, for a routed expert's neuron
        if routing is not None and routing.routed:
            weights = {t: a.router_weight[i] for t, a in acts.items()
                       if a.router_weight is not None}  # fmt: skip
        yield neuron, neuron_page(atlas, summary, values, tokens, sources, links=links(neuron),
                                  router_weights=weights)  # fmt: skip


def located(
    summary: NeuronSummary, values: Mapping[int, np.ndarray], include_bos: bool, rtol: float
) -> NeuronSummary:
    """The summary with each example at its text's strongest token, checked.

    An example without a position (GLUScope's data has none) gets the position of its
    text's strongest token of the case (:func:`~gatescope.stats.quantities.strongest_token`).
    Every example's recomputed value must then equal the stored one to ``rtol``: where more
    than :data:`MISMATCH_SHARE` of them do not, the corpus, the model or the refactoring is
    not the atlas's, and the page would show unrelated texts.

    Args:
        values: Text index -> [quantity, pos], the neuron's recomputed activations.
        include_bos: Whether the atlas counted the first token.
        rtol: Relative tolerance of the comparison (the model dtype's precision).
    """
    from gatescope.stats.quantities import strongest_token

    first = 0 if include_bos else 1
    top: dict[str, dict[str, list[Example]]] = {}
    checked = wrong = 0
    for case, lists in summary.top.items():
        for quantity, examples in lists.items():
            c, q = CASES.index(case), QUANTITIES.index(quantity)
            top.setdefault(case, {})[quantity] = found = []
            for example in examples:
                text = values[example.text]
                position = example.position
                if position < 0:
                    position = strongest_token(text, c, q, first)
                value = math.nan if position is None else float(text[q, position])
                checked += 1
                wrong += not math.isclose(value, example.value, rel_tol=rtol, abs_tol=1e-6)
                found.append(
                    dataclasses.replace(example, position=-1 if position is None else position)
                )
    if wrong > MISMATCH_SHARE * checked:
        raise GatescopeError(
            f"{wrong} of the {checked} top examples of neuron {summary.layer}.{summary.index} "
            "do not recompute to their stored values: the corpus, the model or the "
            "refactoring (--refactor-glu) does not match the atlas."
        )
    return dataclasses.replace(summary, top=top)


def _relative_precision(dtype: torch.dtype) -> float:
    """How far a recomputation may land from a stored value: a scan in other batches, on
    other hardware, rounds its matrix products differently in the model's dtype."""
    import torch

    return 0.1 if dtype in (torch.bfloat16, torch.float16) else 1e-2


def _refresh_neighbours(
    atlas: Atlas, model: str, out: Path, pages: Iterable[SitePage],
    written: Mapping[tuple[int, int], Path], existing: Set[tuple[str, int, int]],
) -> None:  # fmt: skip
    """Earlier pages beside the new ones gain links to them."""
    from gatescope.render import refresh_nav

    beside = {
        (layer + dl, neuron + dn)
        for layer, neuron in written
        for dl, dn in ((0, -1), (0, 1), (-1, 0), (1, 0))
    }
    for page in pages:
        key = (page.layer, page.neuron)
        path = out / page.file
        if page.model == model and key in beside - written.keys() and path.exists():
            refresh_nav(path, _links(atlas, model, *key, existing))


def neuron_page(
    atlas: Atlas,
    summary: NeuronSummary,
    values: dict[int, Any],
    tokens: dict[int, list[str]],
    sources: dict[int, str],
    *,
    links: dict[str, str | None],
    router_weights: Mapping[int, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Everything the neuron template shows, as plain data.

    Args:
        values: Text index -> [quantity, pos] activations of this neuron.
        tokens: Text index -> display string of each token.
        sources: Text index -> source id.
        links: "prev_neuron", "next_neuron", "prev_layer", "next_layer" -> file or None;
            optionally "index": where "all neurons" leads (else the site's index.html).
        router_weights: For a routed expert's neuron, text index -> [pos] the router's
            weight of each token for the expert (NaN: not routed to it).
    """
    meta = atlas.meta
    shown = summary.distributions
    routing = summary.routing

    def weight(text: int, position: int) -> float | None:
        """The router's weight of an example's token (None: not a routed expert's)."""
        if router_weights is None or text not in router_weights or position < 0:
            return None
        found = router_weights[text]
        return finite(float(found[position])) if position < len(found) else None

    cases = []
    for case in CASES:
        occurs = summary.freq[case] > 0
        sections = []
        for quantity, examples in summary.top.get(case, {}).items():
            if examples:  # a list is empty only where the case never occurs
                sections.append({"quantity": quantity, "examples": [
                    {"rank": r + 1, "value": e.value, "text": e.text, "position": e.position,
                     "source": sources.get(e.text, ""), "weight": weight(e.text, e.position)}
                    for r, e in enumerate(examples)
                ]})  # fmt: skip
        cases.append(
            {
                "name": case,
                "occurs": occurs,
                "freq": summary.freq[case],
                # Among the tokens the neuron computes, its expert's (None: not in a mixture
                # of experts, or an expert the router never chose).
                "routed_freq": finite(routing.freq[case]) if routing is not None else None,
                "stats": {
                    q: {s: finite(getattr(summary, s)[case][q]) for s in ("max", "min", "mean")}
                    for q in QUANTITIES
                },
                "quantiles": shown and _quantile_cells(shown, case),
                "sections": sections,
                "typical": shown
                and [
                    {
                        "text": e.text,
                        "position": e.position,
                        "values": e.values,
                        "source": sources.get(e.text, ""),
                        "weight": weight(e.text, e.position),
                    }
                    for e in shown.typical[case]
                ],
            }
        )
    texts = {
        str(t): {
            "tokens": tokens[t],
            "values": _rounded(values[t]).tolist(),
            "source": sources.get(t, ""),
            **({"weights": _weights(router_weights[t])} if router_weights else {}),
        }
        for t in values
    }
    return {
        "model": meta.model.name or "unknown model",
        "layer": summary.layer,
        "neuron": summary.index,
        "name": atlas.neuron_name(summary.layer, summary.index),
        "routing": routing
        and {
            "expert": routing.expert,
            "neuron": routing.neuron,
            "routed": routing.routed,
            "seen": routing.seen,
            "share": routing.share,
            "router_weight_mean": finite(routing.router_weight_mean),
        },
        "corpus": meta.corpus.path or meta.corpus.fingerprint,
        "tokens": summary.tokens,
        "refactored": meta.options.refactor_glu,
        "include_bos": meta.options.include_bos,
        "links": links,
        "cases": cases,
        "quantiles": [name for name, _ in QUANTILES],
        # A routed expert's distributions are over its tokens: so are their frequencies.
        "distributions": shown
        and _distribution_charts(
            shown, _routed_freq(routing) if routing is not None and routing.routed else summary.freq
        ),
        "data": {
            "quantities": list(QUANTITIES),
            "cases": list(CASES),
            "before": CONTEXT_BEFORE,
            "after": CONTEXT_AFTER,
            "texts": texts,
        },
    }


def _routed_freq(routing: NeuronRouting) -> dict[str, float]:
    """A routed expert neuron's frequencies among its expert's tokens, 0 for an expert the
    router never chose (its histograms are empty)."""
    return {case: f if math.isfinite(f) else 0.0 for case, f in routing.freq.items()}


def _quantile_cells(shown: NeuronDistributions, case: str) -> dict[str, list[dict[str, Any]]]:
    """quantity -> per quantile its estimate and the range it lies in (None: never)."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for quantity in QUANTITIES:
        cells[quantity] = []
        for name, _ in QUANTILES:
            bracket = shown.quantiles[case][quantity][name]
            cells[quantity].append(
                {"value": None, "range": ""} if bracket is None else
                {"value": bracket.estimate,
                 "range": f"{name} of |{quantity}| lies in [{bracket.low:.4g}, {bracket.high:.4g}]"}
            )  # fmt: skip
    return cells


def _distribution_charts(shown: NeuronDistributions, freq: Mapping[str, float]) -> dict[str, Any]:
    """The heat map and, per case and quantity, the histogram bars (one count scale per
    quantity, so that the cases compare), with the tables of their numbers."""
    from gatescope import charts
    from gatescope.stats.distributions import bin_edges, joint_edges

    edges, edges_joint = bin_edges().tolist(), joint_edges().tolist()
    top = {q: max(max(shown.histogram[c][q]) for c in CASES) for q in QUANTITIES}
    histograms = []
    for case in CASES:
        counts = shown.histogram[case]
        nonzero = [b for b in range(len(edges) - 1) if any(counts[q][b] for q in QUANTITIES)]
        histograms.append({
            "case": case,
            "freq": freq[case],
            "charts": [
                {"quantity": q, "index": i, "bars": charts.histogram_bars(counts[q], edges, top[q])}
                for i, q in enumerate(QUANTITIES)
            ],
            "rows": [
                {"label": charts.bin_label(edges, b), "counts": [counts[q][b] for q in QUANTITIES]}
                for b in nonzero
            ],
        })  # fmt: skip
    joint_labels = [charts.bin_label(edges_joint, b) for b in range(len(edges_joint) - 1)]
    return {
        "histograms": histograms,
        "ticks": charts.ticks(edges, every=4, first=3),
        "width": charts.HISTOGRAM_WIDTH,
        "height": charts.HISTOGRAM_HEIGHT,
        "heat_map": charts.heat_map(shown.joint, edges_joint, freq),
        "joint": shown.joint,
        "joint_labels": joint_labels,
    }


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """How each token reads, leading spaces included (SentencePiece's "▁" and byte-level
    BPE's "Ġ" become spaces, byte tokens like <0x0A> their character). Each distinct id is
    converted once: a page's texts repeat a few hundred tokens tens of thousands of times."""
    distinct = sorted(set(ids))
    pieces = tokenizer.convert_ids_to_tokens(distinct)
    special = set(getattr(tokenizer, "all_special_tokens", []))
    reads: dict[int, str] = {}
    for token, piece in zip(distinct, pieces, strict=True):
        if piece is None:
            text = ""
        elif piece in special:
            text = piece
        else:
            text = tokenizer.convert_tokens_to_string([piece])
            if piece[:1] in ("▁", "Ġ") and not text.startswith(" "):
                text = " " + text
        reads[token] = text
    return [reads[token] for token in ids]


def _shown_ends(summaries: Iterable[NeuronSummary]) -> dict[int, int | None]:
    """The texts of some pages (of their ranked lists and typical examples), each with
    where its values may stop: after the last token a window of its examples shows, or
    None (the whole text) when an example's position is unknown (GLUScope's data). Later
    tokens cannot change earlier ones in a causal model, so the cut changes no value (only
    its rounding, as another batch would); the pages show the rest of the text uncolored."""
    ends: dict[int, int | None] = {}

    def see(text: int, position: int) -> None:
        end = None if position < 0 else position + CONTEXT_AFTER + 1
        if text not in ends:
            ends[text] = end
        elif ends[text] is not None:
            ends[text] = None if end is None else max(end, ends[text] or 0)

    for summary in summaries:
        for lists in summary.top.values():
            for examples in lists.values():
                for e in examples:
                    see(e.text, e.position)
        if summary.distributions is not None:
            for typical in summary.distributions.typical.values():
                for e in typical:
                    see(e.text, e.position)
    return ends


def _links(
    atlas: Atlas, model: str, layer: int, neuron: int, existing: Set[tuple[str, int, int]]
) -> dict[str, str | None]:
    """Neighbour pages that exist (or are being written) in the site."""

    def link(lyr: int, n: int) -> str | None:
        return page_file(model, lyr, n) if (model, lyr, n) in existing else None

    return {
        "prev_neuron": link(layer, neuron - 1),
        "next_neuron": link(layer, neuron + 1),
        "prev_layer": link(layer - 1, neuron),
        "next_layer": link(layer + 1, neuron),
    }


def _read_site(out: Path) -> SiteMeta:
    path = out / SITE_JSON
    if not path.exists():
        return SiteMeta()
    try:
        return SiteMeta.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, GatescopeError) as error:
        raise GatescopeError(f"{path} cannot be read ({error}): move it away.") from error


def _weights(weights: np.ndarray) -> list[float | None]:
    """Router weights [pos] for the page's data: four significant digits, None where the
    token was not routed to the expert (JSON has no NaN)."""
    return [finite(w) for w in _rounded(weights).tolist()]


def _rounded(values: np.ndarray) -> np.ndarray:
    """Tokens' values to four significant digits: as many as colors and tooltips show (the
    ranked values themselves travel unrounded). Vectorized: a page has ~10^5 of them."""
    x = values.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        digits = 3 - np.floor(np.log10(np.abs(x)))
    digits = np.where(np.isfinite(digits), digits, 0)
    scale = 10.0 ** np.abs(digits)  # exact powers of ten: multiply or divide by one
    return np.where(digits >= 0, np.round(x * scale) / scale, np.round(x / scale) * scale)
