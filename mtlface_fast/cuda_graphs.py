"""CUDA graphs of the public entry points, one per batch bucket: :meth:`mtlface_fast.MTLFace.cuda_graphs`.

:class:`GraphedMTLFace` replays the model's own eager methods (``forward``, ``encode``, ``synthesize``,
``synthesize_all_ages``) as ``torch.cuda.CUDAGraph`` captures. A call of batch B runs the capture of the
smallest bucket >= B: the images are copied into that bucket's static buffer (the rows past B zeroed), the graph
is replayed and the first B rows of its outputs are cloned. Each (entry point, bucket, options) is captured once,
at its first use; every capture allocates from one shared memory pool. The capture step is a *recorder*
(:class:`CudaGraphRecorder`); :class:`EagerRecorder` replays by running the function again on the static buffers
and writing into the static outputs, which gives the same semantics without a GPU (tests on CPU).
"""
from __future__ import annotations

import bisect
import numbers
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .errors import UsageError
from .precision import autocast, to_dtype
from .reference.model import MTLFace as ReferenceMTLFace
from .reference.model import check_flip, check_groups_per_call
from .validation import check_target_group

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
ENTRIES = ("forward", "encode", "synthesize", "synthesize_all_ages")
SYNTHESIS_ENTRIES = ("synthesize", "synthesize_all_ages")

__all__ = ["CaptureKey", "CaptureMemory", "CudaGraphRecorder", "EagerRecorder", "GraphedMTLFace",
           "check_batch_sizes"]


class CaptureKey(NamedTuple):
    """What one capture replays: the entry point, the bucket (its batch) and the options baked into it, as
    ``(name, value)`` pairs (``(("flip", True),)``, ``(("groups_per_call", 7),)``, or ``()``)."""
    entry: str
    batch: int
    options: Tuple[Tuple[str, Any], ...] = ()


class CaptureMemory(NamedTuple):
    """Growth of ``torch.cuda.memory_reserved()`` / ``memory_allocated()`` across one capture, in bytes."""
    reserved: int
    allocated: int


class Recording(NamedTuple):
    """What a recorder returns: the static outputs, the replay callable, the memory the capture took."""
    outputs: Any
    replay: Callable[[], None]
    memory: CaptureMemory
    graph: Any = None


def check_batch_sizes(batch_sizes) -> Tuple[int, ...]:
    """``batch_sizes`` (an int or a non-empty sequence of positive ints) sorted, duplicates dropped."""
    if isinstance(batch_sizes, numbers.Integral) and not isinstance(batch_sizes, bool):
        batch_sizes = (batch_sizes,)
    if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__iter__"):
        raise ValueError(f"batch_sizes must be a sequence of positive ints (the batch buckets), "
                         f"got {batch_sizes!r}")
    sizes = list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes must hold at least one batch size, got an empty sequence")
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ValueError(f"batch_sizes must hold positive ints, got {b!r} in {batch_sizes!r}")
    return tuple(sorted({int(b) for b in sizes}))


def _tensors(outputs) -> List[torch.Tensor]:
    return list(outputs) if isinstance(outputs, tuple) else [outputs]


def _map(fn, outputs):
    """``fn`` on each tensor of an output (a tensor or a NamedTuple of tensors such as EncodeResult)."""
    if isinstance(outputs, tuple):
        return type(outputs)(*(fn(t) for t in outputs))
    return fn(outputs)


def _cat(parts: List[Any]):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return type(parts[0])(*(torch.cat(ts, dim=0) for ts in zip(*parts)))
    return torch.cat(parts, dim=0)


