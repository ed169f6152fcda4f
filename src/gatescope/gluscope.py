"""GLUScope's own data, exactly: its activation dataset and its ``summary.pt`` files.

GLUScope (Gerstner & Schütze, 2026) publishes one row per neuron, layer-major (row
``layer * d_mlp + neuron``), with these columns in this order (``datasets`` 4 features):

* ``layer``, ``neuron``: int64;
* per case (``gate+_in+``, ``gate+_in-``, ``gate-_in+``, ``gate-_in-``): ``<case>_freq``
  (float32), then per quantity in GLUScope's order ``hook_post``, ``hook_pre_linear``,
  ``hook_pre``, ``swish``: ``<case>_<q>_max_values`` (list of k float32, signed, strongest
  first) and ``<case>_<q>_max_indices`` (list of k int64: rows of the corpus) where the
  quantity is ranked (not ``swish`` in the two ``gate+`` cases), then ``<case>_<q>_mean``
  (float32, NaN where the case never occurs).

Its conventions differ from an atlas's, and an importer must not misread them:

* the first token of every text is counted (``--include-bos``); exact zeros are in no case;
* every text is a candidate in every list, so a case found in fewer than k texts fills the
  rest with value 0 (-0.0 where the list's sign is negative) and valid-looking text indices:
  those are empty slots;
* no token count, no token positions, no extremes; ``freq`` is over all tokens;
* its published OLMo-7B data was made with refactored weights (``--refactor-glu``).

``summary.pt`` (what its script saves before building the dataset) is a dict with tuple keys:
``(case, "freq")`` [L, d]; ``(case, q, "sum")`` [L, d], already a mean; ``(case, q, "max")``
-> ``{"values": [k, L, d], "indices": [k, L, d]}``. :func:`read_summary` turns it into the
dataset's columns; :func:`to_gluscope_dataset` writes an atlas in this exact schema.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gatescope.constants import CASES, QUANTITIES, SIGNS, TOP_LISTS
from gatescope.errors import GatescopeError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

    from gatescope.atlas import Atlas

__all__ = [
    "GLUSCOPE_ORDER",
    "first_token_warning",
    "gluscope_columns",
    "read_summary",
    "to_gluscope_dataset",
]

logger: logging.Logger = logging.getLogger(__name__)

#: GLUScope's order of the quantities within a case.
GLUSCOPE_ORDER: tuple[str, ...] = ("hook_post", "hook_pre_linear", "hook_pre", "swish")

_RANKED = {(CASES[c], QUANTITIES[q]) for c, q in TOP_LISTS}


def gluscope_columns() -> list[tuple[str, str]]:
    """GLUScope's columns in order, each with its type: ``"int64"``, ``"float32"``,
    ``"list<float32>"`` or ``"list<int64>"``."""
    columns = [("layer", "int64"), ("neuron", "int64")]
    for case in CASES:
        columns.append((f"{case}_freq", "float32"))
        for quantity in GLUSCOPE_ORDER:
            if (case, quantity) in _RANKED:
                columns.append((f"{case}_{quantity}_max_values", "list<float32>"))
                columns.append((f"{case}_{quantity}_max_indices", "list<int64>"))
            columns.append((f"{case}_{quantity}_mean", "float32"))
    return columns


def to_gluscope_dataset(atlas: Atlas) -> datasets.Dataset:
    """The atlas in GLUScope's exact schema: its columns, order, dtypes and padding.

    Empty slots become what GLUScope writes there: value 0 (signed like the list) and the
    lowest text indices not in the list, so that GLUScope's own code, which recomputes
    every listed text, finds real rows. The description says how the atlas counted tokens
    (and carries gatescope's metadata, which GLUScope ignores).
    """
    import datasets
    import pyarrow as pa
    from datasets.fingerprint import generate_random_fingerprint

    from gatescope.export import to_hf_dataset

    if atlas.meta.experts is not None:
        raise GatescopeError(
            "--format gluscope cannot hold a mixture-of-experts atlas (GLUScope's schema has "
            "no experts): export it with --format hf or parquet, whose rows are named "
            "layer.expert.neuron."
        )

    ours = to_hf_dataset(atlas)  # the superset; GLUScope's columns are among them
    table = ours.data.table
    rows, k = table.num_rows, atlas.k
    columns: dict[str, pa.Array] = {}
    for name, kind in gluscope_columns():
        if not kind.startswith("list"):
            columns[name] = table.column(name).combine_chunks().cast(getattr(pa, kind)())
    for c, q in TOP_LISTS:
        prefix = f"{CASES[c]}_{QUANTITIES[q]}_max"
        values = _flat(table, f"{prefix}_values").reshape(rows, k).astype(np.float32)
        texts = _flat(table, f"{prefix}_indices").reshape(rows, k).astype(np.int64)
        _pad_like_gluscope(values, texts, negative=SIGNS[c][q] < 0)
        columns[f"{prefix}_values"] = _lists(values)
        columns[f"{prefix}_indices"] = _lists(texts)
    ordered = pa.table({name: columns[name] for name, _ in gluscope_columns()})
    info = datasets.DatasetInfo(description=_description(atlas, ours.info.description))
    # A random fingerprint: the default one hashes the whole table (see export).
    return datasets.Dataset(ordered, info=info, fingerprint=generate_random_fingerprint())


def first_token_warning(atlas: Atlas) -> str | None:
    """One line saying that the atlas's frequencies leave the first token out, or None."""
    if atlas.meta.options.include_bos:
        return None
    return (
        "this atlas was scanned without --include-bos: its frequencies leave each text's first "
        "token out, where GLUScope counts it."
    )


def read_summary(path: Path) -> pa.Table:
    """A GLUScope ``summary.pt`` / ``summary_refactored.pt`` as the dataset's columns.

    Loaded with ``torch.load(weights_only=True)``: only tensors, dicts, tuples and strings,
    never arbitrary objects.
    """
    import torch

    try:
        summary = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused or a damaged file: one sentence
        raise GatescopeError(
            f"{path} is not a GLUScope summary file that loads safely ({_first_line(error)})."
        ) from error
    if not isinstance(summary, dict) or (CASES[0], "freq") not in summary:
        raise GatescopeError(f"{path} is not a GLUScope summary: it has no ('{CASES[0]}', 'freq').")
    try:
        return _summary_columns(summary, path)
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as error:
        raise GatescopeError(
            f"{path} is not a GLUScope summary of the usual shapes ({_first_line(error)})."
        ) from error


def _summary_columns(summary: dict, path: Path) -> pa.Table:
    """The dataset's columns from a loaded summary dict (shapes as GLUScope saves them)."""
    import pyarrow as pa

    layers, d_mlp = summary[CASES[0], "freq"].shape
    columns: dict[str, pa.Array] = {
        "layer": pa.array(np.repeat(np.arange(layers, dtype=np.int64), d_mlp)),
        "neuron": pa.array(np.tile(np.arange(d_mlp, dtype=np.int64), layers)),
    }

    def flat(key: tuple[str, ...]) -> np.ndarray:  # [L, d] -> [L * d]
        if key not in summary:
            raise GatescopeError(f"{path} lacks the entry {key}.")
        return summary[key].float().reshape(-1).numpy()

    for case in CASES:
        columns[f"{case}_freq"] = pa.array(flat((case, "freq")))
        for quantity in GLUSCOPE_ORDER:
            if (case, quantity) in _RANKED:
                ranked = summary.get((case, quantity, "max"))
                if not isinstance(ranked, dict):
                    raise GatescopeError(f"{path} lacks the entry {(case, quantity, 'max')}.")
                # [k, L, d] -> [L * d, k]
                values = ranked["values"].float().reshape(-1, layers * d_mlp).T.contiguous()
                texts = ranked["indices"].long().reshape(-1, layers * d_mlp).T.contiguous()
                prefix = f"{case}_{quantity}_max"
                columns[f"{prefix}_values"] = _lists(values.numpy().astype(np.float32))
                columns[f"{prefix}_indices"] = _lists(texts.numpy())
            # GLUScope's "sum" entries are already means.
            columns[f"{case}_{quantity}_mean"] = pa.array(flat((case, quantity, "sum")))
    return pa.table(columns)


def _pad_like_gluscope(values: np.ndarray, texts: np.ndarray, *, negative: bool) -> None:
    """Fills empty slots (text -1) of ``[rows, k]`` lists in place as GLUScope does."""
    zero = -0.0 if negative else 0.0
    for row in np.flatnonzero((texts < 0).any(axis=1)):
        empty = texts[row] < 0
        taken = set(texts[row][~empty].tolist())
        free = (t for t in range(len(taken) + empty.sum()) if t not in taken)
        texts[row][empty] = [next(free) for _ in range(int(empty.sum()))]
        values[row][empty] = zero


def _description(atlas: Atlas, ours: str) -> str:
    """GLUScope sets no description; ours says how tokens were counted, and keeps our
    metadata for an exact import."""
    import json

    note = first_token_warning(atlas)
    data = json.loads(ours)
    data["description"] += " GLUScope's schema. " + (
        note.capitalize() if note else "The first token of each text is counted, as in GLUScope."
    )
    return json.dumps(data)


def _flat(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)


def _lists(array: np.ndarray) -> pa.Array:
    """A list column from ``array`` [rows, k]."""
    import pyarrow as pa

    rows, k = array.shape
    offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(array.reshape(-1)))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
