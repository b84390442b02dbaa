"""Perplexity (and LiM perplexity) of a model on one split: the workflow behind `hylorada eval`.

    results = evaluate_split(model, tokenizer, EvalSettings(data="kjv", split="test", seq_len=512))

Top to bottom: the split's token ids (hylorada.data.eval_split; the first `max_tokens`) ->
perplexity over `seq_len` windows (non-overlapping, or sliding by `stride`) and, with `lim`, the
per-position-bucket LiM perplexity (one pass gives both when there is no stride;
hylorada/evaluate.py) -> a printed table -> the JSON record (written atomically to `json_out`).
Every window starts with the tokenizer's BOS when `window_prefix` resolves to "bos" (context,
not scored).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import data, evaluate
from ..config import option
from ..utils.io import atomic_write_text
from ..utils.env import environment


@dataclass
class EvalSettings:
    """The fields with a help text are `hylorada eval` flags (EVAL_FIELDS)."""

    data: Any  # a hylorada.data.DataSpec, a corpus name or a path
    split: str = option("test", "which part of --data; a user's data is split 90/5/5 in order (docs/DATA.md)",
                        choices=(*data.SPLITS, "all"))
    seq_len: int = option(512, "window length in tokens")
    stride: int | None = option(None, "sliding-window stride (default: non-overlapping windows)")
    max_tokens: int | None = option(None, "evaluate only the first N tokens")
    batch_size: int = option(8, "windows per forward")
    lim: bool = option(False, "also report LiM perplexity (position buckets)")
    n_buckets: int = option(10, "LiM buckets")
    window_prefix: str = option("auto", "start every window with BOS: auto (when the tokenizer adds one), bos, none",
                                choices=data.WINDOW_PREFIXES)
    progress: bool = True
    json_out: str | None = None
    model_name: str = ""  # printed
    record: dict = field(default_factory=dict)  # the JSON's "args": the command's flags


EVAL_FIELDS = ("split", "seq_len", "stride", "max_tokens", "batch_size", "lim", "n_buckets", "window_prefix")


def evaluate_split(model, tokenizer, s: EvalSettings, *, load_s: float = 0.0) -> dict:
    """The whole evaluation (see the module doc); returns the JSON record."""
    timings = {"load_s": load_s}
    window_prefix = data.resolve_window_prefix(tokenizer, s.window_prefix)
    bos_id = tokenizer.bos_token_id if window_prefix == "bos" else None
    t0 = time.perf_counter()
    docs, ids = data.eval_split(tokenizer, s.data, s.split)
    total_tokens = ids.shape[1]
    if s.max_tokens is not None:
        ids = ids[:, : s.max_tokens]
    data.require_tokens(int(ids.shape[1]), f"--data {s.data} ({s.split} split)")
    timings["data_s"] = time.perf_counter() - t0
    size = evaluate.model_size(model)
    t0 = time.perf_counter()
    ppl, lim = _perplexity(model, ids, s, bos_id)
    timings["eval_s"] = time.perf_counter() - t0
    rows = [
        ("model", s.model_name),
        ("data", f"{s.data} / {s.split} ({len(docs)} documents, {total_tokens:,} tokens)"),
        ("evaluated tokens", f"{ids.shape[1]:,}" + (f" (--max-tokens {s.max_tokens})" if s.max_tokens else "")),
        ("windows", f"{ppl['n_windows']} x {s.seq_len}" + (f", stride {s.stride}" if s.stride else
                                                         " (non-overlapping)")),
        ("window prefix", window_prefix + (f" (BOS id {bos_id} starts every window)" if bos_id is not None else "")),
        ("scored tokens", f"{ppl['n_tokens']:,}"),
        ("perplexity", f"{ppl['ppl']:.4f}"),
        ("NLL / token", f"{ppl['nll']:.5f} nats"),
        ("model size", f"{size.n_bytes / 2**20:.1f} MiB, {size.n_params:,} parameters"),
        ("load / data / eval", f"{timings['load_s']:.1f} s / {timings['data_s']:.1f} s / {timings['eval_s']:.1f} s"),
    ]
    if lim is not None:
        rows.append(("LiM perplexity", f"{lim.lim_ppl:.4f} (mean of {lim.n_buckets} bucket PPLs)"))
    print(_table(rows))
    if lim is not None:
        print("\n  bucket  positions      tokens        ppl")
        for b, (p, c) in enumerate(zip(lim.bucket_ppl, lim.bucket_tokens)):
            lo, hi = b / lim.n_buckets, (b + 1) / lim.n_buckets
            print(f"  {b:>6}  {lo:4.2f}-{hi:4.2f}  {c:>10,}  {p:>9.4f}")
    record = {
        "command": "eval",
        "args": s.record,
        "data": {"name": str(s.data), "split": s.split, "documents": len(docs),
                 "tokens_total": int(total_tokens), "tokens_evaluated": int(ids.shape[1])},
        "window_prefix": window_prefix, "perplexity": ppl, "lim": lim.to_dict() if lim is not None else None,
        "size": size.to_dict(), "timings": timings, "env": environment(str(next(model.parameters()).device)),
    }
    if s.json_out:
        atomic_write_text(Path(s.json_out), json.dumps(evaluate.jsonable(record), indent=2))
        print(f"\n  wrote {s.json_out}")
    return record


def _perplexity(model, ids: torch.Tensor, s: EvalSettings, bos_id: int | None):
    """(perplexity dict, LiM result or None); one LiM pass gives both when there is no stride."""
    lim = None
    if s.lim and s.stride is None:
        lim = evaluate.lim_perplexity(model, ids, s.seq_len, n_buckets=s.n_buckets, batch_size=s.batch_size,
                                      progress=s.progress, bos_id=bos_id)
        ppl = {"ppl": lim.ppl, "nll": lim.nll, "n_tokens": lim.n_tokens, "total_nll": lim.total_nll,
               "n_windows": lim.n_windows, "seq_len": s.seq_len, "stride": None, "seconds": lim.seconds,
               "window_prefix": lim.window_prefix}
        return ppl, lim
    res = evaluate.perplexity(model, ids, s.seq_len, stride=s.stride, batch_size=s.batch_size,
                              progress=s.progress, bos_id=bos_id)
    ppl = res.to_dict()
    ppl.pop("window_tokens")
    ppl.pop("window_nll")
    if s.lim:
        lim = evaluate.lim_perplexity(model, ids, s.seq_len, n_buckets=s.n_buckets, batch_size=s.batch_size,
                                      progress=s.progress, bos_id=bos_id)
    return ppl, lim


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


