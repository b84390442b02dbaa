"""The data flags shared by `eval`, `finetune`, `compress` and `benchmark` (one place).

    --data SOURCE        kjv | shakespeare | a .txt/.json/.jsonl/.csv/.parquet file | a folder
                         (of .txt files or of data files) | a Hugging Face dataset name
    --text-field NAME    the column of a dataset (default: "messages" when present, else "text")
    --data-config NAME   a Hugging Face dataset's configuration
    --train/--valid/--test FILE   a split given whole (no rule applied)          [splits=True]
    --loss-on assistant|all       chat data: which tokens are targets            [loss_on=True]

`spec_from_args(args)` turns them into a `hylorada.data.DataSpec`. docs/DATA.md has the rules.
`add_calib_args`: the calibration flags of `compress` and `analyze` (--calib and CompressConfig's
calibration fields).
"""
from __future__ import annotations

import argparse

from ..compress.config import CompressConfig
from ..recipes.compress import CALIB_FIELDS
from .flags import add_config_flags

SOURCES = ("kjv, shakespeare, a .txt/.json/.jsonl/.csv/.parquet file, a folder of them, "
           "or a Hugging Face dataset name")


def add_data_args(parser, *, default: str | None = None, data: bool = True, splits: bool = False,
                  loss_on: bool = False) -> None:
    """Add the data flags to `parser` (a parser or an argument group)."""
    if data:  # the default applies in spec_from_args, and only when no split file is given
        parser.add_argument("--data", default=None,
                            help=f"{SOURCES} (default: {default})" if default else SOURCES)
    parser.add_argument("--text-field", default=None, metavar="COLUMN",
                        help="dataset column with the text, or with chat messages (default: messages if "
                             "present, else text)")
    parser.add_argument("--data-config", default=None, metavar="NAME",
                        help="configuration of a Hugging Face dataset (e.g. wikitext-2-raw-v1)")
    if splits:
        for split in ("train", "valid", "test"):
            parser.add_argument(f"--{split}", default=None, metavar="FILE",
                                help=f"the {split} split as a file of its own (used whole)")
    if loss_on:
        parser.add_argument("--loss-on", default=None, choices=["assistant", "all"],
                            help="chat data: train on the assistant turns only, or on every token "
                                 "(default: assistant for chat data, all for text)")


def add_calib_args(parser, *, default: str | None, help: str, blocks: int, whiten: bool = False,
                   helps: dict | None = None) -> None:
    """--calib CORPORA (comma-separated) and the CALIB_FIELDS flags (--calib-blocks `blocks`,
    --calib-seq-len 512), then --whiten-method when `whiten`."""
    parser.add_argument("--calib", default=default, help=help)
    add_config_flags(parser, CompressConfig, CALIB_FIELDS + (("whiten_method",) if whiten else ()),
                     defaults={"calib_blocks": blocks, "calib_seq_len": 512}, helps=helps)


def spec_from_args(args: argparse.Namespace, default: str | None = None, source: str | None = None):
    """The DataSpec of the parsed flags. --data, else `default` when no --train/--valid/--test
    file is given; `source` replaces --data (compress's --calib, --eval, --recover-data)."""
    from ..data import DataSpec

    files = [getattr(args, s, None) for s in ("train", "valid", "test")]
    if source is None:
        source = getattr(args, "data", None)
        if source is None and not any(files):
            source = default
    return DataSpec(source=source,
                    train=getattr(args, "train", None), valid=getattr(args, "valid", None),
                    test=getattr(args, "test", None), text_field=getattr(args, "text_field", None),
                    config=getattr(args, "data_config", None), loss_on=getattr(args, "loss_on", None))


def checked_specs(args: argparse.Namespace, corpora: dict[str, tuple[str | None, str, bool]]) -> dict[str, list]:
    """flag -> [DataSpec] of each comma-separated corpus list (`corpora`: flag -> (names, split,
    used)); the `split` documents of the used ones are read now (checks.load_docs, memoised), so
    bad data stops here, before the model loads."""
    from ..data import source_list
    from .checks import load_docs

    specs = {flag: [spec_from_args(args, source=n) for n in source_list(names or "")]
             for flag, (names, _, _) in corpora.items()}
    for flag, (_, split, used) in corpora.items():
        for spec in specs[flag] if used else ():
            load_docs(spec, split, flag)
    return specs
