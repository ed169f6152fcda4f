"""How a scan runs: :class:`ScanOptions`, the one definition of every scan option.

The Python API (``gatescope.scan(model, corpus, options)``) and the command line
(``gatescope scan --batch-size ...``) both take their choices, defaults and help texts from
here. Torch-free, so that ``gatescope --help`` stays instant.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from gatescope.constants import DEFAULT_K
from gatescope.errors import GatescopeError

__all__ = ["DEVICE_MAPS", "DTYPES", "STATS_BACKENDS", "ScanOptions"]

#: Model dtypes: ``auto`` keeps the checkpoint's on a GPU and uses float32 on a CPU.
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16", "float64")

#: accelerate's strategies for spreading a model's layers over several devices.
DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")

#: The statistics passes: ``auto`` is triton on CUDA (when importable), numba on a CPU,
#: torch otherwise. They compute the same numbers.
STATS_BACKENDS: tuple[str, ...] = ("auto", "triton", "numba", "torch")

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _option(default: Any, help: str) -> Any:
    """A field with its command-line help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ScanOptions:
    """The options of a scan. Those that change the result (``k``, ``include_bos``,
    ``refactor_glu``, ``distributions``, ``seed`` and the dtype, as the model's resolved
    dtype) are recorded in the atlas
    and are part of the run's identity (:class:`gatescope.records.RunIdentity`): a resume
    or a merge must share them. ``batch_size`` is recorded too; where the scan ran
    (``device``, ``device_map``) and ``checkpoint_every`` are not."""

    batch_size: int = _option(16, "Texts per forward pass.")
    k: int = _option(DEFAULT_K, "Texts kept per case and quantity.")
    dtype: str = _option("auto", "Model dtype; auto = the checkpoint's on a GPU, float32 on a CPU.")
    device: str = _option("auto", "auto, cpu, cuda or cuda:N.")
    device_map: str | None = _option(
        None,
        "Spread a model too large for one GPU over all GPUs (and the CPU); needs accelerate.",
    )
    include_bos: bool = _option(
        False, "Count position 0 too (as GLUScope does; it floods top lists with ties)."
    )
    refactor_glu: bool = _option(
        False,
        "Flip neurons with cos(w_gate, w_in) < 0 first (same function; docs/architecture.md).",
    )
    distributions: bool = _option(
        True,
        "Collect per-case histograms, the joint (x_gate, x_in) histogram and typical examples.",
    )
    seed: int = _option(0, "Seed of the typical examples' draw.")
    stats_backend: str = _option(
        "auto", "Statistics pass: auto (triton on CUDA, numba on a CPU), triton, numba or torch."
    )
    checkpoint_every: float = _option(300.0, "Seconds between checkpoints.")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise GatescopeError(f"--batch-size must be at least 1, not {self.batch_size}.")
        if self.k < 1:
            raise GatescopeError(f"--k must be at least 1, not {self.k}.")
        if not 0 <= self.seed < 2**32:
            raise GatescopeError(f"--seed must be in 0 to 2**32 - 1, not {self.seed}.")
        if self.checkpoint_every < 0:
            raise GatescopeError("--checkpoint-every must not be negative.")
        if self.stats_backend not in STATS_BACKENDS:
            raise GatescopeError(
                f"--stats-backend must be one of {', '.join(STATS_BACKENDS)}, "
                f"not '{self.stats_backend}'."
            )
        if self.dtype not in DTYPES:
            raise GatescopeError(f"--dtype must be one of {', '.join(DTYPES)}, not '{self.dtype}'.")
        if not _DEVICE.fullmatch(self.device):
            raise GatescopeError(
                f"--device must be auto, cpu, cuda or cuda:N, not '{self.device}'."
            )
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise GatescopeError(
                f"--device-map must be one of {', '.join(DEVICE_MAPS)}, not '{self.device_map}'."
            )

    @classmethod
    def of(cls, options: ScanOptions | None = None, **changes: Any) -> ScanOptions:
        """``options`` (the defaults if None) with ``changes``; an unknown name is refused
        with a sentence that lists the known ones."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise GatescopeError(
                f"unknown scan option {unknown[0]!r}: the options are {', '.join(names)}."
            )
        return replace(options or cls(), **changes)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default value of option ``name``."""
        value = cls.__dataclass_fields__[name].default
        assert value is not MISSING
        return value

    @classmethod
    def help(cls, name: str) -> str:
        """The one-line help text of option ``name``."""
        return str(cls.__dataclass_fields__[name].metadata["help"])
