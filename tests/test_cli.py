"""The gatescope command: end to end, resume after a crash or kill, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from click.testing import CliRunner

from gatescope import scanner
from gatescope.atlas import Atlas
from gatescope.cli import cli
from gatescope.constants import CHECKPOINT_DIR
from gatescope.corpus import save_corpus
from gatescope.stats import NeuronStats
from tests.models import tiny_model, tiny_non_gated
from tests.test_scan import random_corpus

TENSORS = ("count", "sum", "top_value", "top_text", "top_position")
DISTRIBUTIONS = ("histogram", "joint", "typical_text", "typical_position", "typical_value")


def run(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def fail(*args: str, match: str) -> str:
    """Runs a command that must fail with one sentence (no traceback) matching ``match``."""
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert match in result.output, result.output
    return result.output


def assert_same_atlas(left: Atlas, right: Atlas, *, exact_sums: bool = True) -> None:
    both = left.has_distributions and right.has_distributions
    names = TENSORS + (DISTRIBUTIONS if both else ())
    for name in names:
        if name == "sum" and not exact_sums:
            torch.testing.assert_close(left.tensor(name), right.tensor(name), rtol=1e-14, atol=0)
        else:
            assert torch.equal(left.tensor(name), right.tensor(name)), name
    assert left.tokens == right.tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus"
    save_corpus(random_corpus(seed=7, n_texts=20), path)
    return path


def test_help_is_instant_and_module_entry_point_works():
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", "import sys, gatescope.cli; print(sorted(sys.modules))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "torch" not in out.stdout and "transformers" not in out.stdout
    assert time.perf_counter() - start < 30  # generous: only guards against heavy imports
    help_text = subprocess.run(
        [sys.executable, "-m", "gatescope", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("corpus", "scan", "export", "import"):
        assert command in help_text


def test_corpus_scan_export_import(stories260k, tinystories, tmp_path):
    corpus, atlas, exported = tmp_path / "corpus", tmp_path / "atlas", tmp_path / "export"
    result = run("corpus", tinystories, "--tokenizer", stories260k, "--out", corpus,
                 "--max-length", 128, "--tokens", 3000)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3,000 tokens" in result.output
    result = run("scan", "--model", stories260k, "--corpus", corpus, "--out", atlas,
                 "--batch-size", 4, "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = Atlas.load(atlas)
    assert loaded.num_layers == 5 and loaded.d_mlp == 172
    assert loaded.meta.corpus.meta.recipe.tokenizer == str(stories260k)
    result = run("export", atlas, exported)
    assert result.exit_code == 0, result.output
    rows = datasets.load_from_disk(str(exported))
    assert len(rows) == 5 * 172 and "gate-_in-_hook_post_max_values" in rows.column_names
    result = run("import", exported, tmp_path / "imported")
    assert result.exit_code == 0, result.output
    # The schema stores means, not sums: those come back to float64 rounding.
    imported = Atlas.load(tmp_path / "imported")
    assert_same_atlas(imported, loaded, exact_sums=False)
    assert loaded.has_distributions and not imported.has_distributions  # histograms stay


def test_resume_after_a_crash_equals_an_uninterrupted_scan(
    tiny, tiny_corpus, tmp_path, monkeypatch
):
    options = dict(batch_size=3, k=4, progress=False)
    straight = scanner.scan(tiny, tiny_corpus, out=tmp_path / "straight", **options)

    calls, real_update = [0], NeuronStats.update

    def crashing_update(self, *args):
        calls[0] += 1
        if calls[0] == 9:  # in the middle of the 5th batch (2 layers per batch)
            raise RuntimeError("simulated crash")
        return real_update(self, *args)

    monkeypatch.setattr(NeuronStats, "update", crashing_update)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        scanner.scan(tiny, tiny_corpus, out=out, checkpoint_every=0, **options)
    monkeypatch.setattr(NeuronStats, "update", real_update)

    assert (out / CHECKPOINT_DIR).exists()
    fail("export", out, tmp_path / "x", match="unfinished scan")  # never taken for an atlas
    fail("scan", "--model", tiny, "--corpus", tiny_corpus, "--out", out, match="--resume")
    resumed = scanner.scan(tiny, tiny_corpus, out=out, resume=True, **options)
    assert_same_atlas(resumed, straight)
    assert not (out / CHECKPOINT_DIR).exists()


def test_resume_refuses_other_options(tiny, tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "atlas"
    monkeypatch.setattr(NeuronStats, "update", _raise_on_third_call())
    with pytest.raises(RuntimeError):
        scanner.scan(tiny, tiny_corpus, out=out, batch_size=2, checkpoint_every=0, progress=False)
    monkeypatch.undo()
    fail("scan", "--model", tiny, "--corpus", tiny_corpus, "--out", out, "--resume",
         "--batch-size", 2, "--k", 5, match="same ones")  # fmt: skip


def _raise_on_third_call():
    calls, real = [0], NeuronStats.update

    def update(self, *args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("stop")
        return real(self, *args)

    return update


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_killed_or_interrupted_scan_resumes_to_the_same_atlas(
    stories260k, tinystories, tmp_path, how
):
    """A real process, stopped by kill -9, Ctrl-C or SIGTERM (a preemption) once a
    checkpoint exists."""
    corpus = tmp_path / "corpus"
    assert run("corpus", tinystories, "--tokenizer", stories260k, "--out", corpus,
               "--max-length", 64, "--tokens", 12_000).exit_code == 0  # fmt: skip
    args = ["--model", stories260k, "--corpus", corpus, "--batch-size", 1, "--k", 4, "--quiet"]
    straight = tmp_path / "straight"
    assert run("scan", *args, "--out", straight).exit_code == 0

    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "gatescope", "scan", *map(str, args), "--out", str(out),
               "--checkpoint-every", "0"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    checkpoint = out / CHECKPOINT_DIR / scanner.CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the scan finished before it could be stopped"
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=120)
    if how != "SIGKILL":  # the batch is finished and saved, then one sentence
        assert process.returncode == 1
        assert f"interrupted ({how})" in stderr and "texts are saved" in stderr
        assert "--resume" in stderr and "Traceback" not in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (out / "atlas.json").exists()

    assert run("scan", *args, "--out", out, "--resume").exit_code == 0
    assert_same_atlas(Atlas.load(out), Atlas.load(straight))


# ---------------------------------------------------------------- bad input


def test_model_without_gated_mlp(tmp_path, tiny_corpus):
    model = tmp_path / "gpt2"
    tiny_non_gated("gpt2").save_pretrained(model)
    fail("scan", "--model", model, "--corpus", tiny_corpus, "--out", tmp_path / "a",
         match="no gated MLP")  # fmt: skip
    assert not (tmp_path / "a" / "atlas.json").exists()


def test_corpus_folder_that_is_not_one(tiny, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    fail("scan", "--model", tiny, "--corpus", tmp_path / "notes", "--out", tmp_path / "a",
         match="not a corpus folder")  # fmt: skip
    fail("scan", "--model", tiny, "--corpus", tmp_path / "missing", "--out", tmp_path / "a",
         match="does not exist")  # fmt: skip


def test_empty_corpus(tmp_path, stories260k):
    (tmp_path / "empty.jsonl").write_text("")
    fail("corpus", tmp_path / "empty.jsonl", "--tokenizer", stories260k, "--out", tmp_path / "c",
         match="no texts")  # fmt: skip


def test_texts_longer_than_the_context(tiny, tmp_path):
    corpus = tmp_path / "long"
    save_corpus(datasets.Dataset.from_dict({"input_ids": [[1] * 200]}), corpus)
    fail("scan", "--model", tiny, "--corpus", corpus, "--out", tmp_path / "a",
         match="context is 128")  # fmt: skip


def test_tokenizer_and_model_vocabularies_differ(tiny, tmp_path):
    corpus = tmp_path / "big-vocab"
    save_corpus(datasets.Dataset.from_dict({"input_ids": [[1, 5, 500]]}), corpus)
    fail("scan", "--model", tiny, "--corpus", corpus, "--out", tmp_path / "a",
         match="vocabulary")  # fmt: skip


def test_existing_output_folder(tiny, tiny_corpus, tmp_path):
    out = tmp_path / "atlas"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fail("scan", "--model", tiny, "--corpus", tiny_corpus, "--out", out, match="not empty")
    assert (out / "precious.txt").read_text() == "keep me"
    done = tmp_path / "done"
    assert (
        run("scan", "--model", tiny, "--corpus", tiny_corpus, "--out", done, "--quiet").exit_code
        == 0
    )
    fail("scan", "--model", tiny, "--corpus", tiny_corpus, "--out", done, match="--overwrite")
    result = run("scan", "--model", tiny, "--corpus", tiny_corpus, "--out", done, "--overwrite",
                 "--quiet", "--k", 3)  # fmt: skip
    assert result.exit_code == 0 and Atlas.load(done).k == 3


def test_model_that_does_not_exist(tiny_corpus, tmp_path):
    fail("scan", "--model", tmp_path / "no-model", "--corpus", tiny_corpus, "--out", tmp_path / "a",
         match="could not load")  # fmt: skip


def test_a_stats_backend_that_cannot_run_here_is_one_sentence(tiny, tiny_corpus, tmp_path,
                                                              monkeypatch):  # fmt: skip
    """Before the weights load and before any output: no kernel traceback, no folder."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no GPU here: Triton cannot run
    out = tmp_path / "atlas"
    fail("scan", "--model", tiny, "--corpus", tiny_corpus, "--out", out,
         "--stats-backend", "triton", match="runs on CUDA GPUs, not on cpu")  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton can run, but not in float64
    fail("scan", "--model", tiny, "--corpus", tiny_corpus, "--out", out, "--dtype", "float64",
         "--stats-backend", "triton", match="computes in float32")  # fmt: skip
    assert not out.exists()
