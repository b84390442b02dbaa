"""Corpora and user data -> documents -> token ids -> evaluation windows, training blocks and
calibration blocks. The one place that turns text into blocks; docs/DATA.md has the rules.

- data/corpora.py: the pinned corpora (kjv, shakespeare), Gutenberg stripping, the fixed split rule;
- data/user.py: user files, folders and datasets, the user-data split rule, `load_documents`;
- data/chat.py: conversations, assistant-only labels, whole-conversation packing;
- data/tokens.py: `token_stream` / `eval_ids` with their on-disk cache;
- data/blocks.py: the window prefix (BOS), `pack_blocks`, `training_blocks`,
  `calibration_blocks`, `eval_split`.

Every public name is importable from `hylorada.data` itself.
"""
from .blocks import (MIN_TOKENS, WINDOW_PREFIXES, adds_bos, calibration_blocks, default_pad_id, drop_leading,
                     eval_split, pack_blocks, require_tokens, resolve_window_prefix, source_list, training_blocks,
                     window_bos_id)
from .chat import IGNORE_INDEX, LOSS_ON, assistant_spans, chat_tokens, pack_conversations, render_chat, resolve_loss_on
from .corpora import (CORPORA, LOADERS, SPLIT_FRACTIONS, SPLITS, DataSpec, Document, as_spec, assign_splits,
                      strip_gutenberg)
from .tokens import EVAL_JOIN, encode, eval_ids, token_stream
from .user import (DATA_SUFFIXES, HUB_SPLITS, USER_SPLIT_PERCENT, assign_contiguous, corpus_documents, drop_empty,
                   first_bad_json_line, load_corpus, load_documents, rows_to_documents, split_documents,
                   split_summary, split_user_documents)

__all__ = [
    "CORPORA", "DATA_SUFFIXES", "EVAL_JOIN", "HUB_SPLITS", "IGNORE_INDEX", "LOADERS", "LOSS_ON", "MIN_TOKENS",
    "SPLITS", "SPLIT_FRACTIONS", "USER_SPLIT_PERCENT", "WINDOW_PREFIXES", "DataSpec", "Document", "adds_bos",
    "as_spec", "assign_contiguous", "assign_splits", "assistant_spans", "calibration_blocks", "chat_tokens",
    "corpus_documents", "default_pad_id", "drop_empty", "drop_leading", "encode", "eval_ids", "eval_split",
    "first_bad_json_line", "load_corpus", "load_documents", "pack_blocks", "pack_conversations", "render_chat",
    "require_tokens", "resolve_loss_on", "resolve_window_prefix", "rows_to_documents", "source_list",
    "split_documents", "split_summary", "split_user_documents", "strip_gutenberg", "token_stream",
    "training_blocks", "window_bos_id",
]
