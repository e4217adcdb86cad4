"""The Node.js and Go examples against a live gateway: same script, same decisions.

The examples (clients/node/example.ts, clients/go/cmd/chargepath-example) are built by
`make clients` (scripts/setup-node.sh, scripts/setup-go.sh) from the stubs generated from
protos/. A missing toolchain or build is a failure, not a skip: CI installs both.

State is shared within this module (one gateway, one Redis), so each language meters its
own subject: the rate limits that decide here count per API key (cpaas-demo's voice-per-key
bucket: 60 minutes, refilling one every 6 s, so a throttle stays a throttle for the test's
few milliseconds), and each language has its own key. The expected decisions are spelled out,
so two clients that were wrong the same way would still fail.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from tests.conftest import ledger_entries

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = REPO_ROOT / "clients/node/dist/example.js"
GO_EXAMPLE = REPO_ROOT / "clients/go/bin/chargepath-example"
LANGUAGES = ("node", "go")

# The output format: these keys, in this order, on every line.
VERDICT_FIELDS = [
    "request_id",
    "decision",
    "reason",
    "replayed",
    "recorded",
    "degraded",
    "policy_version",
    "decision_id",
    "retry_after_ms",
]
RUN_TIMEOUT_S = 60
DEADLINE_MS = "10000"


class Gateway(Protocol):
    address: str

    @property
    def operator_key(self) -> str: ...


def example_command(language: str) -> list[str]:
    """The command that runs one language's example; fails the test if it is not built."""
    if language == "node":
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not on PATH: run `make clients` (scripts/setup-node.sh)")
        if not NODE_EXAMPLE.is_file():
            pytest.fail(f"{NODE_EXAMPLE} is missing: run `make clients` (scripts/setup-node.sh)")
        return [node, str(NODE_EXAMPLE)]
    if not GO_EXAMPLE.is_file():
        pytest.fail(f"{GO_EXAMPLE} is missing: run `make clients` (scripts/setup-go.sh)")
    return [str(GO_EXAMPLE)]


