"""What a scan of a mixture-of-experts model costs beyond its own forward pass.

A random OLMoE-shaped model (hidden 512, 8 experts of 512 neurons, 2 per token, 4 layers,
vocab 8192), 24 texts of 256 tokens, batch 8, float32 on the CPU. Prints, measured in this
one run (medians of --repeats, each ratio paired within a repeat):

* the bare forward's time with transformers' default experts implementation and with its
  eager one (the computation the scan runs while it captures the experts: one matmul per
  expert and no second one);
* the scan's time, with and without the distributions, and its ratio to each forward;
* the CPU's vector extensions and those the run used.

An expert's statistics are taken over its routed tokens alone, packed per text (see
gatescope.stats.routed), so their cost does not grow with experts / experts-per-token (4
here; compare --experts 32 --d-ff 128, 16).

    python benchmarks/moe_overhead.py [--repeats 3] [--experts 8 --top-k 2 --d-ff 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scan_overhead import BATCH, LENGTH, VOCAB, extensions_used, make_corpus, ratio
from scan_overhead import vector_extensions as cpu_extensions
from transformers import OlmoeConfig, OlmoeForCausalLM

import gatescope

HIDDEN, LAYERS, HEADS = 512, 4, 8


def make_model(experts: int, top_k: int, d_ff: int, implementation: str) -> OlmoeForCausalLM:
    torch.manual_seed(0)
    config = OlmoeConfig(
        hidden_size=HIDDEN, intermediate_size=d_ff, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
        max_position_embeddings=LENGTH, num_experts=experts, num_experts_per_tok=top_k,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip
    model = OlmoeForCausalLM(config).eval()
    model.set_experts_implementation(implementation)
    return model


def time_forward(model, corpus) -> float:
    ids = torch.tensor(corpus["input_ids"])
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), BATCH):
            batch = ids[i : i + BATCH]
            model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    return time.perf_counter() - start


def time_scan(model, corpus, distributions: bool = True) -> float:
    start = time.perf_counter()
    gatescope.scan(model, corpus, batch_size=BATCH, distributions=distributions, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--texts", type=int, default=24)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=512)
    args = parser.parse_args()

    default = make_model(args.experts, args.top_k, args.d_ff, "grouped_mm")
    eager = make_model(args.experts, args.top_k, args.d_ff, "eager")
    corpus = make_corpus(args.texts)
    warm = corpus.select(range(BATCH))
    time_forward(default, warm), time_forward(eager, warm), time_scan(eager, warm)
    forward, eager_forward, scan, bare_scan = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        forward.append(time_forward(default, corpus))
        eager_forward.append(time_forward(eager, corpus))
        scan.append(time_scan(default, corpus))
        bare_scan.append(time_scan(default, corpus, distributions=False))
    tokens = args.texts * LENGTH
    print(f"model: OLMoE-shaped, hidden {HIDDEN}, {args.experts} experts of {args.d_ff} "
          f"neurons, {args.top_k} per token, {LAYERS} layers, vocab {VOCAB}, float32")  # fmt: skip
    print(f"corpus: {args.texts} texts x {LENGTH} tokens, batch {BATCH}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")  # fmt: skip
    print(f"CPU vector extensions: {cpu_extensions()}; used: {extensions_used()}")
    for name, times in (("bare forward (grouped_mm)", forward),
                        ("bare forward (eager experts)", eager_forward), ("scan", scan),
                        ("scan --no-distributions", bare_scan)):  # fmt: skip
        seconds = statistics.median(times)
        print(f"{name + ':':30s}{seconds:7.3f} s  {tokens / seconds:9,.0f} tok/s")
    print(f"ratio scan / bare forward (grouped_mm):   {ratio(scan, forward)}")
    print(f"ratio scan / bare forward (eager):        {ratio(scan, eager_forward)}")
    print(f"ratio scan --no-distributions / forward:  {ratio(bare_scan, forward)}")


if __name__ == "__main__":
    main()
