"""Atomic outputs: a failed write leaves the old file or folder as it was and no temporary litter."""

from __future__ import annotations

import os
import stat

import pytest

from diaggym.atomic import atomic_dir, atomic_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_writes_with_open_s_mode_and_leaves_nothing_else(tmp_path, umask022):
    target = tmp_path / "sub" / "out.txt"
    with atomic_file(target) as fh:
        fh.write("héllo")
        assert not target.exists()  # invisible until the block succeeds
    assert target.read_text(encoding="utf-8") == "héllo"
    assert _mode(target) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    with atomic_file(tmp_path / "b.bin", "wb") as fh:
        fh.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_on_success_and_keeps_the_old_one_on_failure(tmp_path, umask022):
    target = tmp_path / "run"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt  # even an interrupt leaves the old folder in place
    assert sorted(p.name for p in target.iterdir()) == ["stale.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert sorted(p.name for p in target.iterdir()) == ["stale.txt"]  # old one visible until the end
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # replaced, not merged
    assert _mode(target) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary or .old folder left
