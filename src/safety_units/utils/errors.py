"""User-facing errors: one paragraph that names the file / key / row, never a deep stack trace."""

from __future__ import annotations

import functools
import logging
import os
import sys
import textwrap

log = logging.getLogger("safety_units")


class SafetyUnitsError(Exception):
    """A problem with the user's input (config, data file, model path, unit map).

    Entry points print the message alone and exit with status 1; set SAFETY_UNITS_TRACEBACK=1 for the trace.
    """


class ConfigError(SafetyUnitsError):
    pass


class DataError(SafetyUnitsError):
    pass


class ModelError(SafetyUnitsError):
    pass


class UnitMapError(SafetyUnitsError):
    pass


class NonFiniteLossError(SafetyUnitsError):
    pass


def friendly_errors(fn):
    """Wrap an entry point so a SafetyUnitsError prints as one paragraph and exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SafetyUnitsError as e:
            if os.environ.get("SAFETY_UNITS_TRACEBACK"):
                raise
            msg = textwrap.fill(str(e), width=110, break_long_words=False, break_on_hyphens=False)
            print(f"\nerror: {msg}\n", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
