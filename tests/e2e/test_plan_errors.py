"""A plan file's every issue, in one pass, from the commands people run (issue #14, item 6):
``chargepath serve --plans`` before anything starts, and ``chargepath plans apply`` before it
calls the gateway. Each issue is a line ``file:line: field: reason``, in the order of the
file; real ``chargepath`` processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chargepath.store.embedded import free_port
from tests.unit.test_plans import MANY_ERRORS, MANY_ERRORS_FOUND


def chargepath(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chargepath", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def assert_every_issue_on_its_line(stderr: str, what: str) -> None:
    assert "Traceback" not in stderr, stderr
    head, *lines = stderr.strip().splitlines()
    assert head == f"chargepath: {what}: bad.yaml: {len(MANY_ERRORS_FOUND)} errors", stderr
    assert len(lines) == len(MANY_ERRORS_FOUND), stderr
    for line, (number, path, message) in zip(lines, MANY_ERRORS_FOUND, strict=True):
        assert line.startswith(f"bad.yaml:{number}: {path}: {message}"), line


def test_serve_names_every_issue_of_the_plan_file_and_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(MANY_ERRORS)
    data = tmp_path / "data"
    out = chargepath(
        "serve", "--plans", "bad.yaml", "--port", str(free_port()), "--workers", "1",
        "--data-dir", str(data), cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr  # a configuration error, as every other of serve
    assert_every_issue_on_its_line(out.stderr, "--plans")
    assert not data.exists()  # nothing written: no redis-server, no lock


def test_plans_apply_names_every_issue_and_calls_no_gateway(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(MANY_ERRORS)
    # a port nobody listens on, and no credential: the file is refused before any call
    out = chargepath(
        "plans", "apply", "bad.yaml", "--target", f"127.0.0.1:{free_port()}", cwd=tmp_path
    )
    assert out.returncode == 1, out.stderr
    assert_every_issue_on_its_line(out.stderr, "plans apply")
    assert out.stdout == ""


def test_plans_apply_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    out = chargepath(
        "plans", "apply", "nonexistent.yaml", "--target", f"127.0.0.1:{free_port()}", cwd=tmp_path
    )
    assert out.returncode == 2  # a bad argument, as every unreadable file the CLI is given
    assert out.stderr == (
        "chargepath: plans apply: nonexistent.yaml: cannot read: No such file or directory\n"
    )
