"""Shared test set-up: fully offline, no writes outside tmp_path, paths to the fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton kernels run in Triton's interpreter on the tests' CPU tensors (read when a
# kernel is defined, so before gatescope.stats.triton_pass is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = (
    Path(os.environ["GATESCOPE_FIXTURES"])
    if os.environ.get("GATESCOPE_FIXTURES")
    else Path(__file__).resolve().parents[2] / "shared" / "fixtures"
)


@pytest.fixture(autouse=True)
def _hub_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Point every Hugging Face cache at a temporary folder: tests never touch ~/.cache."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """The trained SwiGLU fixture model (skips when ../shared/fixtures is absent)."""
    path = FIXTURES / "stories260K"
    if not (path / "config.json").exists():
        pytest.skip("fixture model ../shared/fixtures/stories260K is absent")
    return path


@pytest.fixture(scope="session")
def tinystories() -> Path:
    """Real English text, stories separated by <|endoftext|> (skips when absent)."""
    path = FIXTURES / "tinystories" / "tinystories-2MiB.txt"
    if not path.exists():
        pytest.skip("fixture text ../shared/fixtures/tinystories is absent")
    return path
