"""The scan: runs a model over a corpus and feeds every gated MLP's activations to ``stats``.

Texts are batched by length (longest first, so memory problems show at once and little
padding is wasted), every layer's gate/up outputs are captured by hooks on the Hugging Face
modules and reduced on the model's device; nothing per token ever goes to the host. The
scan checkpoints into its output folder every few minutes and at Ctrl-C, and ``resume``
continues from the last checkpoint with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gatescope import distributed
from gatescope.atlas import Atlas
from gatescope.constants import ATLAS_JSON, CHECKPOINT_DIR, DEFAULT_K, INPUT_IDS
from gatescope.errors import GatescopeError
from gatescope.shards import Shard

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel

    from gatescope.stats import NeuronStats

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.safetensors"


@dataclass(frozen=True)
class ScanOptions:
    """How a scan runs. Every field is recorded in the atlas."""

    batch_size: int = 16  # texts per forward pass
    k: int = DEFAULT_K  # length of each ranked list
    dtype: str = "auto"  # model dtype: auto (checkpoint's on GPU, float32 on CPU) or a name
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    device_map: str | None = None  # accelerate's "auto" etc.: layers spread over devices
    include_bos: bool = False  # count position 0 (GLUScope does; it floods top-k with ties)
    refactor_glu: bool = False  # flip neurons with cos(w_gate, w_in) < 0 first (DESIGN.md)
    checkpoint_every: float = 300.0  # seconds between checkpoints when scanning into a folder

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise GatescopeError(f"--batch-size must be at least 1, not {self.batch_size}.")
        if self.k < 1:
            raise GatescopeError(f"--k must be at least 1, not {self.k}.")
        if self.checkpoint_every < 0:
            raise GatescopeError("--checkpoint-every must not be negative.")

    def identity(self) -> dict[str, Any]:
        """The options that determine the result: a resumed scan must share them."""
        options = asdict(self)
        del options["device"], options["device_map"], options["checkpoint_every"]
        return options


def scan(
    model: str | Path | PreTrainedModel,
    corpus: str | Path | datasets.Dataset,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | str | None = None,
    **options: Any,
) -> Atlas:
    """Scans ``corpus`` with ``model`` and returns the atlas of all its gated-MLP neurons.

    Args:
        model: A Hugging Face model id, a local model folder, or a loaded ``PreTrainedModel``
            (used on its own device and dtype; ``refactor_glu`` is undone afterwards).
        corpus: A folder written by ``gatescope corpus`` or any ``datasets.Dataset`` with an
            ``input_ids`` column (BOS first).
        out: Folder to write the atlas into, with checkpoints while scanning. Without it
            nothing is written and the atlas stays in memory.
        resume: Continue the unfinished scan in ``out``.
        overwrite: Replace whatever ``out`` holds.
        progress: Show a progress bar.
        shard: Scan only part ``i/N`` of the corpus (``Shard`` or ``"i/N"``); the atlas is a
            part, for :func:`gatescope.merge.merge_atlases`. Under torchrun (a process group
            of several ranks) every rank scans its own part and the ranks merge at the end.
        **options: Fields of :class:`ScanOptions` (batch_size, k, dtype, device, include_bos,
            refactor_glu, checkpoint_every).
    """
    opts = ScanOptions(**options)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    out = Path(out) if out is not None else None
    with distributed.process_group() as ranks:
        return _scan(model, corpus, opts, shard, ranks, out, resume, overwrite, progress)


def _scan(
    model, corpus, opts: ScanOptions, shard: Shard | None, ranks: distributed.Ranks | None,
    out: Path | None, resume: bool, overwrite: bool, progress: bool,
) -> Atlas:  # fmt: skip
    """The scan, as this process's part of it (the whole of it when ``ranks`` is None)."""
    from gatescope.arch import find_gated_mlps, refactored_glu
    from gatescope.loading import load_model
    from gatescope.stats import NeuronStats, Workspace

    if ranks is not None:
        if shard is not None:
            raise GatescopeError("--shard and torchrun do not mix: under torchrun each rank "
                                 "scans its own part.")  # fmt: skip
        if opts.device_map is not None:
            raise GatescopeError("--device-map and torchrun do not mix: under torchrun each "
                                 "rank holds a whole model on its own GPU.")  # fmt: skip
        shard = Shard(ranks.rank, ranks.world)
    if out is not None:
        # One rank looks at the folder (and clears it with overwrite), then all go on.
        prepare = functools.partial(_prepare_output, out, resume=resume, overwrite=overwrite)
        if distributed.on_rank_zero(ranks, prepare):
            return Atlas.load(out)
    texts = TokenizedCorpus.open(corpus)
    device = opts.device
    if ranks is not None and device in ("auto", "cuda"):
        device = str(ranks.device)  # each rank its own GPU: cuda:LOCAL_RANK
    loaded = load_model(model, dtype=opts.dtype, device=device, device_map=opts.device_map)
    mlps = find_gated_mlps(loaded.model)
    texts.check_fits(loaded.model)
    d_mlps = {mlp.d_mlp for mlp in mlps}
    if len(d_mlps) != 1:
        raise GatescopeError(f"the model's layers have different MLP sizes {sorted(d_mlps)}.")

    stats_dtype = torch.float64 if loaded.dtype == torch.float64 else torch.float32
    workspaces = defaultdict(Workspace)  # one per device: layers take turns
    layers = []
    for mlp in mlps:
        device = _execution_device(mlp)
        layers.append(
            NeuronStats(
                mlp.d_mlp,
                mlp.act_fn,
                k=opts.k,
                device=device,
                dtype=stats_dtype,
                workspace=workspaces[device],
            )
        )
    identity = {
        "model": loaded.name,
        "revision": loaded.revision,
        "corpus": texts.fingerprint,
        "options": opts.identity(),
        "shard": str(shard) if shard else None,
    }
    checkpoint = Checkpoint(out / CHECKPOINT_DIR, identity, shard) if out is not None else None
    own_texts = shard.texts(texts.lengths) if shard else None
    if own_texts is not None and len(own_texts) == 0:
        raise GatescopeError(f"shard {shard} has no texts: the corpus has only "
                             f"{len(texts.lengths)}; use fewer shards.")  # fmt: skip
    batches = texts.batches(opts.batch_size, own_texts)
    start = checkpoint.restore(layers) if (checkpoint and resume) else 0

    started = time.perf_counter()
    refactor = refactored_glu(mlps) if opts.refactor_glu else contextlib.nullcontext(0)
    with refactor as flipped, _capture(mlps, layers) as feed, _StopOnInterrupt() as interrupt:
        bar = _progress(texts, batches, start, enabled=progress and not (ranks and ranks.rank))
        last_save = time.monotonic()
        for done in range(start, len(batches)):
            indices = batches[done]
            input_ids, attention_mask = texts.batch(indices, device=loaded.device)
            feed.set(torch.as_tensor(indices), _counted(attention_mask, opts.include_bos))
            loaded.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
            bar.update(int(attention_mask.sum()))
            if done + 1 == len(batches):
                break
            if checkpoint and (
                interrupt.requested or time.monotonic() - last_save >= opts.checkpoint_every
            ):
                checkpoint.save(layers, done + 1)
                last_save = time.monotonic()
            if interrupt.requested:
                bar.close()
                saved = f"; {done + 1} of {len(batches)} batches are saved" if out else ""
                hint = f" (continue with --out {out} --resume)" if out else ""
                raise GatescopeError(f"the scan was interrupted{saved}{hint}.")
        bar.close()
    if ranks is not None:
        layers = distributed.gather_merged(ranks, layers)

    meta = {
        "model": {
            "name": loaded.name,
            "revision": loaded.revision,
            "class": type(loaded.model).__name__,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "act": type(mlps[0].act_fn).__name__,
        },
        "corpus": texts.describe(),
        "options": {**opts.identity(), "refactored_neurons": int(flipped)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scan_seconds": round(time.perf_counter() - started, 3),
    }
    if shard is not None and ranks is None:
        meta["shards"] = {"count": shard.count, "parts": [shard.index]}
    atlas = Atlas.from_stats(layers, meta)
    if atlas.tokens == 0:
        raise GatescopeError(
            "the corpus has no tokens to count: every text is only its BOS token "
            "(use longer texts or --include-bos)."
        )
    if out is not None:
        if ranks is None or ranks.rank == 0:
            atlas.save(out, overwrite=True)
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        distributed.barrier(ranks)
        atlas = Atlas.load(out)
    return atlas


def _execution_device(mlp) -> torch.device:
    """Where a layer's statistics live: on its weights' device. A layer that accelerate
    offloads to disk has its weights on "meta" until it runs; it computes on the first GPU."""
    device = mlp.down_proj.weight.device
    if device.type == "meta":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return device


def _counted(attention_mask: torch.Tensor, include_bos: bool) -> torch.Tensor:
    """[batch, pos] bool: the tokens that enter the statistics."""
    counted = attention_mask.bool()
    if not include_bos:
        counted[:, 0] = False
    return counted


def _prepare_output(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Checks what ``out`` holds; True if ``resume`` finds the scan finished."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise GatescopeError(f"{out} exists and is not a folder.")
    if overwrite:
        (out / ATLAS_JSON).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        return False
    if (out / ATLAS_JSON).exists():
        if resume:
            logger.info("%s already holds the finished atlas", out)
            return True
        raise GatescopeError(f"{out} already holds an atlas: pass --overwrite to replace it.")
    if (out / CHECKPOINT_DIR).exists():
        if resume:
            return False
        raise GatescopeError(
            f"{out} holds an unfinished scan: pass --resume to continue it or --overwrite "
            "to start over."
        )
    if any(out.iterdir()):
        raise GatescopeError(
            f"{out} exists and is not empty: choose a new folder or pass --overwrite."
        )
    return False


class TokenizedCorpus:
    """The texts of a corpus, their lengths, and padded batches of them."""

    def __init__(self, dataset: datasets.Dataset, path: Path | None):
        self.dataset = dataset
        self.path = path
        column = dataset.data.column(INPUT_IDS)  # memory-mapped Arrow, no Python lists
        self.lengths = np.concatenate(
            [np.diff(chunk.offsets.to_numpy()) for chunk in column.chunks] or [np.zeros(0, int)]
        ).astype(np.int64)
        self.max_id = _max_token_id(column)
        if len(self.lengths) == 0 or self.lengths.sum() == 0:
            raise GatescopeError("the corpus is empty: it has no tokenized texts.")
        self._fingerprint: str | None = None

    @classmethod
    def open(cls, corpus: str | Path | datasets.Dataset) -> TokenizedCorpus:
        import datasets

        from gatescope.corpus import load_corpus

        if isinstance(corpus, datasets.Dataset):
            if INPUT_IDS not in corpus.column_names:
                raise GatescopeError(f"the dataset has no '{INPUT_IDS}' column.")
            if corpus._indices is not None:  # a select()/shuffle() view: materialize its rows
                corpus = corpus.flatten_indices(keep_in_memory=True)
            return cls(corpus, None)
        return cls(load_corpus(corpus), Path(corpus))

    @property
    def fingerprint(self) -> str:
        from gatescope.corpus import fingerprint

        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.dataset)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        from gatescope.corpus import corpus_metadata

        return {
            "path": str(self.path.resolve()) if self.path else None,
            "fingerprint": self.fingerprint,
            "texts": len(self.lengths),
            "tokens": int(self.lengths.sum()),
            "metadata": corpus_metadata(self.path) if self.path else {},
        }

    def check_fits(self, model: PreTrainedModel) -> None:
        """Refuses token ids outside the model's vocabulary and texts beyond its context."""
        vocab = model.get_input_embeddings().num_embeddings
        if self.max_id >= vocab:
            raise GatescopeError(
                f"the corpus has token id {self.max_id} but the model's vocabulary has {vocab} "
                "tokens: build the corpus with this model's tokenizer."
            )
        context = getattr(model.config, "max_position_embeddings", None)
        longest = int(self.lengths.max())
        if context is not None and longest > context:
            raise GatescopeError(
                f"the corpus has a text of {longest} tokens but the model's context is "
                f"{context}: rebuild the corpus with --max-length {context} or less."
            )

    def batches(self, batch_size: int, texts: np.ndarray | None = None) -> list[np.ndarray]:
        """Text indices per batch: longest texts first, a stable order (resume relies on it).

        ``texts``: only these texts (a shard's); all by default.
        """
        texts = np.arange(len(self.lengths)) if texts is None else texts
        order = texts[np.argsort(-self.lengths[texts], kind="stable")]
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def batch(self, indices: np.ndarray, device: torch.device):
        """Right-padded ``input_ids`` and ``attention_mask`` [batch, longest] of some texts."""
        rows = self.dataset[indices.tolist()][INPUT_IDS]
        longest = max(len(row) for row in rows)
        input_ids = torch.zeros(len(rows), longest, dtype=torch.int64)
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.as_tensor(row)
            attention_mask[i, : len(row)] = 1
        return input_ids.to(device), attention_mask.to(device)


def _max_token_id(column) -> int:
    import pyarrow.compute as pc

    values = pc.list_flatten(column)
    return int(pc.max(values).as_py() or 0) if len(values) else 0


class _Feed:
    """Hands the current batch's text indices and counted-token mask to the hooks."""

    def __init__(self) -> None:
        self.text_index: torch.Tensor | None = None
        self.counted: torch.Tensor | None = None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def set(self, text_index: torch.Tensor, counted: torch.Tensor) -> None:
        self.text_index, self.counted = text_index, counted
        self._on_device = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's tensors on ``device`` (copied once per batch and device)."""
        if device not in self._on_device:
            self._on_device[device] = (self.text_index.to(device), self.counted.to(device))
        return self._on_device[device]


@contextlib.contextmanager
def _capture(mlps, layers: list[NeuronStats]) -> Iterator[_Feed]:
    """Hooks every gated MLP so that each forward updates its layer's statistics."""
    feed = _Feed()

    def updater(stats: NeuronStats):
        def update(gate: torch.Tensor, up: torch.Tensor) -> None:
            text_index, counted = feed.on(stats.device)
            # A no-op, except for layers accelerate offloads (they run elsewhere).
            gate, up = gate.to(stats.device), up.to(stats.device)
            stats.update(gate, up, text_index, counted)

        return update

    handles = [mlp.capture(updater(stats)) for mlp, stats in zip(mlps, layers, strict=True)]
    try:
        with torch.inference_mode():
            yield feed
    finally:
        for handle in handles:
            handle.remove()


class Checkpoint:
    """A scan's saved progress: every layer's state after a number of whole batches.

    One safetensors file, written to a temporary name and renamed, so a kill at any moment
    leaves either the previous checkpoint or the new one.
    """

    def __init__(self, folder: Path, identity: dict[str, Any], shard: Shard | None = None):
        self.folder = folder
        self.identity = identity
        # Ranks of one torchrun scan share the folder: one file each.
        self.file = (
            f"shard-{shard.index}-of-{shard.count}.safetensors" if shard else CHECKPOINT_FILE
        )

    def save(self, layers: list[NeuronStats], batches_done: int) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{i}.{name}": tensor.detach().cpu().contiguous()
            for i, stats in enumerate(layers)
            for name, tensor in stats.state_dict().items()
        }
        metadata = {"batches_done": str(batches_done), "identity": json.dumps(self.identity)}
        tmp = self.folder / (self.file + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, self.folder / self.file)
        logger.info("checkpoint: %d batches done", batches_done)

    def restore(self, layers: list[NeuronStats]) -> int:
        """Loads the saved state into ``layers``; returns the number of batches done."""
        from safetensors import safe_open

        path = self.folder / self.file
        if not path.exists():
            return 0
        with safe_open(str(path), framework="pt") as saved:
            metadata = saved.metadata()
            if json.loads(metadata["identity"]) != self.identity:
                raise GatescopeError(
                    f"the unfinished scan in {self.folder.parent} used another model, corpus or "
                    "options: resume it with the same ones, or pass --overwrite to start over."
                )
            for i, stats in enumerate(layers):
                names = stats.state_dict().keys()
                stats.load_state_dict({name: saved.get_tensor(f"{i}.{name}") for name in names})
            return int(metadata["batches_done"])


class _StopOnInterrupt:
    """Turns the first Ctrl-C into a request to stop at the next batch boundary.

    The statistics are only consistent between batches, so that is where the scan saves its
    checkpoint and stops. A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stopping after this batch (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _progress(texts: TokenizedCorpus, batches: list[np.ndarray], start: int, *, enabled: bool):
    from tqdm.auto import tqdm

    done = int(sum(texts.lengths[b].sum() for b in batches[:start]))
    return tqdm(
        total=int(sum(texts.lengths[b].sum() for b in batches)),
        initial=done,
        unit="tok",
        unit_scale=True,
        desc="scan",
        disable=not enabled,
        dynamic_ncols=True,
    )
