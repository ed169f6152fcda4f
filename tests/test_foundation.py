"""The foundation: typed records, one configuration, one output policy, a resume that checks
the run's identity, inputs checked before a model loads, quiet libraries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import gatescope
from gatescope.atlas import Atlas
from gatescope.cli import cli
from gatescope.constants import ATLAS_JSON, CHECKPOINT_DIR
from gatescope.corpus import save_corpus
from gatescope.errors import GatescopeError
from gatescope.files import ATLAS, CORPUS, DATASET, Found, claim_output, staged
from gatescope.options import ScanOptions
from gatescope.records import (
    AtlasMeta,
    AtlasOptions,
    CorpusMeta,
    CorpusRecipe,
    CorpusRef,
    ModelRecord,
    RunIdentity,
    ShardSet,
)
from tests.models import tiny_model
from tests.test_scan import random_corpus


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Two tiny models (different weights), two corpora, one finished atlas."""
    root = tmp_path_factory.mktemp("foundation")
    tiny_model("llama", seed=0).save_pretrained(root / "model")
    tiny_model("llama", seed=1).save_pretrained(root / "other-model")
    save_corpus(random_corpus(seed=1, n_texts=12), root / "corpus")
    save_corpus(random_corpus(seed=2, n_texts=12), root / "other-corpus")
    gatescope.scan(root / "model", root / "corpus", out=root / "atlas", k=4, progress=False)
    return root


def invoke(*args: object) -> click.testing.Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


# ------------------------------------------------------------------------------ records


def test_atlas_meta_round_trips_and_is_checked(folders):
    meta = Atlas.load(folders / "atlas").meta
    assert AtlasMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert meta.model.name == str((folders / "model").resolve()) and meta.model.dtype == "float32"
    assert meta.corpus.meta is not None and meta.corpus.meta.num_texts == 12
    assert meta.options == AtlasOptions(
        batch_size=16, refactored_neurons=0, distributions=True, seed=0, stats_backend="numba"
    )
    parts = dataclasses.replace(meta, shards=ShardSet(4, (3, 1)))
    assert AtlasMeta.from_dict(parts.to_dict()).shards == ShardSet(4, (1, 3))
    with pytest.raises(GatescopeError, match="not parts of one corpus"):
        ShardSet(2, (2,))
    with pytest.raises(GatescopeError, match="not possible"):
        dataclasses.replace(meta, k=0)
    with pytest.raises(GatescopeError, match="newer gatescope"):
        AtlasMeta.from_dict({**meta.to_dict(), "format_version": 99})
    with pytest.raises(GatescopeError, match="lacks or mangles the entry 'tokens'"):
        AtlasMeta.from_dict({k: v for k, v in meta.to_dict().items() if k != "tokens"})


def test_corpus_meta_reads_the_first_releases_file():
    first_release = {
        "source": "texts/", "tokenizer": "allenai/OLMo-7B-0424-hf", "max_length": 1024,
        "tokens_budget": 1000, "seed": 0, "text_column": "text", "num_texts": 3,
        "num_tokens": 1000, "fingerprint": "ab" * 32, "gatescope_version": "0.1.0",
    }  # fmt: skip
    meta = CorpusMeta.from_dict(first_release)
    assert meta.recipe.tokenizer == "allenai/OLMo-7B-0424-hf" and meta.num_tokens == 1000
    assert CorpusMeta.from_dict(meta.to_dict()) == meta


