"""``mtlface-fast serve``: Ray Serve on a real local Ray, real HTTP on 127.0.0.1, both architectures.

Every request loop here is bounded: a fixed number of requests, each with a timeout.
"""
import io
import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from mtlface_fast.folder import run_folder
from tests.scale_utils import ARCHS, make_photos, read_index, save_model, start_ray

ray = pytest.importorskip("ray", reason="the scale extra (in the test extra)")  # CI installs it
TIMEOUT = 120  # seconds per request: a CPU replica encodes a batch in well under that


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, data=None, method=None, timeout=TIMEOUT):
    """(status, content type, body bytes) of one HTTP request; 4xx/5xx answers are returned, not raised."""
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


def refused(url) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except (urllib.error.URLError, ConnectionError, OSError) as exc:
        return not isinstance(exc, urllib.error.HTTPError)
    return False


@pytest.fixture(scope="module")
def local_ray():
    started = start_ray()
    yield started
    started.shutdown()


@pytest.fixture(scope="module", params=ARCHS)
def server(request, local_ray, tmp_path_factory):
    """A served model of each architecture with the gallery of a run over two photos (three faces)."""
    from mtlface_fast.scale import gallery, serve
    root = tmp_path_factory.mktemp(f"serve_{request.param}")
    weights = save_model(request.param, root)
    photos = make_photos(root / "photos", extra=False)
    out = str(root / "out")
    run_folder(photos, out, weights=weights, keep="all", batch_size=4, progress=False, log=lambda m: None)
    gallery.build_gallery(out, log=lambda m: None)
    app = serve.build_app(dict(weights=weights), index=out, max_batch_size=8, batch_wait_ms=50,
                          max_request_bytes=2_000_000, max_pixels=4_000_000)
    info = serve.start(app, port=free_port(), log=lambda m: None)
    assert info["started_ray"] is False  # the fixture's Ray
    yield dict(url=info["url"], photos=photos, out=out, weights=weights, arch=request.param)
    serve.stop(False)


def _png(path):
    return open(path, "rb").read()


def test_faces_match_the_folder_run(server):
    status, ctype, body = request(server["url"] + "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["gallery"] == 3
    assert health["config"]["arch"] == server["arch"]
    status, ctype, body = request(server["url"] + "/v1/faces", _png(os.path.join(server["photos"], "sub", "pair.jpg")))
    assert status == 200 and ctype == "application/json"
    res = json.loads(body)
    assert (res["width"], res["height"]) == (300, 150) and len(res["faces"]) == 2
    idx = read_index(server["out"])["sub/pair.jpg"]
    emb = np.load(os.path.join(server["out"], "embeddings.npy"))
    for got, want in zip(res["faces"], idx["faces"]):
        assert got["box"] == want["box"] and got["landmarks"] == want["landmarks"]
        np.testing.assert_allclose(got["embedding"], emb[want["embedding_row"]], rtol=1e-4, atol=1e-4)
        assert abs(got["age"] - want["predicted_age"]) < 1e-2 and got["group"] == want["age_group"]
        assert got["predicted_group"] == want["predicted_group"]


def test_search_and_synthesize(server):
    url = server["url"]
    status, _, body = request(url + "/v1/search?k=2", _png(os.path.join(server["photos"], "astronaut.png")))
    res = json.loads(body)
    assert status == 200 and len(res["faces"]) == 1 and len(res["faces"][0]["matches"]) == 2
    top = res["faces"][0]["matches"][0]
    assert (top["photo"], top["face"]) == ("astronaut.png", 0) and top["score"] > 0.9999
    status, ctype, body = request(url + "/v1/synthesize?group=1", _png(os.path.join(server["photos"], "astronaut.png")))
    assert status == 200 and ctype == "image/png"
    img = Image.open(io.BytesIO(body))
    assert img.size == (112, 112) and img.mode == "RGB"


def test_concurrent_requests_are_batched(server):
    url, data = server["url"] + "/v1/faces", _png(os.path.join(server["photos"], "sub", "pair.jpg"))
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: request(url, data), range(8)))
    assert [a[0] for a in answers] == [200] * 8
    assert all(len(json.loads(a[2])["faces"]) == 2 for a in answers)
    batches = json.loads(request(server["url"] + "/healthz")[2])["batches"]
    per_batch = [int(size) for size in batches["faces"]]
    assert max(per_batch) > 1 and max(per_batch) <= 8  # requests in flight share a batch, up to --max-batch-size
    assert sum(int(size) * n for size, n in batches["model_faces"].items()) >= 16  # 2 faces per request
    assert max(int(size) for size in batches["model_faces"]) >= 2 * max(per_batch)


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # 25 M pixels in a few kilobytes
    return buf.getvalue()


@pytest.mark.parametrize("path, data, method, status, message", [
    ("/v1/faces", b"", None, 400, "request body is empty"),
    ("/v1/faces", b"GIF89a not really", None, 400, "not an image"),
    ("/v1/faces", b"x" * 2_000_001, None, 413, "more than the limit of 2000000"),
    ("/v1/faces", "bomb", None, 413, "decompression bomb"),
    ("/v1/faces", "truncated", None, 400, "cannot be decoded"),
    ("/v1/synthesize?group=9", "photo", None, 400, "'group' must be an integer in 0..3"),
    ("/v1/synthesize?group=old", "photo", None, 400, "'group' must be an integer"),
    ("/v1/synthesize", "photo", None, 400, "'group' is required"),
    ("/v1/synthesize?group=0", "noface", None, 422, "no face found"),
    ("/v1/search?k=0", "photo", None, 400, "'k' must be an integer in 1..1000"),
    ("/v1/nothing", b"", None, 404, "no endpoint /v1/nothing"),
    ("/v1/faces", None, "GET", 405, "/v1/faces takes POST"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem(server, path, data, method, status, message):
    photo = _png(os.path.join(server["photos"], "astronaut.png"))
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (40, 90, 200)).save(buf, format="PNG")
    data = {"bomb": _bomb(), "truncated": photo[:len(photo) // 2], "photo": photo, "noface": buf.getvalue()}.get(
        data, data) if isinstance(data, str) else data
    got, ctype, body = request(server["url"] + path, data, method)
    assert got == status and ctype == "application/json"
    assert message in json.loads(body)["error"]
    assert request(server["url"] + "/healthz")[0] == 200  # still serving


def test_bad_options_are_named(server, tmp_path):
    from mtlface_fast.scale import serve
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1"):
        serve.build_app({}, max_batch_size=0)
    with pytest.raises(FileNotFoundError, match="no gallery"):
        serve.build_app({}, index=str(tmp_path))
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        serve.build_app({}, device="tpu")


def test_shutdown_is_clean_and_the_command_serves(server, capsys):
    """Last in the module: stops the fixture's server (its teardown then finds nothing to stop)."""
    from mtlface_fast.cli import main
    from mtlface_fast.scale import serve
    serve.stop(False)
    assert refused(server["url"] + "/healthz")
    assert ray.is_initialized()  # Ray itself belongs to the fixture
    port = free_port()
    assert main(["serve", "--weights", server["weights"], "--port", str(port), "--duration", "1"]) == 0
    text = capsys.readouterr().out
    assert f"serving on http://127.0.0.1:{port}" in text and text.rstrip().endswith("stopped")
    assert refused(f"http://127.0.0.1:{port}/healthz")
    assert main(["serve", "--weights", server["weights"], "--port", "70000"]) == 2
    assert "port must be an int in 1..65535" in capsys.readouterr().err
