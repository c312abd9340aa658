"""The one exception type that reaches the user as a single line and exit code 2."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""


class InputError(UserError):
    """A :class:`UserError` about one input file: the message is ``"<path>: <reason>"``.

    A batch, which lists each input beside its outcome, records ``reason`` alone, so that the path is not
    shown twice.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@contextmanager
def about_input(path: str | os.PathLike[str]) -> Iterator[None]:
    """Let a :class:`UserError` raised in the block name ``path``, once: it becomes an :class:`InputError`."""
    try:
        yield
    except InputError:
        raise
    except UserError as error:
        raise InputError(path, str(error)) from None