def test_an_atlas_of_the_first_format_still_loads(folders, tmp_path):
    """atlas.json as the first release wrote it: untyped, options with k and the requested
    dtype, empty corpus metadata, no tokens_exact."""
    new = Atlas.load(folders / "atlas")
    old = tmp_path / "old"
    old.mkdir()
    (old / "stats.safetensors").write_bytes((folders / "atlas" / "stats.safetensors").read_bytes())
    first_release = {
        "gatescope_version": "0.1.0",
        "model": {"name": "some/model", "revision": None, "class": "LlamaForCausalLM",
                  "dtype": "float32", "act": "SiLUActivation"},
        "corpus": {"path": "/data/corpus", "fingerprint": "cd" * 32, "texts": 12,
                   "tokens": new.meta.corpus.tokens, "metadata": {}},
        "options": {"batch_size": 16, "k": 4, "dtype": "auto", "include_bos": False,
                    "refactor_glu": True, "refactored_neurons": 5},
        "created": "2026-10-01T00:00:00+00:00", "scan_seconds": 1.5, "tokens": new.tokens,
        "format": "gatescope-atlas", "format_version": 1, "layers": new.num_layers,
        "d_mlp": new.d_mlp, "k": 4, "cases": list(gatescope.constants.CASES),
        "quantities": list(gatescope.constants.QUANTITIES), "lists": [],
    }  # fmt: skip
    (old / ATLAS_JSON).write_text(json.dumps(first_release))
    atlas = Atlas.load(old)
    assert atlas.meta.model == ModelRecord("some/model", None, "LlamaForCausalLM", "float32",
                                           "SiLUActivation")  # fmt: skip
    assert atlas.meta.options == AtlasOptions(False, True, 16, 5)
    assert atlas.meta.corpus == CorpusRef("cd" * 32, "/data/corpus", 12, new.meta.corpus.tokens)
    assert atlas.meta.tokens == new.tokens and atlas.meta.shards is None
    # The same numbers; an atlas before format 3 has no distributions (its file's extra
    # tensors are not read).
    assert not atlas.has_distributions and new.has_distributions
    assert atlas.neuron(1, 3) == dataclasses.replace(new.neuron(1, 3), distributions=None)
    # The first release wrote a nominal count where it knew none: it is read as unknown.
    (old / ATLAS_JSON).write_text(json.dumps({**first_release, "tokens_exact": False}))
    assert Atlas.load(old).tokens is None


def test_stats_that_do_not_match_their_description_are_refused(folders, tmp_path):
    meta = Atlas.load(folders / "atlas").meta.to_dict()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "stats.safetensors").write_bytes(
        (folders / "atlas" / "stats.safetensors").read_bytes()
    )
    (damaged / ATLAS_JSON).write_text(json.dumps({**meta, "d_mlp": meta["d_mlp"] + 1}))
    with pytest.raises(GatescopeError, match="the atlas is damaged"):
        Atlas.load(damaged)


def test_run_identity_names_the_first_difference():
    a = RunIdentity("m", "r1", "float32", "c" * 64, 16, False, True)
    assert a.first_difference(a) is None
    assert a.first_difference(dataclasses.replace(a, k=5)) == ("k", "16", "5")
    assert a.first_difference(dataclasses.replace(a, corpus="d" * 64)) == (
        "corpus", "c" * 12, "d" * 12
    )  # fmt: skip
    assert RunIdentity.from_dict(a.to_dict()) == a


# ------------------------------------------------------------------------------ options


def test_scan_options_are_one_definition():
    options = ScanOptions.of(None, batch_size=4)
    assert options == ScanOptions(batch_size=4)
    with pytest.raises(GatescopeError, match=r"unknown scan option 'batchsize'.*batch_size"):
        ScanOptions.of(None, batchsize=4)
    for bad, match in [({"dtype": "int8"}, "--dtype"), ({"device": "tpu"}, "--device"),
                       ({"device_map": "all"}, "--device-map"), ({"k": 0}, "--k")]:  # fmt: skip
        with pytest.raises(GatescopeError, match=match):
            ScanOptions(**bad)
    # The command line takes its defaults and help texts from the same fields.
    command = cli.commands["scan"]
    for param in command.params:
        name = param.name or ""
        if name in ScanOptions.__dataclass_fields__:
            assert param.default == ScanOptions.default(name), name
            assert getattr(param, "help", None) == ScanOptions.help(name), name


def test_scan_refuses_an_unknown_keyword(folders):
    with pytest.raises(GatescopeError, match="unknown scan option 'refactor'"):
        gatescope.scan(folders / "model", folders / "corpus", refactor=True)


# ------------------------------------------------------------------------------ output policy


