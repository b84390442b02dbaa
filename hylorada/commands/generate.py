"""`hylorada generate`: text from a model, optionally with a saved adapter or a compressed folder.

    hylorada generate --model smollm2-135m --prompt "Write a haiku about the sea."
    hylorada generate --model smollm2-135m --adapter runs/ft/adapter --prompt "..." --max-new-tokens 80
    hylorada generate --compressed runs/c20 --prompt "..." --do-sample --temperature 0.7 --top-p 0.9

The prompt is one user turn of the tokenizer's chat template when it has one (--no-chat off);
decoding is greedy unless --do-sample; the text streams to stdout as it is generated.
"""
from __future__ import annotations

import argparse

from .flags import MODEL_HELP, add_common_flags, command_parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = command_parser(subparsers, "generate", "generate text (chat template, greedy or sampling, streamed)", __doc__)
    src = p.add_mutually_exclusive_group()
    add_common_flags(src, "model", defaults={"model": None}, helps={"model": MODEL_HELP + " (default: smollm2-135m)"})
    src.add_argument("--compressed", default=None, help="a folder written by `hylorada compress`")
    p.add_argument("--adapter", default=None, help="an adapter folder saved by `hylorada finetune`")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling, 0 = off (default: %(default)s)")
    add_common_flags(p, "seed", "dtype", "device", helps={"seed": "random seed for sampling (default: %(default)s)"})
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from ..loading import load_model
    from ..recipes.export import load_adapted
    from ..recipes.generate import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  seed=args.seed)
    name = args.compressed or args.model
    if args.adapter:
        model, tokenizer = load_adapted(name, args.adapter, dtype=args.dtype, device=args.device)
    else:
        model, tokenizer = load_model(name or "smollm2-135m", dtype=args.dtype, device=args.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate(model, tokenizer, args.prompt, settings, chat=False if args.no_chat else None, streamer=streamer)
    return 0
