"""Scaling out: shards and their merge, torchrun ranks, resuming a killed rank.

Every way of splitting the work must give the atlas of one scan. The exact comparisons use
batches of one text, so that each text's activations are computed by the same operations
however the texts are split: with larger batches, padding changes float rounding in the
last bits even within one process (see test_scan).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gatescope
from gatescope.atlas import Atlas
from gatescope.cli import cli
from gatescope.errors import GatescopeError
from gatescope.merge import merge_atlases
from gatescope.records import ShardSet
from gatescope.shards import Shard
from tests.models import tiny_model
from tests.test_scan import random_corpus

K = 4
# Ranks run their matrix products on one thread each (torchrun's default): split over
# threads differently, products round differently in the last bits. Counts and lists stay
# identical; values agree to float32 rounding.
RANK_RTOL = 1e-5


def assert_same_atlas(a: Atlas, b: Atlas, *, values_rtol: float = 0.0) -> None:
    """Identical counts and lists (texts, positions); values and extremes identical or
    within ``values_rtol`` (relative, and absolute near 0); sums equal to float64 rounding."""
    assert a.tokens == b.tokens
    assert a.has_distributions and b.has_distributions
    exact = ("count", "top_text", "top_position", "histogram", "joint", "typical_text",
             "typical_position")  # fmt: skip
    for name in exact:
        assert torch.equal(a.tensor(name), b.tensor(name)), name
    for name in ("top_value", "max", "min", "typical_value"):
        torch.testing.assert_close(
            a.tensor(name), b.tensor(name), rtol=values_rtol, atol=values_rtol, equal_nan=True
        )
    torch.testing.assert_close(
        a.tensor("sum"), b.tensor("sum"), rtol=max(values_rtol, 1e-12), atol=1e-12
    )
    assert a.meta.shards is None and b.meta.shards is None


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama, a corpus of 40 texts, and the atlas of one scan of it."""
    model = tiny_model("llama")
    corpus = random_corpus(seed=3, n_texts=40)
    single = gatescope.scan(model, corpus, batch_size=1, k=K, progress=False)
    return model, corpus, single


@pytest.fixture(scope="module")
def on_disk(setup, tmp_path_factory):
    """The same model and corpus as folders, for the command line and torchrun."""
    from gatescope.corpus import save_corpus

    model, corpus, _ = setup
    root = tmp_path_factory.mktemp("scale")
    model.save_pretrained(root / "model")
    save_corpus(corpus, root / "corpus")
    return root


def test_shards_partition_the_texts_by_tokens():
    lengths = np.random.default_rng(0).integers(1, 50, size=101)
    parts = [Shard(i, 4).texts(lengths) for i in range(4)]
    assert np.array_equal(np.concatenate(parts), np.arange(101))  # contiguous, in order
    tokens = [int(lengths[p].sum()) for p in parts]
    assert max(tokens) - min(tokens) <= 2 * lengths.max()
    assert Shard.parse(" 2/8 ") == Shard(2, 8) and str(Shard(2, 8)) == "2/8"
    for bad in ("2", "8/8", "-1/3", "a/b"):
        with pytest.raises(GatescopeError):
            Shard.parse(bad)


def test_shards_merged_in_any_grouping_equal_one_scan(setup):
    model, corpus, single = setup
    parts = [
        gatescope.scan(model, corpus, batch_size=1, k=K, progress=False, shard=f"{i}/3")
        for i in range(3)
    ]
    assert [p.meta.shards for p in parts] == [ShardSet(3, (i,)) for i in range(3)]
    assert sum(p.tokens for p in parts) == single.tokens
    assert_same_atlas(merge_atlases(parts), single)
    assert_same_atlas(merge_atlases(parts[::-1]), single)
    partial = merge_atlases([parts[2], parts[0]])
    assert partial.meta.shards == ShardSet(3, (0, 2))
    assert_same_atlas(merge_atlases([parts[1], partial]), single)


