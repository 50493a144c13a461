"""Beyond one machine (the ``scale`` extra: ``pip install "mtlface-fast[scale]"``).

* :mod:`.gallery`: FAISS galleries over a ``run`` output folder (``mtlface-fast index`` / ``search``).
* :mod:`.ray_engine`: ``mtlface-fast run --engine ray``, photo folders on Ray Data actors.
* :mod:`.serve`: ``mtlface-fast serve``, the model on Ray Serve with request batching.
* :mod:`.triton_repo`: ``mtlface-fast export --target triton-repo``, a Triton Inference Server model repository.

Nothing here is imported by ``import mtlface_fast`` or by the model; each module imports its engine (ray, faiss,
tritonclient) when it is used, with the install hint in the error.
"""
from __future__ import annotations

import importlib
import os

INSTALL_HINT = 'pip install "mtlface-fast[scale]"'


def require(module: str, what: str):
    """``import module`` or a MissingDependencyError (a RuntimeError) naming ``what`` needs it and how to install
    it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        from ..errors import MissingDependencyError
        raise MissingDependencyError(f"{what} needs the '{module.split('.')[0]}' package ({exc}); install the "
                                     f"scale extra: {INSTALL_HINT}") from None


def package_root() -> str:
    """The folder that holds the ``mtlface_fast`` package this process imported (a checkout or site-packages)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_runtime_env() -> dict:
    """Ray runtime_env that makes workers import this process's ``mtlface_fast`` (not another install)."""
    path = [package_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}}


def connect_ray(address=None, log=print) -> bool:
    """Join the Ray cluster at ``address`` or start a local one (unless Ray is initialized in this process
    already); True when this call started the connection (the caller then shuts it down)."""
    ray = require("ray", "the Ray engine")
    if ray.is_initialized():
        return False
    ray.init(address=address, runtime_env=worker_runtime_env(), include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    res = ray.cluster_resources()
    log(f"Ray: {'cluster ' + address if address else 'a local cluster'} with {int(res.get('CPU', 0))} CPU(s), "
        f"{int(res.get('GPU', 0))} GPU(s)")
    return True
