"""Output files: their folder checked before any work, then each written under a temporary name in the
destination folder and renamed when complete."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


def check_output_dir(folder: Path, option: str = "--out") -> None:
    """Refuse in one line, before any work, an output folder that cannot be written: an existing file,
    a path through a file, or a folder (or, when it does not exist yet, its nearest existing parent) in
    which a file cannot be created. Creating and removing a probe file is the test, as permission bits
    say nothing for root, read-only mounts or immutable folders. Nothing is left behind."""
    folder = Path(folder).expanduser()
    _check_writable(folder, f"{option} {folder}", "folder")


def check_output_file(path: Path, option: str) -> None:
    """:func:`check_output_dir` for an output file ``path`` (which must not be a folder) and its folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    _check_writable(path.parent, f"{option} {path}", "file name")


def _check_writable(folder: Path, named: str, kind: str) -> None:
    existing = folder
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == folder and kind == "folder":
            raise UserError(f"{named} is a file, not a folder; choose a folder")
        raise UserError(f"{named} cannot be written: {existing} is a file, not a folder; choose another {kind}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".microdreamer-probe-", dir=existing)
    except OSError as error:
        raise UserError(f"{named}: cannot write in {existing} ({error.strerror or error}); choose another {kind}") from None
    os.close(handle)
    os.unlink(probe)


@contextmanager
def atomic_path(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path``, on error it is removed.

    The temporary name keeps the suffix so that writers choosing a format by extension still work.
    With ``overwrite=False`` an existing ``path`` is never replaced, even if it appears meanwhile.
    A writer that is atomic itself may be handed a temporary path of an enclosing ``atomic_path`` (files
    that appear together): that path is yielded as it is, and the enclosing one publishes it.
    """
    path = Path(path)
    if _is_temporary(path):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path, os.getpid())
    try:
        yield tmp
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def partial_path(path: Path, pid: int) -> Path:
    """The temporary path under which process ``pid`` writes ``path`` (what a killed writer leaves behind)."""
    return path.with_name(f".{path.stem}.partial-{pid}{path.suffix}")


def _is_temporary(path: Path) -> bool:
    """Whether ``path`` is named as the temporary paths :func:`atomic_path` gives out in this process."""
    return re.fullmatch(rf"\..*\.partial-{os.getpid()}(\.[^.]*)?", path.name) is not None


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
