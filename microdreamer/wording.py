"""How messages word things: a count with its noun, a long input shortened for one line of a log."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 input``, ``2 inputs``; ``nouns`` is the plural where it is not ``noun + "s"``."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def shorten(text: str, limit: int = 60) -> str:
    """``text`` on one line of at most ``limit`` characters: a longer one keeps its start and its end (a
    prompt's first words, a path's file name) around an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return text[:head].rstrip() + "…" + text[len(text) - (limit - 1 - head):].lstrip()
