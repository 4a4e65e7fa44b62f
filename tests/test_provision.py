"""scripts/provision.sh is idempotent and fast when everything is in place; scripts/test.sh
treats "no tests collected" as a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
PROVISION = ROOT / "scripts" / "provision.sh"
IMAGES = ("swarm-base:bookworm-2", "swarm-sandbox:latest", "swarm:latest")

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def provision() -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(PROVISION)], capture_output=True, text=True,
                          timeout=1800, env=_env())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}


def image_ids() -> dict[str, str]:
    out = {}
    for image in IMAGES:
        done = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", image],
                              capture_output=True, text=True, timeout=60, env=_env())
        out[image] = done.stdout.strip()
    return out


def test_second_run_is_fast_and_changes_nothing() -> None:
    require(os.geteuid() == 0, "provisioning needs root")
    require(shutil.which("docker") is not None, "no docker client")
    first = provision()  # whatever was missing gets installed here (slow on a new machine)
    assert first.returncode == 0, first.stdout + first.stderr
    before = image_ids()
    stamp = ROOT / ".venv" / ".swarm-pyproject.sha256"
    stamp_mtime = stamp.stat().st_mtime

    started = time.monotonic()
    second = provision()
    elapsed = time.monotonic() - started

    assert second.returncode == 0, second.stdout + second.stderr
    assert elapsed < 10, f"second provision run took {elapsed:.1f}s"
    lines = second.stdout.splitlines()
    assert len(lines) == 6, second.stdout
    assert all(line.split()[-1] == "ok" for line in lines), second.stdout
    assert image_ids() == before
    assert stamp.stat().st_mtime == stamp_mtime


def test_test_command_fails_when_no_test_is_collected() -> None:
    require(os.geteuid() == 0, "provisioning needs root")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test.sh"), "tests/test_provision.py",
         "-k", "no_test_has_this_name", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, env=_env(),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pytest collected no tests" in done.stderr
