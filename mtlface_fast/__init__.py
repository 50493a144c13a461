"""mtlface_fast: a fast, exact and deployable MTLFace (age-invariant face recognition + face age synthesis).

Public surface: :class:`MTLFace` (the fast model), :mod:`mtlface_fast.reference` (the oracle),
:func:`preprocess`, the backend switch (:func:`use_backend`, :func:`get_backend`) and ``__version__``.
"""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """In a source checkout the Triton kernels live in the top-level ``kernels/`` folder; an install ships
    them inside the package. Map the checkout's folder to ``mtlface_fast.kernels`` so both import alike."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")) or "mtlface_fast.kernels" in _sys.modules:
        return
    src = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(src, "__init__.py")
    if _os.path.isfile(init):
        spec = _ilu.spec_from_file_location("mtlface_fast.kernels", init, submodule_search_locations=[src])
        module = _ilu.module_from_spec(spec)
        _sys.modules["mtlface_fast.kernels"] = module
        spec.loader.exec_module(module)


_map_source_kernels()

from .preprocess import preprocess  # noqa: E402  (torch-free at import; a module attribute of the same name)

# The public names load on first use (PEP 562), so that ``import mtlface_fast`` and the command line's parser
# (``mtlface-fast --help``) do not import torch; ``from mtlface_fast import MTLFace`` works as usual.
_LAZY = {
    "MTLFace": (".model", "MTLFace"),
    "reference": (".reference", None),
    "use_backend": (".backend", "use_backend"),
    "get_backend": (".backend", "get_backend"),
    "age2group": (".reference.heads", "age2group"),
    "dex_age": (".reference.heads", "dex_age"),
}

__all__ = ["MTLFace", "reference", "preprocess", "use_backend", "get_backend", "age2group", "dex_age",
           "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
