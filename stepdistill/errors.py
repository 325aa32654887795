"""Errors a user can fix; command-line entry points print them as one line and exit non-zero."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class StepdistillError(Exception):
    """Base class: a bad value supplied by the user; the message names it and what is allowed."""


class ConfigError(StepdistillError):
    """A config key, type or value that is not allowed."""


class DataError(StepdistillError):
    """A dataset that cannot be read or is empty."""


class ModelError(StepdistillError):
    """A model path, pipeline class or prediction type that is not supported."""


class DiskFullError(StepdistillError):
    """The disk filled while a checkpoint or an export was written; the partial copy was removed."""


def cli_errors(main: Callable[..., Any]) -> Callable[..., int]:
    """Wrap a ``main`` so that user errors print ``error: ...`` on one line and exit with status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            result = main(*args, **kwargs)
        except StepdistillError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0 if result is None else int(result)

    return wrapper
