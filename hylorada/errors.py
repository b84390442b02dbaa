"""The error types the command line turns into one line (`cli.main`).

- `UsageError` (exit 2): the user's input is wrong; raised before any expensive work. The
  message names the field or file, the value given and what is allowed.
- `HyloradaError` (exit 1): a runtime failure that is not a bug of ours (a broken file, a
  model that loads with missing weights, a full disk); the message says what and where.

Any other exception is a bug and keeps its traceback. `--debug` shows the traceback of all.
Both derive from the built-in types callers already catch (ValueError / RuntimeError).
"""
from __future__ import annotations


class HyloradaError(RuntimeError):
    """A runtime failure reported as `error: <what>, <where>, <what to do>` with exit code 1."""

    exit_code = 1


class UsageError(HyloradaError, ValueError):
    """Bad input (a flag, a config field, a file the user named); exit code 2."""

    exit_code = 2
