"""The CLI's usage errors and help, without a gateway: every typed flag of every command, given a
malformed value, gets one line naming the flag and exit status 2, never a traceback; every
``--help`` reads as plain text."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from chargepath.cli import build_parser, main

pytestmark = pytest.mark.unit

MALFORMED = "x!bogus"


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _commands(child, (*path, name))


COMMANDS = list(_commands(build_parser()))


def _typed_flags() -> Iterator[tuple[tuple[str, ...], str, tuple[str, ...]]]:
    """(command path, flag, argv) for each flag or positional that takes a typed value."""
    for path, parser in COMMANDS:
        positionals = [a for a in parser._actions if not a.option_strings]
        for action in parser._actions:
            if action.type is None and action.choices is None:
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.option_strings:
                flag = action.option_strings[-1]
                yield path, flag, (*path, flag, MALFORMED)
            else:
                before = positionals[: positionals.index(action)]
                yield path, str(action.dest), (*path, *("t" for _ in before), MALFORMED)


TYPED = list(_typed_flags())


def test_the_walk_finds_the_commands_and_their_typed_flags() -> None:
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"grant", "tail", "state", "check", "plans apply", "keys create", "serve"} <= paths
    flags = {(" ".join(p), f) for p, f, _ in TYPED}
    assert {("grant", "--expires"), ("tail", "--reason"), ("check", "--label")} <= flags
    assert {("failure-policy", "mode"), ("state", "--interval")} <= flags


@pytest.mark.parametrize(("path", "flag", "argv"), TYPED, ids=[" ".join(t[2]) for t in TYPED])
def test_a_malformed_value_is_one_line_naming_the_flag(
    path: tuple[str, ...], flag: str, argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"chargepath {' '.join(path)}: {flag}: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("grant", "--tenant", "t", "--limit", "l", "--amount", "1", "--expires", "2x"),
            "chargepath grant: --expires: expected a duration from now (30m, 2h, 1d) or an "
            "ISO 8601 time, got '2x'",
        ),
        (
            ("tail", "--tenant", "t", "--reason", "BOGUS"),
            "chargepath tail: --reason: unknown reason 'BOGUS'; one of OK, RATE_LIMITED,",
        ),
        (
            ("check", "--tenant", "t", "--metric", "m", "--label", "foo"),
            "chargepath check: --label: expected KEY=VALUE, got 'foo'",
        ),
        (
            ("check", "--tenant", "t", "--metric", "m", "--label", "=v"),
            "chargepath check: --label: expected KEY=VALUE, got '=v'",
        ),
        (("state", "t", "--recent", "101"), "chargepath state: --recent: must be between 0 and"),
        (("state", "t", "--interval", "-1"), "chargepath state: --interval: must be a positive"),
        (("check", "--timeout", "nan"), "chargepath check: --timeout: must be a positive"),
    ],
)
def test_the_reported_cases(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith(message), err
    assert len(err.splitlines()) == 1


def test_a_plan_file_that_cannot_be_read_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # no gateway is needed: the file is read before anything is sent
    code = main(["plans", "apply", "/nonexistent.yaml", "--target", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        err
        == "chargepath: plans apply: /nonexistent.yaml: cannot read: No such file or directory\n"
    )


def test_tail_accepts_decisions_and_reasons_in_any_spelling() -> None:
    args = build_parser().parse_args(
        [
            *("tail", "--tenant", "t", "--decision", "deny", "--decision", "DECISION_THROTTLE"),
            *("--reason", "rate_limited", "--reason", "REASON_QUOTA_EXHAUSTED"),
        ]
    )
    assert args.decision == ["DENY", "THROTTLE"]
    assert args.reason == ["RATE_LIMITED", "QUOTA_EXHAUSTED"]


@pytest.mark.parametrize(
    "path", [p for p, _ in COMMANDS] + [("plans",), ("keys",), ("ledger",), ()], ids=" ".join
)
def test_help_is_plain_text(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*path, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert out.startswith("usage: chargepath")
    assert "``" not in out
    assert ":class:" not in out and ":func:" not in out and ":data:" not in out


def test_make_help_lists_every_target() -> None:
    """`make help` prints the targets with a ``## `` comment: every .PHONY target has one."""
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:((?:.*\\\n)*.*)$", makefile, re.M)
    assert phony is not None
    targets = set(phony.group(1).replace("\\\n", " ").split())
    documented = set(re.findall(r"^([a-zA-Z0-9_-]+):.*?## ", makefile, re.M))
    assert "test-e2e" in targets
    assert targets - documented == set()
