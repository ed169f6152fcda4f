"""Combining the atlases of disjoint parts of one corpus (`--shard i/N`, torchrun ranks).

A part's ``atlas.json`` carries ``"shards": {"count": N, "parts": [i]}``. Merging checks
that the parts describe the same model, corpus and options, adds up their counts and sums
and ranks their lists together (:meth:`NeuronStats.from_states`); the parts of the result
are the union. Once all N parts are in, the atlas is that of one scan of the whole corpus,
and ``"shards"`` is gone. Any grouping of parts gives the same atlas (sums to float64
rounding), so partial merges are fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from gatescope.atlas import Atlas
from gatescope.errors import GatescopeError

__all__ = ["merge_atlases"]

# What must agree between parts: the model, the corpus (by content), the scan's options.
_MODEL_FIELDS = ("name", "revision", "class", "dtype", "act")
# Options that do not change the result: parts may differ in them.
_FREE_OPTIONS = {"batch_size"}


def merge_atlases(parts: Sequence[Atlas], names: Sequence[str] | None = None) -> Atlas:
    """The atlas of the union of ``parts`` (``names``, e.g. their folders, for messages)."""
    from gatescope.stats import NeuronStats

    names = list(names) if names is not None else [f"part {i + 1}" for i in range(len(parts))]
    if len(parts) < 2:
        raise GatescopeError("give at least two parts to merge.")
    merged_parts = _check_compatible(parts, names)
    layers = [
        NeuronStats.from_states([part.layer_state(layer) for part in parts])
        for layer in range(parts[0].num_layers)
    ]
    meta = {k: v for k, v in parts[0].meta.items() if k != "shards"}
    count = parts[0].meta["shards"]["count"]
    if len(merged_parts) < count:
        meta["shards"] = {"count": count, "parts": merged_parts}
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["scan_seconds"] = round(sum(p.meta.get("scan_seconds", 0.0) for p in parts), 3)
    return Atlas.from_stats(layers, _strip_shape(meta))


def _check_compatible(parts: Sequence[Atlas], names: Sequence[str]) -> list[int]:
    """Refuses parts that cannot be merged; returns the sorted union of their parts."""
    first, first_name = parts[0], names[0]
    seen: dict[int, str] = {}
    for part, name in zip(parts, names, strict=True):
        shards = part.meta.get("shards")
        if not shards:
            raise GatescopeError(
                f"{name} is a whole scan, not a part (scan parts with --shard i/N)."
            )
        for what, mine, theirs in _identity_pairs(first, part):
            if mine != theirs:
                raise GatescopeError(
                    f"{name} and {first_name} differ in {what} ({theirs!r} vs {mine!r}): "
                    "only parts of one scan can be merged."
                )
        for index in shards["parts"]:
            if index in seen:
                raise GatescopeError(f"{name} and {seen[index]} both hold shard {index}.")
            seen[index] = name
    return sorted(seen)


def _identity_pairs(a: Atlas, b: Atlas) -> list[tuple[str, Any, Any]]:
    model_a, model_b = a.meta.get("model", {}), b.meta.get("model", {})
    options_a, options_b = a.meta.get("options", {}), b.meta.get("options", {})
    return [
        *((f"model {f}", model_a.get(f), model_b.get(f)) for f in _MODEL_FIELDS),
        ("corpus", a.meta["corpus"].get("fingerprint"), b.meta["corpus"].get("fingerprint")),
        ("k", a.k, b.k),
        *(
            (f"option {name}", options_a.get(name), options_b.get(name))
            for name in sorted((set(options_a) | set(options_b)) - _FREE_OPTIONS)
        ),
        ("shape", (a.num_layers, a.d_mlp), (b.num_layers, b.d_mlp)),
        ("number of shards", a.meta["shards"]["count"], b.meta["shards"]["count"]),
    ]


def _strip_shape(meta: dict[str, Any]) -> dict[str, Any]:
    """The fields ``complete_meta`` recomputes, removed so they come from the tensors."""
    computed = {"format", "format_version", "layers", "d_mlp", "k", "cases", "quantities",
                "lists", "tokens"}  # fmt: skip
    return {k: v for k, v in meta.items() if k not in computed}
