"""Names shared by every module: sign cases, quantities, ranked lists and file names.

The names are GLUScope's, so that exported datasets keep its schema (see docs/architecture.md).
"""

from __future__ import annotations

#: The four sign cases of (x_gate, x_in), in a fixed order: index = 2 * (g < 0) + (u < 0).
CASES: tuple[str, ...] = ("gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-")

#: The four intermediate quantities of a gated MLP neuron, in a fixed order.
#: hook_pre = g = <w_gate, x>, hook_pre_linear = u = <w_in, x>, swish = act(g),
#: hook_post = act(g) * u.
QUANTITIES: tuple[str, ...] = ("hook_pre", "hook_pre_linear", "swish", "hook_post")

#: Sign of each quantity inside each case, SIGNS[case][quantity]. swish has the sign of g
#: because act(g) has the sign of g for SiLU and GELU.
SIGNS: tuple[tuple[int, ...], ...] = (
    (+1, +1, +1, +1),  # gate+_in+
    (+1, -1, +1, -1),  # gate+_in-
    (-1, +1, -1, -1),  # gate-_in+
    (-1, -1, -1, +1),  # gate-_in-
)

#: The ranked (top-k) lists as (case index, quantity index). swish is not ranked in the two
#: gate+ cases: act is increasing for g > 0, so it orders exactly like hook_pre there.
TOP_LISTS: tuple[tuple[int, int], ...] = tuple(
    (c, q)
    for c in range(len(CASES))
    for q in range(len(QUANTITIES))
    if not (QUANTITIES[q] == "swish" and CASES[c].startswith("gate+"))
)

DEFAULT_K = 16

#: The quantiles of |value| per case and quantity that atlases with distributions report:
#: (name, level).
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

# Files of an atlas directory.
ATLAS_JSON = "atlas.json"
STATS_FILE = "stats.safetensors"
CHECKPOINT_DIR = "checkpoint"

# Files of a corpus directory (besides those of datasets' save_to_disk).
CORPUS_JSON = "gatescope_corpus.json"

# Columns of a corpus.
INPUT_IDS = "input_ids"
SOURCE_ID = "source_id"
