"""Documents -> evaluation windows, training blocks and calibration blocks: the one place.

Window prefix (BOS). Many model families are trained with BOS at the start of every sequence;
a window without it is scored far worse than the model is (docs/DATA.md). `window_prefix` is
"auto" (default), "bos" or "none"; `resolve_window_prefix` turns it into "bos" or "none":
"auto" is "bos" exactly when the tokenizer puts `bos_token_id` before a text by default
(`adds_bos`: the ids of "x" with the default special tokens start with it; never decided from a
model name), "bos" needs a `bos_token_id`, "none" is the protocol without a prefix. With "bos"
every evaluation window (hylorada/evaluate.py), every training block and every calibration
block (`pack_blocks(bos_id=)`) is BOS + seq_len - 1 tokens of text; the BOS position is context,
never a target. The token ids themselves do not change: `eval_ids` keeps the tokenizer's own
leading BOS, which the windowing drops because every window gets its own.

Every corpus -> block path goes through `pack_blocks`:
- `training_blocks` (finetune, recovery after compression, the benchmark, tune): all blocks of
  a split, the last one right-padded; chat data through `pack_conversations` (data/chat.py);
- `calibration_blocks` (compress, analyze): the full (unpadded) blocks of each source's stream,
  a seeded random subset of them.
"""
from __future__ import annotations

import torch

from ..errors import UsageError
from .chat import IGNORE_INDEX, chat_tokens, pack_conversations, resolve_loss_on
from .corpora import as_spec
from .tokens import encode, eval_ids, token_stream
from .user import load_corpus, load_documents

WINDOW_PREFIXES = ("auto", "bos", "none")
MIN_TOKENS = 2  # one window: a token scored from at least one token of context


# ----------------------------------------------------------------------------- window prefix
def adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts its BOS before a text by default: `bos_token_id` is set and
    the ids of "x" with the default special tokens start with it (and without them do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special, plain = encode(tokenizer, "x", True), encode(tokenizer, "x", False)
    return bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)


def resolve_window_prefix(tokenizer, window_prefix: str = "auto") -> str:
    """"bos" or "none": what `window_prefix` ("auto" | "bos" | "none") means for this tokenizer."""
    if window_prefix not in WINDOW_PREFIXES:
        raise UsageError(f"window_prefix={window_prefix!r} is invalid: allowed {list(WINDOW_PREFIXES)}")
    if window_prefix == "auto":
        return "bos" if adds_bos(tokenizer) else "none"
    if window_prefix == "bos" and getattr(tokenizer, "bos_token_id", None) is None:
        raise UsageError("window_prefix='bos' needs a tokenizer with a bos_token_id; this one has none "
                         "(allowed here: 'auto' or 'none')")
    return window_prefix


def window_bos_id(tokenizer, window_prefix: str = "auto") -> int | None:
    """The token id every window/block starts with (`bos_token_id`), or None for no prefix."""
    return int(tokenizer.bos_token_id) if resolve_window_prefix(tokenizer, window_prefix) == "bos" else None


