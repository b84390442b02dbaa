"""Chat data: conversations ({role, content} messages) rendered with the tokenizer's chat
template, the assistant-only labels, and packing whole conversations into training blocks.

With loss on "assistant" only the assistant turns are targets (`assistant_spans`,
`chat_tokens`); the other tokens get label -100 (`pack_conversations`). docs/DATA.md, "Chat data
and the assistant-only loss", has the rule with examples.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UsageError
from .tokens import encode

LOSS_ON = ("assistant", "all")
IGNORE_INDEX = -100

def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the data are conversations (a messages column) but the tokenizer has no chat template; "
                         "use a model whose tokenizer has one, or a text column with --text-field")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) character spans of the assistant turns]).

    For assistant message j the span runs from the end of render(messages[:j]) with the
    generation prompt (so the "assistant" header is not a target) to the end of
    render(messages[:j+1]) (its content and end-of-turn tokens are). Each prefix rendering must
    be a prefix of the whole; a template that rewrites earlier turns is refused."""
    full = render_chat(tokenizer, messages)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:j], add_generation_prompt=True) if j else ""
        upto = render_chat(tokenizer, messages[: j + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            raise UsageError("--loss-on assistant: this tokenizer's chat template does not render a conversation's "
                             "prefixes as prefixes of the whole, so the assistant turns cannot be located; "
                             "use --loss-on all")
        spans.append((len(head), len(upto)))
    return full, spans


def chat_tokens(tokenizer, messages: Sequence[dict], loss_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: the rendered text tokenized once, without special
    tokens the tokenizer would add (the template writes its own). loss_on "all": labels = ids;
    "assistant": a token is a target iff its first character lies in an assistant span
    (`assistant_spans`, via the tokenizer's offset mapping), else label -100."""
    if loss_on == "all":
        ids = encode(tokenizer, render_chat(tokenizer, messages), False)
        return list(ids), list(ids)
    full, spans = assistant_spans(tokenizer, messages)
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        raise UsageError("--loss-on assistant needs a fast tokenizer (character offsets); use --loss-on all") from None
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX for t, (start, _) in zip(ids, offsets)]
    return ids, labels


def resolve_loss_on(loss_on: str | None, chat: bool) -> str:
    """"assistant" or "all": None means assistant for chat data and all for text."""
    if loss_on is None:
        return "assistant" if chat else "all"
    if loss_on not in LOSS_ON:
        raise UsageError(f"--loss-on {loss_on!r} is invalid: allowed {', '.join(LOSS_ON)}")
    if loss_on == "assistant" and not chat:
        raise UsageError("--loss-on assistant needs chat data (a messages column of {role, content}); this data is "
                         "plain text: use --loss-on all")
    return loss_on


def pack_conversations(seqs: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int | None = 0, *,
                       bos_id: int | None = None) -> dict[str, torch.Tensor]:
    """Training blocks of (ids, labels) conversations, each kept whole where it fits.

    With span = seq_len (seq_len - 1 under a BOS prefix), a block holds consecutive whole
    conversations while their total fits in span; a conversation longer than span fills blocks of
    its own, its remainder starting the next block. Blocks are right-padded (pad_id, attention
    mask 0, label -100); with bos_id each block starts with BOS (mask 1, label -100)."""
    span = seq_len - (bos_id is not None)
    if span < 1:
        raise ValueError(f"seq_len must be >= {1 + (bos_id is not None)}, got {seq_len}")
    rows: list[tuple[list[int], list[int]]] = []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    for ids, labels in seqs:
        if cur_ids and len(cur_ids) + len(ids) > span:
            rows.append((cur_ids, cur_lab))
            cur_ids, cur_lab = [], []
        while len(cur_ids) + len(ids) > span:
            rows.append((ids[:span], labels[:span]))
            ids, labels = ids[span:], labels[span:]
        cur_ids, cur_lab = cur_ids + list(ids), cur_lab + list(labels)
    if cur_ids:
        rows.append((cur_ids, cur_lab))
    pad = 0 if pad_id is None else int(pad_id)
    n = len(rows)
    out = {"input_ids": torch.full((n, seq_len), pad, dtype=torch.long),
           "attention_mask": torch.zeros((n, seq_len), dtype=torch.long),
           "labels": torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)}
    first = int(bos_id is not None)
    for r, (ids, labels) in enumerate(rows):
        if bos_id is not None:
            out["input_ids"][r, 0], out["attention_mask"][r, 0] = int(bos_id), 1
        out["input_ids"][r, first:first + len(ids)] = torch.tensor(ids, dtype=torch.long)
        out["attention_mask"][r, first:first + len(ids)] = 1
        out["labels"][r, first:first + len(ids)] = torch.tensor(labels, dtype=torch.long)
    return out