# -- recorders ---------------------------------------------------------------------------------------------
class CudaGraphRecorder:
    """Captures with ``torch.cuda.CUDAGraph``, as the PyTorch docs prescribe: ``warmup`` eager runs on a side
    stream (which also builds the layers' cached derived weights outside the graph), then one capture into the
    shared pool (:func:`torch.cuda.graph_pool_handle`)."""

    warmup = 3

    def __init__(self):
        self._streams: Dict[torch.device, torch.cuda.Stream] = {}

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            hint = "" if torch.cuda.is_available() else " (CUDA is not available on this machine)"
            raise UsageError(f"cuda_graphs needs the model on a CUDA device, but its parameters are on {device}; "
                             f"move it first (model.cuda()){hint}")

    def check_model(self, model: torch.nn.Module, entry: str) -> None:
        """Refuse what cannot be captured before trying: the PyTorch ICM reads the group counts on the host."""
        if entry not in SYNTHESIS_ENTRIES:
            return
        from .layers import CompactICM

        for name, m in model.named_modules():
            if isinstance(m, CompactICM) and m.implementation() != "triton":
                raise UsageError(f"{entry} cannot be captured as a CUDA graph: the ICM ({name}) runs the "
                                 f"{m.implementation()!r} implementation, which reads the per-group counts on "
                                 f"the host; use backend 'auto' or 'triton' (triton installed), or call the model "
                                 f"itself")

    def new_pool(self, device: torch.device):
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    def memory(self, device: torch.device) -> CaptureMemory:
        return CaptureMemory(torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))

    def record(self, fn: Callable[[], Any], pool, device: torch.device) -> Recording:
        with torch.cuda.device(device):
            current = torch.cuda.current_stream()
            side = self._streams.get(device)
            if side is None:
                side = self._streams[device] = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn()
            current.wait_stream(side)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # torch.cuda.graph empties the cache on entry: measure from there
            before = self.memory(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = fn()
            after = self.memory(device)
        return Recording(outputs, graph.replay,
                         CaptureMemory(after.reserved - before.reserved, after.allocated - before.allocated), graph)


class EagerRecorder:
    """A recorder without CUDA (any device): "capture" runs the function once and keeps its outputs as the
    static outputs; "replay" runs it again on the static buffers and copies the results into those outputs, so
    outputs are overwritten in place as a graph replay overwrites its pool memory. ``memory`` reports the bytes
    of the static outputs. Counts what it did: ``captures`` (the pool of each), ``replays``."""

    def __init__(self):
        self.captures: List[Any] = []   # the pool each capture used, in order
        self.replays = 0
        self.pools = 0

    def check_device(self, device: torch.device) -> None:
        pass

    def check_model(self, model: torch.nn.Module, entry: str) -> None:
        pass

    def new_pool(self, device: torch.device):
        self.pools += 1
        return ("eager pool", self.pools)

    def record(self, fn: Callable[[], Any], pool, device: torch.device) -> Recording:
        outputs = fn()
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(outputs))

        def replay():
            self.replays += 1
            for static, fresh in zip(_tensors(outputs), _tensors(fn())):
                static.copy_(fresh)

        self.captures.append(pool)
        return Recording(outputs, replay, CaptureMemory(nbytes, nbytes))


# -- the graphed model -------------------------------------------------------------------------------------
class _Buffers:
    """The static inputs of one bucket, shared by every capture of that bucket (replays never overlap)."""

    def __init__(self, bucket: int, input_size: int, device: torch.device, dtype: torch.dtype):
        self.images = torch.zeros(bucket, 3, input_size, input_size, device=device, dtype=dtype)
        self.groups = torch.zeros(bucket, device=device, dtype=torch.long)
        self.images_used = self.groups_used = 0  # rows that may hold data past the zero padding

    def load(self, images: torch.Tensor, groups: Optional[torch.Tensor]) -> None:
        n = images.size(0)
        self.images[:n].copy_(images)
        if n < self.images_used:
            self.images[n:self.images_used].zero_()
        self.images_used = n
        if groups is not None:
            self.groups[:n].copy_(groups)
            if n < self.groups_used:
                self.groups[n:self.groups_used].zero_()
            self.groups_used = n


