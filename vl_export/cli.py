"""The `vl-export` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import VlExportError

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}


def command(name: str):
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


@command("export")
def _export(args: argparse.Namespace) -> int:
    from vl_export.export.bundle import export_bundle

    export_bundle(args.model, Path(args.out), precision=args.dtype, overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vl-export",
        description="Export InternVL2.5 to ONNX / TensorRT bundles and run them without torch.",
    )
    parser.add_argument("--version", action="version", version=f"vl-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("export", help="export a checkpoint to an ONNX bundle (fp32 or fp16 graphs)")
    p.add_argument("--model", required=True, help="checkpoint directory, Hugging Face repo id (from the local cache), or random:<preset>")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph precision (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser




def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VlExportError as exc:
        print(f"vl-export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vl-export: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