def test_claim_output(tmp_path):
    assert claim_output(tmp_path / "new", ATLAS) is Found.NOTHING
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_output(empty, CORPUS) is Found.NOTHING
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(GatescopeError, match="exists and is not a folder"):
        claim_output(file, CORPUS, overwrite=True)
    with pytest.raises(GatescopeError, match="already exists: pass --overwrite"):
        claim_output(file, DATASET)
    assert claim_output(file, DATASET, overwrite=True) is Found.NOTHING
    atlas = tmp_path / "atlas"
    atlas.mkdir()
    (atlas / ATLAS_JSON).write_text("{}")
    with pytest.raises(GatescopeError, match="already holds an atlas: pass --overwrite"):
        claim_output(atlas, ATLAS)
    assert claim_output(atlas, ATLAS, overwrite=True) is Found.NOTHING
    assert claim_output(atlas, ATLAS, resume=True) is Found.FINISHED
    unfinished = tmp_path / "unfinished"
    (unfinished / CHECKPOINT_DIR).mkdir(parents=True)
    with pytest.raises(GatescopeError, match="unfinished scan: pass --resume"):
        claim_output(unfinished, ATLAS)
    assert claim_output(unfinished, ATLAS, resume=True) is Found.UNFINISHED
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for kind in (ATLAS, CORPUS, DATASET):  # never, not even with --overwrite
        with pytest.raises(GatescopeError, match="is not empty and holds no"):
            claim_output(mine, kind, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_staged_publishes_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged(out) as tmp:
        tmp.mkdir()
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").exists()
    with staged(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------ resume


def test_resume_returns_a_finished_atlas_only_of_the_same_scan(folders):
    out = folders / "atlas"
    before = Atlas.load(out).meta
    again = gatescope.scan(folders / "model", folders / "corpus", out=out, k=4, resume=True,
                           batch_size=3, progress=False)  # fmt: skip
    assert again.meta == before  # returned as it is, batch size notwithstanding
    for args, difference in [
        (("other-model", "corpus", {}), "its model is"),
        (("model", "other-corpus", {}), "its corpus is"),
        (("model", "corpus", {"k": 5}), "its k is 4, not 5"),
        (("model", "corpus", {"refactor_glu": True}), "its refactor_glu is False, not True"),
        (("model", "corpus", {"dtype": "float64"}), "its dtype is 'float32', not 'float64'"),
    ]:
        model, corpus, options = args
        with pytest.raises(GatescopeError, match=difference) as refused:
            gatescope.scan(folders / model, folders / corpus, out=out, resume=True,
                           progress=False, **{"k": 4, **options})  # fmt: skip
        assert "already holds the atlas of another scan" in str(refused.value)
        assert "--overwrite" in str(refused.value)
    assert Atlas.load(out).meta == before  # nothing was lost


def test_a_resume_may_change_the_batch_size(folders, tmp_path, monkeypatch):
    from gatescope.stats import NeuronStats

    straight = Atlas.load(folders / "atlas")
    calls, real = [0], NeuronStats.update

    def crash(self, *args):
        calls[0] += 1
        if calls[0] == 5:  # the third batch of 2 texts
            raise RuntimeError("crash")
        return real(self, *args)

    monkeypatch.setattr(NeuronStats, "update", crash)
    out = tmp_path / "atlas"
    with pytest.raises(RuntimeError):
        gatescope.scan(folders / "model", folders / "corpus", out=out, k=4, batch_size=2,
                       checkpoint_every=0, progress=False)  # fmt: skip
    monkeypatch.undo()
    resumed = gatescope.scan(folders / "model", folders / "corpus", out=out, k=4, batch_size=5,
                             resume=True, progress=False)  # fmt: skip
    for name in ("count", "top_text", "top_position"):
        assert torch.equal(resumed.tensor(name), straight.tensor(name)), name
    torch.testing.assert_close(resumed.tensor("top_value"), straight.tensor("top_value"))


# ------------------------------------------------------------------------------ the commands


def test_page_checks_neurons_before_the_model_loads(folders, tmp_path, monkeypatch):
    from gatescope import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading.ModelSpec, "load", no_loading)
    for neurons, message in [("9.9", "layer 9 is out of range"), ("1.999", "neuron 999")]:
        result = invoke("page", folders / "atlas", "--neurons", neurons, "--out", tmp_path / "s")
        assert result.exit_code == 1 and message in result.output, result.output
    result = invoke("page", folders / "atlas", "--layer", "0", "--top", "2", "--by", "often",
                    "--out", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 1 and "cannot rank by 'often'" in result.output


def test_commands_show_only_their_own_progress_bars(folders, tmp_path):
    args = ["--model", folders / "model", "--corpus", folders / "corpus", "--k", 4]
    quiet = invoke("scan", *args, "--out", tmp_path / "a")
    assert quiet.exit_code == 0, quiet.output
    assert "scan:" in quiet.stderr and "Loading weights" not in quiet.stderr
    verbose = invoke("-v", "scan", *args, "--out", tmp_path / "b")
    assert verbose.exit_code == 0 and "Loading weights" in verbose.stderr
    exported = invoke("export", tmp_path / "a", tmp_path / "export")
    assert exported.exit_code == 0 and "Saving the dataset" not in exported.stderr


def test_corpus_recipe_survives_saving_and_loading(tmp_path):
    from gatescope.corpus import corpus_recipe, load_corpus

    dataset = random_corpus(seed=3, n_texts=4)
    recipe = CorpusRecipe(source="synthetic", seed=3)
    save_corpus(dataset, tmp_path / "c", recipe=recipe)
    assert gatescope.corpus.corpus_metadata(tmp_path / "c").recipe == recipe
    assert corpus_recipe(load_corpus(tmp_path / "c")) is None  # a dataset not built by us


def test_resume_and_overwrite_are_not_both_asked(folders, tmp_path):
    with pytest.raises(GatescopeError, match="--resume or --overwrite, not both"):
        gatescope.scan(folders / "model", folders / "corpus", out=folders / "atlas", k=4,
                       resume=True, overwrite=True, progress=False)  # fmt: skip
    assert Atlas.load(folders / "atlas").k == 4  # untouched


def test_a_scan_split_otherwise_is_not_resumed_from_scratch(folders, tmp_path):
    out = tmp_path / "atlas"
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    (out / CHECKPOINT_DIR / "shard-0-of-2.safetensors").write_bytes(b"a rank's progress")
    with pytest.raises(GatescopeError, match="split into other parts"):
        gatescope.scan(folders / "model", folders / "corpus", out=out, k=4, resume=True,
                       progress=False)  # fmt: skip
    assert (out / CHECKPOINT_DIR / "shard-0-of-2.safetensors").exists()


def test_the_first_releases_nominal_counts_keep_their_frequencies(folders, tmp_path):
    """The first release imported GLUScope data with counts over a nominal 10**9 tokens."""
    new = Atlas.load(folders / "atlas")
    nominal = tmp_path / "nominal"
    nominal.mkdir()
    (nominal / "stats.safetensors").write_bytes(
        (folders / "atlas" / "stats.safetensors").read_bytes()
    )
    meta = {**new.meta.to_dict(), "format_version": 1, "tokens_exact": False}
    del meta["count_scale"]
    (nominal / ATLAS_JSON).write_text(json.dumps(meta))
    old = Atlas.load(nominal)
    assert old.tokens is None and old.meta.count_scale == new.tokens
    assert old.neuron(1, 3).freq == new.neuron(1, 3).freq
    assert old.neuron(1, 3).count is None


def test_a_folder_replaces_a_file_and_an_unsafe_summary_is_refused(tmp_path):
    out = tmp_path / "export"
    out.write_text("an earlier parquet export")
    with staged(out) as tmp:
        tmp.mkdir()
        (tmp / "dataset_info.json").write_text("{}")
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    from gatescope.export import import_dataset

    bad = tmp_path / "summary.pt"
    torch.save({("gate+_in+", "freq"): torch.zeros(3)}, bad)  # not [layers, neurons]
    with pytest.raises(GatescopeError, match="not a GLUScope summary of the usual shapes"):
        import_dataset(bad, tmp_path / "atlas")
    torch.save({("gate+_in+", "freq"): Path("an object to unpickle")}, bad)
    with pytest.raises(GatescopeError, match="not a GLUScope summary file that loads safely"):
        import_dataset(bad, tmp_path / "atlas")
