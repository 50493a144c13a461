"""Load on ``mtlface-fast serve``: N requests at concurrency C against POST /v1/faces, on 127.0.0.1.

Starts a local Ray and the service (mtlface_fast.scale.serve) with a seeded random model of the chosen
architecture (ir34 trunk unless --backbone, 112 px input; or --weights), sends a photo with one face
(scikit-image's astronaut, 200x200 PNG) N times from C threads for each concurrency level, then stops the
service. Every loop is bounded: N requests per level, a timeout per request and a deadline per level after which
nothing more is sent. Reported per level: requests/s, p50/p99 latency, errors, the requests per batch and the
faces per model call (the delta of /healthz's counts over the level).

    python bench/serve_load.py                              # the committed result: C = 1 and 8, N = 48
    python bench/serve_load.py --concurrency 1,4,16 --requests 64 --max-batch-size 16
"""
import argparse
import io
import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from common import environment, write_results  # noqa: E402  (bench/common.py puts the checkout on sys.path)


def post(url, data, timeout):
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        status = f"{type(e).__name__}: {e}"
    return status, time.perf_counter() - start


def batches(url):
    """(requests per batch, faces per model call): /healthz's counts."""
    with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
        seen = json.loads(r.read())["batches"]
    return (Counter({int(k): v for k, v in seen["faces"].items()}),
            Counter({int(k): v for k, v in seen["model_faces"].items()}))


def percentile(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))] if v else None


def save_random_model(arch, backbone, folder, seed):
    import torch

    import mtlface_fast
    torch.manual_seed(seed)
    if arch == "cvpr":
        return mtlface_fast.MTLFace(backbone=backbone, input_size=112).save_pretrained(os.path.join(folder, "model"))
    path = os.path.join(folder, "mtlface_checkpoints.tar")
    torch.save(mtlface_fast.MTLFace(arch="tpami", backbone=backbone, input_size=112).state_dict(), path)
    return path


def main():
    import numpy as np
    import ray
    from PIL import Image
    from skimage import data

    from mtlface_fast.scale import serve, worker_runtime_env
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cvpr", choices=("cvpr", "tpami"))
    p.add_argument("--backbone", default="ir34")
    p.add_argument("--weights", help="a model to serve (default: a seeded random one of --arch)")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds per level; no request is sent after it")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.fromarray(data.astronaut()).resize((200, 200), Image.BILINEAR))).save(buf, "PNG")
    photo = buf.getvalue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="serve_load_")
    weights = args.weights or save_random_model(args.arch, args.backbone, tmp, args.seed)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env=worker_runtime_env())
    rows = []
    try:
        app = serve.build_app(dict(weights=weights), max_batch_size=args.max_batch_size,
                              batch_wait_ms=args.batch_wait_ms)
        url = serve.start(app, port=port)["url"]
        for _ in range(2):  # warm-up, not counted
            post(url + "/v1/faces", photo, args.timeout)
        for c in levels:
            before = batches(url)
            deadline = time.monotonic() + args.deadline

            def one(_):
                if time.monotonic() > deadline:
                    return "skipped: past the level's deadline", 0.0
                return post(url + "/v1/faces", photo, args.timeout)
            start = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
            after = batches(url)
            seen, model = after[0] - before[0], after[1] - before[1]
            ok = [t for s, t in results if s == 200]
            errors = Counter(str(s) for s, _ in results if s != 200)
            requests_batched = sum(size * n for size, n in seen.items())
            rows.append({"concurrency": c, "requests": args.requests, "ok": len(ok), "errors": dict(errors),
                         "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
                         "p50_ms": round(1000 * percentile(ok, 50), 1) if ok else None,
                         "p99_ms": round(1000 * percentile(ok, 99), 1) if ok else None,
                         "requests_per_batch": {str(k): v for k, v in sorted(seen.items())},
                         "faces_per_model_call": {str(k): v for k, v in sorted(model.items())},
                         "mean_requests_per_batch": round(requests_batched / max(1, sum(seen.values())), 3)})
            r = rows[-1]
            print(f"C={c:3d}: {r['requests_per_s']:7.2f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                  f"errors {r['errors'] or 0}  requests per batch {r['requests_per_batch']} "
                  f"(mean {r['mean_requests_per_batch']}), faces per model call {r['faces_per_model_call']}", flush=True)
    finally:
        serve.stop(True)
    env = environment("cpu")
    env["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]  # the machine is shared
    env["ray"] = ray.__version__
    path = write_results(f"serve-load-cpu-{args.arch}", {
        "benchmark": "serve_load", "environment": env, "parameters": vars(args),
        "endpoint": "POST /v1/faces (detect, align, encode one 200x200 photo with one face)",
        "model": "seeded random model (weights do not change the cost)" if not args.weights else args.weights,
        "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
