"""Scan throughput on a GPU at the scale of OLMo-7B, and the time it projects for 20M tokens.

A random model with the exact shapes of OLMo-7B-0424 (32 layers, d_model 4096, d_mlp 11008,
vocab 50304, 32 heads) in bfloat16, batches of 16 texts of 1024 tokens. Prints, measured
in this one run:

* the bare forward's tokens/s (the decoder, as the scan runs it: no logits) and with logits;
* the scan's tokens/s over the same batches, statistics included (float32, float64 sums),
  with the distributions (the default) and with ``--no-distributions``, for each statistics
  backend of ``--backends`` (triton and torch on a GPU);
* scan time / bare forward time, for each;
* where the scan loop makes the host wait for the GPU, once per batch (on a GPU: scans of
  2 and of 4 batches under ``torch.cuda.set_sync_debug_mode("warn")``; the source lines
  whose warnings grow with the batches), for the first backend;
* the attention implementation the model runs (``--attn``: sdpa, the default, or eager);
* the projected hours for 20M tokens (GLUScope: five days on one A100).

``--experts E --top-k K`` makes it a mixture of experts instead (OLMoE's architecture,
``--d-mlp`` neurons per expert); OLMoE-1B-7B's shapes are ``--layers 16 --hidden 2048
--heads 16 --experts 64 --top-k 8 --d-mlp 1024``.

    python benchmarks/gpu_scan.py                     # needs about 20 GB of GPU memory
    python benchmarks/gpu_scan.py --layers 2 --hidden 256 --d-mlp 688 --vocab 1024 \\
        --length 128 --device cpu --dtype float32     # a small smoke run anywhere
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from collections import Counter
from pathlib import Path

import datasets
import torch

import gatescope

TOKENS_TO_PROJECT = 20_000_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--d-mlp", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024, help="tokens per text")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12, help="batches timed")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    backends = "comma-separated; default triton,torch on a GPU, numba,torch on a CPU"
    parser.add_argument("--backends", default=None, help=backends)
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager)")
    parser.add_argument("--experts", type=int, default=0, help="routed experts (0: dense)")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token")
    return parser.parse_args()


def make_model(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, OlmoConfig, OlmoeConfig

    # OLMo-7B's architecture, or OLMoE's: the same but for the experts (and q/k norms).
    kind, routing = OlmoConfig, {}
    if args.experts:
        kind = OlmoeConfig
        routing = {"num_experts": args.experts, "num_experts_per_tok": args.top_k}
    config = kind(
        **routing,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.length, 2048),
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=min(50279, args.vocab - 1),
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # initialized where it runs: no host copy of 7B
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
        )
    return model.eval()


def make_corpus(args: argparse.Namespace, batches: int) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (batches * args.batch_size, args.length),
                        generator=generator)  # fmt: skip
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model, corpus, args, *, logits: bool) -> float:
    ids = torch.tensor(corpus["input_ids"])
    run = model if logits else model.base_model
    with torch.inference_mode():
        batches = ids.split(args.batch_size)
        run(input_ids=batches[0].to(args.device), use_cache=False)  # warm-up
        synchronize(args.device)
        start = time.perf_counter()
        for batch in batches:
            batch = batch.to(args.device)
            run(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
        synchronize(args.device)
    return time.perf_counter() - start


def time_scan(model, corpus, args, *, backend: str, distributions: bool = True) -> float:
    run = functools.partial(
        gatescope.scan, model, batch_size=args.batch_size, distributions=distributions,
        stats_backend=backend, progress=False,
    )  # fmt: skip
    run(corpus.select(range(args.batch_size)))  # compile, allocate
    synchronize(args.device)
    start = time.perf_counter()
    run(corpus)
    synchronize(args.device)
    return time.perf_counter() - start


def sync_sites(model, corpus, args, backend: str, batches: int) -> Counter[str]:
    """How often each source line made the host wait for the GPU in a scan of ``batches``."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            time_scan(model, corpus.select(range(batches * args.batch_size)), args,
                      backend=backend)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return Counter(
        "/".join(Path(w.filename).parts[-2:]) + f":{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )


def sync_check(model, corpus, args, backend: str) -> str:
    """The lines that synchronise once per batch ("none" if none): those whose count grows
    from a scan of 2 batches to one of 4 (the end of a scan synchronises, once)."""
    few, more = (sync_sites(model, corpus, args, backend, n) for n in (2, 4))
    per_batch = sorted(site for site in more if more[site] > few[site])
    found = [f"{site} ({more[site] - few[site]} per 2 batches)" for site in per_batch]
    return ", ".join(found) or "none"


def main() -> None:
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no GPU here: pass --device cpu (with small shapes) for a smoke run")
    model = make_model(args)
    corpus = make_corpus(args, args.batches)
    tokens = args.batches * args.batch_size * args.length
    counted = args.batches * args.batch_size * (args.length - 1)  # BOS is not counted
    forward = time_forward(model, corpus, args, logits=False)
    with_logits = time_forward(model, corpus, args, logits=True)
    on_gpu = args.device.startswith("cuda")
    backends = (args.backends or ("triton,torch" if on_gpu else "numba,torch")).split(",")
    scans = {
        backend: (time_scan(model, corpus, args, backend=backend),
                  time_scan(model, corpus, args, backend=backend, distributions=False))
        for backend in backends
    }  # fmt: skip
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    mlp = (f"{args.experts} experts of {args.d_mlp} neurons, {args.top_k} per token"
           if args.experts else f"d_mlp {args.d_mlp}")  # fmt: skip
    print(
        f"device: {device}; model: {args.layers} layers x {mlp}, "
        f"d_model {args.hidden}, vocab {args.vocab}, {args.dtype}, "
        f"attention {model.config._attn_implementation}"
    )
    print(
        f"batches: {args.batches} x {args.batch_size} texts x {args.length} tokens "
        f"= {tokens:,} tokens ({counted:,} counted)"
    )
    print(f"bare forward (decoder): {tokens / forward:,.0f} tokens/s")
    print(f"bare forward (with logits): {tokens / with_logits:,.0f} tokens/s")
    for backend, (scan, bare_scan) in scans.items():
        for name, seconds in ((f"scan, {backend}", scan),
                              (f"scan --no-distributions, {backend}", bare_scan)):  # fmt: skip
            print(
                f"{name}: {tokens / seconds:,.0f} tokens/s; / bare forward "
                f"{seconds / forward:.2f} (decoder), {seconds / with_logits:.2f} (with logits); "
                f"statistics' share {1 - forward / seconds:.0%}"
            )
        hours = TOKENS_TO_PROJECT / (tokens / scan) / 3600
        print(f"projected for 20M tokens, {backend}: {hours:.2f} hours (GLUScope: 120 hours "
              "on one A100)")  # fmt: skip
    if on_gpu:
        found = sync_check(model, corpus, args, backends[0])
        print(f"host synchronisations per batch in the scan loop ({backends[0]}): {found}")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
