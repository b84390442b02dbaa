"""`hylorada export`: turn a saved adapter into a peft adapter or a merged model folder.

    hylorada export --adapter runs/ft/adapter --to peft   runs/ft/peft     # peft.PeftModel loads it
    hylorada export --adapter runs/ft/adapter --to merged runs/ft/merged   # from_pretrained loads it

The base model is the one the adapter records, or --model. `merged` of an adapter trained on a
compressed model writes a compressed folder (load it with `hylorada.load_model`). OUT must not
exist yet.
"""
from __future__ import annotations

import argparse

from .flags import add_common_flags, command_parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = command_parser(subparsers, "export", "export a saved adapter to peft, or merged into the model", __doc__)
    p.add_argument("--adapter", required=True, help="an adapter folder saved by `hylorada finetune`")
    p.add_argument("--to", required=True, choices=["peft", "merged"], help="what to write")
    p.add_argument("out", help="the new output folder")
    p.add_argument("--model", default=None, help="the base model (default: the one the adapter records)")
    add_common_flags(p, "dtype")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..recipes.export import export_adapter

    out = export_adapter(args.adapter, args.to, args.out, model_name=args.model, dtype=args.dtype)
    how = ("peft.PeftModel.from_pretrained(base, path)" if args.to == "peft"
           else "hylorada.load_model(path) or AutoModelForCausalLM.from_pretrained(path)")
    print(f"wrote {out} (load it with {how})")
    return 0
