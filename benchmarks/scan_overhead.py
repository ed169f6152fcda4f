"""How much a scan costs beyond the model's own forward pass (target <= 1.3, goal 1.1).

A random Llama (hidden 512, d_mlp 1408, 8 layers, vocab 8192), 24 texts of 256 tokens,
batch 8, float32 on the CPU. Prints, measured in this one run (medians of --repeats):

* scan time / bare forward time of the same model on the same batches (``model(...)``,
  logits included, as a user would run it), and against the decoder alone (no lm_head;
  the scan skips the unembedding because it needs no logits); for the default scan (with
  the distributions: histograms and typical examples) and with ``--no-distributions``.
  Each is the median of the repeats' own ratios, then the ratio of the fastest runs;
* the CPU's vector extensions (AVX2, AVX-512: the kernel's speed depends on them), and
  those the run used: torch's kernels (``ATEN_CPU_CAPABILITY=avx2`` limits them) and
  numba's target CPU (``NUMBA_CPU_NAME=haswell`` compiles for AVX2 alone); with both set,
  an AVX-512 machine measures what an AVX2-only one would;
* scan tokens/s;
* peak memory (resident set) of a scan over the corpus and over a corpus 4x as long: it
  must not grow with corpus length.

The targets are for the default model. ``--hidden``, ``--d-mlp`` and ``--layers`` measure
another shape: the statistics cost the same per MLP activation whatever the model, while
the forward costs more per activation as the model widens, so wider models pay less.

    python benchmarks/scan_overhead.py [--repeats 3] [--texts 24] [--hidden 512 --d-mlp 1408]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gatescope

HIDDEN, D_MLP, LAYERS, VOCAB, HEADS = 512, 1408, 8, 8192, 8
LENGTH, BATCH = 256, 8


def make_model(hidden: int = HIDDEN, d_mlp: int = D_MLP, layers: int = LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=d_mlp,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config).eval()


def make_corpus(texts: int, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (texts, LENGTH), generator=generator)
    ids[:, 0] = 1  # BOS
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def time_forward(model, corpus: datasets.Dataset, decoder_only: bool) -> float:
    """Seconds for the bare forward over the batches the scan uses (all texts are 256 long)."""
    ids = torch.tensor(corpus["input_ids"])
    mask = torch.ones_like(ids)
    run = model.base_model if decoder_only else model
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), BATCH):
            run(input_ids=ids[i : i + BATCH], attention_mask=mask[i : i + BATCH], use_cache=False)
    return time.perf_counter() - start


def time_scan(model, corpus: datasets.Dataset, distributions: bool = True) -> float:
    start = time.perf_counter()
    gatescope.scan(model, corpus, batch_size=BATCH, distributions=distributions, progress=False)
    return time.perf_counter() - start


def vector_extensions() -> str:
    """The CPU's widest vector extensions, from /proc/cpuinfo (Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return "unknown"
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    found = [name for name in ("avx2", "avx512f", "avx512bw", "avx512vl") if name in flags]
    return ", ".join(found) or "none of AVX2, AVX-512"


def extensions_used() -> str:
    """The vector extensions this run's kernels were built for: torch's dispatch level and
    numba's target CPU (the host's unless NUMBA_CPU_NAME says otherwise)."""
    import llvmlite.binding
    import numba

    target = numba.config.CPU_NAME or llvmlite.binding.get_host_cpu_name()
    return f"torch {torch.backends.cpu.get_cpu_capability()}, numba target {target}"


def peak_rss_mib_during(fn) -> float:
    """Peak resident memory while ``fn`` runs (Linux: reset the high-water mark first)."""
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if not (status.exists() and clear.exists()):
        return float("nan")
    clear.write_text("5")  # resets VmHWM to the current RSS
    fn()
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ratio(numerator: list[float], denominator: list[float]) -> str:
    """The median of the repeats' ratios, and the ratio of the fastest runs."""
    paired = statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))
    return f"{paired:.3f}  (fastest runs: {min(numerator) / min(denominator):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--texts", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--d-mlp", type=int, default=D_MLP)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--verbose", action="store_true", help="print every repeat")
    args = parser.parse_args()

    model, corpus = make_model(args.hidden, args.d_mlp, args.layers), make_corpus(args.texts)
    default_shape = (args.hidden, args.d_mlp, args.layers) == (HIDDEN, D_MLP, LAYERS)
    tokens = args.texts * LENGTH
    time_forward(model, corpus.select(range(BATCH)), decoder_only=False)  # warm-up
    gatescope.scan(model, corpus.select(range(BATCH)), batch_size=BATCH, progress=False)

    forward, decoder, scan, bare_scan = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        forward.append(time_forward(model, corpus, decoder_only=False))
        decoder.append(time_forward(model, corpus, decoder_only=True))
        scan.append(time_scan(model, corpus))
        bare_scan.append(time_scan(model, corpus, distributions=False))
    forward_s, decoder_s, scan_s, bare_s = map(
        statistics.median, (forward, decoder, scan, bare_scan)
    )
    if args.verbose:
        for name, times in (("forward", forward), ("decoder", decoder), ("scan", scan),
                            ("no-dist", bare_scan)):  # fmt: skip
            print(f"{name:8s}", " ".join(f"{t:.3f}" for t in times))

    print(
        f"model: Llama hidden {args.hidden}, d_mlp {args.d_mlp}, {args.layers} layers, "
        f"vocab {VOCAB}, float32"
    )
    print(
        f"corpus: {args.texts} texts x {LENGTH} tokens, batch {BATCH}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"bare forward (logits):    {forward_s:7.3f} s  {tokens / forward_s:9,.0f} tok/s")
    print(f"bare forward (no lm_head):{decoder_s:7.3f} s  {tokens / decoder_s:9,.0f} tok/s")
    print(f"CPU vector extensions: {vector_extensions()}; used: {extensions_used()}")
    print(f"scan:                     {scan_s:7.3f} s  {tokens / scan_s:9,.0f} tok/s")
    print(f"scan --no-distributions:  {bare_s:7.3f} s  {tokens / bare_s:9,.0f} tok/s")
    # Ratios are paired within a repeat (a machine whose speed drifts slows both alike),
    # then the median; the fastest runs' ratio is the least disturbed estimate.
    target = "  (target <= 1.3, goal 1.1)" if default_shape else ""
    print(f"ratio scan / bare forward:            {ratio(scan, forward)}{target}")
    print(f"ratio scan / bare forward no lm_head: {ratio(scan, decoder)}")
    print(f"ratio scan --no-distributions / bare forward: {ratio(bare_scan, forward)}")
    share = statistics.median(1 - b / s for b, s in zip(bare_scan, scan, strict=True))
    print(f"distributions' share of the scan: {share:.1%}")

    long_corpus = make_corpus(4 * args.texts, seed=1)
    short_peak = peak_rss_mib_during(lambda: time_scan(model, corpus))
    long_peak = peak_rss_mib_during(lambda: time_scan(model, long_corpus))
    print(
        f"peak RSS: {short_peak:,.0f} MiB over {args.texts} texts, "
        f"{long_peak:,.0f} MiB over {4 * args.texts} texts "
        f"(growth {long_peak - short_peak:+,.0f} MiB)"
    )


if __name__ == "__main__":
    main()