def test_merge_refuses_what_does_not_belong_together(setup):
    model, corpus, single = setup
    part = gatescope.scan(model, corpus, batch_size=1, k=K, progress=False, shard="0/2")
    other_k = gatescope.scan(model, corpus, batch_size=1, k=K + 1, progress=False, shard="1/2")
    other_corpus = gatescope.scan(
        model, random_corpus(seed=4, n_texts=40), batch_size=1, k=K, progress=False,
        shard="1/2",
    )  # fmt: skip
    with pytest.raises(GatescopeError, match="differ in k"):
        merge_atlases([part, other_k])
    with pytest.raises(GatescopeError, match="differ in corpus"):
        merge_atlases([part, other_corpus])
    with pytest.raises(GatescopeError, match="both hold shard 0"):
        merge_atlases([part, part])
    with pytest.raises(GatescopeError, match="is a whole scan"):
        merge_atlases([part, single])
    with pytest.raises(GatescopeError, match="at least two"):
        merge_atlases([part])


def test_cli_shard_and_merge(on_disk, tmp_path):
    root = on_disk
    single = gatescope.scan(root / "model", root / "corpus", batch_size=1, k=K, progress=False)
    runner = CliRunner()
    common = ["--model", str(root / "model"), "--corpus", str(root / "corpus"),
              "--batch-size", "1", "--k", str(K), "--quiet"]  # fmt: skip
    for i in range(3):
        result = runner.invoke(cli, ["scan", *common, "--shard", f"{i}/3",
                                     "--out", str(tmp_path / f"part{i}")])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"(shard {i}/3)" in result.output
    parts = [str(tmp_path / f"part{i}") for i in (2, 0, 1)]
    result = runner.invoke(cli, ["merge", *parts, "--out", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    assert "complete" in result.output
    assert_same_atlas(Atlas.load(tmp_path / "all"), single)
    again = runner.invoke(cli, ["merge", *parts, "--out", str(tmp_path / "all")])
    assert again.exit_code == 1 and "--overwrite" in again.output
    bad = runner.invoke(cli, ["scan", *common, "--shard", "3/3", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "does not exist" in bad.output


def torchrun(*args: str, nproc: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "gatescope", "scan", *args]  # fmt: skip
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(on_disk, tmp_path):
    root = on_disk
    single = gatescope.scan(root / "model", root / "corpus", batch_size=1, k=K, progress=False)
    run = torchrun("--model", str(root / "model"), "--corpus", str(root / "corpus"),
                   "--out", str(tmp_path / "atlas"), "--batch-size", "1", "--k", str(K),
                   "--quiet")  # fmt: skip
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    assert output.count("wrote 2 layers") == 1  # rank 0 speaks for all
    assert_same_atlas(Atlas.load(tmp_path / "atlas"), single, values_rtol=RANK_RTOL)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The process of a torchrun worker of the given rank (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def _stoppable_scan(tmp_path: Path) -> list[str]:
    """A model and corpus on disk, and `gatescope scan` arguments that checkpoint after
    every batch (a scan slow enough to stop midway)."""
    from gatescope.corpus import save_corpus

    tiny_model("llama", num_layers=2).save_pretrained(tmp_path / "model")
    save_corpus(random_corpus(seed=5, n_texts=120), tmp_path / "corpus")
    return ["--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "corpus"),
            "--out", str(tmp_path / "atlas"), "--batch-size", "1", "--k", str(K), "--quiet",
            "--checkpoint-every", "0"]  # fmt: skip


def _resumes_to_one_scan(tmp_path: Path, args: list[str]) -> None:
    """`--resume` under torchrun finishes the stopped scan into the atlas of one process."""
    assert not (tmp_path / "atlas" / "atlas.json").exists()
    resumed = torchrun(*args, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    single = gatescope.scan(tmp_path / "model", tmp_path / "corpus", batch_size=1, k=K,
                            progress=False)  # fmt: skip
    assert_same_atlas(Atlas.load(tmp_path / "atlas"), single, values_rtol=RANK_RTOL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_killed_rank_resumes_to_the_same_atlas(tmp_path):
    args = _stoppable_scan(tmp_path)
    run = torchrun(*args)
    # Wait until rank 1 has saved progress, then kill it.
    checkpoint = tmp_path / "atlas" / "checkpoint" / "shard-1-of-2.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.01)
    pid = _rank_pid(run.pid, 1)
    assert pid is not None and checkpoint.exists(), "rank 1 never saved a checkpoint"
    os.kill(pid, signal.SIGKILL)
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output
    _resumes_to_one_scan(tmp_path, args)


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_resumes_to_the_same_atlas(tmp_path):
    """A preemption under torchrun: the agent passes SIGTERM on to its ranks, each finishes
    its batch, saves its part and says how to resume."""
    args = _stoppable_scan(tmp_path)
    run = torchrun(*args)
    checkpoints = [
        tmp_path / "atlas" / "checkpoint" / f"shard-{r}-of-2.safetensors" for r in (0, 1)
    ]
    deadline = time.monotonic() + 120
    while not all(c.exists() for c in checkpoints) and time.monotonic() < deadline:
        assert run.poll() is None, "the scan finished before it could be stopped"
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output
    assert output.count("the scan was interrupted (SIGTERM)") == 2, output  # both ranks
    assert "--resume" in output
    # torchrun's agent reports the signal with a traceback of its own; none is gatescope's.
    assert not re.search(r'File "[^"]*gatescope/', output), output
    _resumes_to_one_scan(tmp_path, args)


def test_device_map_auto_gives_the_same_atlas(on_disk):
    pytest.importorskip("accelerate")
    root = on_disk
    single = gatescope.scan(root / "model", root / "corpus", batch_size=1, k=K, progress=False)
    spread = gatescope.scan(root / "model", root / "corpus", batch_size=1, k=K, progress=False,
                            device_map="auto")  # fmt: skip
    assert_same_atlas(spread, single)
    assert not hasattr(spread.meta.options, "device_map")  # where it ran is not what it found


def test_device_map_needs_accelerate(on_disk, monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else
        find_spec(name, *a),
    )  # fmt: skip
    result = CliRunner().invoke(cli, ["scan", "--model", str(on_disk / "model"), "--corpus",
                                      str(on_disk / "corpus"), "--out", str(tmp_path / "atlas"),
                                      "--device-map", "auto"])  # fmt: skip
    assert result.exit_code == 1 and "pip install accelerate" in result.output


def _scan_as_rank(rank: int, world: int, init_file: str, root: str, out: str) -> None:
    """One process of a group made by the caller, as a training script would make it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    atlas = gatescope.scan(f"{root}/model", f"{root}/corpus", batch_size=1, k=K, progress=False)
    assert dist.is_initialized()  # gatescope leaves a group it did not make alone
    tensors = {name: atlas.tensor(name) for name in ("count", "top_text", "top_position")}
    torch.save({**tensors, "tokens": atlas.tokens}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _failing_rank(rank: int, world: int, init_file: str, root: str, out: str) -> None:
    """Rank 1 fails after its first batch; both ranks write how they ended, and when."""
    import json

    import torch.distributed as dist

    from gatescope.stats import NeuronStats

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    if rank == 1:
        real = NeuronStats.update

        def update(self, *args):
            if self.tokens > 0:
                raise RuntimeError("simulated failure on rank 1")
            return real(self, *args)

        NeuronStats.update = update
    start = time.monotonic()
    try:
        gatescope.scan(f"{root}/model", f"{root}/corpus", batch_size=1, k=K, progress=False)
        ended = "finished"
    except Exception as error:  # what the caller of gatescope.scan sees
        ended = f"{type(error).__name__}: {error}"
    record = {"ended": ended, "seconds": time.monotonic() - start}
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_failing_rank_stops_the_others(on_disk, tmp_path):
    """In a process group the caller made, a rank that raises does not leave the others
    waiting in the final gather: they stop at their next batch, with a message."""
    import json

    import torch.multiprocessing as mp

    start = time.monotonic()
    mp.spawn(_failing_rank, args=(2, str(tmp_path / "init"), str(on_disk), str(tmp_path)),
             nprocs=2)  # fmt: skip
    assert time.monotonic() - start < 120
    failed = json.loads((tmp_path / "rank1.json").read_text())
    stopped = json.loads((tmp_path / "rank0.json").read_text())
    assert failed["ended"] == "RuntimeError: simulated failure on rank 1"
    assert stopped["ended"].startswith("RankFailed: another rank failed (rank 1: simulated")


@pytest.mark.slow
def test_scan_inside_a_process_group(on_disk, tmp_path):
    import torch.multiprocessing as mp

    root = on_disk
    single = gatescope.scan(root / "model", root / "corpus", batch_size=1, k=K, progress=False)
    mp.spawn(_scan_as_rank, args=(2, str(tmp_path / "init"), str(root), str(tmp_path)),
             nprocs=2)  # fmt: skip
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["tokens"] == single.tokens  # every rank holds the whole corpus's atlas
        for name in ("count", "top_text", "top_position"):
            assert torch.equal(result[name], single.tensor(name)), name
