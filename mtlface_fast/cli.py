"""The ``mtlface-fast`` command: ``demo``, ``bench``, ``train``, ``eval``, ``export``."""
from __future__ import annotations

import argparse
import sys


def _add_demo(sub):
    p = sub.add_parser("demo", help="encode a face and render it at every age group (PNG grid + JSON)",
                       description="Encode a face and render it at every age group. Without --weights the model "
                                   "is a seeded random initialization (said plainly in the output).")
    p.add_argument("--image", help="face image (an aligned crop works best); default: a face from scikit-image")
    p.add_argument("--weights", help="a folder written by save_pretrained, the authors' TPAMI release file "
                   "(mtlface_checkpoints.tar), or an official CVPR backbone checkpoint")
    p.add_argument("--generator", help="official generator checkpoint (with an official --weights)")
    p.add_argument("--estimator", help="official estimation-network checkpoint (with an official --weights)")
    p.add_argument("--backbone", default="ir50", help="backbone of the random model when no --weights (ir50)")
    p.add_argument("--out", default="demo_out", help="output folder (demo_out)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialization (0)")

    def run(args):
        from .demo import run_demo
        run_demo(args.image, args.out, args.weights, args.generator, args.estimator, args.backbone, args.device,
                 args.seed)
        return 0

    p.set_defaults(func=run)


def _add_bench(sub):
    from .throughput import __doc__ as doc, add_arguments
    p = sub.add_parser("bench", help="whole-model throughput vs the reference (JSON + PNG under bench/results)",
                       description=doc, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)

    def run(args):
        from .throughput import execute
        return execute(args)

    p.set_defaults(func=run)


def _add_train(sub):
    from .train.config import add_arguments
    p = sub.add_parser("train", help="train MTLFace: aifr | fas | joint | finetune (see docs/TRAINING.md)",
                       description="Train the fast MTLFace with an official recipe. Options come from the recipe's "
                                   "defaults, then --config FILE (YAML/JSON), then these flags. Multi-GPU: "
                                   "torchrun --nproc_per_node N -m mtlface_fast train ...")
    add_arguments(p)

    def run(args):
        from .train import train
        from .train.config import config_from_args
        result = train(config_from_args(args))
        print(f"trained {result['step']} steps -> {result['output']}")
        return 0

    p.set_defaults(func=run)


def _add_tool(sub, name: str, module: str, help: str):
    """A subcommand whose arguments and ``execute(args)`` live in ``mtlface_fast.<module>``."""
    import importlib
    mod = importlib.import_module(f"{__package__}.{module}")
    p = sub.add_parser(name, help=help, description=mod.__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mod.add_arguments(p)
    p.set_defaults(func=lambda args: mod.execute(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlface-fast", description="Fast MTLFace: age-invariant face "
                                     "recognition and face age synthesis.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"mtlface-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    _add_bench(sub)
    _add_tool(sub, "eval", "eval.runner", "verification, identification, age and synthesis metrics (JSON + Markdown)")
    _add_tool(sub, "export", "export.command",
              "ONNX file, AOTInductor package or TensorRT engine of recognition/synthesis")
    _add_train(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"mtlface-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
