#!/usr/bin/env python
"""Compares a bfloat16 (or float16) scan with a float32 scan of the same model and corpus.

    python scripts/compare_precision.py MODEL CORPUS [--dtype bfloat16]

Prints, over all neurons: how far the case frequencies move (in percentage points), how far
the means move (relative), and how much the top-k lists overlap (the share of texts of a
float32 list that the other list holds too, and how often the top-1 text is the same). The
statistics themselves are float32 with float64 sums in both scans: what differs is the
model's own arithmetic. docs/precision.md reports it for the fixture model.
"""

from __future__ import annotations

import argparse

import numpy as np

import gatescope
from gatescope.constants import CASES, QUANTITIES, TOP_LISTS


def _quantile(values, q: float) -> float:
    """numpy's quantile: torch.quantile takes at most 16M values."""
    return float(np.quantile(values.double().numpy(), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("corpus")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    exact = gatescope.scan(args.model, args.corpus, dtype="float32", k=args.k, progress=False)
    low = gatescope.scan(args.model, args.corpus, dtype=args.dtype, k=args.k, progress=False)

    freq = exact.tensor("count").double() / exact.tokens  # [L, case, d]
    freq_low = low.tensor("count").double() / low.tokens
    moved = (freq_low - freq).abs() * 100
    print(
        f"model {args.model}, {exact.tokens:,} tokens, {exact.num_layers} x {exact.d_mlp} "
        f"neurons; {args.dtype} against float32"
    )
    print(
        "case frequency change, percentage points: "
        f"mean {moved.mean():.4f}, 99th percentile {_quantile(moved, 0.99):.4f}, "
        f"max {moved.max():.4f}"
    )
    for c, case in enumerate(CASES):
        print(f"  {case}: mean {moved[:, c].mean():.4f}, max {moved[:, c].max():.4f}")

    mean = exact.tensor("sum") / exact.tensor("count").unsqueeze(2)  # [L, case, q, d]
    mean_low = low.tensor("sum") / low.tensor("count").unsqueeze(2)
    both = mean.isfinite() & mean_low.isfinite() & (exact.tensor("count").unsqueeze(2) >= 100)
    relative = ((mean_low - mean).abs() / mean.abs().clamp_min(1e-6))[both]
    print(
        f"mean of each quantity (cases with >= 100 tokens), relative change: median "
        f"{relative.median():.2e}, 99th percentile {_quantile(relative, 0.99):.2e}"
    )

    texts, texts_low = exact.tensor("top_text"), low.tensor("top_text")  # [L, d, list, k]
    filled = texts >= 0
    shared = (texts.unsqueeze(-1) == texts_low.unsqueeze(-2)).any(-1) & filled
    overlap = shared.sum(-1).double() / filled.sum(-1).clamp_min(1)
    lists = filled.any(-1)
    same_top = (texts[..., 0] == texts_low[..., 0])[lists].double().mean()
    print(
        f"top-{args.k} overlap (share of a float32 list's texts also in the {args.dtype} "
        f"list): mean {overlap[lists].mean():.3f}, 5th percentile "
        f"{_quantile(overlap[lists], 0.05):.3f}"
    )
    print(f"same top-1 text: {same_top:.3f} of lists")
    for lst, (c, q) in enumerate(TOP_LISTS):
        these = overlap[:, :, lst][lists[:, :, lst]]
        print(
            f"  {CASES[c]} {QUANTITIES[q]}: overlap mean {these.mean():.3f}, "
            f"5th percentile {_quantile(these, 0.05):.3f}"
        )


if __name__ == "__main__":
    main()
