"""The ``dpicl`` command: one entry point for the core (plan, generate) and the server."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    from dp_decoding import cli as core_cli

    parser = argparse.ArgumentParser(
        prog="dpicl",
        description="Differentially private in-context learning: generate DP few-shot "
        "demonstrations from private labelled examples, and serve them behind an "
        "OpenAI-compatible API. Privacy unit: one record (add/remove), or one user.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    core_cli.register(sub)
    m = sub.add_parser("model", help="prepare the embedded model (convert the shipped GGUF once)")
    m.add_argument("action", choices=("prepare", "path"))
    m.set_defaults(func=_cmd_model)
    return parser


def _cmd_model(args: argparse.Namespace) -> int:
    from dp_decoding.engines.model_files import ModelUnavailableError, ensure_model_dir

    try:
        print(ensure_model_dir())
    except ModelUnavailableError as exc:
        print(f"dpicl: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from dp_decoding import cli as core_cli

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return core_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
