"""An independent, brute-force implementation of the statistics of docs/architecture.md, for tests.

Written directly from the contract with plain loops over texts and cases (numpy, float64);
it shares no code with gatescope.stats. Bins are found by searching the explicit edges,
the typical examples' hash in plain Python integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CASES = ("gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-")
QUANTITIES = ("hook_pre", "hook_pre_linear", "swish", "hook_post")


# Magnitude bins: [0, 2**-11), half octaves up to 2**7 (the inner edge of an octave is
# float32(sqrt(2)) times its start), [2**7, inf]. Joint bins: [0, 2**-9), two octaves each up
# to 2**7, [2**7, inf].
_SQRT2 = float(np.float32(np.sqrt(2.0)))
BIN_EDGES = np.array(
    [0.0] + [m * 2.0**e for e in range(-11, 7) for m in (1.0, _SQRT2)] + [2.0**7, np.inf]
)
JOINT_EDGES = np.array([0.0] + [2.0**e for e in range(-9, 8, 2)] + [np.inf])


def bin_of(edges: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """The bin of each magnitude: the last edge at or below it (NaN: the last bin)."""
    found = np.searchsorted(edges, magnitude, side="right") - 1
    return np.where(np.isnan(magnitude), len(edges) - 2, np.minimum(found, len(edges) - 2))


def _mix(x: int) -> int:
    x = (((x >> 16) ^ x) * 0x45D9F3B) % 2**32
    x = (((x >> 16) ^ x) * 0x45D9F3B) % 2**32
    return (x >> 16) ^ x


def text_priority(seed: int, layer: int, case: int, neuron: int, text: int) -> int:
    base = _mix(_mix(seed % 2**32) ^ (layer % 2**32))
    return _mix(_mix(base ^ (neuron * 4 + case)) ^ text)


def token_priority(text_priority: int, position: int) -> int:
    return _mix(_mix(text_priority ^ 0x2545F491) ^ position)


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
    histogram: dict[tuple[str, str], np.ndarray]  # (case, quantity) -> [d, bin] counts
    joint: dict[str, np.ndarray]  # case -> [d, |g| bin, |u| bin] counts
    histogram_slack: dict[tuple[str, str], np.ndarray]  # like histogram
    joint_slack: dict[str, np.ndarray]  # like joint
    # case -> [d] lists of (text, position, (g, u, act, post)), draw order, length k, padded
    # with (-1, -1, (0, 0, 0, 0))
    typical: dict[str, list[list[tuple[int, int, tuple[float, ...]]]]]


def reference_stats(
    texts, k: int, seed: int = 0, layer: int = 0, rtol: float = 0.0, atol: float = 0.0
) -> Reference:
    """Brute-force statistics.

    Args:
        texts: list of (text_index, quantities) where quantities maps each of QUANTITIES to a
            [positions, d] array over the counted tokens only, and "position" to the
            [positions] array of their token positions.
        k: length of the ranked lists.
        seed, layer: of the typical examples' draw.
        rtol, atol: how far the values compared with may be off: ``histogram_slack`` and
            ``joint_slack`` count, per bin, the tokens that such an error could move into
            or out of it.
    """
    d = texts[0][1]["hook_pre"].shape[1]
    tokens = sum(len(qs["position"]) for _, qs in texts)
    count = {c: np.zeros(d, dtype=np.int64) for c in CASES}
    sums = {(c, q): np.zeros(d) for c in CASES for q in QUANTITIES}
    maximum = {(c, q): np.full(d, -np.inf) for c in CASES for q in QUANTITIES}
    minimum = {(c, q): np.full(d, np.inf) for c in CASES for q in QUANTITIES}
    candidates = {(c, q): [[] for _ in range(d)] for c in CASES for q in QUANTITIES}
    histogram = {
        (c, q): np.zeros((d, len(BIN_EDGES) - 1), np.int64) for c in CASES for q in QUANTITIES
    }
    joint = {c: np.zeros((d, len(JOINT_EDGES) - 1, len(JOINT_EDGES) - 1), np.int64) for c in CASES}
    histogram_slack = {key: np.zeros_like(h) for key, h in histogram.items()}
    joint_slack = {c: np.zeros_like(j) for c, j in joint.items()}

    def bins_within(edges, magnitude):
        """The bins of the magnitudes, and of their lowest and highest possible values."""
        low = np.maximum(magnitude * (1 - rtol) - atol, 0.0)
        high = magnitude * (1 + rtol) + atol
        return bin_of(edges, magnitude), bin_of(edges, low), bin_of(edges, high)

    drawn = {c: [[] for _ in range(d)] for c in CASES}  # (priority, text, position, values)
    for text_index, qs in texts:
        g, u = qs["hook_pre"], qs["hook_pre_linear"]
        for ci, c in enumerate(CASES):
            mask = case_mask(g, u, c)
            count[c] += mask.sum(axis=0)
            for n in range(d):
                rows = np.flatnonzero(mask[:, n])
                for q in QUANTITIES:
                    bins, low, high = bins_within(BIN_EDGES, np.abs(qs[q][rows, n]))
                    np.add.at(histogram[c, q][n], bins, 1)
                    for b_low, b_high in zip(low[low != high], high[low != high], strict=True):
                        histogram_slack[c, q][n, b_low : b_high + 1] += 1
                g_bins, g_low, g_high = bins_within(JOINT_EDGES, np.abs(g[rows, n]))
                u_bins, u_low, u_high = bins_within(JOINT_EDGES, np.abs(u[rows, n]))
                np.add.at(joint[c][n], (g_bins, u_bins), 1)
                unsure = (g_low != g_high) | (u_low != u_high)
                for gl, gh, ul, uh in zip(
                    g_low[unsure], g_high[unsure], u_low[unsure], u_high[unsure], strict=True
                ):
                    joint_slack[c][n, gl : gh + 1, ul : uh + 1] += 1
                if len(rows) == 0:
                    continue
                priority = text_priority(seed, layer, ci, n, text_index)
                positions = [int(qs["position"][r]) for r in rows]
                draws = [
                    (token_priority(priority, p), p, r)
                    for p, r in zip(positions, rows, strict=True)
                ]
                _, position, row = min(draws)
                values = tuple(float(qs[q][row, n]) for q in QUANTITIES)
                drawn[c][n].append((priority, text_index, position, values))
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
    empty = (-1, -1, (0.0,) * len(QUANTITIES))
    typical = {
        c: [
            [entry[1:] for entry in sorted(per_neuron)[:k]]
            + [empty] * (k - min(k, len(per_neuron)))
            for per_neuron in drawn[c]
        ]
        for c in CASES
    }
    return Reference(
        tokens=tokens, count=count, mean=mean, maximum=maximum, minimum=minimum, top=top,
        histogram=histogram, joint=joint, typical=typical, histogram_slack=histogram_slack,
        joint_slack=joint_slack,
    )  # fmt: skip
