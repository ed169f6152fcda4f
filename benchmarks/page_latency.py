"""Seconds to write one neuron page (target: under 1 s for the fixture model on a CPU).

Two models: the fixture stories260K (../shared/fixtures, skipped when absent) over TinyStories
texts, and the random Llama of scan_overhead.py (hidden 512, d_mlp 1408, 8 layers) over
random texts of 256 tokens. For each: "cold" includes loading the model, corpus and
tokenizer (a fresh `gatescope page` run); "warm" is one more page once they are loaded (a
server's case). Medians of --repeats, measured in this run.

    python benchmarks/page_latency.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

import gatescope
from gatescope.pages import PageSource, write_pages

sys.path.insert(0, str(Path(__file__).parent))
import scan_overhead

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def word_tokenizer(vocab: int):
    """A real tokenizer over the random Llama's ids (tokens "t0", "t1", ...)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="t1", unk_token="t0")


def fixture_atlas(root: Path) -> gatescope.Atlas | None:
    model, text = FIXTURES / "stories260K", FIXTURES / "tinystories" / "tinystories-2MiB.txt"
    if not (model / "config.json").exists() or not text.exists():
        return None
    from gatescope.corpus import build_corpus, save_corpus

    corpus = build_corpus(text, model, max_length=256, tokens=100_000, seed=0)
    save_corpus(corpus, root / "corpus")  # the recipe names the tokenizer
    return gatescope.scan(model, root / "corpus", out=root / "atlas", progress=False)


def llama_atlas(root: Path) -> gatescope.Atlas:
    model = scan_overhead.make_model()
    model.save_pretrained(root / "model")
    word_tokenizer(scan_overhead.VOCAB).save_pretrained(root / "model")
    corpus: datasets.Dataset = scan_overhead.make_corpus(96)
    corpus.save_to_disk(root / "corpus")
    return gatescope.scan(root / "model", root / "corpus", out=root / "atlas", progress=False)


def measure(atlas: gatescope.Atlas, root: Path, repeats: int) -> tuple[float, float]:
    cold, warm = [], []
    for i in range(repeats):
        start = time.perf_counter()
        source = PageSource.open(gatescope.Atlas.load(root / "atlas"))
        write_pages(source, [(1, i)], root / "site")
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        write_pages(source, [(2, i)], root / "site")
        warm.append(time.perf_counter() - start)
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, median of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (
            ("stories260K (fixture)", fixture_atlas),
            ("llama 8x1408", llama_atlas),
        ):
            root = Path(tmp) / name.split()[0]
            root.mkdir()
            atlas = build(root)
            if atlas is None:
                print(f"{name}: skipped (../shared/fixtures absent)")
                continue
            cold, warm = measure(atlas, root, args.repeats)
            size = (
                (root / "site" / next(iter(sorted(p.name for p in (root / "site").glob("*-L2-*")))))
                .stat()
                .st_size
            )
            print(
                f"{name:22s} cold {cold:6.2f} s   warm {warm:6.2f} s   "
                f"(k={atlas.k}, page {size / 2**20:.1f} MiB)"
                + ("  target < 1 s" if "fixture" in name else "")
            )


if __name__ == "__main__":
    main()
