"""Files a run read, named so that its report still finds them after the run folder has moved.

A run report (``<stem>.json``) names its input image and its model, when that is a mesh or a model
folder, by a :class:`FileRef`: the path relative to the run folder (the report's folder), the absolute
path and a content hash. :meth:`FileRef.resolve` tries the relative path, then the absolute one, and
takes the first whose content still matches the hash.

The hash of a file is the SHA-256 of its bytes. A folder (a model in the diffusers layout, gigabytes of
weights) is hashed by its listing instead: SHA-256 over every visible file's relative path and size, and
over the bytes of its ``.json`` files (``model_index.json`` and the component configs); weights are
recognised by name and size, not read. A Hugging Face id names no local file and is stored as the id.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

_CHUNK = 1 << 20


def content_hash(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, or of a folder's listing and configs (see the module docstring)."""
    digest = hashlib.sha256()
    if not path.is_dir():
        _feed(digest, path)
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\t{file.stat().st_size}\n".encode())
        if file.suffix == ".json":
            _feed(digest, file)
    return digest.hexdigest()


def _feed(digest: Any, file: Path) -> None:
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)


@dataclass(frozen=True)
class FileRef:
    """A file or folder as a run report stores it."""

    relative: str | None  # POSIX path from the run folder; None where there is none (another drive)
    absolute: str
    sha256: str | None  # None only for a plain path read from a report of an older version

    @classmethod
    def record(cls, path: str | os.PathLike[str], run_dir: Path, sha256: str | None = None) -> FileRef:
        """Name ``path`` for a report written to ``run_dir`` (``sha256``: its :func:`content_hash`, if known)."""
        absolute = Path(path).expanduser().resolve()
        try:
            relative: str | None = Path(os.path.relpath(absolute, Path(run_dir).resolve())).as_posix()
        except ValueError:  # Windows: another drive
            relative = None
        return cls(relative, str(absolute), sha256 or content_hash(absolute))

    @classmethod
    def from_json(cls, value: Any) -> FileRef:
        """A reference as :meth:`to_dict` wrote it, or the plain path of an older report (not checked)."""
        if isinstance(value, str):
            return cls(None, value, None)
        if isinstance(value, dict) and isinstance(value.get("absolute"), str):
            return cls(value.get("relative"), value["absolute"], value.get("sha256"))
        raise UserError(f"a run report names a file as {value!r}; expected a path or {{relative, absolute, sha256}}")

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def resolve(self, run_dir: Path, what: str, fix: str) -> Path:
        """The file: relative to ``run_dir``, else at the absolute path, whichever still has its content.

        Otherwise a one-line :class:`UserError` naming ``what`` (e.g. "the run's input image"), where it was
        looked for, and ``fix`` (what the user can do instead)."""
        places = [Path(self.absolute)]
        if self.relative is not None:
            places.insert(0, Path(os.path.normpath(Path(run_dir) / self.relative)))
        changed = None
        for place in dict.fromkeys(places):  # the same place once
            if place.exists():
                if self.sha256 is None or content_hash(place) == self.sha256:
                    return place
                changed = changed or place
        name = Path(self.absolute).name
        if changed is not None:
            raise UserError(f"{what} {changed} has changed since the run (its content hash differs): {fix}")
        looked = " nor at ".join(str(p) for p in dict.fromkeys(places))
        raise UserError(f"{what} {name} is gone (not at {looked}): {fix}")


def record_path(value: str | None, run_dir: Path) -> str | dict[str, str | None] | None:
    """A model setting as a report stores it: an existing file or folder as a :class:`FileRef`, anything else
    (a Hugging Face id, nothing) as given."""
    if value is None or not Path(value).expanduser().exists():
        return value
    return FileRef.record(value, run_dir).to_dict()