def drop_leading(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """`ids` (1-D) without a leading `bos_id` (the tokenizer's own BOS before the corpus)."""
    if bos_id is not None and ids.numel() and int(ids[0]) == bos_id:
        return ids[1:]
    return ids


def default_pad_id(tokenizer) -> int:
    """The id that pads a block: the tokenizer's pad token, else its EOS, else 0 (padding has
    attention mask 0 and label -100, so the id itself never reaches a loss)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


# ----------------------------------------------------------------------------- blocks
def pack_blocks(ids: torch.Tensor, seq_len: int, pad_id: int | None = 0, *,
                bos_id: int | None = None, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cut a token stream into consecutive blocks of `seq_len` for training.

    Returns input_ids, attention_mask and labels, each LongTensor [n_blocks, seq_len]. Labels
    are the input ids (the model shifts them); padding has attention_mask 0 and label -100.
    - bos_id None: block i holds ids[i*L : (i+1)*L] (L = seq_len), n_blocks = ceil(N / L);
    - bos_id set (window prefix "bos"): block i is [bos_id] + ids[i*(L-1) : (i+1)*(L-1)],
      n_blocks = ceil(N / (L-1)); the BOS has attention_mask 1 and label -100 (context, never a
      target), so every stream token is a target exactly once (the first of a block is
      predicted from the BOS). A leading `bos_id` in `ids` is dropped first (`drop_leading`).
    The last partial block is right-padded with `pad_id` (0 if None). `labels` (a stream as
    long as `ids`, -100 where a token is not a target) replaces the ids as labels.
    """
    if seq_len < (1 if bos_id is None else 2):
        raise ValueError(f"seq_len must be >= {1 if bos_id is None else 2}" +
                         ("" if bos_id is None else " with a BOS prefix") + f", got {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    targets = ids if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if targets.shape != ids.shape:
        raise ValueError(f"labels must match ids: {tuple(targets.shape)} vs {tuple(ids.shape)}")
    if bos_id is not None:
        cut = ids.numel() - drop_leading(ids, bos_id).numel()
        body = pack_blocks(ids[cut:], seq_len - 1, pad_id, labels=targets[cut:])
        n_blocks = body["input_ids"].shape[0]
        first = {"input_ids": int(bos_id), "attention_mask": 1, "labels": IGNORE_INDEX}
        return {k: torch.cat([torch.full((n_blocks, 1), first[k], dtype=torch.long), v], dim=1)
                for k, v in body.items()}
    n = ids.numel()
    n_blocks = -(-n // seq_len)
    pad = 0 if pad_id is None else int(pad_id)
    input_ids = torch.full((n_blocks * seq_len,), pad, dtype=torch.long)
    input_ids[:n] = ids
    mask = torch.zeros(n_blocks * seq_len, dtype=torch.long)
    mask[:n] = 1
    out_labels = torch.full((n_blocks * seq_len,), IGNORE_INDEX, dtype=torch.long)
    out_labels[:n] = targets
    shape = (n_blocks, seq_len)
    return {"input_ids": input_ids.reshape(shape), "attention_mask": mask.reshape(shape),
            "labels": out_labels.reshape(shape)}


def require_tokens(n: int, what: str, minimum: int = MIN_TOKENS) -> None:
    """Refuse data too short for even one window (UsageError with the count and the minimum)."""
    if n < minimum:
        raise UsageError(f"{what}: {n} token(s), too few for one window (at least {minimum} needed)")


def training_blocks(tokenizer, data, split: str, seq_len: int, pad_id: int | None = None, *,
                    bos_id: int | None = None, max_tokens: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(blocks, info): the one way a split becomes training blocks.

    Text: `token_stream` (documents joined by EOS), the first `max_tokens`, `pack_blocks`.
    Chat: `chat_tokens` per conversation (loss on assistant turns or all, DataSpec.loss_on),
    the first `max_tokens` tokens, `pack_conversations`. Blocks start with `bos_id` when given
    (`window_bos_id`); padding uses `pad_id` (None: `default_pad_id(tokenizer)`). info:
    documents, tokens (before the cut), chat, loss_on, targets (labels != -100, padding and BOS
    excluded)."""
    spec = as_spec(data)
    docs = load_documents(spec, split)
    chat = any(d.messages is not None for d in docs)
    loss_on = resolve_loss_on(spec.loss_on, chat)
    what = f"{spec} ({split})"
    pad_id = default_pad_id(tokenizer) if pad_id is None else pad_id
    if not chat:
        ids = token_stream(tokenizer, [d.text for d in docs])
        n_tokens = int(ids.numel())
        ids = ids[:max_tokens] if max_tokens else ids
        require_tokens(int(ids.numel()), what)
        blocks = pack_blocks(ids, seq_len, pad_id, bos_id=bos_id)
    else:
        seqs = [chat_tokens(tokenizer, d.messages, loss_on) for d in docs]
        n_tokens = sum(len(i) for i, _ in seqs)
        if max_tokens:
            seqs = _first_tokens(seqs, max_tokens)
        require_tokens(sum(len(i) for i, _ in seqs), what)
        blocks = pack_conversations(seqs, seq_len, pad_id, bos_id=bos_id)
    targets = int((blocks["labels"] != IGNORE_INDEX).sum())
    if targets == 0:
        raise UsageError(f"{what}: no target tokens (loss on {loss_on}); give data with assistant turns or "
                         "--loss-on all")
    return blocks, {"documents": len(docs), "tokens": n_tokens, "chat": chat, "loss_on": loss_on,
                    "targets": targets}


def _first_tokens(seqs, n: int):
    """The (ids, labels) conversations cut to their first `n` tokens in total."""
    out = []
    for ids, labels in seqs:
        if n <= 0:
            break
        out.append((ids[:n], labels[:n]))
        n -= len(ids)
    return out


def source_list(sources) -> list:
    """Sources as a list: "kjv,my.txt" -> ["kjv", "my.txt"]; a list (of names, paths or
    DataSpecs) as it is; empty names dropped."""
    items = sources.split(",") if isinstance(sources, str) else list(sources)
    items = [s.strip() if isinstance(s, str) else s for s in items]
    return [s for s in items if s]


def calibration_blocks(tokenizer, corpora, n_blocks: int, seq_len: int, split: str = "train",
                       seed: int | None = 0, window_prefix: str = "auto") -> torch.Tensor:
    """LongTensor [n_blocks, seq_len] of calibration text: each source's `split` texts
    (`load_corpus`, conversations rendered with the chat template) as one `token_stream`, cut
    by `pack_blocks` (BOS + seq_len - 1 tokens under window prefix "bos"), the full blocks only
    (no padding), of which a seeded random subset is taken (sorted, so in stream order; seed None: the first
    n_blocks, as `hylorada benchmark` calibrates).
    Several sources (a list or "kjv,shakespeare") share the blocks as evenly as possible, the
    first ones taking one more (a mix calibrates for both; calibrating on one corpus alone
    hurts the other one badly)."""
    names = source_list(corpora)
    if not names or n_blocks < 1 or seq_len < 2:
        raise ValueError(f"calibration needs corpora, n_blocks >= 1 and seq_len >= 2; got "
                         f"{names!r}, {n_blocks}, {seq_len}")
    bos = window_bos_id(tokenizer, window_prefix)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    per = [n_blocks // len(names) + (i < n_blocks % len(names)) for i in range(len(names))]
    out = []
    for name, n in zip(names, per):
        if n == 0:
            continue
        blocks = pack_blocks(token_stream(tokenizer, load_corpus(name, split, tokenizer=tokenizer)), seq_len,
                             bos_id=bos)
        windows = blocks["input_ids"][blocks["attention_mask"].all(dim=1)]
        avail = windows.shape[0]
        if avail < n:
            raise UsageError(f"{name} ({split}) has {avail} blocks of {seq_len} tokens, {n} asked")
        pick = torch.arange(n) if g is None else torch.randperm(avail, generator=g)[:n].sort().values
        out.append(windows[pick])
    return torch.cat(out)


def eval_split(tokenizer, data, split: str) -> tuple[list[str], torch.Tensor]:
    """(texts, `eval_ids`) of one split for perplexity; conversations rendered with the chat
    template and scored on every token. Refused when shorter than one window."""
    texts = load_corpus(data, split, tokenizer=tokenizer)
    ids = eval_ids(tokenizer, texts)
    require_tokens(int(ids.shape[1]), f"{as_spec(data)} ({split})")
    return texts, ids

