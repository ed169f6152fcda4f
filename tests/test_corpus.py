"""Tests of gatescope.corpus: reading sources, tokenizing, saving, loading, fingerprints."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gatescope.constants import CORPUS_JSON, INPUT_IDS, SOURCE_ID
from gatescope.corpus import (
    build_corpus,
    corpus_metadata,
    corpus_recipe,
    fingerprint,
    load_corpus,
    save_corpus,
)
from gatescope.errors import GatescopeError
from gatescope.records import CorpusMeta, CorpusRecipe

SEP = "<|endoftext|>"

WORDS = [f"w{i}" for i in range(300)]
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
INVERSE = {i: token for token, i in VOCAB.items()}
BOS, EOS = VOCAB["<s>"], VOCAB["</s>"]


def make_tokenizer(*, bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one token per whitespace-separated word, so counts are exact."""
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>" if bos else None,
        eos_token="</s>" if eos else None,
        unk_token="<unk>",
    )


def decode(ids: list[int]) -> str:
    return " ".join(INVERSE[i] for i in ids)


def make_texts(n: int, offset: int = 0) -> list[str]:
    """n distinct texts of 3 to 12 words; text i starts with word i + offset."""
    return [
        " ".join(WORDS[(i + offset + 37 * j) % len(WORDS)] for j in range(3 + (i * 5) % 10))
        for i in range(n)
    ]


def write_jsonl(path: Path, texts: list[str | None], column: str = "text") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({column: text, "meta": {"n": i}}) for i, text in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n")


def write_parquet(path: Path, texts: list[str | None], column: str = "text") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)


def rows_of(corpus: datasets.Dataset) -> list[tuple[str, list[int]]]:
    return list(zip(corpus[SOURCE_ID], corpus[INPUT_IDS], strict=True))


def check_points_back(corpus: datasets.Dataset, texts_by_source: dict[str, str]) -> None:
    """Every row starts with BOS and decodes to the text its source id names."""
    for source_id, ids in rows_of(corpus):
        assert ids[0] == BOS
        assert decode(ids[1:]) == texts_by_source[source_id], source_id


