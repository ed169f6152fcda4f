"""Combining the atlases of disjoint parts of one corpus (`--shard i/N`, torchrun ranks).

A part's ``atlas.json`` carries ``"shards": {"count": N, "parts": [i]}``. Merging checks
that the parts are of one scan (the same :class:`~gatescope.records.RunIdentity`: model,
revision, dtype, corpus, k, include_bos, refactor_glu), adds up their counts and sums and
ranks their lists together (:meth:`NeuronStats.from_states`); the parts of the result are
the union. Once all N parts are in, the atlas is that of one scan of the whole corpus,
and ``"shards"`` is gone. Any grouping of parts gives the same atlas (sums to float64
rounding), so partial merges are fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from gatescope.atlas import Atlas
from gatescope.errors import GatescopeError
from gatescope.records import ShardSet

__all__ = ["merge_atlases"]


def merge_atlases(parts: Sequence[Atlas], names: Sequence[str] | None = None) -> Atlas:
    """The atlas of the union of ``parts`` (``names``, e.g. their folders, for messages)."""
    from gatescope.stats import NeuronStats

    names = list(names) if names is not None else [f"part {i + 1}" for i in range(len(parts))]
    if len(parts) < 2:
        raise GatescopeError("give at least two parts to merge.")
    shards = _check_compatible(parts, names)
    seed = parts[0].meta.options.seed or 0
    layers = [
        NeuronStats.from_states([part.layer_state(layer) for part in parts], seed=seed, layer=layer)
        for layer in range(parts[0].num_layers)
    ]
    first = parts[0].meta
    meta = first.replace(
        tokens=int(layers[0].tokens),
        shards=None if shards.complete else shards,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        scan_seconds=round(sum(p.meta.scan_seconds or 0.0 for p in parts), 3),
    )
    return Atlas.from_stats(layers, meta)


def _check_compatible(parts: Sequence[Atlas], names: Sequence[str]) -> ShardSet:
    """Refuses parts that cannot be merged; returns the union of their parts."""
    first, first_name = parts[0].meta, names[0]
    seen: dict[int, str] = {}
    for part, name in zip(parts, names, strict=True):
        meta = part.meta
        if meta.shards is None:
            raise GatescopeError(
                f"{name} is a whole scan, not a part (scan parts with --shard i/N)."
            )
        difference = first.identity().first_difference(meta.identity())
        for what, mine, theirs in [
            *([difference] if difference else []),
            ("shape", str((first.layers, first.d_mlp)), str((meta.layers, meta.d_mlp))),
            ("number of shards", str(first.shards and first.shards.count), str(meta.shards.count)),
        ]:
            if mine != theirs:
                raise GatescopeError(
                    f"{name} and {first_name} differ in {what} ({theirs} vs {mine}): "
                    "only parts of one scan can be merged."
                )
        for index in meta.shards.parts:
            if index in seen:
                raise GatescopeError(f"{name} and {seen[index]} both hold shard {index}.")
            seen[index] = name
    assert first.shards is not None
    return ShardSet(first.shards.count, tuple(seen))
