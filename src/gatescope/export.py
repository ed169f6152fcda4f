"""Export an atlas in the GLUScope activation-dataset schema, and import that schema back.

One row per neuron, layer-major (row ``layer * d_mlp + neuron``), with the columns:

* ``layer``, ``neuron`` (int32);
* ``<case>_freq`` (float64): tokens of the case / counted tokens;
* ``<case>_<quantity>_mean`` (float64): mean over the case's tokens, NaN when it never occurs;
* beyond GLUScope, ``<case>_<quantity>_max`` and ``<case>_<quantity>_min`` (float32): the
  extremes over the case's tokens, NaN when it never occurs;
* for every ranked list (``TOP_LISTS``: each case and quantity but ``swish`` in the two
  ``gate+`` cases): ``<case>_<quantity>_max_values`` (list of ``k`` float32, strongest first,
  0 in empty slots), ``<case>_<quantity>_max_indices`` (list of ``k`` int32 text indices, -1
  in empty slots) and, beyond GLUScope, ``<case>_<quantity>_max_positions`` (list of ``k``
  int32 token positions, -1 in empty slots);
* beyond GLUScope, for an atlas with distributions: ``<case>_<quantity>_p50``, ``_p90`` and
  ``_p99`` (float32): quantiles of |value| over the case's tokens, the geometric middle of
  the histogram bin that holds them clipped to the case's extremes (its upper end when the
  lower is 0; NaN when the case never occurs).
  ``--format gluscope`` never has them; the histograms themselves stay in the atlas.

A mixture-of-experts atlas (``meta.experts``) names its rows ``layer``, ``expert`` ("0",
"1", ..., "shared", or "dense" for the dense layers of models like DeepSeek) and ``neuron``
(within the expert), leaves the padding of narrower layers out, and adds ``routed`` (int64: the
counted tokens routed to the row's expert; all counted tokens for shared and dense rows),
``<case>_routed_freq`` (float64: tokens of the case / ``routed``, the frequency among the
tokens the expert saw; ``<case>_freq`` stays relative to all counted tokens) and
``router_weight_mean`` (float64: the mean router weight of the expert's tokens, NaN for
shared and dense rows). ``--format gluscope`` refuses it: GLUScope's schema has no experts.

The atlas metadata (token count, k, model, corpus, options, ...) travels as JSON in the
dataset's ``info.description`` (and, in a parquet file, in the schema metadata, since
``datasets`` does not keep the description there), so an export imports back exactly.
GLUScope's own dataset has neither positions, extremes nor a token count: its import gets
positions -1, an unknown token count (unless one is given), and of the extremes only the
strongest value of each ranked list (the other one is NaN).

Counts and sums are not columns of the schema: an import rebuilds them as
``count = round(freq * tokens)`` (``tokens`` is :data:`~gatescope.atlas.FREQ_SCALE` when
unknown) and ``sum = mean * count``, which can differ from the scanned sum in the last bit
of its float64 mantissa. Counts are exact from our float64 frequencies; from GLUScope's
float32 ones (and our ``--format gluscope``) they are exact below 2**24 tokens of a case,
and within float32's relative precision (6e-8) above.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gatescope.atlas import FREQ_SCALE, ROUTING, Atlas
from gatescope.constants import CASES, QUANTILES, QUANTITIES, SIGNS, TOP_LISTS
from gatescope.errors import GatescopeError
from gatescope.files import ATLAS, DATASET, claim_output, staged
from gatescope.records import (
    PADDING,
    SHARED,
    AtlasMeta,
    AtlasOptions,
    ExpertsRecord,
    expert_label,
)
from gatescope.stats.distributions import bracket_estimates

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

logger: logging.Logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "export_atlas",
    "from_hf_dataset",
    "import_dataset",
    "schema_columns",
    "to_hf_dataset",
]

#: Output formats of :func:`export_atlas`.
FORMATS = ("hf", "parquet", "gluscope")

#: Key of the atlas metadata in the description JSON and in a parquet file's schema metadata.
META_KEY = "gatescope_meta"

# Suffixes of the three columns of a ranked list, in the order of the atlas tensors.
_LIST_FIELDS = (
    ("max_values", "top_value"),
    ("max_indices", "top_text"),
    ("max_positions", "top_position"),
)
# Empty-slot value and stored dtype of each ranked-list tensor.
_LIST_FILL = {
    "top_value": (0.0, np.float32),
    "top_text": (-1, np.int32),
    "top_position": (-1, np.int32),
}
# Our extreme columns, named by the atlas tensor they hold.
_EXTREMES = ("max", "min")


def schema_columns(*, extras: bool = True, quantiles: bool = False) -> list[str]:
    """The column names of the schema, in the order :func:`to_hf_dataset` writes them.

    Args:
        extras: Include our columns beyond GLUScope's: ``_max``, ``_min`` and
            ``_max_positions``.
        quantiles: Include the quantile columns (with ``extras`` only).
    """
    columns = ["layer", "neuron"]
    for c, case in enumerate(CASES):
        columns.append(f"{case}_freq")
        columns += [f"{case}_{quantity}_mean" for quantity in QUANTITIES]
        if extras:
            columns += [f"{case}_{q}_{extreme}" for q in QUANTITIES for extreme in _EXTREMES]
        if extras and quantiles:
            columns += [f"{case}_{q}_{name}" for q in QUANTITIES for name, _ in QUANTILES]
        for lc, q in TOP_LISTS:
            if lc == c:
                fields = [suffix for suffix, _ in _LIST_FIELDS]
                if not extras:
                    fields.remove("max_positions")
                columns += [f"{case}_{QUANTITIES[q]}_{suffix}" for suffix in fields]
    return columns


# ---------------------------------------------------------------------------- export


def to_hf_dataset(atlas: Atlas) -> datasets.Dataset:
    """The atlas as a ``datasets.Dataset`` in the GLUScope schema (see the module docstring).

    Built column by column from the whole tensors; ``info.description`` holds the atlas
    metadata as JSON (``{"description": ..., "gatescope_meta": meta}``).

    Args:
        atlas: Any atlas, in memory or memory-mapped from disk.

    Returns:
        A dataset of ``layers * d_mlp`` rows, layer-major.
    """
    import datasets
    import pyarrow as pa

    layers, d_mlp, k = atlas.num_layers, atlas.d_mlp, atlas.k
    rows = layers * d_mlp
    count = atlas.tensor("count").numpy()  # [L, case, d]
    sums = atlas.tensor("sum").numpy()  # [L, case, quantity, d]
    extremes = {name: atlas.tensor(name).numpy() for name in _EXTREMES}  # [L, case, q, d]
    columns: dict[str, pa.Array] = {
        "layer": pa.array(np.repeat(np.arange(layers, dtype=np.int32), d_mlp)),
        "neuron": pa.array(np.tile(np.arange(d_mlp, dtype=np.int32), layers)),
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        freq = count / atlas.denominator
        mean = np.where(count[:, :, None, :] > 0, sums / count[:, :, None, :], np.nan)
    for c, case in enumerate(CASES):
        columns[f"{case}_freq"] = pa.array(freq[:, c].reshape(rows).astype(np.float64))
        for q, quantity in enumerate(QUANTITIES):
            columns[f"{case}_{quantity}_mean"] = pa.array(mean[:, c, q].reshape(rows))
            for extreme in _EXTREMES:
                values = extremes[extreme][:, c, q].reshape(rows).astype(np.float32)
                columns[f"{case}_{quantity}_{extreme}"] = pa.array(values)
    ranked = {name: atlas.tensor(name).numpy() for _, name in _LIST_FIELDS}  # [L, d, list, k]
    for lst, (c, q) in enumerate(TOP_LISTS):
        for suffix, name in _LIST_FIELDS:
            flat = ranked[name][:, :, lst, :].reshape(rows * k).astype(_LIST_FILL[name][1])
            columns[f"{CASES[c]}_{QUANTITIES[q]}_{suffix}"] = _list_array(flat, rows, k)

    if atlas.has_distributions:
        columns |= _quantile_columns(atlas)
    names = schema_columns(quantiles=atlas.has_distributions)
    table = pa.table({name: columns[name] for name in names})
    if atlas.meta.experts is not None:
        table = _with_experts(table, atlas, atlas.meta.experts, count)
    from datasets.fingerprint import generate_random_fingerprint

    info = datasets.DatasetInfo(description=_describe(atlas.meta))
    # The default fingerprint pickles and hashes the whole table: seconds and gigabytes for
    # a 7B model, for an in-memory dataset that is never cached on disk.
    return datasets.Dataset(table, info=info, fingerprint=generate_random_fingerprint())


def _with_experts(
    table: pa.Table, atlas: Atlas, record: ExpertsRecord, count: np.ndarray
) -> pa.Table:
    """A mixture of experts' export: ``expert`` ("0", "1", ..., "shared", "dense") and the
    neuron within it, the expert's routed tokens, the case frequencies among them and its
    mean router weight; the padding of narrower layers left out.

    Args:
        count: [layer, case, d] the atlas's counts.
    """
    import pyarrow as pa

    layers = [atlas.routing(layer) for layer in range(atlas.num_layers)]
    code, neuron, seen, mean_weight = (
        np.concatenate([getattr(routing, name) for routing in layers if routing is not None])
        for name in ("code", "neuron", "seen", "router_weight_mean")
    )
    routed_freq = np.concatenate(
        [routing.freq(count[i]) for i, routing in enumerate(layers) if routing is not None],
        axis=1,
    )  # [case, L * d]
    kept = code != PADDING
    columns = {
        "expert": pa.DictionaryArray.from_arrays(
            pa.array(record.places(code)[kept].astype(np.int32)), pa.array(record.labels)
        ),
        "neuron": pa.array(neuron[kept].astype(np.int32)),
        "routed": pa.array(seen[kept]),
        "router_weight_mean": pa.array(mean_weight[kept]),
        **{f"{case}_routed_freq": pa.array(routed_freq[c, kept]) for c, case in enumerate(CASES)},
    }
    table = table.filter(pa.array(kept))
    table = table.set_column(table.column_names.index("neuron"), "neuron", columns.pop("neuron"))
    table = table.add_column(1, "expert", columns.pop("expert"))
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def _quantile_columns(atlas: Atlas) -> dict[str, pa.Array]:
    """``<case>_<quantity>_<p50|p90|p99>``: estimates of the quantiles of |value|."""
    import pyarrow as pa

    per_layer = []
    for layer in range(atlas.num_layers):
        brackets = atlas.quantiles(layer)  # [d, case, quantity, level, (low, high)]
        assert brackets is not None
        per_layer.append(bracket_estimates(brackets))
    estimates = np.concatenate(per_layer)  # [rows, case, quantity, level]
    return {
        f"{case}_{quantity}_{name}": pa.array(estimates[:, c, q, i].astype(np.float32))
        for c, case in enumerate(CASES)
        for q, quantity in enumerate(QUANTITIES)
        for i, (name, _) in enumerate(QUANTILES)
    }


def export_atlas(
    atlas: Atlas, out: str | Path, *, format: str = "hf", overwrite: bool = False
) -> Path:
    """Writes the atlas in the GLUScope schema.

    The output is written under a temporary name next to ``out`` and renamed into place, so
    an interrupted export never leaves something that looks complete.

    Args:
        atlas: The atlas to export.
        out: Target path. ``"hf"``: a folder for ``datasets.load_from_disk``. ``"parquet"``:
            one parquet file, written at ``out`` exactly as given (no suffix is added).
            ``"gluscope"``: a ``load_from_disk`` folder in GLUScope's exact schema
            (:func:`gatescope.gluscope.to_gluscope_dataset`), as its own script saves it.
        format: ``"hf"``, ``"parquet"`` or ``"gluscope"``.
        overwrite: Replace an existing ``out`` (only a dataset folder, an empty folder or a
            file; any other folder is refused).

    Returns:
        The path written.
    """
    if format not in FORMATS:
        raise GatescopeError(
            f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}."
        )
    out = Path(out)
    claim_output(out, DATASET, overwrite=overwrite)
    if format == "gluscope":
        from gatescope.gluscope import to_gluscope_dataset

        dataset = to_gluscope_dataset(atlas)
    else:
        dataset = to_hf_dataset(atlas)
    with staged(out) as tmp:
        if format == "parquet":
            _write_parquet(dataset, tmp)
        else:
            dataset.save_to_disk(str(tmp))
    logger.info("exported %d neurons (%s) to %s", dataset.num_rows, format, out)
    return out


def _list_array(flat: np.ndarray, rows: int, k: int) -> pa.Array:
    """A list column of ``rows`` lists of ``k`` items from ``flat`` [rows * k]."""
    import pyarrow as pa

    big = (rows + 1) * k >= 2**31
    offsets = np.arange(0, (rows + 1) * k, k, dtype=np.int64 if big else np.int32)
    array_type = pa.LargeListArray if big else pa.ListArray
    return array_type.from_arrays(pa.array(offsets), pa.array(flat))


def _describe(meta: AtlasMeta) -> str:
    """The ``info.description`` of an export: a sentence and the atlas metadata, as JSON."""
    model = meta.model.name or "a model"
    text = f"Neuron statistics of {model} in the GLUScope activation-dataset schema (gatescope)."
    return json.dumps({"description": text, META_KEY: meta.to_dict()})


def _write_parquet(dataset: datasets.Dataset, path: Path) -> None:
    """Writes one parquet file that keeps the description in the schema metadata."""
    import pyarrow.parquet as pq

    table = dataset.data.table
    metadata = {**(table.schema.metadata or {}), META_KEY.encode(): dataset.info.description}
    pq.write_table(table.replace_schema_metadata(metadata), str(path))


# ---------------------------------------------------------------------------- import


def from_hf_dataset(
    dataset: datasets.Dataset | pa.Table,
    *,
    tokens: int | None = None,
) -> Atlas:
    """Builds an in-memory atlas from a dataset in the GLUScope schema.

    Reads our exports exactly (metadata from ``info.description``) and GLUScope's own
    dataset, which has no ``_max_positions`` columns (positions become -1) and no token
    count. Rows may come in any order; ``layer`` and ``neuron`` place them.

    Args:
        dataset: The dataset (or a pyarrow table of it), one row per neuron.
        tokens: Counted tokens of the corpus behind the dataset; without it (and without
            restored metadata) the token count stays unknown: frequencies are right, counts
            are not known.

    Returns:
        The atlas: ``count`` [L, case, d] = round(freq * tokens), ``sum`` [L, case,
        quantity, d] = mean * count, ranked lists [L, d, list, k] with ``k`` the length
        of the dataset's lists.
    """
    table = _as_table(dataset)
    restored = _restored_meta(dataset, table)
    columns = set(table.column_names)
    required = schema_columns(extras=False)
    missing = [name for name in required if name not in columns]
    if missing:
        raise GatescopeError(
            f"the dataset is not in the GLUScope schema: it lacks the columns {', '.join(missing)}."
        )
    rows = table.num_rows
    if rows == 0:
        raise GatescopeError("the dataset has no rows: there are no neurons to import.")
    layer = _integers(table, "layer")
    neuron = _integers(table, "neuron")
    experts = restored.experts if restored is not None else None
    routing: dict[str, torch.Tensor] = {}
    if experts is None:
        layers, d_mlp = int(layer.max()) + 1, int(neuron.max()) + 1
        place = _places(layer, neuron, layers, d_mlp)  # [row] -> layer * d_mlp + neuron
    else:  # a mixture of experts: rows named by (layer, expert, neuron), no padding rows
        assert restored is not None
        layers, d_mlp = restored.layers, experts.width
        code = _expert_codes(table, experts)
        layout = experts.layouts(layers)
        index = _expert_index(experts, layer, code, neuron, layout)
        present = layout[0] != PADDING
        place = _places(layer, index, layers, d_mlp, present)
        routing = _imported_routing(table, experts, layer, code, layers)

    if tokens is None and restored is not None:
        tokens = restored.tokens
    denominator = FREQ_SCALE if tokens is None else tokens

    count = np.zeros((layers * d_mlp, len(CASES)), dtype=np.int64)
    sums = np.zeros((layers * d_mlp, len(CASES), len(QUANTITIES)), dtype=np.float64)
    for c, case in enumerate(CASES):
        freq = _floats(table, f"{case}_freq")
        count[place, c] = np.rint(np.nan_to_num(freq * denominator, nan=0.0)).astype(np.int64)
        for q, quantity in enumerate(QUANTITIES):
            mean = _floats(table, f"{case}_{quantity}_mean")
            sums[place, c, q] = np.where(np.isnan(mean), 0.0, mean * count[place, c])

    k = _list_length(table, _ranked_column(0, "max_values"), layer, neuron, expected=None)
    ranked = {
        name: np.full((layers * d_mlp, len(TOP_LISTS), k), fill, dtype=dtype)
        for name, (fill, dtype) in _LIST_FILL.items()
    }
    for lst in range(len(TOP_LISTS)):
        for suffix, name in _LIST_FIELDS:
            column = _ranked_column(lst, suffix)
            if column not in columns:  # GLUScope has no positions: they stay -1
                continue
            _list_length(table, column, layer, neuron, expected=k)
            fill, dtype = _LIST_FILL[name]
            ranked[name][place, lst] = _list_values(table, column, fill, dtype).reshape(rows, k)
    gluscope_layout = _ranked_column(0, "max_positions") not in columns
    if gluscope_layout:
        # GLUScope ranks every text, so a case seen in fewer than k texts fills its list with
        # zeros (-0.0 for negative lists) at valid-looking text indices: empty slots.
        empty = ranked["top_value"] == 0
        ranked["top_value"][empty] = 0.0
        ranked["top_text"][empty] = -1

    def neuron_last(array: np.ndarray) -> torch.Tensor:  # [L * d, ...] -> [L, ..., d]
        moved = np.moveaxis(array.reshape(layers, d_mlp, *array.shape[1:]), 1, -1)
        return torch.from_numpy(np.ascontiguousarray(moved))

    extremes = _imported_extremes(table, columns, place, ranked["top_value"], count)
    tensors = {
        "count": neuron_last(count),
        "sum": neuron_last(sums),
        **{name: neuron_last(array) for name, array in extremes.items()},
        **routing,
        **{
            name: torch.from_numpy(array.reshape(layers, d_mlp, *array.shape[1:]))
            for name, array in ranked.items()
        },
    }
    shape = {"layers": layers, "d_mlp": d_mlp, "k": k, "tokens": tokens,
             "count_scale": None if tokens is not None else FREQ_SCALE}  # fmt: skip
    if restored is not None:  # the histograms stay in the atlas: the import has none
        options = dataclasses.replace(restored.options, distributions=False, seed=None)
        meta = restored.replace(**shape, options=options)
    else:  # GLUScope's own: it counts every text's first token
        meta = AtlasMeta(**shape, options=AtlasOptions(include_bos=True))
    return Atlas(meta, tensors)


def _imported_extremes(
    table: pa.Table,
    columns: set[str],
    place: np.ndarray,
    top_value: np.ndarray,
    count: np.ndarray,
) -> dict[str, np.ndarray]:
    """The ``max`` and ``min`` arrays [L * d, case, quantity] of an import.

    Our exports carry them; for GLUScope's dataset the strongest value of each ranked list
    is one of the two (the maximum of a positive quantity, the minimum of a negative one),
    and everything else is unknown (NaN).
    """
    shape = (count.shape[0], len(CASES), len(QUANTITIES))
    extremes = {name: np.full(shape, np.nan, dtype=np.float32) for name in _EXTREMES}
    if all(f"{CASES[0]}_{QUANTITIES[0]}_{name}" in columns for name in _EXTREMES):
        for c, case in enumerate(CASES):
            for q, quantity in enumerate(QUANTITIES):
                for name in _EXTREMES:
                    values = _floats(table, f"{case}_{quantity}_{name}")
                    extremes[name][place, c, q] = values
        return extremes
    for lst, (c, q) in enumerate(TOP_LISTS):
        name = "max" if SIGNS[c][q] > 0 else "min"
        strongest = top_value[:, lst, 0]
        extremes[name][:, c, q] = np.where(count[:, c] > 0, strongest, np.nan)
    return extremes


def import_dataset(
    source: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    tokens: int | None = None,
    corpus: str | Path | None = None,
    refactor_glu: bool = False,
    overwrite: bool = False,
) -> Atlas:
    """Imports a dataset in the GLUScope schema, or a GLUScope ``summary.pt``, into an atlas
    folder.

    Args:
        source: A ``save_to_disk`` folder, a parquet file or a ``summary.pt`` (recognized by
            their content, whatever their suffix), or a Hugging Face dataset id (its
            ``train`` split), such as GLUScope's published OLMo-7B dataset.
        out: The atlas folder to write.
        model: The model the statistics belong to (recorded as its name).
        tokens: Counted tokens of the corpus, when the dataset does not record them.
        corpus: The corpus the dataset's text indices point into (``gatescope corpus`` on
            GLUScope's tokenized corpus keeps its rows): recorded for pages, checked against
            the indices, and the source of the token count (every token of every text: the
            first too, as GLUScope counts it) when none is known.
        refactor_glu: The statistics were made with refactored weights (GLUScope's
            ``--refactor_glu``, as its published OLMo-7B data): pages recompute with them.
        overwrite: Replace an atlas already in ``out``.

    Returns:
        The atlas, loaded from ``out``.
    """
    from gatescope.corpus import TokenizedCorpus

    out = Path(out)
    claim_output(out, ATLAS, overwrite=overwrite)
    texts = TokenizedCorpus.open(corpus) if corpus is not None else None
    dataset = _load_source(source)
    restored = _restored_meta(dataset, _as_table(dataset))
    if tokens is None and texts is not None and (restored is None or restored.tokens is None):
        first_counted = restored is None or restored.options.include_bos  # GLUScope counts it
        tokens = int(texts.lengths.sum()) - (0 if first_counted else len(texts.lengths))
    atlas = from_hf_dataset(dataset, tokens=tokens)
    meta = atlas.meta.replace(imported_from=str(source))
    if model is not None:
        meta = meta.replace(model=dataclasses.replace(meta.model, name=model))
    if refactor_glu:
        meta = meta.replace(options=dataclasses.replace(meta.options, refactor_glu=True))
    if texts is not None:
        texts.check_texts([max(int(atlas.tensor("top_text").max()), 0)])
        meta = meta.replace(corpus=texts.reference())
    atlas.meta = meta
    atlas.save(out, overwrite=overwrite)
    logger.info("imported %s into %s", source, out)
    return Atlas.load(out)


def _load_source(source: str | Path) -> datasets.Dataset | pa.Table:
    """The dataset behind ``source`` (see :func:`import_dataset`)."""
    import datasets

    path = Path(source)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise GatescopeError(f"{path} is not a saved dataset folder ({error}).") from error
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise GatescopeError(
                    f"{path} holds the splits {', '.join(map(str, loaded))}: import a folder "
                    "of one split."
                )
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    if path.is_file():
        with path.open("rb") as file:
            magic = file.read(4)
        if magic == b"PK\x03\x04":  # torch.save's zip format: a GLUScope summary.pt
            from gatescope.gluscope import read_summary

            return read_summary(path)
        if magic != b"PAR1":
            raise GatescopeError(
                f"{path} is neither a parquet file nor a GLUScope summary.pt: import one of "
                "those, a dataset folder or a Hugging Face dataset id."
            )
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(str(path))
        except (OSError, pa.ArrowException) as error:
            raise GatescopeError(f"{path} is an unreadable parquet file ({error}).") from error
    if isinstance(source, Path) or path.suffix == ".parquet" or str(source).startswith((".", "/")):
        raise GatescopeError(f"{source} does not exist.")
    try:
        return datasets.load_dataset(str(source), split="train")
    except Exception as error:  # offline, unknown id, no train split, ...: all user-facing
        raise GatescopeError(
            f"{source} is no local dataset folder or .parquet file, and loading it as a Hugging "
            f"Face dataset id failed ({type(error).__name__}: {error}); check the path or id, "
            "and the network."
        ) from error


def _as_table(dataset: datasets.Dataset | pa.Table) -> pa.Table:
    import datasets
    import pyarrow as pa

    if isinstance(dataset, pa.Table):
        return dataset
    if isinstance(dataset, datasets.DatasetDict):
        raise GatescopeError(
            f"expected one split, got a DatasetDict with {', '.join(map(str, dataset))}: pass e.g. "
            "dataset['train']."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise GatescopeError(
            f"expected a datasets.Dataset or a pyarrow Table, got {type(dataset).__name__}."
        )
    table = dataset.data.table
    # A shuffled or selected dataset reads through an indices mapping; datasets' own
    # formatting applies it ten times slower than one take.
    indices = getattr(dataset, "_indices", None)
    if indices is not None:
        table = table.take(indices.column(0))
    return table


def _restored_meta(dataset: datasets.Dataset | pa.Table, table: pa.Table) -> AtlasMeta | None:
    """The atlas metadata an export carries; None when absent (GLUScope's own dataset)."""
    texts = [getattr(getattr(dataset, "info", None), "description", None)]
    texts.append((table.schema.metadata or {}).get(META_KEY.encode()))
    for text in texts:
        if not text:
            continue
        try:
            meta = json.loads(text).get(META_KEY)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            continue  # a free-text description (GLUScope's): no metadata
        if isinstance(meta, dict):
            return AtlasMeta.from_dict(meta)
    return None


def _ranked_column(lst: int, suffix: str) -> str:
    c, q = TOP_LISTS[lst]
    return f"{CASES[c]}_{QUANTITIES[q]}_{suffix}"


def _integers(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise GatescopeError(f"the column {name} has {column.null_count} empty values.")
    values = column.to_numpy().astype(np.int64)
    if values.min() < 0:
        raise GatescopeError(f"the column {name} has negative values.")
    return values


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """[rows] float64, NaN for nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = pc.fill_null(table.column(name).cast(pa.float64()), float("nan"))
    return column.to_numpy()


def _expert_codes(table: pa.Table, record: ExpertsRecord) -> np.ndarray:
    """[row] the ``expert`` column as codes: the routed expert's number, SHARED or DENSE."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "expert" not in table.column_names:
        raise GatescopeError("the dataset is of a mixture-of-experts atlas but has no column "
                             "expert.")  # fmt: skip
    labels = table.column("expert").cast(pa.string())
    place = pc.index_in(labels, value_set=pa.array(record.labels))  # pyright: ignore[reportAttributeAccessIssue]
    if place.null_count:
        raise GatescopeError(f"the column expert has values other than 0-"
                             f"{record.n_experts - 1}, shared and dense.")  # fmt: skip
    return record.codes(place.to_numpy(zero_copy_only=False).astype(np.int64))


def _expert_index(
    record: ExpertsRecord, layer: np.ndarray, code: np.ndarray, neuron: np.ndarray,
    layout: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:  # fmt: skip
    """[row] the place in its layer of each row's (expert, neuron), refusing any the layer
    does not have (:meth:`ExpertsRecord.index`, vectorized; ``layout`` is
    :meth:`ExpertsRecord.layouts` of the atlas's layers)."""
    routed = record.n_experts * record.d_ff
    index = np.select([code >= 0, code == SHARED], [code * record.d_ff + neuron, routed + neuron],
                      neuron)  # fmt: skip
    layout_code, layout_neuron = layout
    layers = len(layout_code) // record.width
    slot = layer * record.width + np.minimum(index, record.width - 1)
    valid = (layer < layers) & (index < record.width) & (layout_code[slot] == code)
    valid &= layout_neuron[slot] == neuron
    if not valid.all():
        row = int(np.argmin(valid))
        name = f"{expert_label(int(code[row]))}.{neuron[row]}"
        raise GatescopeError(f"layer {layer[row]} of the atlas has no neuron {name} (row {row}).")
    return index


def _imported_routing(
    table: pa.Table, record: ExpertsRecord, layer: np.ndarray, code: np.ndarray, layers: int
) -> dict[str, torch.Tensor]:
    """[layer, expert] routed tokens and the sums of their router weights, from the rows of
    each expert's neurons."""
    routed = np.zeros((layers, record.n_experts), np.int64)
    weight = np.zeros((layers, record.n_experts))
    rows = code >= 0
    routed[layer[rows], code[rows]] = _integers(table, "routed")[rows]
    mean = np.nan_to_num(_floats(table, "router_weight_mean")[rows])
    weight[layer[rows], code[rows]] = mean * routed[layer[rows], code[rows]]
    return dict(zip(ROUTING, (torch.from_numpy(routed), torch.from_numpy(weight)), strict=True))


def _places(
    layer: np.ndarray, neuron: np.ndarray, layers: int, d_mlp: int,
    present: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """[row] index ``layer * d_mlp + neuron``, checking that every neuron is there once
    (every one where ``present`` [layers * d_mlp] is true, when given)."""
    place = layer * d_mlp + neuron
    seen = np.bincount(place, minlength=layers * d_mlp)
    if present is not None:
        seen = np.where(present, seen, 1)  # slots that hold nothing need no row
    if (seen > 1).any():
        first = int(np.argmax(seen > 1))
        raise GatescopeError(
            f"the dataset has {int((seen > 1).sum())} neurons in more than one row "
            f"(first: layer {first // d_mlp}, neuron {first % d_mlp})."
        )
    if (seen == 0).any():
        first = int(np.argmax(seen == 0))
        raise GatescopeError(
            f"the dataset lacks {int((seen == 0).sum())} of the {layers * d_mlp} neurons of "
            f"{layers} layers x {d_mlp} (first missing: layer {first // d_mlp}, neuron "
            f"{first % d_mlp})."
        )
    return place


def _list_length(
    table: pa.Table, name: str, layer: np.ndarray, neuron: np.ndarray, expected: int | None
) -> int:
    """The common length of the lists of a column; ``expected`` if given, else that of row 0."""
    import pyarrow.compute as pc

    # pyarrow.compute makes its functions at import time, out of sight of its type stubs.
    lengths = pc.list_value_length(table.column(name))  # pyright: ignore[reportAttributeAccessIssue]
    if lengths.null_count:
        raise GatescopeError(f"the column {name} has {lengths.null_count} empty (null) lists.")
    lengths = lengths.to_numpy()
    k = int(lengths[0]) if expected is None else expected
    wrong = np.flatnonzero(lengths != k)
    if wrong.size:
        row = int(wrong[0])
        raise GatescopeError(
            f"the column {name} has a list of length {int(lengths[row])} at layer "
            f"{int(layer[row])}, neuron {int(neuron[row])}, but the ranked lists have length {k}."
        )
    if k == 0:
        raise GatescopeError(f"the column {name} has empty lists: the ranked lists need k >= 1.")
    return k


def _list_values(table: pa.Table, name: str, fill: float, dtype: type) -> np.ndarray:
    """The items of a list column, flattened: [rows * k] of ``dtype``, nulls -> ``fill``."""
    import pyarrow.compute as pc

    items = table.column(name).combine_chunks().flatten()
    return pc.fill_null(items, fill).to_numpy(zero_copy_only=False).astype(dtype)
