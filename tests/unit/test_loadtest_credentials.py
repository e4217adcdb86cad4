"""The load generator's TLS and API key options: what each generator is given, and what the
report keeps of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import cli
from loadtest.credentials import PLAINTEXT, ClientCredentials
from loadtest.gogen import start_args
from loadtest.workload import Workload

pytestmark = pytest.mark.unit

KEY = "cp_secret_key"


def test_plaintext_and_no_key_by_default() -> None:
    assert not PLAINTEXT.tls
    assert PLAINTEXT.channel_credentials() is None
    assert PLAINTEXT.call_metadata((("x-a", "1"),)) == (("x-a", "1"),)
    assert PLAINTEXT.go_args() == []
    assert PLAINTEXT.problems() == []


def test_the_key_goes_in_the_metadata_and_tls_files_to_the_go_generator() -> None:
    creds = ClientCredentials("ca.pem", "client.pem", "client.key", KEY)
    assert creds.tls
    assert creds.call_metadata((("x-a", "1"),)) == (
        ("x-a", "1"),
        ("authorization", f"Bearer {KEY}"),
    )
    workload = Workload(
        plans="p.yaml", spread="many", keys=1, check_tenant="t", check_metric="m",
        check_amount=1, stream_tenant="t", stream_metric="m", stream_amount=1, slices=(), view=0,
    )  # fmt: skip
    args = start_args(Path("/bin/loadgen"), "h:1", 1, workload, "p", creds)
    assert args[-6:] == [
        "--tls-ca", "ca.pem", "--tls-cert", "client.pem", "--tls-key", "client.key",
    ]  # fmt: skip
    # never on a command line, which every user of the machine can read
    assert KEY not in " ".join(args)


def test_problems_name_the_option(tmp_path: Path) -> None:
    creds = ClientCredentials(str(tmp_path / "none.pem"), str(tmp_path), "", "bad\nkey")
    assert creds.problems() == [
        "--tls-cert and --tls-key go together",
        f"--tls-ca {tmp_path}/none.pem: cannot read: No such file or directory",
        f"--tls-cert {tmp_path}: cannot read: Is a directory",
        "--api-key must be printable ASCII",
    ]


def test_the_report_keeps_no_api_key() -> None:
    argv = ["check", "--api-key", KEY, f"--api-key={KEY}", "--api", KEY, "--rate", "5"]
    assert cli._redacted(argv, KEY) == [
        "check", "--api-key", "(redacted)", "--api-key=(redacted)", "--api", "(redacted)",
        "--rate", "5",
    ]  # fmt: skip
    assert cli._redacted(argv, "") == argv
