"""The `hylorada` command line: one sub-command per module under hylorada/commands.

Errors: bad input (UsageError, a bad flag) exits 2, a runtime failure (HyloradaError,
AssetError, NonFiniteLossError) exits 1, Ctrl-C exits 130; each prints one line
`error: <what>, <where>, <what to do>` on stderr. `--debug` (anywhere on the line) also
prints the traceback. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from .errors import HyloradaError, UsageError

DESCRIPTION = ("hylorada: make Hugging Face causal language models smaller (truncated / whitened SVD) "
               "and adapt them cheaply (LoRA, DoRA, LoRaDA, HyLoRADA); evaluate, benchmark and tune them.")

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


class Parser(argparse.ArgumentParser):
    """argparse's errors as a UsageError (one line, exit 2) instead of usage text + exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (in `{self.prog}`); see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands.flags import apply_ranges

    parser = Parser(prog="hylorada", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hylorada {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is None:  # pragma: no cover - during development only
            continue
        apply_ranges(importlib.import_module(module).add_parser(sub))
    return parser


def _known_runtime_errors() -> tuple[type[BaseException], ...]:
    """Failures of ours that predate errors.py: exit 1 with their message."""
    from .assets import AssetError
    from .train import NonFiniteLossError

    return AssetError, NonFiniteLossError


def _report(e: BaseException, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(e)
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # for messages that repeat the command (finetune's --resume hint)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        return _report(e if str(e) else KeyboardInterrupt("interrupted (Ctrl-C)"), 130, debug)
    except HyloradaError as e:
        return _report(e, e.exit_code, debug)
    except Exception as e:
        if isinstance(e, _known_runtime_errors()):
            return _report(e, 1, debug)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