def run_example(language: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*example_command(language), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def run_script(
    language: str, gateway: Gateway, script: dict[str, Any], tmp_path: Path, *args: str
) -> list[dict[str, Any]]:
    """Runs a script through one example, with the gateway's operator key; returns its verdict
    lines."""
    path = tmp_path / f"{language}-script.json"
    path.write_text(json.dumps(script, indent=2))
    proc = run_example(
        language,
        "--addr",
        gateway.address,
        "--api-key",
        gateway.operator_key,
        "--script",
        str(path),
        "--deadline-ms",
        DEADLINE_MS,
        *args,
    )
    assert proc.returncode == 0, f"{language} example failed ({proc.returncode}):\n{proc.stderr}"
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    for line in lines:
        assert list(line) == VERDICT_FIELDS, f"{language}: output line has other keys: {line}"
    return lines


def admit(rid: str, key: str, metric: str, amount: int) -> dict[str, Any]:
    return {
        "request_id": rid,
        "subject": {"tenant": "cpaas-demo", "key": key},
        "metric": metric,
        "amount": amount,
        "mode": "MODE_ADMIT",
        "labels": {"source": "test_interop"},
    }


def report(rid: str, key: str, amount: int, sequence: int) -> dict[str, Any]:
    return {
        "request_id": rid,
        "subject": {"tenant": "mvno-demo", "slice": "1-000001", "key": key},
        "metric": "slice.bytes",
        "amount": amount,
        "mode": "MODE_REPORT",
        "sequence": sequence,
    }


def decisions_script(language: str, run: str) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """A script that meets every decision a per-key limit gives, and what each usage gets.

    Returns the script and, per usage in output order, (decision, reason, replayed, recorded).
    """
    key = f"interop-{language}"
    rid = f"{run}-{language}"
    script = {
        "check": [
            admit(f"{rid}-c1", key, "api.voice.minutes", 60),  # empties the key's voice bucket
            admit(f"{rid}-c2", key, "api.voice.minutes", 1),  # 6 s until one more minute fits
            admit(f"{rid}-c3", key, "api.voice.minutes", 61),  # more than the bucket ever holds
            admit(f"{rid}-c1", key, "api.voice.minutes", 60),  # a retry of c1
            admit(f"{rid}-c4", key, "api.sms.send", 1),  # another limit, with room
            admit(f"{rid}-c5", key, "slice.bytes", 1),  # a metric the CPaaS plan lacks
        ],
        "stream": {
            "session_id": f"{rid}-session",
            "batches": [
                [
                    {**admit(f"{rid}-s1", key, "api.sms.send", 1), "sequence": 1},
                    {**admit(f"{rid}-s2", key, "api.voice.minutes", 1), "sequence": 2},
                ],
                [
                    {**admit(f"{rid}-s3", key, "api.sms.send", 0), "sequence": 3},  # invalid
                    {**admit(f"{rid}-s4", key, "api.voice.minutes", 61), "sequence": 4},
                    {**admit(f"{rid}-s5", key, "api.sms.send", 2), "sequence": 5},
                ],
            ],
        },
    }
    allow, throttle, deny = "DECISION_ALLOW", "DECISION_THROTTLE", "DECISION_DENY"
    expected = [
        (allow, "REASON_OK", False, True),
        (throttle, "REASON_RATE_LIMITED", False, False),
        (deny, "REASON_AMOUNT_EXCEEDS_CAPACITY", False, False),
        (allow, "REASON_OK", True, True),
        (allow, "REASON_OK", False, True),
        (deny, "REASON_NO_ENTITLEMENT", False, False),
        (allow, "REASON_OK", False, True),
        (throttle, "REASON_RATE_LIMITED", False, False),
        (deny, "REASON_INVALID_USAGE", False, False),
        (deny, "REASON_AMOUNT_EXCEEDS_CAPACITY", False, False),
        (allow, "REASON_OK", False, True),
    ]
    return script, expected


def script_request_ids(script: dict[str, Any]) -> list[str]:
    usages = [*script.get("check", [])]
    for batch in script.get("stream", {}).get("batches", []):
        usages.extend(batch)
    return [usage["request_id"] for usage in usages]


def test_both_languages_decide_alike(gateway: Gateway, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    outcomes: dict[str, list[tuple[str, ...]]] = {}
    for language in LANGUAGES:
        script, expected = decisions_script(language, run)
        lines = run_script(language, gateway, script, tmp_path)

        assert [line["request_id"] for line in lines] == script_request_ids(script), language
        outcomes[language] = [
            (line["decision"], line["reason"], line["replayed"], line["recorded"]) for line in lines
        ]
        assert outcomes[language] == expected, language

        first, throttled, _, retried = lines[:4]
        assert retried["decision_id"] == first["decision_id"], "a replay carries the first id"
        assert 0 < throttled["retry_after_ms"] <= 6000, throttled
        for line in lines:
            assert not line["degraded"], line
            assert line["policy_version"] >= 1, line
            assert len(line["decision_id"]) == 32, line

    assert outcomes["node"] == outcomes["go"]


def ledger_request_ids(client: redis.Redis, tenant: str) -> list[str]:
    return [e.request_id for e in ledger_entries(client, tenant)]


@pytest.mark.parametrize("language", LANGUAGES)
def test_reconnect_after_drop_records_each_usage_once(
    gateway: Gateway, redis_client: redis.Redis, tmp_path: Path, language: str
) -> None:
    session = f"drop-{language}-{uuid.uuid4().hex[:8]}"
    key = f"interop-{language}"
    batches = [
        [report(f"{session}-{seq}", key, 1000, seq) for seq in (2 * b + 1, 2 * b + 2)]
        for b in range(3)
    ]
    script = {"stream": {"session_id": session, "batches": batches}}
    rids = [usage["request_id"] for batch in batches for usage in batch]

    lines = run_script(language, gateway, script, tmp_path, "--drop-after", "1")

    # The first stream answers batch 1 and is dropped; the second resends all three batches.
    first, second = lines[:2], lines[2:]
    assert [line["request_id"] for line in first] == rids[:2]
    assert [line["request_id"] for line in second] == rids
    assert all(line["decision"] == "DECISION_ALLOW" for line in lines), lines
    assert all(line["recorded"] for line in lines), lines
    assert [line["replayed"] for line in first] == [False, False]
    assert [line["replayed"] for line in second] == [True, True, False, False, False, False]
    assert [line["decision_id"] for line in second[:2]] == [line["decision_id"] for line in first]

    in_ledger = [rid for rid in ledger_request_ids(redis_client, "mvno-demo") if rid in rids]
    assert sorted(in_ledger) == sorted(rids), "every usage is in the ledger exactly once"


@pytest.mark.parametrize("language", LANGUAGES)
def test_builtin_demo(gateway: Gateway, language: str) -> None:
    proc = run_example(
        language,
        "--addr",
        gateway.address,
        "--api-key",
        gateway.operator_key,
        "--deadline-ms",
        DEADLINE_MS,
    )

    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 1 + 2 * 3, "one Check, then two batches of three reports"
    assert all(line["decision"] == "DECISION_ALLOW" for line in lines), lines
    assert all(line["recorded"] and not line["replayed"] for line in lines), lines
    session = lines[1]["request_id"].rsplit("-", 1)[0]
    assert [line["request_id"] for line in lines[1:]] == [f"{session}-{n}" for n in range(1, 7)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("language", LANGUAGES)
def test_unreachable_gateway_is_a_clean_failure(language: str) -> None:
    proc = run_example(language, "--addr", f"127.0.0.1:{free_port()}", "--deadline-ms", "3000")

    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "Check failed: UNAVAILABLE: " in proc.stderr, proc.stderr
