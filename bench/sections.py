"""Sections of docs/benchmarks.md that one scenario owns, between its own markers."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, begin: str, end: str, body: str) -> None:
    """Put `begin + body + end` in place of the file's old section, or at its end."""
    section = f"{begin}\n\n{body.strip()}\n\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
