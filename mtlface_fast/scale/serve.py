"""``mtlface-fast serve``: the model behind HTTP on Ray Serve, with request batching.

Endpoints (the request body is the image file's bytes: JPEG, PNG, ...):

    GET  /healthz                  {"status": "ok", "model", "gallery", "batches": {"encode": {size: count}, ...}}
    POST /v1/faces                 every face: box, landmarks, score, embedding, age, group, predicted_group
    POST /v1/search?k=5            every face: box and its k nearest faces of the gallery (--index OUT/)
    POST /v1/synthesize?group=G    the largest face re-rendered at age group G, as a PNG

Requests in flight are handled as one batch (``@serve.batch``, up to ``--max-batch-size`` requests, waiting at most
``--batch-wait-ms`` for a batch to fill): each image's faces are detected and aligned as ``mtlface-fast run`` does
it (MTCNN, 5-point template), and the crops of all images of the batch go through the model in one call.
``/healthz`` counts the requests per batch (``faces``, ``synthesize``) and the faces per model call
(``model_faces``, ``model_synthesize``). A bad
request (empty, not an image, over ``--max-request-bytes``, over ``--max-pixels`` -- a decompression bomb --, a
group outside the model's range, an unknown path or method) gets a 4xx JSON ``{"error": ...}`` that names the
problem; the server goes on serving. Ctrl-C or SIGTERM (or ``--duration``) shuts Serve and Ray down.

One replica holds one model (``--replicas``; one GPU each with ``--device cuda``). Listens on 127.0.0.1 unless
``--host`` says otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import threading
import time
import warnings
from collections import Counter
from typing import Dict, List, Optional, Tuple

from . import connect_ray, require

MAX_BATCH_SIZE = 16
BATCH_WAIT_MS = 10.0
MAX_REQUEST_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000; Pillow's own bomb limit is 89.5 M (warning) / 179 M (error)
APP_NAME = "mtlface"


class RequestError(Exception):
    """A request the service refuses: HTTP ``status`` (4xx) and a message that names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(body: bytes, max_pixels: int = MAX_PIXELS):
    """Request bytes -> (H, W, 3) uint8 RGB; a RequestError naming the problem when they are not a usable image.

    The pixel count is checked from the header, before anything is decoded (a small file can declare a huge
    image)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError
    if not body:
        raise RequestError(400, "the request body is empty: send the image file's bytes (JPEG, PNG, ...)")
    try:
        img = Image.open(io.BytesIO(body))
    except UnidentifiedImageError:
        raise RequestError(400, f"the request body ({len(body)} bytes) is not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(400, f"the request body is not a readable image: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise RequestError(413, f"the image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                                f"(a decompression bomb, or a photo to downscale first)")
    if w == 0 or h == 0:
        raise RequestError(400, f"the image is empty ({w}x{h})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = ImageOps.exif_transpose(img)
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(400, f"the image cannot be decoded (truncated or corrupt): {exc}") from None


def parse_int(params, name: str, default: Optional[int], low: int, high: Optional[int], what: str) -> int:
    """Query parameter ``name`` as an int in [low, high]; a 400 RequestError naming it otherwise."""
    raw = params.get(name)
    if raw is None:
        if default is None:
            raise RequestError(400, f"the query parameter '{name}' is required: {what}")
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise RequestError(400, f"'{name}' must be an integer in {span} ({what}), got {raw!r}")
    return value


class FaceModel:
    """What one replica holds: model, aligner, optional gallery; the sync work the HTTP handlers call."""

    def __init__(self, model_args: Dict, options: Dict):
        import torch

        from ..align import FaceAligner
        from ..demo import group_labels
        from ..validation import check_device
        from ..loading import load_model
        self.device = check_device(options.get("device") or "cpu")
        model, self.source = load_model(**model_args)
        self.model = model.to(self.device).eval()
        self.size = int(self.model.config["input_size"])
        self.age_groups = int(self.model.config["age_group"])
        self.labels = group_labels(self.age_groups)
        self.aligner = FaceAligner(size=self.size, device=self.device, min_face_size=options.get("min_face_size", 20))
        self.gallery = None
        if options.get("index"):
            from .gallery import Gallery
            self.gallery = Gallery(options["index"])
            self.gallery.check_model(json.loads(json.dumps(self.model.config)))
        self.detect_lock, self.model_lock = threading.Lock(), threading.Lock()
        self.torch = torch

    def faces(self, arr, keep: str = "all"):
        with self.detect_lock:
            return self.aligner.align(arr, keep=keep)

    def encode(self, crops) -> List[Dict]:
        """One model batch: embedding, age, group of each aligned crop."""
        from ..preprocess import preprocess
        from ..reference.heads import age2group
        if not crops:
            return []
        x = preprocess(list(crops), size=self.size, device=self.device)
        with self.model_lock, self.torch.inference_mode():
            enc = self.model.encode(x)
        emb = enc.embedding.float().cpu().numpy()
        return [{"embedding": emb[j].tolist(), "age": round(float(enc.age[j]), 3),
                 "group": int(age2group(float(enc.age[j]), self.age_groups)),
                 "predicted_group": int(enc.group_logits[j].argmax())} for j in range(len(crops))]

    def faces_of_images(self, arrs) -> Tuple[List[List[Dict]], int]:
        """Every face of every image, the crops of all images encoded as one model batch; (per image, faces)."""
        found = [self.faces(arr, "all") for arr in arrs]
        encoded = iter(self.encode([f.crop for faces in found for f in faces]))
        out = [[{"face": k, "box": [round(float(v), 2) for v in f.box],
                 "landmarks": [[round(float(v), 2) for v in p] for p in f.landmarks],
                 "score": round(f.score, 5), **next(encoded)} for k, f in enumerate(faces)] for faces in found]
        return out, sum(len(f) for f in found)

    def synthesize(self, crops, groups: List[int]) -> List[bytes]:
        """One model batch: each crop re-rendered at its group, as PNG bytes."""
        import numpy as np
        from PIL import Image

        from ..preprocess import preprocess
        if not crops:
            return []
        x = preprocess(list(crops), size=self.size, device=self.device)
        g = self.torch.tensor(groups, dtype=self.torch.long, device=self.device)
        with self.model_lock, self.torch.inference_mode():
            out = self.model.synthesize(x, g)
        imgs = ((out.float().clamp(-1, 1) + 1) * 127.5).round().to(self.torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pngs = []
        for img in imgs:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return pngs

    def synthesize_images(self, arrs, groups: List[int]) -> Tuple[List[Optional[bytes]], int]:
        """The largest face of each image at its group (None where there is no face); one model batch."""
        faces = [self.faces(arr, "largest") for arr in arrs]
        have = [i for i, f in enumerate(faces) if f]
        pngs = iter(self.synthesize([faces[i][0].crop for i in have], [groups[i] for i in have]))
        return [next(pngs) if f else None for f in faces], len(have)


def service_class():
    """The Ray Serve deployment class (built here so that parsing ``serve --help`` does not import Ray)."""
    serve = require("ray.serve", "mtlface-fast serve")
    from starlette.responses import JSONResponse, Response

    class FaceService:
        def __init__(self, model_args: Dict, options: Dict):
            self.core = FaceModel(model_args, options)
            self.options = options
            # requests per batch, and faces per model call, for each batched method
            self.batches = {k: Counter() for k in ("faces", "synthesize", "model_faces", "model_synthesize")}
            for method in (self.faces_batch, self.synthesize_batch):
                method.set_max_batch_size(int(options["max_batch_size"]))
                method.set_batch_wait_timeout_s(float(options["batch_wait_ms"]) / 1000.0)

        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_MS / 1000.0)
        async def faces_batch(self, arrs: List) -> List[List[Dict]]:
            out, n = await asyncio.to_thread(self.core.faces_of_images, arrs)
            self.batches["faces"][len(arrs)] += 1
            self.batches["model_faces"][n] += 1
            return out

        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_MS / 1000.0)
        async def synthesize_batch(self, items: List) -> List[Optional[bytes]]:
            out, n = await asyncio.to_thread(self.core.synthesize_images, [a for a, _ in items],
                                             [g for _, g in items])
            self.batches["synthesize"][len(items)] += 1
            self.batches["model_synthesize"][n] += 1
            return out

        async def _image(self, request):
            limit = int(self.options["max_request_bytes"])
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise RequestError(413, f"the request body is {declared} bytes, more than the limit of {limit}")
            body = bytearray()
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise RequestError(413, f"the request body is more than the limit of {limit} bytes")
            return await asyncio.to_thread(decode_image, bytes(body), int(self.options["max_pixels"]))

        async def _faces(self, request):
            arr = await self._image(request)
            return arr, await self.faces_batch(arr)

        def health(self) -> Dict:
            return {"status": "ok", "model": self.core.source, "config": self.core.model.config,
                    "device": str(self.core.device), "gallery": len(self.core.gallery) if self.core.gallery else None,
                    "max_batch_size": int(self.options["max_batch_size"]),
                    "batch_wait_ms": float(self.options["batch_wait_ms"]),
                    "batches": {k: {str(s): n for s, n in sorted(v.items())} for k, v in self.batches.items()}}

        async def __call__(self, request):
            path, method = request.url.path.rstrip("/") or "/", request.method
            routes = {"/healthz": "GET", "/v1/faces": "POST", "/v1/search": "POST", "/v1/synthesize": "POST"}
            try:
                if path not in routes:
                    raise RequestError(404, f"no endpoint {path}; endpoints: "
                                            + ", ".join(f"{m} {p}" for p, m in routes.items()))
                if method != routes[path]:
                    raise RequestError(405, f"{path} takes {routes[path]}, got {method}")
                if path == "/healthz":
                    return JSONResponse(self.health())
                if path == "/v1/faces":
                    arr, faces = await self._faces(request)
                    return JSONResponse({"width": int(arr.shape[1]), "height": int(arr.shape[0]), "faces": faces})
                if path == "/v1/search":
                    if self.core.gallery is None:
                        raise RequestError(404, "no gallery is loaded: start the server with --index OUT/")
                    k = parse_int(request.query_params, "k", 5, 1, 1000, "gallery faces per query face")
                    arr, faces = await self._faces(request)
                    matches = self.core.gallery.search([f["embedding"] for f in faces], k) if faces else []
                    return JSONResponse({"width": int(arr.shape[1]), "height": int(arr.shape[0]),
                                         "faces": [{"face": f["face"], "box": f["box"], "score": f["score"],
                                                    "matches": m} for f, m in zip(faces, matches)]})
                group = parse_int(request.query_params, "group", None, 0, self.core.age_groups - 1,
                                  f"the target age group, one of {self.core.labels}")
                png = await self.synthesize_batch((await self._image(request), group))
                if png is None:
                    raise RequestError(422, "no face found in the image")
                return Response(png, media_type="image/png", headers={"X-Age-Group": self.core.labels[group]})
            except RequestError as exc:
                return JSONResponse({"error": exc.message, "status": exc.status}, status_code=exc.status)

    return FaceService


def build_app(model_args: Dict, *, index: Optional[str] = None, device: Optional[str] = None,
              max_batch_size: int = MAX_BATCH_SIZE, batch_wait_ms: float = BATCH_WAIT_MS,
              max_request_bytes: int = MAX_REQUEST_BYTES, max_pixels: int = MAX_PIXELS, replicas: int = 1,
              max_ongoing_requests: int = 64):
    """The Ray Serve application (not started): ``FaceService`` with these options, checked here."""
    serve = require("ray.serve", "mtlface-fast serve")
    for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_request_bytes", max_request_bytes, 1),
                             ("max_pixels", max_pixels, 1), ("replicas", replicas, 1),
                             ("max_ongoing_requests", max_ongoing_requests, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(batch_wait_ms, (int, float)) or batch_wait_ms < 0:
        raise ValueError(f"batch_wait_ms must be a number >= 0, got {batch_wait_ms!r}")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if index is not None:
        from .gallery import Gallery
        Gallery(index)  # a missing or broken gallery is an error now, not in a replica's log
        index = os.path.abspath(index)
    options = dict(index=index, device=device or "cpu", max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                   max_request_bytes=max_request_bytes, max_pixels=max_pixels)
    actor = {"num_cpus": 1, "num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
    deployment = serve.deployment(service_class(), name="FaceService", num_replicas=replicas,
                                  max_ongoing_requests=max_ongoing_requests, ray_actor_options=actor)
    model_args = dict(model_args)
    if model_args.get("weights"):
        model_args["weights"] = os.path.abspath(model_args["weights"])
    return deployment.bind(model_args, options)


def start(app, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None, log=print) -> Dict:
    """Start Ray (unless running) and Serve on ``host:port`` and deploy ``app``; returns {url, started_ray}."""
    serve = require("ray.serve", "mtlface-fast serve")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an int in 1..65535, got {port!r}")
    started = connect_ray(address, log=log)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        stop(started)
        raise
    return {"url": f"http://{host}:{port}", "started_ray": started}


def stop(started_ray: bool) -> None:
    """Shut Serve down (replicas, proxy), and Ray when this process started it."""
    import ray
    from ray import serve
    if ray.is_initialized():
        serve.shutdown()
        if started_ray:
            ray.shutdown()


# -- the command ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..loading import add_model_arguments
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    add_model_arguments(p, title=None)
    p.add_argument("--index", metavar="OUT", help="a run folder with a gallery (mtlface-fast index) for /v1/search")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="replicas' device (cpu)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (1)")
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                   help=f"faces per model batch ({MAX_BATCH_SIZE})")
    p.add_argument("--batch-wait-ms", type=float, default=BATCH_WAIT_MS,
                   help=f"longest wait for a batch to fill, ms ({BATCH_WAIT_MS:g})")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help=f"largest request body ({MAX_REQUEST_BYTES})")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"largest image, in pixels ({MAX_PIXELS})")
    p.add_argument("--address", help="the Ray cluster to join (default: start a local Ray)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C / SIGTERM)")


def execute(args) -> int:
    import signal
    app = build_app(dict(weights=args.weights, generator=args.generator, estimator=args.estimator,
                         backbone=args.backbone, seed=args.seed), index=args.index, device=args.device,
                    max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                    max_request_bytes=args.max_request_bytes, max_pixels=args.max_pixels, replicas=args.replicas)
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration must be > 0 seconds, got {args.duration}")
    stopping = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    info = None
    try:
        info = start(app, args.host, args.port, args.address)
        print(f"serving on {info['url']} (GET /healthz, POST /v1/faces, /v1/search, /v1/synthesize); "
              f"Ctrl-C stops", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stopping.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        if info is not None:
            stop(info["started_ray"])
        for s, h in previous.items():
            signal.signal(s, h)
    print("stopped", flush=True)
    return 0
