"""Text source -> tokenized corpus: the texts a scan runs the model over.

A corpus is a `datasets` folder (`save_to_disk`) with two columns, `INPUT_IDS` (each text's
token ids, BOS first, at most `max_length` of them) and `SOURCE_ID` (where the text came
from), plus `CORPUS_JSON` (:class:`~gatescope.records.CorpusMeta`: how it was built and what
it holds). Text sources are local `.jsonl`, `.parquet` and `.txt` files, folders of them,
folders written by `save_to_disk`, or a Hugging Face dataset name.

A built corpus carries its recipe in its `info.description`, so that `save_corpus` records
the same metadata whether it is called by `gatescope corpus` or from Python.
:class:`TokenizedCorpus` is a corpus opened for reading: its lengths, batches and source ids.

Heavy libraries (pyarrow, datasets, transformers) are imported inside the functions, so that
`import gatescope.corpus` stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from gatescope import __version__
from gatescope.constants import CORPUS_JSON, INPUT_IDS, SOURCE_ID
from gatescope.errors import GatescopeError
from gatescope.files import CORPUS, claim_output, staged
from gatescope.records import CorpusMeta, CorpusRecipe, CorpusRef

if TYPE_CHECKING:
    import datasets
    import numpy as np
    import pyarrow as pa
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TokenizedCorpus",
    "build_corpus",
    "corpus_metadata",
    "corpus_recipe",
    "fingerprint",
    "load_corpus",
    "save_corpus",
    "start_token",
]

logger: logging.Logger = logging.getLogger(__name__)

#: File suffixes read from a local source, and from the folders searched recursively.
SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet", ".txt")

# Tokenization batches: small enough that a tiny budget never tokenizes much past it, large
# enough that the fast tokenizer's batching pays off.
_MIN_BATCH = 16
_MAX_BATCH = 1024
# Rows per slice when hashing a corpus, so memory stays bounded on large corpora.
_HASH_ROWS = 1 << 16
_FINGERPRINT_TAG = b"gatescope-corpus-v1"
# Key of the recipe in a built corpus's `info.description` (JSON).
_RECIPE_KEY = "gatescope_corpus_recipe"


@dataclass
class _Texts:
    """Texts of one source file or dataset, before shuffling.

    Attributes:
        label: the source-id prefix: a relative path, or `<dataset>/<split>`.
        texts: the non-empty texts, as an Arrow string array (`[n]`).
        rows: each text's 0-based row in its file or dataset (`[n]`, int64).
        names: for texts given by name, every row's name: the source id, without label.
    """

    label: str
    texts: pa.Array
    rows: np.ndarray
    names: list[str] | None = None

    def source_id(self, row: int) -> str:
        return self.names[row] if self.names is not None else f"{self.label}:{row}"


def build_corpus(
    source: str | Path | Mapping[str, str],
    tokenizer: str | Path | PreTrainedTokenizerBase,
    *,
    max_length: int = 1024,
    tokens: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    split: str = "train",
    separator: str = "<|endoftext|>",
    progress: bool = False,
    source_name: str | None = None,
) -> datasets.Dataset:
    """Reads, shuffles and tokenizes the texts of a source into a corpus.

    Texts: a `.jsonl` or `.parquet` file gives one text per row (the `text_column`); a
    `.txt` file is split at `separator` (TinyStories style; an empty separator or a file
    without it gives one text), and each piece is stripped of the whitespace around it. A
    folder gives the texts of all such files below it, in the order of their relative
    paths; a folder written by `datasets` `save_to_disk`, or a Hugging Face dataset name,
    gives the `text_column` of its `split`. A mapping gives its values, one text each, as
    they are (name -> text: for texts made in Python, such as chunks of source files). Empty
    and whitespace-only texts are dropped.

    Source ids: `"<relative path>:<row>"` for local files (the path relative to the source
    folder, or the file name; row is the 0-based JSON line, Parquet row or `separator`-
    delimited piece of the file), `"<dataset>/<split>:<row>"` for Hugging Face and saved
    datasets. Rows count the dropped empty texts too, so a source id always points back to
    the right place in the file. A mapping's texts have their names as source ids.

    Order and tokens: the texts are shuffled with `numpy.random.default_rng(seed)`, so the
    same source, tokenizer and seed always give the same corpus. They are tokenized in that
    order without special tokens; each gets the tokenizer's BOS id first (its EOS id when it
    has no BOS, as GLUScope does) and is truncated to `max_length` tokens, BOS included.

    Budget: with `tokens`, the corpus holds exactly `tokens` tokens (BOS included) when the
    source has that many: the last text is cut to fit, like any text longer than
    `max_length`. An exact count makes the number of scanned tokens, and so the
    frequencies of different corpora, directly comparable. Texts after the budget are never
    tokenized, so a small budget on a large source stays fast.

    Args:
        source: a local file or folder, a Hugging Face dataset name, or name -> text.
        tokenizer: a tokenizer, or a name or path for `AutoTokenizer.from_pretrained`.
        max_length: the most tokens per text, BOS included (at least 2).
        tokens: the token budget of the whole corpus; None takes every text.
        seed: the shuffle seed.
        text_column: the column holding the texts (jsonl, parquet and datasets).
        split: the split of a Hugging Face dataset or of a saved `DatasetDict`.
        separator: the string between texts in a `.txt` file.
        progress: show a progress bar.
        source_name: how the source is recorded (default: its path or name).

    Returns:
        A `datasets.Dataset` with columns `INPUT_IDS` (list of int32) and `SOURCE_ID`
        (string), one row per text, in memory; its recipe (:func:`corpus_recipe`) travels
        in its `info.description`.

    Raises:
        GatescopeError: the source, the tokenizer or an option is unusable.
    """
    import numpy as np

    if max_length < 2:
        raise GatescopeError(
            f"max_length must be at least 2 (BOS and one token), got {max_length}."
        )
    if tokens is not None and tokens < 1:
        raise GatescopeError(f"the token budget must be a positive number, got {tokens}.")

    tok = _load_tokenizer(tokenizer)
    bos = start_token(tok)
    if tok.bos_token_id is None:
        logger.info("the tokenizer has no BOS token: each text starts with EOS (id %d)", bos)

    recipe = CorpusRecipe(
        source=source_name or _describe(source, quoted=False),
        tokenizer=str(tokenizer) if isinstance(tokenizer, (str, Path)) else tok.name_or_path,
        max_length=max_length,
        tokens_budget=tokens,
        seed=seed,
        text_column=text_column,
        split=split,
        separator=separator,
    )
    tokenized = _tokenized_source(source, split=split)
    if tokenized is not None:
        rows, label = tokenized
        recipe = dataclasses.replace(recipe, seed=None, text_column=INPUT_IDS, separator=None)
        return _kept_rows(rows, label, tok, max_length=max_length, tokens=tokens, recipe=recipe)

    parts = _read_source(source, text_column=text_column, split=split, separator=separator)
    total = sum(len(part.texts) for part in parts)
    if total == 0:
        raise GatescopeError(f"the source {_describe(source)} contains no texts.")
    logger.info("read %d texts from %s", total, _describe(source))

    import pyarrow as pa

    texts = pa.chunked_array([part.texts for part in parts], type=pa.large_string())
    part_of = np.repeat(np.arange(len(parts)), [len(part.texts) for part in parts])
    rows = np.concatenate([part.rows for part in parts])
    order = np.random.default_rng(seed).permutation(total)

    ids_chunks: list[np.ndarray] = []
    lengths: list[int] = []
    source_ids: list[str] = []
    n_tokens = 0
    start = 0
    bar = _progress_bar(progress, total=tokens if tokens is not None else total, budget=tokens)
    try:
        while start < total and (tokens is None or n_tokens < tokens):
            size = _batch_size(tokens, n_tokens, len(lengths))
            picked = order[start : start + size]
            start += len(picked)
            batch = texts.take(pa.array(picked)).to_pylist()
            encoded = tok(
                batch,
                add_special_tokens=False,
                truncation=True,
                max_length=max_length - 1,
                return_attention_mask=False,
            )["input_ids"]
            for index, ids in zip(picked, encoded, strict=True):
                if not ids:  # Nothing but BOS: no token to learn about.
                    continue
                keep = 1 + len(ids)
                if tokens is not None:
                    keep = min(keep, tokens - n_tokens)
                row = np.empty(keep, dtype=np.int32)
                row[0] = bos
                row[1:] = ids[: keep - 1]
                ids_chunks.append(row)
                lengths.append(keep)
                source_ids.append(parts[part_of[index]].source_id(int(rows[index])))
                n_tokens += keep
                if bar is not None and tokens is not None:
                    bar.update(keep)
                if tokens is not None and n_tokens >= tokens:
                    break
            if bar is not None and tokens is None:
                bar.update(len(picked))
    finally:
        if bar is not None:
            bar.close()

    if not lengths:
        raise GatescopeError(f"the source {_describe(source)} contains no texts with any token.")
    if tokens is not None and n_tokens < tokens:
        logger.warning(
            "the source has only %d tokens, fewer than the budget of %d", n_tokens, tokens
        )
    logger.info("corpus: %d texts, %d tokens", len(lengths), n_tokens)
    return _to_dataset(ids_chunks, lengths, source_ids, recipe)


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token every text starts with: the tokenizer's BOS, else its EOS."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if not isinstance(bos, int):
        raise GatescopeError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a BOS nor an "
            "EOS token to start each text with: use a tokenizer that defines one."
        )
    return bos


def save_corpus(
    dataset: datasets.Dataset,
    out: str | Path,
    *,
    recipe: CorpusRecipe | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves a corpus to a folder, atomically.

    The corpus is written to a temporary sibling folder, `CORPUS_JSON` last, and renamed
    into place at the end, so a crash never leaves a half-written corpus at `out`.

    Args:
        dataset: the corpus, as built by `build_corpus` (or any dataset with `INPUT_IDS`).
        out: the folder to write.
        recipe: how the corpus was built; default: the recipe `build_corpus` attached to
            the dataset (none for other datasets).
        overwrite: replace a corpus already at `out`.

    Returns:
        The corpus folder; :func:`corpus_metadata` reads what was recorded.

    Raises:
        GatescopeError: `out` holds a corpus and `overwrite` is False, or something else.
    """
    out = Path(out)
    claim_output(out, CORPUS, overwrite=overwrite)
    meta = CorpusMeta(
        num_texts=dataset.num_rows,
        num_tokens=_num_tokens(dataset),
        fingerprint=fingerprint(dataset),
        recipe=recipe or corpus_recipe(dataset) or CorpusRecipe(),
        gatescope_version=__version__,
    )
    with staged(out) as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / CORPUS_JSON).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
    logger.info("saved %d texts, %d tokens to %s", meta.num_texts, meta.num_tokens, out)
    return out


