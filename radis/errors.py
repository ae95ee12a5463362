"""The base class of every bad-input error, so that every command reports them alike.

A bad config value, data file, record, model directory or checkpoint directory raises a
subclass of `InputError` whose message names the key, file, line or field and what was
expected; `radis.cli` prints it as `radis <command>: error: <message>` and exits with
status 2, without a traceback. Anything else that escapes a command is a bug in radis
and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (see the module docstring)."""
