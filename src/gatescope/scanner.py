"""The scan: runs a model over a corpus and feeds every gated MLP's activations to ``stats``.

Texts are batched by length (longest first, so memory problems show at once and little
padding is wasted), every layer's gate/up outputs are captured by hooks on the Hugging Face
modules and reduced on the model's device; nothing per token ever goes to the host.

A scan into a folder is preemption-safe: it checkpoints every few minutes, and on Ctrl-C or
SIGTERM (what SLURM, Kubernetes and torchrun send) it finishes the batch, checkpoints and
stops with a sentence saying how to resume. ``resume`` continues from the last checkpoint
with exactly the result of an uninterrupted run, after checking that the request is the
same scan (:class:`~gatescope.records.RunIdentity`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from gatescope import __version__, distributed
from gatescope.atlas import Atlas
from gatescope.constants import ATLAS_JSON, CHECKPOINT_DIR
from gatescope.corpus import TokenizedCorpus
from gatescope.errors import GatescopeError
from gatescope.files import ATLAS, Found, claim_output, remove_path, write_atomic
from gatescope.loading import dtype_name, resolve_model, to_device
from gatescope.options import ScanOptions
from gatescope.progress import progress_bar
from gatescope.records import (
    AtlasMeta,
    AtlasOptions,
    ExpertsRecord,
    ModelRecord,
    RunIdentity,
    ShardSet,
)
from gatescope.shards import Shard

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel

    from gatescope.arch import (
        CaptureActCallback,
        CaptureHandle,
        ExpertLayer,
        GatedMLP,
        RoutedForward,
    )
    from gatescope.loading import LoadedModel, ModelSpec
    from gatescope.stats import NeuronStats
    from gatescope.stats.routed import RoutedStats

    # A layer's statistics: a gated MLP's, or a mixture-of-experts layer's.
    LayerAccumulator = NeuronStats | RoutedStats

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "ScanOptions", "scan"]

logger: logging.Logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.safetensors"
_CHECKPOINT_FORMAT = "gatescope-checkpoint-3"


def scan(
    model: str | Path | PreTrainedModel,
    corpus: str | Path | datasets.Dataset,
    options: ScanOptions | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | str | None = None,
    **changes: Any,
) -> Atlas:
    """Scans ``corpus`` with ``model`` and returns the atlas of all its gated-MLP neurons.

    Args:
        model: A Hugging Face model id, a local model folder, or a loaded ``PreTrainedModel``
            (used on its own device and dtype; ``refactor_glu`` is undone afterwards).
        corpus: A folder written by ``gatescope corpus`` or any ``datasets.Dataset`` with an
            ``input_ids`` column (BOS first).
        options: How to scan (:class:`~gatescope.options.ScanOptions`); default options if
            None.
        out: Folder to write the atlas into, with checkpoints while scanning. Without it
            nothing is written and the atlas stays in memory.
        resume: Continue the unfinished scan in ``out``, or return the finished atlas there
            if it is of the same scan (model, revision, dtype, corpus, k, include_bos,
            refactor_glu); any other is refused, naming the first difference.
        overwrite: Replace the atlas or unfinished scan in ``out``.
        progress: Show a progress bar.
        shard: Scan only part ``i/N`` of the corpus (``Shard`` or ``"i/N"``); the atlas is a
            part, for :func:`gatescope.merge.merge_atlases`. Under torchrun (a process group
            of several ranks) every rank scans its own part and the ranks merge at the end.
        **changes: Options by name, changing ``options`` (``batch_size=8``); an unknown
            name is refused.

    Raises:
        GatescopeError: A mistake in the input, or the scan was stopped (Ctrl-C, SIGTERM);
            the message says how to continue.
    """
    opts = ScanOptions.of(options, **changes)
    if resume and overwrite:
        raise GatescopeError("pass --resume or --overwrite, not both: one continues the scan "
                             "in --out, the other starts it over.")  # fmt: skip
    part = Shard.parse(shard) if isinstance(shard, str) else shard
    folder = Path(out) if out is not None else None
    with distributed.process_group() as ranks:
        return _scan(model, corpus, opts, part, ranks, folder, resume, overwrite, progress)


def _scan(
    model: str | Path | PreTrainedModel, corpus: str | Path | datasets.Dataset,
    opts: ScanOptions, shard: Shard | None, ranks: distributed.Ranks | None, out: Path | None,
    resume: bool, overwrite: bool, progress: bool,
) -> Atlas:  # fmt: skip
    """The scan, as this process's part of it (the whole of it when ``ranks`` is None)."""
    shard = _own_shard(shard, ranks, opts)
    texts = TokenizedCorpus.open(corpus)
    _check_distributions_fit(texts, opts)
    own_texts = _shard_texts(texts, shard)
    spec = resolve_model(model, dtype=opts.dtype, device=_device(opts, ranks),
                         device_map=opts.device_map)  # fmt: skip
    identity = _identity(spec, texts, opts)
    _check_backend(opts, spec.device, spec.dtype)  # before the weights load
    if out is not None:
        # One rank looks at the folder (and clears it with overwrite), then all go on.
        claim = functools.partial(_claim_folder, out, identity, _shards(shard, ranks),
                                  resume=resume, overwrite=overwrite)  # fmt: skip
        if distributed.on_rank_zero(ranks, claim):
            return Atlas.load(out)

    started = time.perf_counter()
    # From here on, a rank that fails tells the others (loading can fail on one GPU alone).
    with distributed.RankWatch(ranks) as watch:
        prepared = _prepare(spec.load(), texts, opts)
        checkpoint = Checkpoint(out / CHECKPOINT_DIR, identity, shard) if out is not None else None
        order = texts.scan_order(own_texts)
        done = checkpoint.restore(prepared.layers) if (checkpoint and resume) else 0
        flipped = _feed(prepared, texts, order, done, opts, checkpoint, watch,
                        progress=progress and not (ranks and ranks.rank), out=out)  # fmt: skip
        if ranks is not None:
            if checkpoint is not None:  # every rank's part is safe before it waits
                checkpoint.save(prepared.layers, len(order))
            watch.wait_for_all()
            prepared.layers = distributed.gather_merged(ranks, prepared.layers)
    meta = _describe(prepared, identity, texts, opts, _shards(shard, ranks), flipped,
                     seconds=time.perf_counter() - started)  # fmt: skip
    atlas = Atlas.from_stats(prepared.layers, meta)
    return _publish(atlas, out, ranks)