def corpus_recipe(dataset: datasets.Dataset) -> CorpusRecipe | None:
    """The recipe `build_corpus` attached to a corpus, or None."""
    try:
        recipe = json.loads(dataset.info.description or "").get(_RECIPE_KEY)
    except (json.JSONDecodeError, AttributeError):
        return None
    return CorpusRecipe.from_dict(recipe) if isinstance(recipe, dict) else None


def load_corpus(path: str | Path) -> datasets.Dataset:
    """Loads a corpus folder written by `save_corpus` (memory-mapped).

    Args:
        path: the corpus folder.

    Returns:
        The corpus, with at least the `INPUT_IDS` column and one row.

    Raises:
        GatescopeError: the folder does not exist, is not a corpus or is empty.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise GatescopeError(f"the corpus folder {path} does not exist.")
    not_corpus = f"{path} is not a corpus folder: build one with `gatescope corpus`."
    if not path.is_dir():
        raise GatescopeError(not_corpus)
    empty = f"the corpus {path} has no texts: build it again from a source."
    if _saved_without_data(path):
        # datasets cannot load a Dataset saved with no rows (no Arrow file): say so first.
        raise GatescopeError(empty)
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # Missing or foreign files: datasets raises many kinds.
        raise GatescopeError(not_corpus) from exc
    if not isinstance(dataset, datasets.Dataset) or INPUT_IDS not in dataset.column_names:
        raise GatescopeError(not_corpus)
    if dataset.num_rows == 0:
        raise GatescopeError(empty)
    return dataset


def corpus_metadata(path: str | Path) -> CorpusMeta | None:
    """The metadata of a corpus folder (`CORPUS_JSON`), or None when it has none."""
    file = Path(path) / CORPUS_JSON
    if not file.is_file():
        return None
    try:
        return CorpusMeta.from_dict(json.loads(file.read_text()))
    except (OSError, json.JSONDecodeError, GatescopeError) as error:
        raise GatescopeError(f"{file} is unreadable ({error}): build the corpus again.") from error


def fingerprint(dataset: datasets.Dataset) -> str:
    """A sha256 hex digest of a corpus' token content.

    Hashes every text's length and token ids (as little-endian int64, read from the Arrow
    buffers slice by slice), so two corpora with the same texts of the same ids in the same
    order have the same fingerprint, however they were stored or chunked; the source ids
    do not count.
    """
    import numpy as np

    lengths_hash = hashlib.sha256()
    ids_hash = hashlib.sha256()
    table = dataset.select_columns([INPUT_IDS]).with_format("arrow")
    for start in range(0, dataset.num_rows, _HASH_ROWS):
        column = _arrow_rows(table, slice(start, start + _HASH_ROWS), INPUT_IDS)
        for chunk in column.chunks:
            offsets = np.asarray(chunk.offsets, dtype=np.int64)
            lengths_hash.update(np.diff(offsets).astype("<i8").tobytes())
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            ids_hash.update(values.astype("<i8").tobytes())
    # Two streams, combined at the end, so chunk boundaries do not change the digest.
    return hashlib.sha256(_FINGERPRINT_TAG + lengths_hash.digest() + ids_hash.digest()).hexdigest()


# --- reading sources -------------------------------------------------------------------


def _read_source(
    source: str | Path | Mapping[str, str], *, text_column: str, split: str, separator: str
) -> list[_Texts]:
    """The texts of a source, one `_Texts` per file or dataset, in a fixed order."""
    if isinstance(source, Mapping):
        import pyarrow as pa

        names = [str(name) for name in source]
        texts = pa.array(list(source.values()), type=pa.large_string())
        part = _non_empty("", texts, "texts given")
        part.names = names
        return [part]
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise GatescopeError(
                f"{path} is not a {', '.join(SUFFIXES)} file: convert it, or point SOURCE at "
                "a folder of such files."
            )
        return [_read_file(path, path.name, text_column=text_column, separator=separator)]
    if path.is_dir():
        if _is_saved_dataset(path):
            return [_read_saved_dataset(path, text_column=text_column, split=split)]
        files = sorted(
            (p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise GatescopeError(
                f"the folder {path} contains no {', '.join(SUFFIXES)} files and is not a "
                "saved dataset."
            )
        logger.info("reading %d files from %s", len(files), path)
        return [
            _read_file(
                file,
                file.relative_to(path).as_posix(),
                text_column=text_column,
                separator=separator,
            )
            for file in files
        ]
    if _looks_like_path(source):
        raise GatescopeError(f"the source {str(source)!r} does not exist.")
    return [_read_hub_dataset(str(source), text_column=text_column, split=split)]


def _describe(source: str | Path | Mapping[str, str], *, quoted: bool = True) -> str:
    if isinstance(source, Mapping):
        return f"<{len(source)} named texts>"
    return repr(str(source)) if quoted else str(source)


def _looks_like_path(source: str | Path) -> bool:
    """Whether a missing source was meant as a local path rather than a dataset name."""
    if isinstance(source, Path):
        return True
    # A Hugging Face name is "name" or "owner/name"; anything else is meant as a path.
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith(SUFFIXES)
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def _read_file(path: Path, label: str, *, text_column: str, separator: str) -> _Texts:
    if path.suffix == ".txt":
        return _read_txt(path, label, separator)
    if path.suffix == ".jsonl":
        column = _read_jsonl(path, text_column)
    else:
        column = _read_parquet(path, text_column)
    return _non_empty(label, column, f"column {text_column!r} of {path}")


def _read_txt(path: Path, label: str, separator: str) -> _Texts:
    import numpy as np
    import pyarrow as pa

    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GatescopeError(f"{path} is not UTF-8 text ({exc.reason}).") from exc
    pieces = content.split(separator) if separator else [content]
    rows = [row for row, piece in enumerate(pieces) if piece.strip()]
    texts = pa.array([pieces[row].strip() for row in rows], type=pa.large_string())
    return _Texts(label, texts, np.asarray(rows, dtype=np.int64))


def _read_jsonl(path: Path, text_column: str) -> pa.Array:
    import pyarrow as pa
    import pyarrow.json as pa_json

    # The first record names the columns: reading only the text column (an explicit schema)
    # keeps other columns' types from tripping the reader, but would hide a missing column.
    with path.open("rb") as file:
        first = next((line for line in file if line.strip()), None)
    if first is None:
        return pa.array([], type=pa.large_string())
    try:
        record = json.loads(first)
    except json.JSONDecodeError as exc:
        raise GatescopeError(f"{path} is not JSON lines: {exc}.") from exc
    if not isinstance(record, dict):
        raise GatescopeError(f"{path} is not JSON lines of objects: its first line is not one.")
    _check_column(text_column, list(record), path)
    options = pa_json.ParseOptions(
        explicit_schema=pa.schema([(text_column, pa.large_string())]),
        unexpected_field_behavior="ignore",
    )
    try:
        table = pa_json.read_json(path, parse_options=options)
    except pa.ArrowException as exc:
        raise GatescopeError(f"could not read {path} as JSON lines of texts ({exc}).") from exc
    return table.column(text_column)


def _read_parquet(path: Path, text_column: str) -> pa.Array:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        _check_column(text_column, names, path)
        return pq.read_table(path, columns=[text_column]).column(text_column)
    except pa.ArrowException as exc:
        raise GatescopeError(f"could not read {path} as Parquet ({exc}).") from exc


def _read_saved_dataset(path: Path, *, text_column: str, split: str) -> _Texts:
    dataset, label = _load_saved_dataset(path, split)
    return _dataset_texts(dataset, label, text_column, str(path))


def _load_saved_dataset(path: Path, split: str) -> tuple[datasets.Dataset, str]:
    """A `save_to_disk` folder's dataset (its `split` if it holds several), and its label."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise GatescopeError(f"could not load the saved dataset {path} ({exc}).") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise GatescopeError(
                f"the saved dataset {path} has no split {split!r}: choose one of "
                f"{', '.join(map(repr, loaded))}."
            )
        dataset, split_name = loaded[split], split
    else:
        dataset, split_name = loaded, str(loaded.split) if loaded.split else split
    return dataset, f"{path.name}/{split_name}"


