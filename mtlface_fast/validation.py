"""Argument checks shared by the reference and the fast model: clear errors before any compute.

Value checks (images finite and normalized, target groups in range) read tensor contents. On CPU tensors
they raise a ``ValueError`` at once. On CUDA (and other accelerator) tensors reading a value back would
stall the stream on every call, so they run as device-side assertions (``torch._assert_async``): no host
synchronization; a violation aborts the next CUDA synchronization with the check's message (a device-side
assert, after which the CUDA context is unusable: the process must restart), never a silent wrong answer.
``MTLFACE_FAST_SYNC_CHECKS=1`` makes them immediate ``ValueError``s on every device (a host sync per call,
for debugging). Under ``torch.compile`` / ``torch.export`` the value checks are skipped.
"""
from __future__ import annotations

import numbers
import os

import torch

# Normalized images lie in [-1, 1] ((x / 255 - 0.5) / 0.5, as preprocess() computes). Values beyond this
# magnitude mean un-normalized input ([0, 255] floats) or garbage (1e38 overflows to inf inside the trunk).
# The margin is wide on purpose: N(0, 1) test inputs and slightly overshooting resized or generated images pass.
IMAGE_VALUE_LIMIT = 8.0
SYNC_CHECKS_ENV = "MTLFACE_FAST_SYNC_CHECKS"


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def immediate_checks(tensor: torch.Tensor) -> bool:
    """Whether value checks on ``tensor`` may read it on the host (CPU tensors, or MTLFACE_FAST_SYNC_CHECKS=1).

    A tensor that says ``is_cuda`` takes the device-side branch whatever its ``device`` reports; so does a
    CUDA tensor while a CUDA graph is being captured (a host read cannot be captured).
    """
    if tensor.device.type == "cpu" and not tensor.is_cuda:
        return True
    if os.environ.get(SYNC_CHECKS_ENV, "0") in ("", "0"):
        return False
    return not (tensor.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_image_values(images: torch.Tensor, name: str = "images", *, immediate: bool) -> None:
    """Finite and within +-IMAGE_VALUE_LIMIT: one min/max reduction (NaN propagates through it).

    ``immediate``: raise a ValueError now (reads two values on the host), else a device-side assertion.
    """
    lo, hi = torch.aminmax(images.detach())
    ok = (lo >= -IMAGE_VALUE_LIMIT) & (hi <= IMAGE_VALUE_LIMIT)  # False for NaN and +-inf too
    hint = (f"{name} must be normalized to [-1, 1] ((x / 255 - 0.5) / 0.5, as mtlface_fast.preprocess() does); "
            f"values beyond +-{IMAGE_VALUE_LIMIT:g} are rejected")
    if not immediate:
        torch._assert_async(ok, f"{name} contains NaN, infinite or un-normalized values; {hint}")
        return
    if not bool(ok):
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        raise ValueError(f"{name} holds values in [{float(lo):.4g}, {float(hi):.4g}], far outside [-1, 1] "
                         f"([0, 255] pixels?); {hint}")


def check_images(images, *, input_size: int, device: torch.device, dtype: torch.dtype,
                 name: str = "images", check_finite: bool = True,
                 module: "torch.nn.Module | None" = None) -> torch.Tensor:
    """Validate a batch of normalized images (B, 3, input_size, input_size) for a model on ``device``.

    ``check_finite``: also check the values (finite, within +-IMAGE_VALUE_LIMIT; see the module docstring).
    ``module``: the model the batch goes through; a batch of 1 in train mode is refused (:func:`check_train_batch`).
    Values inside the accepted range are not judged further: a [0, 1] batch that was never normalized passes
    (it is a valid input, only darker); normalize with ``(x - 0.5) / 0.5`` or use ``mtlface_fast.preprocess``.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 3, {input_size}, {input_size}), "
                        f"got {type(images).__name__}; use mtlface_fast.preprocess() for images and paths")
    if images.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.size(1) != 3:
        raise ValueError(f"{name} must have 3 channels in dim 1 (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.size(0) == 0:
        raise ValueError(f"{name} must hold at least one image, got an empty batch")
    if tuple(images.shape[2:]) != (input_size, input_size):
        raise ValueError(f"{name} must be {input_size}x{input_size} (the model's input_size), got "
                         f"{images.size(2)}x{images.size(3)}; mtlface_fast.preprocess() resizes")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor normalized to [-1, 1], got dtype {images.dtype}; "
                        f"mtlface_fast.preprocess() converts uint8 images")
    if images.device != device:
        raise ValueError(f"{name} is on {images.device} but the model is on {device}; move one of them")
    if images.dtype != dtype and not torch.is_autocast_enabled(device.type):
        raise TypeError(f"{name} has dtype {images.dtype} but the model's parameters are {dtype}; "
                        f"cast the images or the model, or run under torch.autocast")
    if check_finite and not _is_compiling():
        check_image_values(images, name, immediate=immediate_checks(images))
    if module is not None:
        check_train_batch(images, module, name)
    return images


def check_group_values(groups: torch.Tensor, age_group: int, name: str = "target_group", *,
                       immediate: bool) -> None:
    """Every value of the integer tensor ``groups`` in [0, age_group): a ValueError now, or a device assertion."""
    if not immediate:
        torch._assert_async(((groups >= 0) & (groups < age_group)).all(),
                            f"{name} values must be in [0, {age_group})")
        return
    lo, hi = int(groups.min()), int(groups.max())
    if lo < 0 or hi >= age_group:
        raise ValueError(f"{name} values must be in [0, {age_group}), got values in [{lo}, {hi}]")


def check_target_group(target_group, *, batch: int, age_group: int, device: torch.device,
                       name: str = "target_group") -> torch.Tensor:
    """An int (numpy integers too) or an integer tensor of shape () / (B,) with values in [0, age_group)
    -> LongTensor (B,) on ``device``."""
    if isinstance(target_group, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(target_group, numbers.Integral):
        target_group = int(target_group)
        if not 0 <= target_group < age_group:
            raise ValueError(f"{name} must be in [0, {age_group}), got {target_group}")
        return torch.full((batch,), target_group, dtype=torch.long, device=device)
    if not isinstance(target_group, torch.Tensor):
        raise TypeError(f"{name} must be an int or a LongTensor of shape ({batch},), "
                        f"got {type(target_group).__name__}")
    if target_group.is_floating_point() or target_group.is_complex() or target_group.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {target_group.dtype}")
    if target_group.dim() == 0:
        target_group = target_group.expand(batch)
    if target_group.dim() != 1 or target_group.size(0) != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {tuple(target_group.shape)}")
    if target_group.device.type not in (torch.device(device).type, "cpu"):
        raise ValueError(f"{name} is on {target_group.device} but the model is on {device}; pass an int, or a "
                         f"tensor on {device} or on the CPU")
    if not _is_compiling():
        check_group_values(target_group, age_group, name, immediate=immediate_checks(target_group))
    return target_group.to(device=device, dtype=torch.long)


def check_device(device, name: str = "device"):
    """``device`` (None, a string or a torch.device) as a torch.device that this machine has, or None.

    A malformed string, or an accelerator that is not available (``"cuda"`` on a machine without CUDA),
    raises a ValueError that names ``name`` (torch's own messages are an AssertionError deep in a copy).
    """
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name} must be a device name such as 'cpu' or 'cuda', or a torch.device, "
                        f"got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{name} {device!r} is not a device name such as 'cpu', 'cuda' or 'cuda:1' "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if dev.type in ("cpu", "meta"):
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is not None and not available():
        raise ValueError(f"{name} {str(dev)!r} was requested but {dev.type.upper()} is not available on this "
                         f"machine; use 'cpu'")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ValueError(f"{name} {str(dev)!r} was requested but this machine has {count()} {dev.type} device(s)")
    return dev


def check_train_batch(images: torch.Tensor, module: torch.nn.Module, name: str = "images") -> None:
    """A batch of one sample through a module whose BatchNorm1d layers are in train mode (the embedding layer's)
    cannot be normalized by its own statistics: refuse it with a message that says so (BatchNorm's own says
    "Expected more than 1 value per channel"). Free for every other call: only B == 1 on a model in train mode
    looks at the modules (``model.eval()`` puts every module in eval mode)."""
    if images.dim() == 0 or images.size(0) != 1 or not module.training or _is_compiling():
        return
    if any(isinstance(m, torch.nn.BatchNorm1d) and m.training for m in module.modules()):
        raise ValueError(f"{name} is a batch of 1, but the model is in train mode: its BatchNorm1d layers "
                         f"normalize with the batch's own statistics and need at least 2 samples; train with "
                         f"batches of 2 or more, or call model.eval() for inference")


def check_generator(generator, name: str = "generator") -> None:
    """``generator`` is None or a ``torch.Generator`` (for ``noise="random"``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator (for noise='random') or None, "
                        f"got {type(generator).__name__}")


def check_noise_maps(noise, shapes, device: torch.device, name: str = "noise") -> list:
    """An explicit list of per-layer generator noise maps, checked against ``shapes`` ((B, 1, r, r) per layer):
    each entry None (a fresh draw in that layer) or a floating tensor of shape (B, 1, r, r) or (1, 1, r, r)
    (broadcast over the batch) on ``device``. Returns the list."""
    if isinstance(noise, torch.Tensor) or not isinstance(noise, (list, tuple)):
        raise TypeError(f"{name} must be 'stored', 'random' or a list of {len(shapes)} tensors (one per generator "
                        f"layer, shapes {[tuple(s) for s in shapes]}), got {type(noise).__name__}")
    noise = list(noise)
    if len(noise) != len(shapes):
        raise ValueError(f"{name} must hold {len(shapes)} tensors (one per generator layer), got {len(noise)}")
    for i, (t, shape) in enumerate(zip(noise, shapes)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating tensor of shape {tuple(shape)} or None, "
                            f"got {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        one = (1,) + tuple(shape[1:])
        if tuple(t.shape) not in (tuple(shape), one):
            raise ValueError(f"{name}[{i}] must have shape {tuple(shape)} (or {one}, shared by the batch), "
                             f"got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but the model is on {device}; move it")
    return noise
