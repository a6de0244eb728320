"""The one atomic writer: all or nothing, flushed to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from robustkd import atomic
from robustkd.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_writes_and_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    path = atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert path.read_bytes() == "héllo\n".encode() and len(synced) == 1
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and len(synced) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left


def test_a_failing_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def broken(fh) -> None:
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_every_writer_of_the_library_goes_through_it() -> None:
    root = Path(__file__).resolve().parent.parent
    for folder in ("robustkd", "app", "pages"):
        for source in (root / folder).rglob("*.py"):
            if source.name == "atomic.py":
                continue
            text = source.read_text()
            assert "mkstemp" not in text, f"{source.name} writes its own temporary files"