def _read_hub_dataset(name: str, *, text_column: str, split: str) -> _Texts:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # Offline, unknown name, bad split: all mean the same to a user.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GatescopeError(
            f"could not load the Hugging Face dataset {name!r} ({reason}): check the name, "
            "or point SOURCE at a local file or folder."
        ) from exc
    return _dataset_texts(dataset, f"{name}/{split}", text_column, repr(name))


def _dataset_texts(dataset: datasets.Dataset, label: str, text_column: str, what: str) -> _Texts:
    _check_column(text_column, dataset.column_names, what)
    # Arrow format respects an indices mapping (a shuffled or selected dataset).
    column = _arrow_rows(
        dataset.select_columns([text_column]).with_format("arrow"), slice(None), text_column
    )
    return _non_empty(label, column, f"column {text_column!r} of {what}")


def _arrow_rows(table: datasets.Dataset, rows: slice, column: str) -> pa.ChunkedArray:
    """One column of ``table[rows]``, for a dataset in the "arrow" format.

    Such a dataset gives a ``pa.Table`` for a slice, though `datasets` annotates a dict.
    """
    return cast("pa.Table", table[rows]).column(column)


def _check_column(column: str, names: Sequence[str], where: Path | str) -> None:
    if column not in names:
        raise GatescopeError(
            f"{where} has no column {column!r}: choose the text column among "
            f"{', '.join(map(repr, names)) or 'none'}."
        )


