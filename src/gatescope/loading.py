"""Loading a Hugging Face causal LM for analysis: device, dtype and clear errors.

Two steps, so that a run is checked before its weights load: :func:`resolve_model` reads
only the config (the model's name, revision and the dtype it will run in), and
:meth:`ModelSpec.load` loads the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gatescope.errors import GatescopeError
from gatescope.options import DEVICE_MAPS, DTYPES

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger: logging.Logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GatescopeError(f"--device {device} was asked for, but PyTorch sees no GPU here.")
    return torch.device(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, without the host waiting for the GPU: a plain copy from the
    CPU to CUDA synchronises the stream (once per batch in a scan); a copy from pinned
    memory does not (torch's host allocator keeps the pinned block until it is done)."""
    if tensor.device.type != "cpu" or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def resolve_dtype(
    dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None
) -> torch.dtype:
    """The dtype to run the model in.

    ``auto`` keeps the checkpoint's own dtype on a GPU; on a CPU it is float32, because
    bfloat16/float16 matrix products are slow (or missing) there.
    """
    if dtype not in DTYPES:
        raise GatescopeError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'.")
    if dtype != "auto":
        resolved: torch.dtype = getattr(torch, dtype)
        return resolved
    if device.type == "cpu" or checkpoint_dtype is None:
        return torch.float32
    return checkpoint_dtype


@dataclass
class LoadedModel:
    """A model ready for analysis and how it was obtained (recorded in atlases)."""

    model: PreTrainedModel
    name: str  # hub id or local path (absolute), as recorded
    revision: str | None  # the checkpoint's commit hash, where known

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


@dataclass(frozen=True)
class ModelSpec:
    """A model to load, resolved from its config alone: what a run records of it is known
    before any weight is read."""

    name: str  # hub id or absolute local path
    revision: str | None  # the checkpoint's commit hash, where known
    dtype: torch.dtype  # what it will run in
    device: torch.device  # where it goes (the first device under a device map)
    placement: dict[str, Any]  # from_pretrained's placement arguments
    loaded: PreTrainedModel | None = None  # a model given already loaded

    def load(self) -> LoadedModel:
        """The model in eval mode, its weights loaded straight onto their device."""
        from transformers import AutoModelForCausalLM

        if self.loaded is not None:
            return LoadedModel(self.loaded.eval(), self.name, self.revision)
        logger.info("loading %s as %s on %s", self.name, self.dtype, self.device)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.name, **_dtype_kwarg(self.dtype), **self.placement
            )
        except (OSError, ValueError, KeyError) as error:
            raise GatescopeError(
                f"could not load the model '{self.name}': {_first_line(error)}"
            ) from error
        if not self.placement:
            # transformers wraps `to` in functools.wraps, which hides its bound `self` from
            # type checkers (they take the device for `self`).
            model = model.to(self.device)  # pyright: ignore[reportArgumentType]
        return LoadedModel(model.eval(), self.name, self.revision)


def resolve_model(
    model: str | Path | PreTrainedModel,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
) -> ModelSpec:
    """Reads ``model``'s config (hub id, local folder, or an already loaded
    ``PreTrainedModel``, whose device and dtype are kept) and decides how to load it.

    ``device_map`` (one of :data:`~gatescope.options.DEVICE_MAPS`, needs accelerate)
    spreads the layers over all GPUs (and the CPU) instead of putting the model on
    ``device``.
    """
    from transformers import AutoConfig, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        revision = getattr(model.config, "_commit_hash", None)
        first = next(model.parameters())
        return ModelSpec(str(name), revision, first.dtype, first.device, {}, loaded=model)

    # A local folder is recorded absolute, so that pages can find it from anywhere.
    name = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
    target = resolve_device(device)
    placement = _placement(device_map, target)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise GatescopeError(
            f"could not load the model config of '{name}' ({_first_line(error)}): give a local "
            "model folder or a Hugging Face model id that is available offline."
        ) from error
    checkpoint_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = getattr(torch, checkpoint_dtype, None)
    first_device = target if device_map is None else resolve_device("auto")
    run_dtype = resolve_dtype(dtype, first_device, checkpoint_dtype)
    revision = getattr(config, "_commit_hash", None)
    return ModelSpec(name, revision, run_dtype, first_device, placement)


def load_model(
    model: str | Path | PreTrainedModel,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
) -> LoadedModel:
    """:func:`resolve_model`, then :meth:`ModelSpec.load`."""
    return resolve_model(model, dtype=dtype, device=device, device_map=device_map).load()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as atlases record it."""
    return str(dtype).removeprefix("torch.")


def _placement(device_map: str | None, target: torch.device) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments: a strategy of accelerate, or loading
    straight onto a GPU (transformers 5 does that itself; 4.x needs accelerate)."""
    import importlib.util

    import transformers

    has_accelerate = importlib.util.find_spec("accelerate") is not None
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise GatescopeError(
                f"--device-map must be one of {', '.join(DEVICE_MAPS)}, not '{device_map}'."
            )
        if not has_accelerate:
            raise GatescopeError(
                f"--device-map {device_map} needs accelerate: pip install accelerate."
            )
        return {"device_map": device_map}
    if target.type != "cpu" and (
        has_accelerate or int(transformers.__version__.split(".")[0]) >= 5
    ):
        return {"device_map": str(target)}
    return {}


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 5 (and 4.56+) call it ``dtype``; older 4.x ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("4.56")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
