"""safe_copy: a hostile archive or workspace puts nothing outside the destination."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import uuid
from pathlib import Path

import pytest

from swarm.errors import SandboxError
from swarm.sandbox.safe_copy import copy_tree_safely, extract_tar_safely


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def _malicious_tar(abs_target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "../evil.txt", b"escaped")
        _add(tar, "a/../../evil2.txt", b"escaped")
        _add(tar, abs_target, b"absolute")
        _add(tar, "link", type=tarfile.SYMTYPE, linkname="/etc")
        _add(tar, "link/passwd", b"pwned")  # through the symlink, if it had been made
        _add(tar, "uplink", type=tarfile.SYMTYPE, linkname="../outside")
        _add(tar, "uplink/x.txt", b"pwned")
        _add(tar, "hard", type=tarfile.LNKTYPE, linkname="/etc/passwd")
        _add(tar, "fifo", type=tarfile.FIFOTYPE)
        _add(tar, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _add(tar, "ok/file.txt", b"fine", mode=0o4755)
        _add(tar, "ok/plain.txt", b"plain", mode=0o666)
    return buf.getvalue()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_malicious_archive_lands_nowhere_outside(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    abs_target = f"/tmp/swarm-abs-{uuid.uuid4().hex}.txt"
    passwd = _sha(Path("/etc/passwd"))

    report = extract_tar_safely(_malicious_tar(abs_target), dest)

    assert not Path(abs_target).exists()
    assert _sha(Path("/etc/passwd")) == passwd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "outside"]
    assert list(outside.iterdir()) == []
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    # Entries under a refused link are made as plain folders inside dest: harmless.
    assert _tree(dest) == {"ok", "ok/file.txt", "ok/plain.txt", "link", "link/passwd",
                           "uplink", "uplink/x.txt"}
    mode = stat.S_IMODE((dest / "ok/file.txt").stat().st_mode)
    assert mode == 0o755  # set-uid dropped
    assert stat.S_IMODE((dest / "ok/plain.txt").stat().st_mode) == 0o644
    skipped = "\n".join(report.skipped)
    for name in ("../evil.txt", "evil2.txt", abs_target, "link: link", "hard: link",
                 "fifo: special", "dev: special"):
        assert name in skipped
    assert report.files == 4


def test_existing_symlink_in_destination_is_not_followed(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "pre").symlink_to(outside)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "pre/x.txt", b"through")
        _add(tar, "pre", b"replaces the link itself")

    report = extract_tar_safely(buf.getvalue(), dest)

    assert list(outside.iterdir()) == []
    assert "pre/x.txt" in report.skipped[0]
    assert (dest / "pre").read_bytes() == b"replaces the link itself"  # rename, not follow


def test_caps_stop_the_copy(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            _add(tar, f"f{i}", b"12345")
    with pytest.raises(SandboxError, match="more than 2 files"):
        extract_tar_safely(buf.getvalue(), tmp_path / "a", max_files=2)
    with pytest.raises(SandboxError, match="more than 12 bytes"):
        extract_tar_safely(buf.getvalue(), tmp_path / "b", max_bytes=12)


def test_chunk_stream_and_garbage(tmp_path: Path) -> None:
    data = _malicious_tar("/nonexistent/abs")
    chunks = (data[i:i + 777] for i in range(0, len(data), 777))
    assert extract_tar_safely(chunks, tmp_path / "d").files == 4
    with pytest.raises(SandboxError, match="tar"):
        extract_tar_safely(b"not a tar at all" * 100, tmp_path / "e")


def test_copy_tree_skips_links_and_special_files(tmp_path: Path) -> None:
    src, dest, outside = tmp_path / "src", tmp_path / "dest", tmp_path / "outside"
    for d in (src / "sub", outside):
        d.mkdir(parents=True)
    (outside / "secret").write_text("secret")
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.sh").write_text("#!/bin/sh\n")
    (src / "sub" / "b.sh").chmod(0o755)
    (src / "etc").symlink_to("/etc")
    (src / "out").symlink_to(outside)
    (src / "secret-link").symlink_to(outside / "secret")
    os.link(outside / "secret", src / "hard")
    os.mkfifo(src / "fifo")

    report = copy_tree_safely(src, dest)

    assert _tree(dest) == {"a.txt", "sub", "sub/b.sh"}
    assert os.access(dest / "sub" / "b.sh", os.X_OK)
    assert report.files == 2 and report.dirs == 1
    skipped = "\n".join(report.skipped)
    for name in ("etc:", "out:", "secret-link:", "hard: hard link", "fifo:"):
        assert name in skipped
    assert (outside / "secret").read_text() == "secret"
    with pytest.raises(SandboxError, match="more than 1 files"):
        copy_tree_safely(src, tmp_path / "capped", max_files=1)