def _non_empty(label: str, column: pa.ChunkedArray | pa.Array, what: str) -> _Texts:
    """Keeps the non-null texts with a non-whitespace character, with their row numbers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise GatescopeError(f"the {what} holds {column.type}, not text.")
    column = column.cast(pa.large_string())
    # pyarrow.compute makes most of its functions at import time, so type checkers (which
    # read its stubs) cannot see them: the lines calling those say so with a pyright ignore.
    keep = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0), False)  # pyright: ignore[reportAttributeAccessIssue]
    keep_np = keep.to_numpy(zero_copy_only=False)
    return _Texts(label, column.filter(keep), np.flatnonzero(keep_np).astype(np.int64))


def _saved_without_data(path: Path) -> bool:
    """Whether a folder holds a `save_to_disk` Dataset with no Arrow files (no rows)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _is_saved_dataset(path: Path) -> bool:
    """Whether a folder was written by `datasets` `save_to_disk` (Dataset or DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


# --- already tokenized sources -------------------------------------------------------


def _tokenized_source(
    source: str | Path | Mapping[str, str], *, split: str
) -> tuple[datasets.Dataset, str] | None:
    """A source that is already tokenized (it has an `INPUT_IDS` column: a saved dataset, a
    parquet file or a Hugging Face dataset, such as GLUScope's dolma-small), with its label;
    None for a source of texts."""
    import datasets

    if isinstance(source, Mapping):
        return None
    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        dataset, label = _load_saved_dataset(path, split)
    elif path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if INPUT_IDS not in pq.read_schema(path).names:
            return None
        dataset, label = datasets.Dataset.from_parquet(str(path)), path.name
    elif not path.exists() and not _looks_like_path(source):
        try:  # the features first: a dataset of texts is loaded once, by _read_source
            features = datasets.load_dataset_builder(str(source)).info.features
            if features is not None and INPUT_IDS not in features:
                return None
            dataset = datasets.load_dataset(str(source), split=split)
        except Exception:  # _read_source says why, for a source of texts too
            return None
        label = f"{source}/{split}"
    else:
        return None
    if not isinstance(dataset, datasets.Dataset) or INPUT_IDS not in dataset.column_names:
        return None
    return dataset, label


def _kept_rows(
    dataset: datasets.Dataset, label: str, tok: PreTrainedTokenizerBase, *, max_length: int,
    tokens: int | None, recipe: CorpusRecipe,
) -> datasets.Dataset:  # fmt: skip
    """A tokenized dataset's rows as a corpus, in their order (text i is row i: indices into
    the source, like GLUScope's, stay valid): no new BOS, no shuffle, padding stripped (the
    positions its `attention_mask` masks, else trailing pad tokens), each row cut at
    `max_length` and the last at the token budget."""
    import numpy as np

    arrays = dataset.with_format("numpy")  # rows as arrays, never Python lists of ints
    masks = arrays["attention_mask"] if "attention_mask" in dataset.column_names else None
    pad = tok.pad_token_id if isinstance(tok.pad_token_id, int) else None
    if pad in (tok.bos_token_id, tok.eos_token_id):
        pad = None  # a pad that is also BOS or EOS may be a real token
    ids_chunks: list[np.ndarray] = []
    n_tokens = 0
    for row, ids in enumerate(arrays[INPUT_IDS]):
        ids = np.asarray(ids, dtype=np.int32)
        if masks is not None:
            ids = ids[np.asarray(masks[row]) != 0]
        elif pad is not None:
            ids = ids[: len(ids) - _trailing(ids, pad)]
        if len(ids) == 0:
            raise GatescopeError(f"row {row} of {label} has no tokens once padding is stripped.")
        keep = min(len(ids), max_length)
        if tokens is not None:
            keep = min(keep, tokens - n_tokens)
        ids_chunks.append(ids[:keep])
        n_tokens += keep
        if tokens is not None and n_tokens >= tokens:
            break
    lengths = [len(ids) for ids in ids_chunks]
    source_ids = [f"{label}:{row}" for row in range(len(ids_chunks))]
    logger.info("corpus: %d tokenized rows kept in order, %d tokens", len(lengths), n_tokens)
    return _to_dataset(ids_chunks, lengths, source_ids, recipe)


def _trailing(ids: np.ndarray, pad: int) -> int:
    """How many ``pad`` tokens end ``ids``."""
    import numpy as np

    not_pad = np.flatnonzero(ids != pad)
    return len(ids) - (int(not_pad[-1]) + 1 if len(not_pad) else 0)


# --- tokenizing ---------------------------------------------------------------------------


def _load_tokenizer(tokenizer: str | Path | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as exc:  # Hub errors, missing files, bad configs: one user message.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GatescopeError(
            f"could not load the tokenizer {str(tokenizer)!r} ({reason}): check the name or path."
        ) from exc


def _batch_size(budget: int | None, n_tokens: int, n_texts: int) -> int:
    """Texts to tokenize next: about what the rest of the budget needs, so few are wasted."""
    if budget is None:
        return _MAX_BATCH
    if n_texts == 0:
        return _MIN_BATCH
    per_text = n_tokens / n_texts
    wanted = int((budget - n_tokens) / per_text * 1.1) + 1
    return max(_MIN_BATCH, min(_MAX_BATCH, wanted))


def _progress_bar(progress: bool, *, total: int, budget: int | None) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok" if budget is not None else "text", desc="corpus")


def _to_dataset(
    ids_chunks: list[np.ndarray], lengths: list[int], source_ids: list[str], recipe: CorpusRecipe
) -> datasets.Dataset:
    """One in-memory Dataset from token rows, built through Arrow (no cache files)."""
    import datasets
    import numpy as np
    import pyarrow as pa
    from datasets.table import InMemoryTable

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    offsets_type = np.int32 if offsets[-1] < np.iinfo(np.int32).max else np.int64
    list_type = pa.ListArray if offsets_type is np.int32 else pa.LargeListArray
    values = pa.array(np.concatenate(ids_chunks), type=pa.int32())
    input_ids = list_type.from_arrays(pa.array(offsets.astype(offsets_type)), values)
    table = pa.table({INPUT_IDS: input_ids, SOURCE_ID: pa.array(source_ids, type=pa.string())})
    info = datasets.DatasetInfo(description=json.dumps({_RECIPE_KEY: recipe.to_dict()}))
    return datasets.Dataset(InMemoryTable(table), info=info)


def _num_tokens(dataset: datasets.Dataset) -> int:
    import pyarrow.compute as pc

    column = _arrow_rows(
        dataset.select_columns([INPUT_IDS]).with_format("arrow"), slice(None), INPUT_IDS
    )
    return int(pc.sum(pc.list_value_length(column)).as_py() or 0)  # pyright: ignore[reportAttributeAccessIssue]


# --- reading a corpus -----------------------------------------------------------------


class TokenizedCorpus:
    """A corpus opened for reading: its texts' lengths, their scan order, padded batches.

    Attributes:
        dataset: the texts, memory-mapped (`INPUT_IDS`, and `SOURCE_ID` when present).
        path: the corpus folder, or None for a dataset given in memory.
        lengths: [n_texts] int64, the tokens of each text.
        max_id: the largest token id.
        meta: the folder's `CORPUS_JSON`, if it has one.
    """

    def __init__(self, dataset: datasets.Dataset, path: Path | None) -> None:
        import numpy as np

        self.dataset = dataset
        self.path = path
        column = dataset.data.column(INPUT_IDS)  # memory-mapped Arrow, no Python lists
        self.lengths: np.ndarray = np.concatenate(
            [np.diff(chunk.offsets.to_numpy()) for chunk in column.chunks] or [np.zeros(0, int)]
        ).astype(np.int64)
        self.max_id: int = _max_token_id(column)
        if len(self.lengths) == 0 or self.lengths.sum() == 0:
            raise GatescopeError("the corpus is empty: it has no tokenized texts.")
        self.meta: CorpusMeta | None = corpus_metadata(path) if path is not None else None
        self._fingerprint: str | None = None

    @classmethod
    def open(cls, corpus: str | Path | datasets.Dataset) -> TokenizedCorpus:
        """A corpus folder (`gatescope corpus`) or a `datasets.Dataset` with `INPUT_IDS`."""
        import datasets

        if isinstance(corpus, datasets.Dataset):
            if INPUT_IDS not in corpus.column_names:
                raise GatescopeError(f"the dataset has no '{INPUT_IDS}' column.")
            if corpus._indices is not None:  # a select()/shuffle() view: materialize its rows
                corpus = corpus.flatten_indices(keep_in_memory=True)
            return cls(corpus, None)
        return cls(load_corpus(corpus), Path(corpus))

    @property
    def fingerprint(self) -> str:
        """The corpus's content hash (computed once, on first use)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.dataset)
        return self._fingerprint

    @property
    def tokenizer(self) -> str | None:
        """The tokenizer the corpus was built with, where recorded."""
        recipe = self.meta.recipe if self.meta else corpus_recipe(self.dataset)
        return recipe.tokenizer if recipe else None

    def reference(self) -> CorpusRef:
        """What an atlas records of this corpus."""
        return CorpusRef(
            fingerprint=self.fingerprint,
            path=str(self.path.resolve()) if self.path else None,
            texts=len(self.lengths),
            tokens=int(self.lengths.sum()),
            meta=self.meta,
        )

    def check_fits(self, vocab: int, context: int | None) -> None:
        """Refuses token ids outside a model's vocabulary and texts beyond its context."""
        if self.max_id >= vocab:
            raise GatescopeError(
                f"the corpus has token id {self.max_id} but the model's vocabulary has {vocab} "
                "tokens: build the corpus with this model's tokenizer."
            )
        longest = int(self.lengths.max())
        if context is not None and longest > context:
            raise GatescopeError(
                f"the corpus has a text of {longest} tokens but the model's context is "
                f"{context}: rebuild the corpus with --max-length {context} or less."
            )

    def check_texts(self, texts: Sequence[int]) -> None:
        """Refuses text indices that are not in the corpus (an atlas of another corpus)."""
        bad = [t for t in texts if not 0 <= t < len(self.lengths)]
        if bad:
            raise GatescopeError(
                f"text {bad[0]} is not in the corpus ({len(self.lengths)} texts): the atlas "
                "was scanned on another corpus."
            )

    def scan_order(self, texts: np.ndarray | None = None) -> np.ndarray:
        """Text indices, longest first, in a stable order (a resume relies on it): little
        padding per batch, and memory problems show at once.

        ``texts``: only these texts (a shard's); all by default.
        """
        import numpy as np

        texts = np.arange(len(self.lengths)) if texts is None else texts
        return texts[np.argsort(-self.lengths[texts], kind="stable")]

    def batch(self, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` [batch, longest] of some texts."""
        import torch

        from gatescope.loading import to_device

        rows = self.dataset[indices.tolist()][INPUT_IDS]
        longest = max(len(row) for row in rows)
        input_ids = torch.zeros(len(rows), longest, dtype=torch.int64)
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.as_tensor(row)
            attention_mask[i, : len(row)] = 1
        return to_device(input_ids, device), to_device(attention_mask, device)

    def tokens_at(self, texts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The token ids at pairs of (text index, position), vectorized: [pairs] int64.
        Pairs outside the corpus are refused (an atlas of another corpus)."""
        import numpy as np

        inside = (texts >= 0) & (texts < len(self.lengths)) & (positions >= 0)
        inside[inside] &= positions[inside] < self.lengths[texts[inside]]
        if not inside.all():
            raise GatescopeError("the atlas points at tokens the corpus does not have.")
        starts = np.cumsum(self.lengths) - self.lengths
        return self._flat_tokens[starts[texts] + positions].astype(np.int64)

    @cached_property
    def _flat_tokens(self) -> np.ndarray:
        """Every token of the corpus, text after text (read once, for :meth:`tokens_at`)."""
        import numpy as np
        import pyarrow.compute as pc

        column = self.dataset.data.column(INPUT_IDS)
        return np.concatenate(
            [pc.list_flatten(chunk).to_numpy() for chunk in column.chunks]  # pyright: ignore[reportAttributeAccessIssue]
        )

    def source_ids(self, texts: Sequence[int]) -> dict[int, str]:
        """Text index -> source id, for the texts of a corpus that records them."""
        if SOURCE_ID not in self.dataset.column_names or not texts:
            return {}
        column = self.dataset.select_columns([SOURCE_ID])[list(texts)][SOURCE_ID]
        return {t: str(s) for t, s in zip(texts, column, strict=True)}


def _max_token_id(column: pa.ChunkedArray) -> int:
    import pyarrow.compute as pc

    values = pc.list_flatten(column)  # pyright: ignore[reportAttributeAccessIssue]
    return int(pc.max(values).as_py() or 0) if len(values) else 0  # pyright: ignore[reportAttributeAccessIssue]