class CountingTokenizer:
    """Wraps a tokenizer and counts the texts it is asked to tokenize."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.texts = 0

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def __call__(self, texts, **kwargs):
        self.texts += len(texts)
        return self.tokenizer(texts, **kwargs)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


# --- sources ------------------------------------------------------------------------------


def test_jsonl(tmp_path: Path, tok) -> None:
    texts = make_texts(30)
    write_jsonl(tmp_path / "data.jsonl", texts)
    corpus = build_corpus(tmp_path / "data.jsonl", tok)
    assert corpus.column_names == [INPUT_IDS, SOURCE_ID]
    assert corpus.features[INPUT_IDS].feature.dtype == "int32"
    assert corpus.num_rows == 30
    assert sorted(corpus[SOURCE_ID]) == sorted(f"data.jsonl:{i}" for i in range(30))
    check_points_back(corpus, {f"data.jsonl:{i}": t for i, t in enumerate(texts)})


def test_parquet_with_other_column_name(tmp_path: Path, tok) -> None:
    texts = make_texts(20)
    write_parquet(tmp_path / "data.parquet", texts, column="content")
    corpus = build_corpus(str(tmp_path / "data.parquet"), tok, text_column="content")
    assert corpus.num_rows == 20
    check_points_back(corpus, {f"data.parquet:{i}": t for i, t in enumerate(texts)})


def test_named_texts(tok) -> None:
    texts = {f"part{i}.py:{i * 10 + 1}-{i * 10 + 10}": t for i, t in enumerate(make_texts(12))}
    texts["blank"] = "  \n "
    corpus = build_corpus(texts, tok, seed=3)
    assert corpus.num_rows == 12  # the blank one is dropped
    del texts["blank"]
    check_points_back(corpus, texts)
    with pytest.raises(GatescopeError, match="<1 named texts> contains no texts"):
        build_corpus({"only": " "}, tok)


def test_empty_texts_dropped_rows_kept(tmp_path: Path, tok) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["w1 w2", "", "   \n", None, "w3"])
    write_parquet(tmp_path / "b.parquet", [None, "w4", " \t "])
    corpus = build_corpus(tmp_path / "a.jsonl", tok)
    check_points_back(corpus, {"a.jsonl:0": "w1 w2", "a.jsonl:4": "w3"})
    assert corpus.num_rows == 2
    corpus = build_corpus(tmp_path / "b.parquet", tok)
    check_points_back(corpus, {"b.parquet:1": "w4"})


def test_txt_split_at_separator(tmp_path: Path, tok) -> None:
    content = f"w1 w2{SEP}\n w3 w4 \n{SEP}\n\n{SEP}w5\n{SEP}\n"
    (tmp_path / "s.txt").write_text(content)
    corpus = build_corpus(tmp_path / "s.txt", tok)
    check_points_back(corpus, {"s.txt:0": "w1 w2", "s.txt:1": "w3 w4", "s.txt:3": "w5"})
    assert corpus.num_rows == 3

    (tmp_path / "one.txt").write_text("w1 w2\nw3\n")
    corpus = build_corpus(tmp_path / "one.txt", tok)
    assert rows_of(corpus) == [("one.txt:0", [BOS, VOCAB["w1"], VOCAB["w2"], VOCAB["w3"]])]

    (tmp_path / "custom.txt").write_text("w1 ### w2")
    corpus = build_corpus(tmp_path / "custom.txt", tok, separator="###")
    check_points_back(corpus, {"custom.txt:0": "w1", "custom.txt:1": "w2"})


def test_folder_of_mixed_files(tmp_path: Path, tok) -> None:
    root = tmp_path / "src"
    a, b, c = make_texts(5), make_texts(4, offset=50), make_texts(3, offset=100)
    write_jsonl(root / "a.jsonl", a)
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "b.txt").write_text(SEP.join(b))
    write_parquet(root / "sub" / "deeper" / "c.parquet", c)
    (root / "README.md").write_text("not a source")
    corpus = build_corpus(root, tok)
    expected = {f"a.jsonl:{i}": t for i, t in enumerate(a)}
    expected |= {f"sub/b.txt:{i}": t for i, t in enumerate(b)}
    expected |= {f"sub/deeper/c.parquet:{i}": t for i, t in enumerate(c)}
    assert sorted(corpus[SOURCE_ID]) == sorted(expected)
    check_points_back(corpus, expected)


def test_saved_dataset_folder(tmp_path: Path, tok) -> None:
    texts = make_texts(10)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    corpus = build_corpus(tmp_path / "saved", tok)
    check_points_back(corpus, {f"saved/train:{i}": t for i, t in enumerate(texts)})

    other = make_texts(4, offset=9)
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": texts}),
        validation=datasets.Dataset.from_dict({"text": other}),
    ).save_to_disk(str(tmp_path / "dict"))
    corpus = build_corpus(tmp_path / "dict", tok, split="validation")
    check_points_back(corpus, {f"dict/validation:{i}": t for i, t in enumerate(other)})
    with pytest.raises(GatescopeError, match=r"no split 'test'.*'train', 'validation'"):
        build_corpus(tmp_path / "dict", tok, split="test")


def test_hub_dataset_failure_is_a_sentence(monkeypatch, tok) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GatescopeError, match="could not load the Hugging Face dataset 'me/x'"):
        build_corpus("me/x", tok)


def test_hub_dataset_source_ids(monkeypatch, tok) -> None:
    texts = make_texts(6)

    def fake_load(name, split):
        assert (name, split) == ("me/stories", "train")
        return datasets.Dataset.from_dict({"text": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    corpus = build_corpus("me/stories", tok)
    check_points_back(corpus, {f"me/stories/train:{i}": t for i, t in enumerate(texts)})


# --- tokens -------------------------------------------------------------------------------


def test_eos_when_no_bos(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ["w1 w2", "w3"])
    corpus = build_corpus(tmp_path / "d.jsonl", make_tokenizer(bos=False))
    assert all(ids[0] == EOS for ids in corpus[INPUT_IDS])
    with pytest.raises(GatescopeError, match="neither a BOS nor an EOS"):
        build_corpus(tmp_path / "d.jsonl", make_tokenizer(bos=False, eos=False))


def test_truncation_at_max_length(tmp_path: Path, tok) -> None:
    texts = make_texts(40)
    write_jsonl(tmp_path / "d.jsonl", texts)
    corpus = build_corpus(tmp_path / "d.jsonl", tok, max_length=5)
    by_source = {f"d.jsonl:{i}": t for i, t in enumerate(texts)}
    for source_id, ids in rows_of(corpus):
        words = by_source[source_id].split()
        assert len(ids) == min(5, 1 + len(words))
        assert decode(ids[1:]) == " ".join(words[:4])
    with pytest.raises(GatescopeError, match="max_length must be at least 2"):
        build_corpus(tmp_path / "d.jsonl", tok, max_length=1)


def test_budget_exact_and_last_text_cut(tmp_path: Path, tok) -> None:
    texts = make_texts(50)
    write_jsonl(tmp_path / "d.jsonl", texts)
    full = build_corpus(tmp_path / "d.jsonl", tok, seed=3)
    for budget in (1, 2, 7, 25, 101):
        corpus = build_corpus(tmp_path / "d.jsonl", tok, seed=3, tokens=budget)
        lengths = [len(ids) for ids in corpus[INPUT_IDS]]
        assert sum(lengths) == budget
        # The same texts in the same order; only the last one may be cut.
        n = corpus.num_rows
        assert corpus[SOURCE_ID] == full[SOURCE_ID][:n]
        assert corpus[INPUT_IDS][:-1] == full[INPUT_IDS][: n - 1]
        last = full[INPUT_IDS][n - 1]
        assert corpus[INPUT_IDS][-1] == last[: lengths[-1]]
    everything = build_corpus(tmp_path / "d.jsonl", tok, seed=3, tokens=10**9)
    assert rows_of(everything) == rows_of(full)  # A budget beyond the source takes it all.
    with pytest.raises(GatescopeError, match="budget"):
        build_corpus(tmp_path / "d.jsonl", tok, tokens=0)


def test_budget_stops_tokenizing_early(tmp_path: Path, tok) -> None:
    texts = make_texts(20_000)
    (tmp_path / "big.txt").write_text(SEP.join(texts))
    counting = CountingTokenizer(tok)
    corpus = build_corpus(tmp_path / "big.txt", counting, tokens=300)
    assert sum(len(ids) for ids in corpus[INPUT_IDS]) == 300
    assert counting.texts < 200  # ~8.5 tokens a text: a few dozen texts, not 20,000.


def test_same_seed_same_corpus_other_seed_other_order(tmp_path: Path, tok) -> None:
    texts = make_texts(60)
    write_jsonl(tmp_path / "d.jsonl", texts)
    a = build_corpus(tmp_path / "d.jsonl", tok, seed=1)
    b = build_corpus(tmp_path / "d.jsonl", make_tokenizer(), seed=1)
    c = build_corpus(tmp_path / "d.jsonl", tok, seed=2)
    assert rows_of(a) == rows_of(b)
    assert fingerprint(a) == fingerprint(b)
    assert a[SOURCE_ID] != c[SOURCE_ID]
    assert sorted(a[SOURCE_ID]) == sorted(c[SOURCE_ID])
    assert a[SOURCE_ID] != [f"d.jsonl:{i}" for i in range(60)]  # Shuffled, not file order.
    assert fingerprint(a) != fingerprint(c)


def test_progress_bar(tmp_path: Path, tok) -> None:
    write_jsonl(tmp_path / "d.jsonl", make_texts(10))
    assert build_corpus(tmp_path / "d.jsonl", tok, progress=True).num_rows == 10
    corpus = build_corpus(tmp_path / "d.jsonl", tok, tokens=9, progress=True)
    assert sum(map(len, corpus[INPUT_IDS])) == 9


# --- user mistakes ------------------------------------------------------------------------


def test_missing_text_column(tmp_path: Path, tok) -> None:
    write_jsonl(tmp_path / "d.jsonl", ["w1"], column="body")
    with pytest.raises(GatescopeError, match=r"no column 'text'.*'body', 'meta'"):
        build_corpus(tmp_path / "d.jsonl", tok)
    write_parquet(tmp_path / "d.parquet", ["w1"], column="body")
    with pytest.raises(GatescopeError, match=r"no column 'text'.*'body', 'id'"):
        build_corpus(tmp_path / "d.parquet", tok)
    datasets.Dataset.from_dict({"body": ["w1"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(GatescopeError, match=r"no column 'text'.*'body'"):
        build_corpus(tmp_path / "saved", tok)


def test_empty_sources(tmp_path: Path, tok) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text(f"  \n{SEP}\n\n{SEP}")
    write_parquet(tmp_path / "nulls.parquet", [None, ""])
    for name in ("empty.jsonl", "blank.txt", "nulls.parquet"):
        with pytest.raises(GatescopeError, match="contains no texts"):
            build_corpus(tmp_path / name, tok)
    with pytest.raises(GatescopeError, match="contains no texts"):
        build_corpus(tmp_path, tok)  # A folder of only empty files.
    (tmp_path / "nothing").mkdir()
    with pytest.raises(GatescopeError, match=r"contains no \.jsonl"):
        build_corpus(tmp_path / "nothing", tok)


def test_bad_paths_and_files(tmp_path: Path, tok) -> None:
    with pytest.raises(GatescopeError, match="does not exist"):
        build_corpus(tmp_path / "missing.jsonl", tok)
    with pytest.raises(GatescopeError, match="does not exist"):
        build_corpus(str(tmp_path / "missing"), tok)
    (tmp_path / "data.csv").write_text("text\nw1\n")
    with pytest.raises(GatescopeError, match=r"is not a \.jsonl"):
        build_corpus(tmp_path / "data.csv", tok)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(GatescopeError, match="not JSON lines"):
        build_corpus(tmp_path / "bad.jsonl", tok)
    write_jsonl(tmp_path / "numbers.jsonl", [1, 2])  # type: ignore[list-item]
    with pytest.raises(GatescopeError):
        build_corpus(tmp_path / "numbers.jsonl", tok)


def test_tokenizer_that_cannot_load(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ["w1"])
    with pytest.raises(GatescopeError, match="could not load the tokenizer"):
        build_corpus(tmp_path / "d.jsonl", str(tmp_path / "no-tokenizer"))


# --- save, load, fingerprint --------------------------------------------------------------


def test_save_load_roundtrip(tmp_path: Path, tok) -> None:
    write_jsonl(tmp_path / "d.jsonl", make_texts(25))
    corpus = build_corpus(tmp_path / "d.jsonl", tok, tokens=100, seed=4)
    out = save_corpus(corpus, tmp_path / "out" / "corpus")
    assert out == tmp_path / "out" / "corpus"
    assert (out / CORPUS_JSON).is_file()
    assert [p.name for p in out.parent.iterdir()] == ["corpus"]  # No temporary folder left.
    loaded = load_corpus(out)
    assert rows_of(loaded) == rows_of(corpus)
    assert fingerprint(loaded) == fingerprint(corpus)
    # Built and saved from Python, the corpus records what `gatescope corpus` records.
    info = corpus_metadata(out)
    assert info.recipe == CorpusRecipe(
        source=str(tmp_path / "d.jsonl"), tokenizer=tok.name_or_path, max_length=1024,
        tokens_budget=100, seed=4, text_column="text", split="train", separator="<|endoftext|>",
    )  # fmt: skip
    assert info.num_texts == corpus.num_rows
    assert info.num_tokens == 100
    assert info.fingerprint == fingerprint(corpus)
    assert isinstance(info.gatescope_version, str)
    assert CorpusMeta.from_dict(info.to_dict()) == info
    assert corpus_metadata(tmp_path) is None


def test_save_refuses_existing_folder(tmp_path: Path, tok) -> None:
    write_jsonl(tmp_path / "d.jsonl", make_texts(10))
    first = build_corpus(tmp_path / "d.jsonl", tok, seed=0)
    second = build_corpus(tmp_path / "d.jsonl", tok, seed=1)
    out = tmp_path / "corpus"
    out.mkdir()  # An empty folder is fine.
    save_corpus(first, out)
    with pytest.raises(GatescopeError, match="--overwrite"):
        save_corpus(second, out)
    assert fingerprint(load_corpus(out)) == fingerprint(first)
    save_corpus(second, out, overwrite=True)
    assert fingerprint(load_corpus(out)) == fingerprint(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "d.jsonl"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(GatescopeError, match="not a folder"):
        save_corpus(first, tmp_path / "file", overwrite=True)


def test_load_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(GatescopeError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    with pytest.raises(GatescopeError, match="is not a corpus folder: build one with"):
        load_corpus(tmp_path / "random")
    with pytest.raises(GatescopeError, match="is not a corpus folder"):
        load_corpus(tmp_path / "random" / "notes.txt")
    datasets.Dataset.from_dict({"text": ["w1"]}).save_to_disk(str(tmp_path / "texts"))
    with pytest.raises(GatescopeError, match="is not a corpus folder"):
        load_corpus(tmp_path / "texts")
    empty = pa.table(
        {INPUT_IDS: pa.array([], pa.list_(pa.int32())), SOURCE_ID: pa.array([], pa.string())}
    )
    datasets.Dataset(datasets.table.InMemoryTable(empty)).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(GatescopeError, match="has no texts"):
        load_corpus(tmp_path / "empty")


def test_fingerprint_depends_on_tokens_only() -> None:
    rows = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    as_int32 = datasets.Dataset(
        datasets.table.InMemoryTable(
            pa.table(
                {
                    INPUT_IDS: pa.array(rows, pa.list_(pa.int32())),
                    SOURCE_ID: ["a:0", "a:1", "a:2"],
                }
            )
        )
    )
    # Same ids as int64, another source id column and several Arrow chunks.
    chunked = pa.Table.from_batches(
        [
            pa.record_batch({INPUT_IDS: pa.array(rows[:1], pa.list_(pa.int64()))}),
            pa.record_batch({INPUT_IDS: pa.array(rows[1:], pa.list_(pa.int64()))}),
        ]
    )
    as_chunks = datasets.Dataset(datasets.table.InMemoryTable(chunked))
    assert fingerprint(as_int32) == fingerprint(as_chunks)
    # A view through an indices mapping hashes what it shows.
    assert fingerprint(as_int32.select([0, 1, 2])) == fingerprint(as_int32)
    assert fingerprint(as_int32.select([1, 0, 2])) != fingerprint(as_int32)

    def of(new_rows: list[list[int]]) -> str:
        return fingerprint(datasets.Dataset.from_dict({INPUT_IDS: new_rows}))

    assert of(rows) == fingerprint(as_int32)
    assert of([[1, 5, 6], [1, 7], [1, 8, 9, 11]]) != of(rows)  # One token differs.
    assert of([[1, 5], [6, 1, 7], [1, 8, 9, 10]]) != of(rows)  # Same ids, other split.
    assert len(of(rows)) == 64


# --- the real fixtures --------------------------------------------------------------------


def test_real_tokenizer_and_tinystories(
    tmp_path: Path, stories260k: Path, tinystories: Path
) -> None:
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(str(stories260k))
    corpus = build_corpus(tinystories, str(stories260k), max_length=128, tokens=5000, seed=7)
    assert sum(len(ids) for ids in corpus[INPUT_IDS]) == 5000
    assert all(ids[0] == 1 and 2 <= len(ids) <= 128 for ids in corpus[INPUT_IDS])
    pieces = tinystories.read_text(encoding="utf-8").split(SEP)
    for source_id, ids in rows_of(corpus)[:-1]:  # The last one may be cut by the budget.
        name, row = source_id.rsplit(":", 1)
        assert name == tinystories.name
        expected = real(pieces[int(row)].strip(), add_special_tokens=False)["input_ids"]
        assert ids[1:] == expected[:127]
    again = build_corpus(tinystories, real, max_length=128, tokens=5000, seed=7)
    assert fingerprint(again) == fingerprint(corpus)
    out = save_corpus(corpus, tmp_path / "ts")
    assert corpus_metadata(out).recipe.tokenizer == real.name_or_path
    assert fingerprint(load_corpus(out)) == fingerprint(corpus)


def test_tokenized_parquet_keeps_rows_and_strips_trailing_padding(tmp_path: Path) -> None:
    """An `input_ids` parquet file without attention masks: rows in order, trailing pad
    tokens stripped (a pad that is also BOS/EOS would be kept), budget and max_length cut."""
    from tests.tokenizers import char_tokenizer

    tokenizer = char_tokenizer()
    pad = tokenizer.pad_token_id
    rows = [[1, 40, 41, pad, pad], [1, 50, pad, 51, pad], [1, 60, 61, 62, 63]]
    pq.write_table(pa.table({"input_ids": rows, "text": ["a", "b", "c"]}), tmp_path / "t.parquet")
    corpus = build_corpus(tmp_path / "t.parquet", tokenizer, max_length=4, seed=9)
    assert corpus["input_ids"] == [[1, 40, 41], [1, 50, pad, 51], [1, 60, 61, 62]]
    assert corpus["source_id"] == ["t.parquet:0", "t.parquet:1", "t.parquet:2"]
    assert corpus_recipe(corpus).seed is None  # never shuffled
    budget = build_corpus(tmp_path / "t.parquet", tokenizer, tokens=5)
    assert budget["input_ids"] == [[1, 40, 41], [1, 50]]
