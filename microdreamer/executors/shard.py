"""Shards: one slice of a batch per task of a scheduler's array job (Slurm, PBS, LSF…), and the join of
the shards' manifests.

Input ``stem`` belongs to shard ``int(sha256(stem as UTF-8).hexdigest(), 16) mod N``. The stem is what
the input's outputs are named after (an image's file stem, a prompt's words), so it is unique among the
inputs writing into one folder and does not depend on how the input's path was spelled. An input's shard
depends on nothing else: adding inputs moves no other input between shards. Shard ``I`` of ``N`` writes
``<manifest stem>.shard-I-of-N.json`` (by default ``OUT/manifest.shard-I-of-N.json``), so shards sharing
an output folder never write the same manifest; :func:`merge_manifests` joins them into the manifest the
unsharded batch would have written, its entries in the same order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..batch import Job, Manifest
from ..errors import UserError
from ..wording import plural

_SHARD_NAME = re.compile(r"(?P<base>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>\.[^.]*)$")


def shard_of(stem: str, count: int) -> int:
    """The shard (0 ≤ shard < ``count``) of the input named ``stem``."""
    return int(hashlib.sha256(stem.encode("utf-8")).hexdigest(), 16) % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (counted from 0) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UserError(f"--shard I/N needs 0 <= I < N, got {self}")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"`` (as Slurm gives it: ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if found is None:
            raise UserError(f"--shard takes I/N (shard I of N, counted from 0), got '{text}'")
        return cls(int(found[1]), int(found[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, jobs: Sequence[Job]) -> tuple[list[Job], dict[str, Any]]:
        """This shard's jobs, and the record its manifest keeps of them: the shard, how many inputs the whole
        batch has, and where in the whole batch each of its jobs stands."""
        positions = [i for i, job in enumerate(jobs) if shard_of(job.stem, self.count) == self.index]
        record = {"index": self.index, "count": self.count, "inputs": len(jobs), "positions": positions}
        return [jobs[i] for i in positions], record

    def manifest_path(self, path: Path) -> Path:
        """``manifest.json`` → ``manifest.shard-I-of-N.json``."""
        return path.with_name(f"{path.stem}.shard-{self.index}-of-{self.count}{path.suffix}")


def shard_manifests(specs: Sequence[Path]) -> list[Path]:
    """Shard manifests: files as given, and the ``*.shard-I-of-N.json`` files in folders."""
    paths: list[Path] = []
    for spec in specs:
        if spec.is_dir():
            found = sorted(p for p in spec.iterdir() if _SHARD_NAME.fullmatch(p.name) and p.suffix == ".json")
            if not found:
                raise UserError(f"{spec} holds no shard manifests (*.shard-I-of-N.json); run the shards with --shard first")
            paths += found
        elif spec.is_file():
            paths.append(spec)
        else:
            raise UserError(f"shard manifest not found: {spec}")
    return list(dict.fromkeys(paths))


def merged_manifest_path(shard_path: Path) -> Path:
    """Where the join of the shards goes by default: ``OUT/manifest.shard-0-of-4.json`` → ``OUT/manifest.json``."""
    found = _SHARD_NAME.fullmatch(shard_path.name)
    return shard_path.with_name(found["base"] + found["suffix"]) if found else shard_path.with_name("manifest.json")


def merge_manifests(paths: Sequence[Path]) -> Manifest:
    """The manifest of the whole batch from its shards' manifests: every shard present once, of the same
    batch (command, shard count, number of inputs), and every input in exactly one shard; the entries in
    the order of the unsharded batch."""
    if not paths:
        raise UserError("no shard manifests given")
    shards = [(path, Manifest.read(path)) for path in paths]
    first_path, first = shards[0]
    for path, manifest in shards:
        if manifest.shard is None:
            raise UserError(f"{path} is not a shard's manifest (it was not written with --shard)")
    count, total = first.shard["count"], first.shard["inputs"]
    by_index: dict[int, Path] = {}
    slots: list[Any] = [None] * total
    for path, manifest in shards:
        record = manifest.shard
        if (manifest.command, record["count"], record["inputs"]) != (first.command, count, total):
            raise UserError(
                f"{path} is from another batch than {first_path}: {manifest.command} shard {record['index']}/"
                f"{record['count']} of {plural(record['inputs'], 'input')}, there {first.command} shard "
                f"{first.shard['index']}/{count} of {plural(total, 'input')}"
            )
        if record["index"] in by_index:
            raise UserError(f"shard {record['index']}/{count} is given twice: {by_index[record['index']]} and {path}")
        by_index[record["index"]] = path
        if len(record["positions"]) != len(manifest.entries):
            raise UserError(f"{path} is damaged: {plural(len(manifest.entries), 'entry', 'entries')} for "
                            f"{plural(len(record['positions']), 'position')}")
        for position, entry in zip(record["positions"], manifest.entries):
            if not 0 <= position < total or slots[position] is not None:
                raise UserError(f"{path}: input {entry.input} is in more than one shard; were the shards run on "
                                "the same inputs?")
            slots[position] = entry
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        name = Shard(missing[0], count).manifest_path(merged_manifest_path(first_path)).name
        raise UserError(f"shard {missing[0]}/{count} is missing ({name}): give every shard's manifest, "
                        f"{plural(count, 'shard')} in all")
    if any(entry is None for entry in slots):
        raise UserError(f"the shards hold {plural(sum(e is not None for e in slots), 'input')} of the batch's "
                        f"{total}; were the shards run on the same inputs?")
    finished = [m.finished for _, m in shards]
    return Manifest(
        first.command, first.out_dir, min(m.started for _, m in shards),
        finished=None if None in finished else max(finished),  # type: ignore[type-var]
        interrupted=any(m.interrupted for _, m in shards), entries=slots, ignored=first.ignored,
    )
