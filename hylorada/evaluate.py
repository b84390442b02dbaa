"""Honest evaluation: perplexity, LiM perplexity, true model size, forward throughput.

Perplexity protocol (`perplexity`), for a token sequence [1, N] and a window length L. The
window prefix (`bos_id`, see hylorada/data/blocks.py "Window prefix") decides how a window starts:

Without a prefix (`bos_id=None`, window prefix "none"; the protocol of every number before the
prefix existed, and of any tokenizer that adds no BOS, e.g. SmolLM2's):
- default: non-overlapping windows [0, L), [L, 2L), ...; the last, shorter window is included.
  In each window positions 1..len-1 are scored (position 0 has no context in its window), so
  n_tokens = sum(len_w - 1);
- with `stride` S <= L: the sliding-window protocol of the Hugging Face perplexity guide.
  Windows start at 0, S, 2S, ... and end at min(start + L, N); the first window scores all its
  positions (1..len-1), every later window only the tokens past the previous window's end (its
  last S tokens, fewer in the final window). Every token but the first is scored exactly once,
  each with at least L - S tokens of context.

With a BOS prefix (`bos_id` set, window prefix "bos"): a leading `bos_id` in the ids (the
tokenizer's own BOS before the corpus) is dropped, leaving N text tokens; every window is
[bos_id] + a span of at most L - 1 text tokens, so it is at most L tokens long. The BOS is
context only; every text token of the span is scored, the first one predicted from the BOS:
- default: spans [0, L-1), [L-1, 2(L-1)), ...; every text token is scored exactly once,
  n_tokens = N, windows = ceil(N / (L-1));
- with `stride` S <= L - 1: spans start at 0, S, 2S, ... and end at min(start + L - 1, N);
  the first window scores its whole span, every later one only the tokens past the previous
  span's end. Every text token is scored exactly once, each with the BOS and at least
  L - 1 - S text tokens of context.

In both: PPL = exp(total NLL / scored tokens): one mean over tokens, never a mean of
per-window PPLs.
Losses are computed in fp32 from the logits with `F.cross_entropy(reduction="none")`, under
`torch.no_grad()`, windows of equal length batched together.

LiM ("lost in the middle") perplexity (`lim_perplexity`): non-overlapping windows as above (with
or without the BOS prefix); the
j-th scored token of a window with m scored tokens (j = 0..m-1) falls in bucket
floor(n_buckets * j / m). Every bucket gets its own PPL = exp(bucket NLL / bucket tokens); the
LiM PPL is the mean of the bucket PPLs (over non-empty buckets). The buckets partition the
scored tokens, so their counts and NLLs add up to the plain perplexity's.

The model can be any module whose `forward(input_ids=..., attention_mask=...)` returns an
object with `.logits` (a Hugging Face model or a wrapper).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return x


class _Result:
    def to_dict(self) -> dict:
        """A JSON-serialisable dict (non-finite floats become null / "inf")."""
        return jsonable(dataclasses.asdict(self))


@dataclass
class PerplexityResult(_Result):
    ppl: float  # exp(nll)
    nll: float  # mean NLL per scored token (nats)
    n_tokens: int  # scored tokens
    total_nll: float
    n_windows: int
    seq_len: int
    stride: int | None
    seconds: float
    tokens_per_s: float  # tokens fed to the model per second
    window_tokens: list[int] = field(default_factory=list)  # scored tokens per window
    window_nll: list[float] = field(default_factory=list)  # summed NLL per window
    window_prefix: str = "none"  # "bos" (every window starts with BOS) or "none"


@dataclass
class LimResult(_Result):
    lim_ppl: float  # mean of the bucket PPLs (non-empty buckets)
    ppl: float  # plain perplexity over all scored tokens
    nll: float
    n_tokens: int
    total_nll: float
    n_buckets: int
    bucket_ppl: list[float]
    bucket_nll: list[float]  # mean NLL per token in the bucket
    bucket_tokens: list[int]
    seq_len: int
    n_windows: int
    seconds: float
    window_prefix: str = "none"  # "bos" (every window starts with BOS) or "none"


@dataclass
class SizeResult(_Result):
    n_params: int  # parameter elements, tied (shared) tensors counted once
    n_bytes: int  # bytes a saved model needs: parameters + persistent buffers
    n_param_bytes: int
    n_buffers: int  # persistent buffer elements
    n_buffers_bytes: int
    n_nonpersistent_bytes: int  # buffers recomputed at load (not saved, not in n_bytes)
    n_tensors: int  # distinct tensors counted
    n_shared: int  # extra references to already-counted tensors (e.g. tied embeddings)
    n_trainable: int  # trainable parameter elements
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def mb(self) -> float:
        return self.n_bytes / 2**20


@dataclass
class ThroughputResult(_Result):
    tokens_per_s: float
    ms_per_batch: float
    seconds: float
    n_tokens: int
    seq_len: int
    batch_size: int
    n_batches: int
    warmup: int
    device: str


# ----------------------------------------------------------------------------- helpers
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _as_ids(token_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"token_ids must be [1, N] or [N], got {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be [1, N] or [N], got {tuple(ids.shape)}")
    return ids.long()


def windows(n: int, seq_len: int, stride: int | None = None, *, bos: bool = False) -> list[tuple[int, int, int]]:
    """The windows of the protocol as (start, end, first scored offset) over n tokens.

    Without `bos`: the window is ids[start:end] and it scores ids[start + first:end] (first >= 1).
    With `bos`: the window is [BOS] + ids[start:end] (end - start <= seq_len - 1) and it scores
    ids[start + first:end] (first >= 0: the first text token is predicted from the BOS)."""
    from .errors import UsageError

    if seq_len < 2:
        raise UsageError(f"seq_len must be >= 2, got {seq_len}")
    span, lo = (seq_len - 1, 0) if bos else (seq_len, 1)
    out = []
    if stride is None:
        for start in range(0, n, span):
            end = min(start + span, n)
            if end - start - lo >= 1:
                out.append((start, end, lo))
        return out
    if not 1 <= stride <= span:
        raise UsageError(f"stride must be in [1, {'seq_len - 1' if bos else 'seq_len'}={span}]"
                         f"{' with a BOS window prefix' if bos else ''}, got {stride}")
    prev_end = 0
    for start in range(0, n, stride):
        end = min(start + span, n)
        first = max(lo, prev_end - start)  # score only tokens past the previous window
        if end - first - start >= 1:
            out.append((start, end, first))
        prev_end = end
        if end == n:
            break
    return out


def _window_input(ids: torch.Tensor, win: tuple[int, int, int], bos_id: int | None) -> torch.Tensor:
    x = ids[win[0]:win[1]]
    return x if bos_id is None else torch.cat([x.new_tensor([bos_id]), x])


@torch.no_grad()
def _score(model: nn.Module, ids: torch.Tensor, wins, batch_size: int, device, progress: bool, desc: str,
           bos_id: int | None = None):
    """Yields (window index, per-token NLL [n_scored] fp32 on CPU) for every window."""
    device = torch.device(device) if device is not None else _model_device(model)
    p = 0 if bos_id is None else 1  # input index of text offset j is j + p
    groups: dict[int, list[int]] = {}
    for i, (s, e, _) in enumerate(wins):
        groups.setdefault(e - s, []).append(i)
    batches = [idx[k:k + batch_size] for length, idx in groups.items() for k in range(0, len(idx), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(wins), desc=desc, unit="win")
    was_training = model.training
    model.eval()  # no dropout while scoring; the mode is restored afterwards
    try:
        for batch in batches:
            x = torch.stack([_window_input(ids, wins[i], bos_id) for i in batch]).to(device)
            out = model(input_ids=x, attention_mask=torch.ones_like(x))
            logits = out.logits if hasattr(out, "logits") else out[0]
            for row, i in enumerate(batch):
                first = wins[i][2] + p
                lg = logits[row, first - 1:-1].float()  # predicts input positions first..len-1
                tgt = x[row, first:]
                yield i, F.cross_entropy(lg, tgt, reduction="none").cpu()
            if bar is not None:
                bar.update(len(batch))
            del out, logits
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()


def _prepare(token_ids, seq_len: int, stride: int | None, bos_id: int | None):
    from .data import drop_leading

    ids = drop_leading(_as_ids(token_ids), bos_id)
    wins = windows(ids.numel(), seq_len, stride, bos=bos_id is not None)
    if not wins:
        raise ValueError(f"{ids.numel()} tokens give no scored position "
                         f"(need at least {1 if bos_id is not None else 2})")
    return ids, wins


# ----------------------------------------------------------------------------- perplexity
def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int, stride: int | None = None,
               batch_size: int = 8, device=None, progress: bool = False, *,
               bos_id: int | None = None) -> PerplexityResult:
    """Perplexity of `token_ids` ([1, N]) with windows of `seq_len` (see the module docstring).
    `bos_id`: start every window with this token (hylorada.data.window_bos_id); None: no prefix."""
    ids, wins = _prepare(token_ids, seq_len, stride, bos_id)
    w_tokens = [0] * len(wins)
    w_nll = [0.0] * len(wins)
    t0 = time.perf_counter()
    for i, nll in _score(model, ids, wins, batch_size, device, progress, "perplexity", bos_id):
        w_tokens[i] = nll.numel()
        w_nll[i] = float(nll.double().sum())
    seconds = time.perf_counter() - t0
    total, n = math.fsum(w_nll), sum(w_tokens)
    fed = sum(e - s + (bos_id is not None) for s, e, _ in wins)
    return PerplexityResult(ppl=math.exp(total / n), nll=total / n, n_tokens=n, total_nll=total,
                            n_windows=len(wins), seq_len=seq_len, stride=stride, seconds=seconds,
                            tokens_per_s=fed / seconds if seconds > 0 else float("inf"),
                            window_tokens=w_tokens, window_nll=w_nll,
                            window_prefix="none" if bos_id is None else "bos")


def lim_perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int, n_buckets: int = 10,
                   batch_size: int = 8, device=None, progress: bool = False, *,
                   bos_id: int | None = None) -> LimResult:
    """Per-token loss bucketed by relative position in the (non-overlapping) window; `bos_id` as
    in `perplexity`."""
    if n_buckets < 1:
        raise ValueError("n_buckets must be >= 1")
    ids, wins = _prepare(token_ids, seq_len, None, bos_id)
    b_nll = torch.zeros(n_buckets, dtype=torch.float64)
    b_cnt = torch.zeros(n_buckets, dtype=torch.long)
    t0 = time.perf_counter()
    for _, nll in _score(model, ids, wins, batch_size, device, progress, "LiM perplexity", bos_id):
        m = nll.numel()
        bucket = torch.div(torch.arange(m) * n_buckets, m, rounding_mode="floor")  # floor(n_b * j / m)
        b_nll.index_add_(0, bucket, nll.double())
        b_cnt.index_add_(0, bucket, torch.ones(m, dtype=torch.long))
    seconds = time.perf_counter() - t0
    cnt = b_cnt.tolist()
    bucket_nll = [float(s) / c if c else float("nan") for s, c in zip(b_nll.tolist(), cnt)]
    bucket_ppl = [math.exp(x) if c else float("nan") for x, c in zip(bucket_nll, cnt)]
    filled = [p for p, c in zip(bucket_ppl, cnt) if c]
    total, n = math.fsum(b_nll.tolist()), sum(cnt)
    return LimResult(lim_ppl=sum(filled) / len(filled), ppl=math.exp(total / n), nll=total / n,
                     n_tokens=n, total_nll=total, n_buckets=n_buckets, bucket_ppl=bucket_ppl,
                     bucket_nll=bucket_nll, bucket_tokens=cnt, seq_len=seq_len, n_windows=len(wins),
                     seconds=seconds, window_prefix="none" if bos_id is None else "bos")


# ----------------------------------------------------------------------------- size
def _tensor_key(t: torch.Tensor):
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.device.index, t.data_ptr(), t.numel(), t.dtype)


def model_size(model: nn.Module) -> SizeResult:
    """Parameters and bytes of everything a saved model needs.

    Counts every parameter and every persistent buffer once: tensors that share storage (same
    data pointer, size and dtype, e.g. tied input/output embeddings) are counted once.
    Non-persistent buffers (e.g. rotary inverse frequencies) are reported separately.
    """
    seen: set = set()
    n_params = n_param_bytes = n_buffers = n_buffers_bytes = n_nonpersistent = 0
    n_tensors = n_shared = n_trainable = 0
    by_dtype: dict[str, int] = {}

    def take(t: torch.Tensor) -> bool:
        nonlocal n_shared, n_tensors
        key = _tensor_key(t)
        if key in seen:
            n_shared += 1
            return False
        seen.add(key)
        n_tensors += 1
        nbytes = t.numel() * t.element_size()
        name = str(t.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + nbytes
        return True

    for p in _all_parameters(model):
        if take(p):
            n_params += p.numel()
            n_param_bytes += p.numel() * p.element_size()
            if p.requires_grad:
                n_trainable += p.numel()
    nonpersistent_seen: set = set()
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in module._buffers.items():
            if b is None:
                continue
            if name in skip:
                key = _tensor_key(b)
                if key not in nonpersistent_seen:
                    nonpersistent_seen.add(key)
                    n_nonpersistent += b.numel() * b.element_size()
                continue
            if take(b):
                n_buffers += b.numel()
                n_buffers_bytes += b.numel() * b.element_size()
    return SizeResult(n_params=n_params, n_bytes=n_param_bytes + n_buffers_bytes, n_param_bytes=n_param_bytes,
                      n_buffers=n_buffers, n_buffers_bytes=n_buffers_bytes, n_nonpersistent_bytes=n_nonpersistent,
                      n_tensors=n_tensors, n_shared=n_shared, n_trainable=n_trainable, bytes_by_dtype=by_dtype)


def _all_parameters(model: nn.Module):
    """Every parameter reference, duplicates included (so that sharing can be counted)."""
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                yield p


# ----------------------------------------------------------------------------- speed
@torch.no_grad()
def throughput(model: nn.Module, seq_len: int = 512, batch_size: int = 1, n_batches: int = 3,
               warmup: int = 1, device=None, vocab_size: int | None = None, seed: int = 0) -> ThroughputResult:
    """Forward tokens per second under no_grad (random token ids, after `warmup` batches)."""
    device = torch.device(device) if device is not None else _model_device(model)
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None) or 256
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device)
    mask = torch.ones_like(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(input_ids=x, attention_mask=mask)
        sync()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            model(input_ids=x, attention_mask=mask)
        sync()
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    n = batch_size * seq_len * n_batches
    return ThroughputResult(tokens_per_s=n / seconds if seconds > 0 else float("inf"),
                            ms_per_batch=1000 * seconds / max(n_batches, 1), seconds=seconds, n_tokens=n,
                            seq_len=seq_len, batch_size=batch_size, n_batches=n_batches, warmup=warmup,
                            device=str(device))
