"""hylorada: make Hugging Face causal language models smaller (truncated / whitened SVD) and adapt
them cheaply (LoRA, DoRA, LoRaDA, HyLoRADA); evaluate, benchmark and tune them."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module that defines `add_parser(subparsers)`; each parser sets `func(args) -> int`.
COMMANDS = {
    "eval": "hylorada.commands.eval",
    "finetune": "hylorada.commands.finetune",
    "compress": "hylorada.commands.compress",
    "analyze": "hylorada.commands.analyze",
    "benchmark": "hylorada.commands.benchmark",
    "tune": "hylorada.commands.tune",
    "generate": "hylorada.commands.generate",
    "export": "hylorada.commands.export",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hylorada", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hylorada {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is None:  # pragma: no cover - during development only
            continue
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
