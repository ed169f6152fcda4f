"""An independent, brute-force implementation of the statistics of docs/architecture.md, for tests.

Written directly from the contract with plain loops over texts and cases (numpy, float64);
it shares no code with gatescope.stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CASES = ("gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-")
QUANTITIES = ("hook_pre", "hook_pre_linear", "swish", "hook_post")


def case_mask(g: np.ndarray, u: np.ndarray, case: str) -> np.ndarray:
    gate_ok = g > 0 if case.startswith("gate+") else g < 0
    in_ok = u > 0 if case.endswith("in+") else u < 0
    return gate_ok & in_ok


def ranked(case: str, quantity: str) -> bool:
    return not (quantity == "swish" and case.startswith("gate+"))


@dataclass
class Reference:
    tokens: int
    count: dict[str, np.ndarray]  # case -> [d]
    mean: dict[tuple[str, str], np.ndarray]  # (case, quantity) -> [d], NaN when absent
    maximum: dict[tuple[str, str], np.ndarray]  # (case, quantity) -> [d], NaN when absent
    minimum: dict[tuple[str, str], np.ndarray]  # (case, quantity) -> [d], NaN when absent
    # (case, quantity) -> [d] lists of (value, text, position), length k, padded (0, -1, -1)
    top: dict[tuple[str, str], list[list[tuple[float, int, int]]]]


def reference_stats(texts, k: int) -> Reference:
    """Brute-force statistics.

    Args:
        texts: list of (text_index, quantities) where quantities maps each of QUANTITIES to a
            [positions, d] array over the counted tokens only, and "position" to the
            [positions] array of their token positions.
        k: length of the ranked lists.
    """
    d = texts[0][1]["hook_pre"].shape[1]
    tokens = sum(len(qs["position"]) for _, qs in texts)
    count = {c: np.zeros(d, dtype=np.int64) for c in CASES}
    sums = {(c, q): np.zeros(d) for c in CASES for q in QUANTITIES}
    maximum = {(c, q): np.full(d, -np.inf) for c in CASES for q in QUANTITIES}
    minimum = {(c, q): np.full(d, np.inf) for c in CASES for q in QUANTITIES}
    candidates = {(c, q): [[] for _ in range(d)] for c in CASES for q in QUANTITIES}
    for text_index, qs in texts:
        g, u = qs["hook_pre"], qs["hook_pre_linear"]
        for c in CASES:
            mask = case_mask(g, u, c)
            count[c] += mask.sum(axis=0)
            for q in QUANTITIES:
                values = np.where(mask, qs[q], 0.0)
                sums[c, q] += values.sum(axis=0)
                if mask.any():
                    high = np.where(mask, qs[q], -np.inf).max(axis=0)
                    low = np.where(mask, qs[q], np.inf).min(axis=0)
                    maximum[c, q] = np.maximum(maximum[c, q], high)
                    minimum[c, q] = np.minimum(minimum[c, q], low)
                if not ranked(c, q):
                    continue
                for n in range(d):
                    rows = np.flatnonzero(mask[:, n])
                    if len(rows) == 0:
                        continue
                    strengths = np.abs(qs[q][rows, n])
                    best = rows[int(np.argmax(strengths))]  # first of equals
                    candidates[c, q][n].append(
                        (float(qs[q][best, n]), text_index, int(qs["position"][best]))
                    )
    mean = {
        key: np.where(count[key[0]] > 0, total / np.maximum(count[key[0]], 1), np.nan)
        for key, total in sums.items()
    }
    top = {}
    for key, per_neuron in candidates.items():
        if not ranked(*key):
            continue
        top[key] = []
        for entries in per_neuron:
            best = sorted(entries, key=lambda e: (-abs(e[0]), e[1]))[:k]
            top[key].append(best + [(0.0, -1, -1)] * (k - len(best)))
    for key in maximum:
        never = count[key[0]] == 0
        maximum[key][never] = np.nan
        minimum[key][never] = np.nan
    return Reference(
        tokens=tokens, count=count, mean=mean, maximum=maximum, minimum=minimum, top=top
    )
