"""The ``mtlface-fast`` command: ``demo``, ``run``, ``bench``, ``train``, ``eval``, ``export``, ``index``,
``search``, ``serve``.

Parsing is light: a subcommand's options (and the torch-importing module that defines them) are loaded only
when that subcommand is parsed, so ``mtlface-fast --help`` does not import torch. Known errors (bad
arguments, unreadable files, a checkpoint that does not fit, a missing optional package: ``MTLFaceError`` and
its subclasses, ``ValueError``, ``TypeError``, ``OSError``) print one line and exit with code 2; ``--debug``
shows the traceback instead. Any other error (a ``RuntimeError`` of torch, CUDA or Triton) prints its
traceback and exits with code 1.
"""
from __future__ import annotations

import argparse
import sys

from .errors import MTLFaceError
from .loading import add_model_arguments

# Errors the command reports as one line: the package's own errors, and the ValueError/TypeError of argument
# checks and OSError of files. Any other error (a RuntimeError of torch, CUDA or Triton) is printed with its
# traceback and exits with code 1.
KNOWN_ERRORS = (MTLFaceError, ValueError, TypeError, OSError)


class _LazyParser(argparse.ArgumentParser):
    """A subcommand parser whose arguments are added by ``populate(parser)`` the first time it parses."""

    def __init__(self, *args, populate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate
        # also after the subcommand (SUPPRESS: absent unless given, so it does not reset the top-level flag)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error (default: one line)")

    def _ensure_populated(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ensure_populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._ensure_populated()
        return super().format_help()


def _add_demo(sub):
    def populate(p):
        p.add_argument("--image", help="a photo (its largest face is aligned when the align extra is installed) "
                       "or an aligned face crop; default: scikit-image's astronaut photo")
        add_model_arguments(p)
        p.add_argument("--out", default="demo_out", help="output folder (demo_out)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")

    def run(args):
        from .demo import run_demo
        run_demo(args.image, args.out, args.weights, args.generator, args.estimator, args.backbone, args.device,
                 args.seed)
        return 0

    p = sub.add_parser("demo", help="encode a face and render it at every age group (PNG grid + JSON)",
                       description="Encode a face and render it at every age group. Without --weights the model "
                                   "is a seeded random initialization (said plainly in the output).",
                       populate=populate)
    p.set_defaults(func=run)


def _add_run(sub):
    def populate(p):
        p.add_argument("photos", metavar="PHOTOS", help="folder of photos (searched recursively)")
        p.add_argument("--out", required=True, help="output folder (a rerun with it resumes)")
        add_model_arguments(p)
        p.add_argument("--device", default=None, help="cpu or cuda: the model and the detector (local: cpu; ray: "
                       "cuda when the cluster has GPUs)")
        p.add_argument("--batch-size", type=int, default=32, help="faces per model batch (32)")
        p.add_argument("--engine", default="local", choices=("local", "ray"),
                       help="local: this process; ray: Ray Data actors, one model each (the scale extra)")
        p.add_argument("--address", help="ray: the cluster to join (default: start a local Ray)")
        p.add_argument("--workers", type=int, help="ray: model actors (default: one per GPU, else per CPU)")
        p.add_argument("--all-faces", action="store_true", help="every face of a photo (default: the largest)")
        p.add_argument("--synthesize", action="store_true", help="also render each face at every age group (PNG)")
        p.add_argument("--min-face-size", type=int, default=20, help="smallest face searched, in pixels (20)")
        p.add_argument("--detector", default="auto", choices=("auto", "facenet", "torch"),
                       help="MTCNN as facenet-pytorch runs it, or its networks driven by torch (auto: facenet when "
                            "torchvision imports)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args):
        from .folder import run_folder
        try:
            run_folder(args.photos, args.out, args.weights, args.generator, args.estimator, args.backbone,
                       args.seed, args.device, args.batch_size, "all" if args.all_faces else "largest",
                       args.synthesize, args.detector, args.min_face_size, progress=not args.no_progress,
                       engine=args.engine, address=args.address, workers=args.workers)
        except KeyboardInterrupt as exc:  # Ctrl-C: where it stopped and how to resume, not a traceback
            if args.debug:
                raise
            print(f"\nmtlface-fast run: {exc or 'interrupted; rerun the same command to resume'}",
                  file=sys.stderr)
            return 130
        return 0

    p = sub.add_parser("run", help="every photo of a folder: aligned faces, embeddings, ages, age grids (align extra)",
                       description="Find and align the faces of every photo under PHOTOS (MTCNN, 5-point template; "
                                   "the align extra), encode them in batches on --device and write OUT/index.jsonl "
                                   "(every photo and face, or why none), OUT/embeddings.npy, the crops under "
                                   "OUT/faces/ and with --synthesize the age-group grids under OUT/grids/. A rerun "
                                   "skips what is done. Without --weights the model is a seeded random "
                                   "initialization (said plainly in the output).",
                       populate=populate)
    p.set_defaults(func=run)


def _add_bench(sub):
    def populate(p):
        from .throughput import __doc__ as doc, add_arguments
        p.description = doc
        add_arguments(p)

    def run(args):
        from .throughput import execute
        return execute(args)

    p = sub.add_parser("bench", help="whole-model throughput vs the reference (JSON + PNG under bench/results "
                       "in a checkout, ./bench_results from an install)",
                       formatter_class=argparse.RawTextHelpFormatter, populate=populate)
    p.set_defaults(func=run)


def _add_train(sub):
    def populate(p):
        from .train.config import add_arguments
        add_arguments(p)

    def run(args):
        from .train import train
        from .train.config import config_from_args
        result = train(config_from_args(args))
        print(f"trained {result['step']} steps -> {result['output']}")
        return 0

    p = sub.add_parser("train", help="train MTLFace: aifr | fas | joint | finetune (see docs/TRAINING.md)",
                       description="Train the fast MTLFace with an official recipe. Options come from the recipe's "
                                   "defaults, then --config FILE (YAML/JSON), then these flags. Multi-GPU: "
                                   "torchrun --nproc_per_node N -m mtlface_fast train ...",
                       populate=populate)
    p.set_defaults(func=run)


def _add_tool(sub, name: str, module: str, help: str, add: str = "add_arguments", execute: str = "execute"):
    """A subcommand whose arguments (``add(parser)``) and ``execute(args)`` live in ``mtlface_fast.<module>``
    (loaded lazily)."""
    import importlib

    def populate(p):
        mod = importlib.import_module(f"{__package__}.{module}")
        p.description = mod.__doc__
        getattr(mod, add)(p)

    p = sub.add_parser(name, help=help, formatter_class=argparse.RawTextHelpFormatter, populate=populate)
    p.set_defaults(func=lambda args: getattr(importlib.import_module(f"{__package__}.{module}"), execute)(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlface-fast", description="Fast MTLFace: age-invariant face "
                                     "recognition and face age synthesis.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"mtlface-fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_LazyParser)
    sub.required = True
    _add_demo(sub)
    _add_run(sub)
    _add_bench(sub)
    _add_tool(sub, "eval", "eval.runner", "verification, identification, age and synthesis metrics (JSON + Markdown)")
    _add_tool(sub, "export", "export.command",
              "ONNX file, AOTInductor package or TensorRT engine of recognition/synthesis, or a Triton "
              "Inference Server model repository")
    _add_train(sub)
    _add_tool(sub, "index", "scale.gallery", "FAISS gallery of a run folder's faces, built or grown (scale extra)",
              add="add_index_arguments", execute="execute_index")
    _add_tool(sub, "search", "scale.gallery", "the K nearest gallery faces of every face in a photo or folder "
              "(JSONL; scale extra)", add="add_search_arguments", execute="execute_search")
    _add_tool(sub, "serve", "scale.serve", "HTTP service on Ray Serve with request batching: faces, search, "
              "synthesis (scale extra)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KNOWN_ERRORS as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (MTLFaceError, ValueError, TypeError)):  # name the kind: FileNotFoundError, ...
            message = f"{type(exc).__name__}: {message}"
        print(f"mtlface-fast {args.command}: error: {message} (--debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