# ------------------------------------------------------------------------------ the steps


def _own_shard(
    shard: Shard | None, ranks: distributed.Ranks | None, opts: ScanOptions
) -> Shard | None:
    """The part of the corpus this process scans: the one asked for, or its rank's."""
    if ranks is None:
        return shard
    if shard is not None:
        raise GatescopeError("--shard and torchrun do not mix: under torchrun each rank "
                             "scans its own part.")  # fmt: skip
    if opts.device_map is not None:
        raise GatescopeError("--device-map and torchrun do not mix: under torchrun each "
                             "rank holds a whole model on its own GPU.")  # fmt: skip
    return Shard(ranks.rank, ranks.world)


def _check_backend(
    opts: ScanOptions, device: torch.device, model_dtype: torch.dtype,
    act: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """Refuses a --stats-backend that cannot run on ``device`` for a model of ``model_dtype``
    (and activation ``act``, once loaded), in one sentence."""
    from gatescope.stats import stats_dtype
    from gatescope.stats.accumulator import kernel_problem

    problem = kernel_problem(_KERNELS[opts.stats_backend], device, stats_dtype(model_dtype), act)
    if problem is not None:
        raise GatescopeError(f"--stats-backend {opts.stats_backend}: {problem}.")


def _check_distributions_fit(texts: TokenizedCorpus, opts: ScanOptions) -> None:
    """Refuses, before any work, a corpus of more tokens than the int32 histograms count."""
    from gatescope.stats.accumulator import MAX_HISTOGRAM_TOKENS

    counted = int(texts.lengths.sum()) - (0 if opts.include_bos else len(texts.lengths))
    if opts.distributions and counted > MAX_HISTOGRAM_TOKENS:
        raise GatescopeError(
            f"the corpus has {counted:,} tokens to count, and the distributions count at most "
            f"{MAX_HISTOGRAM_TOKENS:,}: scan with --no-distributions (or a smaller corpus)."
        )


def _shard_texts(texts: TokenizedCorpus, shard: Shard | None) -> np.ndarray | None:
    """The indices of the shard's texts (None: all of them)."""
    if shard is None:
        return None
    own = shard.texts(texts.lengths)
    if len(own) == 0:
        raise GatescopeError(f"shard {shard} has no texts: the corpus has only "
                             f"{len(texts.lengths)}; use fewer shards.")  # fmt: skip
    return own


def _shards(shard: Shard | None, ranks: distributed.Ranks | None) -> ShardSet | None:
    """What the atlas records of its part: ranks merge into a whole, a --shard stays one."""
    if shard is None or ranks is not None:
        return None
    return ShardSet(shard.count, (shard.index,))


def _device(opts: ScanOptions, ranks: distributed.Ranks | None) -> str:
    if ranks is not None and opts.device in ("auto", "cuda"):
        return str(ranks.device)  # each rank its own GPU: cuda:LOCAL_RANK
    return opts.device


def _identity(spec: ModelSpec, texts: TokenizedCorpus, opts: ScanOptions) -> RunIdentity:
    return RunIdentity(
        model=spec.name,
        revision=spec.revision,
        dtype=dtype_name(spec.dtype),
        corpus=texts.fingerprint,
        k=opts.k,
        include_bos=opts.include_bos,
        refactor_glu=opts.refactor_glu,
        distributions=opts.distributions,
        seed=opts.seed if opts.distributions else None,
    )


def _claim_folder(
    out: Path, identity: RunIdentity, shards: ShardSet | None, *, resume: bool, overwrite: bool
) -> bool:
    """Checks what ``out`` holds; True if ``resume`` finds this very scan finished there."""
    found = claim_output(out, ATLAS, overwrite=overwrite, resume=resume)
    if found is Found.FINISHED:
        meta = Atlas.load(out).meta
        difference = meta.identity().first_difference(identity)
        if difference is None and meta.shards != shards:
            difference = ("part of the corpus", str(meta.shards), str(shards))
        if difference is not None:
            what, there, asked = difference
            raise GatescopeError(
                f"{out} already holds the atlas of another scan: its {what} is {there}, not "
                f"{asked}; pass --overwrite to replace it."
            )
        logger.info("%s already holds the finished atlas", out)
        return True
    if overwrite:  # the old atlas stays until the new scan saves progress or its atlas
        remove_path(out / CHECKPOINT_DIR)
    return False


@dataclass
class _Prepared:
    """A loaded model ready to scan: its MLP layers (gated MLPs, or routed experts with
    their shared MLP) and an accumulator for each."""

    loaded: LoadedModel
    mlps: list[GatedMLP] | list[GatedMLP | ExpertLayer]
    layers: Sequence[LayerAccumulator]  # one per MLP layer, on its layer's device
    experts: ExpertsRecord | None = None  # a mixture of experts' layout


def _prepare(loaded: LoadedModel, texts: TokenizedCorpus, opts: ScanOptions) -> _Prepared:
    """Finds the model's MLP layers, checks the corpus fits it, and makes a fresh
    accumulator for each layer on its device (a mixture of experts: every layer as wide as
    its widest, see :mod:`gatescope.stats.routed`)."""
    from gatescope.arch import ExpertLayer, find_mlp_layers, refactor_problem
    from gatescope.stats import NeuronStats, Workspace, stats_dtype
    from gatescope.stats.routed import RoutedStats

    mlps = find_mlp_layers(loaded.model)
    config = loaded.model.config
    # transformers annotates the input embeddings as any nn.Module; this one has a vocabulary.
    vocab = cast("int", loaded.model.get_input_embeddings().num_embeddings)
    texts.check_fits(int(vocab), getattr(config, "max_position_embeddings", None))
    experts = _experts_record(mlps, config)
    if experts is None and len({mlp.d_mlp for mlp in mlps}) != 1:
        sizes = sorted({mlp.d_mlp for mlp in mlps})
        raise GatescopeError(f"the model's layers have different MLP sizes {sizes}.")
    problem = refactor_problem(mlps) if opts.refactor_glu else None
    if problem:  # before the scan starts
        raise GatescopeError(problem)
    width = experts.width if experts is not None else mlps[0].d_mlp
    dtype = stats_dtype(loaded.dtype)
    workspaces: dict[torch.device, Workspace] = defaultdict(Workspace)  # layers take turns
    layers: list[LayerAccumulator] = []
    for index, mlp in enumerate(mlps):
        device = _execution_device(mlp)
        _check_backend(opts, device, loaded.dtype, mlp.act_fn)
        accumulator = functools.partial(
            NeuronStats, act=mlp.act_fn, k=opts.k, device=device, dtype=dtype,
            kernel=_KERNELS[opts.stats_backend], workspace=workspaces[device],
            distributions=opts.distributions, seed=opts.seed, layer=index,
        )  # fmt: skip
        if isinstance(mlp, ExpertLayer):
            shared = mlp.shared.d_mlp if mlp.shared is not None else 0
            layers.append(RoutedStats(width, accumulator, n_experts=mlp.routed.n_experts,
                                      d_ff=mlp.routed.d_ff, shared=shared))  # fmt: skip
        else:  # a dense model's layer, or a dense layer of a mixture of experts
            layers.append(accumulator(width, experts=experts.n_experts if experts else 0))
    return _Prepared(loaded, mlps, layers, experts)


def _experts_record(mlps: Sequence[GatedMLP | ExpertLayer], config: Any) -> ExpertsRecord | None:
    """The layout of a mixture of experts' layers (None for a dense model); refuses one
    whose MoE layers differ in shape or activation."""
    from gatescope.arch import ExpertLayer

    moe = [mlp for mlp in mlps if isinstance(mlp, ExpertLayer)]
    if not moe:
        return None
    shapes = {(m.routed.n_experts, m.routed.d_ff, m.shared.d_mlp if m.shared else 0) for m in moe}
    acts = {m.act_name for m in moe} | {m.shared.act_name for m in moe if m.shared is not None}
    if len(shapes) != 1 or len(acts) != 1:
        raise GatescopeError(
            f"the model's expert layers differ (experts, neurons, shared: {sorted(shapes)}; "
            f"activations {sorted(acts)}): gatescope needs them alike."
        )
    (n_experts, d_ff, shared), dense = shapes.pop(), [m for m in mlps if m not in moe]
    if len({m.d_mlp for m in dense}) > 1:
        raise GatescopeError("the model's dense layers have different MLP sizes.")
    return ExpertsRecord(
        n_experts=n_experts,
        d_ff=d_ff,
        shared=shared,
        top_k=int(getattr(config, "num_experts_per_tok", 1)),
        dense_layers=tuple(m.layer for m in dense),
        dense_d_mlp=dense[0].d_mlp if dense else 0,
    )


def _feed(
    model: _Prepared, texts: TokenizedCorpus, order: np.ndarray, done: int, opts: ScanOptions,
    checkpoint: Checkpoint | None, watch: distributed.RankWatch, *, progress: bool,
    out: Path | None,
) -> int:  # fmt: skip
    """Runs the model over ``order[done:]`` in batches, the statistics hooked on; saves a
    checkpoint when due and stops cleanly when asked to. Returns the neurons that
    ``refactor_glu`` flipped."""
    from gatescope.arch import refactored_glu

    loaded, layers = model.loaded, model.layers
    refactor = refactored_glu(model.mlps) if opts.refactor_glu else contextlib.nullcontext(0)
    lengths = texts.lengths[order]
    bar = progress_bar(total=int(lengths.sum()), initial=int(lengths[:done].sum()), desc="scan",
                       unit="tok", enabled=progress)  # fmt: skip
    with bar, refactor as flipped, _capture(model.mlps, layers) as feed, _StopOnSignal() as stop:
        last_save = time.monotonic()
        while done < len(order):
            indices = order[done : done + opts.batch_size]
            input_ids, attention_mask = texts.batch(indices, device=loaded.device)
            feed.set(torch.as_tensor(indices), _counted(attention_mask, opts.include_bos))
            loaded.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
            done += len(indices)
            bar.update(int(lengths[done - len(indices) : done].sum()))
            failure = watch.failure()
            if done == len(order) and failure is None:
                break
            due = time.monotonic() - last_save >= opts.checkpoint_every
            if checkpoint is not None and (stop.requested or failure or due):
                checkpoint.save(layers, done)
                last_save = time.monotonic()
            if failure is not None:
                raise distributed.RankFailed(
                    f"another rank failed ({failure}); this rank stopped too"
                    + (f" and saved its part: continue with --out {out} --resume." if out else ".")
                )
            if stop.requested:
                saved = f"; {done:,} of {len(order):,} texts are saved" if checkpoint else ""
                hint = f" (continue with --out {out} --resume)" if out else ""
                raise GatescopeError(f"the scan was interrupted ({stop.requested}){saved}{hint}.")
    return int(flipped)


def _describe(
    model: _Prepared, identity: RunIdentity, texts: TokenizedCorpus, opts: ScanOptions,
    shards: ShardSet | None, flipped: int, *, seconds: float,
) -> AtlasMeta:  # fmt: skip
    """The atlas.json of the scan. Its model's name, revision and dtype are the identity's,
    so that a resume compares the atlas with the very values it was checked against."""
    layers = model.layers
    tokens = int(layers[0].tokens)
    if tokens == 0:
        raise GatescopeError(
            "the corpus has no tokens to count: every text is only its BOS token "
            "(use longer texts or --include-bos)."
        )
    return AtlasMeta(
        layers=len(layers),
        d_mlp=layers[0].d_mlp,
        k=opts.k,
        tokens=tokens,
        model=ModelRecord(
            name=identity.model,
            revision=identity.revision,
            class_name=type(model.loaded.model).__name__,
            dtype=identity.dtype,
            act=model.mlps[-1].act_name,  # the last: a MoE model's first layers may be dense
        ),
        corpus=texts.reference(),
        options=AtlasOptions(
            include_bos=opts.include_bos,
            refactor_glu=opts.refactor_glu,
            batch_size=opts.batch_size,
            refactored_neurons=flipped,
            distributions=opts.distributions,
            seed=identity.seed,
            stats_backend=_backend_of(layers),
        ),
        shards=shards,
        experts=model.experts,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        scan_seconds=round(seconds, 3),
        gatescope_version=__version__,
    )


def _publish(atlas: Atlas, out: Path | None, ranks: distributed.Ranks | None) -> Atlas:
    """Writes the atlas into ``out`` (rank 0 alone) and drops the checkpoint."""
    if out is None:
        return atlas
    if ranks is None or ranks.rank == 0:
        atlas.save(out, overwrite=True)
        remove_path(out / CHECKPOINT_DIR)
    distributed.barrier(ranks)
    return Atlas.load(out)


def _execution_device(mlp: GatedMLP | ExpertLayer) -> torch.device:
    """Where a layer's statistics live: on its weights' device. A layer that accelerate
    offloads to disk has its weights on "meta" until it runs; it computes on the first GPU."""
    device = mlp.weight_device
    if device.type == "meta":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return device


def _counted(attention_mask: torch.Tensor, include_bos: bool) -> torch.Tensor:
    """[batch, pos] bool: the tokens that enter the statistics."""
    counted = attention_mask.bool()
    if not include_bos:
        counted[:, 0] = False
    return counted


# ------------------------------------------------------------------------------ the hooks


class _Feed:
    """Hands the current batch's text indices and counted-token mask to the hooks."""

    def __init__(self) -> None:
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def set(self, text_index: torch.Tensor, counted: torch.Tensor) -> None:
        """text_index: [batch] int64; counted: [batch, pos] bool."""
        self._batch = (text_index, counted)
        self._on_device = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's tensors on ``device`` (copied once per batch and device)."""
        assert self._batch is not None, "a forward ran before its batch was set"
        if device not in self._on_device:
            self._on_device[device] = (to_device(self._batch[0], device),
                                       to_device(self._batch[1], device))  # fmt: skip
        return self._on_device[device]


#: --stats-backend -> NeuronStats's kernel, and back (what the atlas records).
_KERNELS = {"auto": "auto", "triton": "triton", "numba": "cpu", "torch": "torch"}


def _backend_of(layers: Sequence[LayerAccumulator]) -> str:
    """The statistics pass that ran (the first layer's: they all choose alike)."""
    return {kernel: name for name, kernel in _KERNELS.items() if name != "auto"}[layers[0].kernel]


@contextlib.contextmanager
def _capture(
    mlps: Sequence[GatedMLP | ExpertLayer], layers: Sequence[LayerAccumulator]
) -> Iterator[_Feed]:
    """Hooks every MLP layer so that each forward updates its layer's statistics."""
    feed = _Feed()
    handles = [_hook(feed, mlp, stats) for mlp, stats in zip(mlps, layers, strict=True)]
    try:
        with torch.inference_mode():
            yield feed
    finally:
        for handle in handles:
            handle.remove()


def _hook(feed: _Feed, mlp: GatedMLP | ExpertLayer, stats: LayerAccumulator) -> CaptureHandle:
    """Hooks one MLP layer (routed experts, or a gated MLP) to feed its statistics."""
    from gatescope.arch import ExpertLayer
    from gatescope.stats import NeuronStats
    from gatescope.stats.routed import RoutedStats

    # The model's own act(g) of a gated MLP is taken only where the statistics use it (in
    # their dtype); the routed experts' comes with their values.
    if isinstance(mlp, ExpertLayer):
        assert isinstance(stats, RoutedStats), "_prepare pairs expert layers with RoutedStats"
        watch_act = mlp.shared is not None and mlp.shared.dtype == stats.dtype
        return mlp.capture(_routed_updater(feed, stats), watch_act=watch_act)
    assert isinstance(stats, NeuronStats)
    return mlp.capture_with_act(_updater(feed, stats), watch_act=mlp.dtype == stats.dtype)


def _updater(feed: _Feed, stats: NeuronStats) -> CaptureActCallback:
    """A gated MLP's forward into its statistics (zero-padded to the layer width of a
    mixture of experts, for its dense layers)."""

    def update(gate: torch.Tensor, up: torch.Tensor, swish: torch.Tensor | None) -> None:
        text_index, counted = feed.on(stats.device)
        # A no-op, except for layers accelerate offloads (they run elsewhere).
        gate, up = gate.to(stats.device), up.to(stats.device)
        swish = swish.to(stats.device) if swish is not None else None
        missing = stats.d_mlp - gate.shape[-1]
        if missing:  # padded neurons: g = 0 is in no case
            gate, up = (torch.nn.functional.pad(x, (0, missing)) for x in (gate, up))
            swish = torch.nn.functional.pad(swish, (0, missing)) if swish is not None else None
        stats.update(gate, up, text_index, counted, swish)

    return update


def _routed_updater(feed: _Feed, stats: RoutedStats) -> Callable[[RoutedForward], None]:
    """An expert layer's forward into its statistics (:mod:`gatescope.stats.routed`)."""

    def update(forward: RoutedForward) -> None:
        text_index, counted = feed.on(stats.device)
        stats.update(forward, text_index, counted)

    return update


# ------------------------------------------------------------------------------ stopping


@dataclass
class Checkpoint:
    """A scan's saved progress: every layer's state after the first ``texts_done`` texts of
    the scan order (longest first), whatever the batch size.

    One safetensors file, written to a temporary name and renamed, so a kill at any moment
    leaves either the previous checkpoint or the new one. Ranks of one torchrun scan share
    the folder: one file each.
    """

    folder: Path
    identity: RunIdentity
    shard: Shard | None = None

    @property
    def file(self) -> Path:
        name = CHECKPOINT_FILE if self.shard is None else (
            f"shard-{self.shard.index}-of-{self.shard.count}.safetensors"
        )  # fmt: skip
        return self.folder / name

    def save(self, layers: Sequence[LayerAccumulator], texts_done: int) -> None:
        import json

        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        # From the first checkpoint on, the folder holds an unfinished scan, not an atlas
        # that --overwrite asked to replace.
        (self.folder.parent / ATLAS_JSON).unlink(missing_ok=True)
        tensors = {
            f"{i}.{name}": tensor.detach().cpu().contiguous()
            for i, stats in enumerate(layers)
            for name, tensor in stats.state_dict().items()
        }
        metadata = {
            "format": _CHECKPOINT_FORMAT,
            "texts_done": str(texts_done),
            "identity": json.dumps(self.identity.to_dict()),
        }
        write_atomic(self.file, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        logger.info("checkpoint: %d texts done", texts_done)

    def restore(self, layers: Sequence[LayerAccumulator]) -> int:
        """Loads the saved state into ``layers``; returns the number of texts done."""
        import json

        from safetensors import safe_open

        where = self.folder.parent
        if not self.file.exists():
            others = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if others:
                raise GatescopeError(
                    f"the unfinished scan in {where} was split into other parts ({others[0]}): "
                    "resume it with the same --shard or number of ranks, or pass --overwrite "
                    "to start over."
                )
            return 0
        with safe_open(str(self.file), framework="pt") as saved:
            metadata = saved.metadata() or {}
            if metadata.get("format") != _CHECKPOINT_FORMAT:
                raise GatescopeError(
                    f"the unfinished scan in {where} was saved by an older gatescope: pass "
                    "--overwrite to start over."
                )
            recorded = RunIdentity.from_dict(json.loads(metadata["identity"]))
            difference = recorded.first_difference(self.identity)
            if difference is not None:
                what, there, asked = difference
                raise GatescopeError(
                    f"the unfinished scan in {where} has another {what} ({there}, not {asked}): "
                    "resume it with the same ones, or pass --overwrite to start over."
                )
            for i, stats in enumerate(layers):
                names = stats.state_dict().keys()
                stats.load_state_dict({name: saved.get_tensor(f"{i}.{name}") for name in names})
            return int(metadata["texts_done"])


class _StopOnSignal:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop at the next batch
    boundary; ``requested`` names the signal.

    The statistics are only consistent between batches, so that is where the scan saves its
    checkpoint and stops. A second signal interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals go to it only
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        logger.warning("%s: stopping after this batch (again to stop at once)", self.requested)

    def __exit__(self, *exc_info: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
