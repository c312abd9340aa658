"""Atomic file output: write under a temporary name in the destination folder, rename when complete."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


from ..errors import UserError


@contextmanager
def atomic_path(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path``, on error it is removed.

    The temporary name keeps the suffix so that writers choosing a format by extension still work.
    With ``overwrite=False`` an existing ``path`` is never replaced, even if it appears meanwhile.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: no check-then-rename race
    except FileExistsError:
        raise UserError(f"{path} already exists; delete it or pass --overwrite") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise UserError(f"{path} already exists; delete it or pass --overwrite") from None
        os.replace(tmp, path)