class GraphedMTLFace:
    """CUDA-graph replays of an MTLFace's public entry points, one capture per batch bucket (inference only).

    Made by ``model.cuda_graphs(batch_sizes=(1, 8, 64, 256), dtype=None)``; the model must be on CUDA.
    ``forward(images)``, ``encode(images, flip=None)``, ``synthesize(images, target_group)`` and
    ``synthesize_all_ages(images, groups_per_call=None)`` return what the model's eager methods return in eval
    mode (same types; the same values up to round-off: every result is per sample) for any batch B:

    * B runs as the smallest bucket >= B: the images go into the bucket's static buffer (zero images after
      them; target groups padded with 0), the capture is replayed and the first B rows of its outputs are
      cloned (the outputs live in the shared pool, which the next replay may overwrite). A batch above the
      largest bucket runs in chunks of the largest bucket (the last chunk in its own bucket).
    * Each (entry point, bucket, options: ``flip``, ``groups_per_call``) is captured at its first use:
      eager warm-up on a side stream, then ``torch.cuda.CUDAGraph`` capture of the class's eager method
      (``model.compile()`` does not reach it) under ``torch.no_grad()`` and, with ``dtype`` bf16/fp16, the same
      autocast as the model's ``dtype=``. Inputs are checked as the eager methods check them.
    * Memory: every capture allocates from ONE pool (``torch.cuda.graph_pool_handle()``), so the intermediates
      of one capture reuse the memory another capture freed; the pool grows to about the needs of the largest
      bucket captured, plus the static outputs of every capture. :meth:`memory` gives the growth of
      ``torch.cuda.memory_reserved()``/``memory_allocated()`` across each capture (captures after the largest
      bucket's add little); :meth:`captured` lists the captures; :meth:`clear` drops them all.
    * Invalidation: the model's :meth:`weights_version` is remembered at capture. A call that finds another
      version (``load_state_dict``, ``.to()``, ``train()``/``eval()``, any optimizer step,
      ``model.weights_changed()``) drops every capture, and the pool, and captures again as calls come.
      A model in training mode is refused. Graphs are replayed one at a time (calls hold a lock).
    * TPAMI noise: only the checkpoint's stored maps (``noise="stored"``) are captured; ``noise="random"``,
      explicit maps or a ``generator`` are refused: call the model itself for those.
    """

    def __init__(self, model: torch.nn.Module, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, dtype=None, *,
                 _recorder=None):
        if not isinstance(model, ReferenceMTLFace) or not hasattr(model, "weights_version"):
            raise TypeError(f"model must be an mtlface_fast.MTLFace (with weights_version()), "
                            f"got {type(model).__name__}")
        self.model = model
        self.batch_sizes = check_batch_sizes(batch_sizes)
        self.dtype = None if dtype is None else to_dtype(dtype)
        self._recorder = CudaGraphRecorder() if _recorder is None else _recorder
        self._device = self._model_device()
        self._recorder.check_device(self._device)
        self._lock = threading.RLock()
        self._captures: Dict[CaptureKey, Recording] = {}
        self._buffers: Dict[int, _Buffers] = {}
        self._pool = None
        self._version = model.weights_version()
        self.capture_count = 0   # captures made so far, dropped ones included
        self.invalidations = 0   # calls that found a changed weights version (and dropped the captures)

    def __repr__(self) -> str:
        dtype = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        return (f"GraphedMTLFace(arch={self.model.config['arch']}, batch_sizes={self.batch_sizes}, dtype={dtype}, "
                f"captured={len(self._captures)})")

    # -- what is held ------------------------------------------------------------------------------------
    def captured(self) -> List[CaptureKey]:
        """The captures held now, in capture order."""
        return list(self._captures)

    def memory(self) -> Dict[CaptureKey, CaptureMemory]:
        """Bytes each held capture added to the reserved and allocated CUDA memory (see the class doc)."""
        return {k: r.memory for k, r in self._captures.items()}

    def clear(self) -> None:
        """Drop every capture, the static buffers and the pool (captured again at the next calls)."""
        with self._lock:
            self._captures.clear()
            self._buffers.clear()
            self._pool = None

    # -- entry points --------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """As ``model(images)``: (B, 512) identity embedding."""
        with self._lock:
            images = self._begin(images)
            return self._run("forward", (), images)

    def encode(self, images: torch.Tensor, flip: Optional[bool] = None):
        """As ``model.encode(images, flip)``: an EncodeResult (flip default: the architecture's)."""
        flip = self.model.architecture.default_flip if flip is None else check_flip(flip)
        with self._lock:
            images = self._begin(images)
            return self._run("encode", (("flip", flip),), images)

    def synthesize(self, images: torch.Tensor, target_group, *, noise="stored",
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """As ``model.synthesize(images, target_group)`` (int or integer tensor (B,)): (B, 3, H, W)."""
        with self._lock:
            images = self._begin(images)
            groups = check_target_group(target_group, batch=images.size(0), age_group=self.model.age_group,
                                        device=images.device)
            self._check_noise(noise, generator)
            return self._run("synthesize", (), images, groups)

    def synthesize_all_ages(self, images: torch.Tensor, groups_per_call: Optional[int] = None, *,
                            noise="stored", generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """As ``model.synthesize_all_ages(images, groups_per_call=...)``: (B, G, 3, H, W)."""
        groups_per_call = check_groups_per_call(groups_per_call)
        with self._lock:
            images = self._begin(images)
            self._check_noise(noise, generator)
            if groups_per_call is None:  # the eager default (the model is in eval mode here)
                groups_per_call = self.model.age_group if images.is_cuda else 1
            return self._run("synthesize_all_ages", (("groups_per_call", groups_per_call),), images)

    # -- plumbing ------------------------------------------------------------------------------------------
    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _begin(self, images: torch.Tensor) -> torch.Tensor:
        """Refuse training mode, drop stale captures, check the images as the eager method does."""
        model = self.model
        if model.training:
            raise RuntimeError("the model is in training mode: CUDA graphs replay inference only; call model.eval() "
                               "(train with the model itself)")
        version = model.weights_version()
        if version != self._version:
            self.clear()
            self.invalidations += 1
            device = self._model_device()
            self._recorder.check_device(device)  # (moved off CUDA: refused at every call)
            self._version, self._device = version, device
        with autocast(self._device, self.dtype):
            return model.check_images(images)

    def _check_noise(self, noise, generator) -> None:
        if isinstance(noise, str) and noise == "stored" and generator is None:
            return
        if not self.model.architecture.noise:
            self.model._check_noise(noise, generator)  # the eager method's error
        raise ValueError("CUDA graphs render with the stored noise maps only (noise='stored', no generator): "
                         "call the model itself for noise='random', explicit noise maps or a generator")

    def _bucket(self, n: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]

    def _run(self, entry: str, options, images: torch.Tensor, groups: Optional[torch.Tensor] = None):
        largest = self.batch_sizes[-1]
        parts = []
        for start in range(0, images.size(0), largest):
            chunk = images[start:start + largest]
            n = chunk.size(0)
            bucket = self._bucket(n)
            rec = self._capture(CaptureKey(entry, bucket, tuple(options)))
            self._buffers[bucket].load(chunk, None if groups is None else groups[start:start + n])
            rec.replay()
            parts.append(_map(lambda t: t[:n].clone(), rec.outputs))
        return _cat(parts)

    def _capture(self, key: CaptureKey) -> Recording:
        rec = self._captures.get(key)
        if rec is not None:
            return rec
        model, device = self.model, self._device
        self._recorder.check_model(model, key.entry)
        buffers = self._buffers.get(key.batch)
        if buffers is None:
            dtype = next(model.parameters()).dtype
            buffers = self._buffers[key.batch] = _Buffers(key.batch, model.input_size, device, dtype)
        if self._pool is None:
            self._pool = self._recorder.new_pool(device)
        fn = self._function(key, buffers)
        try:
            rec = self._recorder.record(fn, self._pool, device)
        except RuntimeError as exc:
            if isinstance(exc, UsageError):
                raise
            raise RuntimeError(f"capturing {key.entry} for a batch of {key.batch} ({dict(key.options)}) failed: "
                               f"{exc}. An op that reads values on the host cannot be captured; call the model "
                               f"itself") from exc
        self._captures[key] = rec
        self.capture_count += 1
        return rec

    def _function(self, key: CaptureKey, buffers: _Buffers) -> Callable[[], Any]:
        """The eager method of the model's class on the static buffers (``model.compile()`` does not reach it)."""
        model, cls, dtype = self.model, type(self.model), self.dtype
        images, groups = buffers.images, buffers.groups
        opts = dict(key.options)
        if key.entry == "forward":
            call = lambda: cls.forward(model, images, dtype=dtype)  # noqa: E731
        elif key.entry == "encode":
            call = lambda: cls.encode(model, images, opts["flip"], dtype=dtype)  # noqa: E731
        elif key.entry == "synthesize":
            call = lambda: cls.synthesize(model, images, groups, dtype=dtype)  # noqa: E731
        elif key.entry == "synthesize_all_ages":
            call = lambda: cls.synthesize_all_ages(model, images, dtype=dtype,  # noqa: E731
                                                   groups_per_call=opts["groups_per_call"])
        else:
            raise ValueError(f"entry must be one of {ENTRIES}, got {key.entry!r}")

        def run():
            with torch.no_grad():
                return call()
        return run
