"""The security settings of ``chargepath serve`` and the CLI's choice of credential: which
combinations may start, and where the CLI's API key comes from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from chargepath.cli.connection import ConnectionOptionError, find_credential
from chargepath.core.auth import new_key
from chargepath.settings import Settings, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.7", False),
        ("gateway.example", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({}, None),
        ({"auth": "none"}, None),  # loopback by default
        ({"auth": "none", "host": "0.0.0.0"}, "--auth none: refused on the non-loopback"),
        ({"auth": "none", "host": "0.0.0.0", "insecure_allow_no_auth": True}, None),
        ({"auth": "keys", "host": "0.0.0.0"}, None),
        ({"auth": "maybe"}, "--auth: must be one of keys, none"),
        ({"tls_cert": "c.pem"}, "--tls-key: --tls-cert and --tls-key go together"),
        ({"tls_key": "k.pem"}, "--tls-cert: --tls-cert and --tls-key go together"),
        ({"tls_client_ca": "ca.pem"}, "--tls-client-ca: mTLS needs --tls-cert"),
        (
            {"tls_cert": "c", "tls_key": "k", "tls_identities": "ids.yaml"},
            "--tls-identities: needs --tls-client-ca",
        ),
        ({"tls_cert": "c", "tls_key": "k", "tls_client_ca": "ca", "tls_identities": "i"}, None),
    ],
)
def test_settings_problem_is_one_line_naming_the_option(
    overrides: dict[str, object], problem: str | None
) -> None:
    found = Settings.from_env({}, **overrides).problem()
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem) and "\n" not in found


def test_auth_is_on_by_default_and_settable_from_the_environment() -> None:
    assert Settings.from_env({}).auth == "keys"
    env = {"CHARGEPATH_AUTH": "none", "CHARGEPATH_INSECURE_ALLOW_NO_AUTH": "1"}
    s = Settings.from_env(env)
    assert (s.auth, s.insecure_allow_no_auth) == ("none", True)


def args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"api_key": None, "data_dir": None, **kw})


def test_the_credential_comes_from_the_option_then_the_environment_then_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    option, env_key, file_key = (new_key().plaintext for _ in range(3))
    (tmp_path / "operator.key").write_text(file_key + "\n")
    env = {"CHARGEPATH_API_KEY": env_key, "CHARGEPATH_DATA_DIR": str(tmp_path)}
    found = find_credential(args(api_key=option), env)
    assert found is not None and (found.key, found.source) == (option, "--api-key")
    found = find_credential(args(), env)
    assert found is not None and (found.key, found.source) == (env_key, "CHARGEPATH_API_KEY")
    found = find_credential(args(), {"CHARGEPATH_DATA_DIR": str(tmp_path)})
    assert found is not None and found.key == file_key
    assert found.source == str(tmp_path / "operator.key")
    found = find_credential(args(data_dir=str(tmp_path)), {})
    assert found is not None and found.key == file_key
    assert file_key not in repr(found)
    # serve's default data dir, relative to where the command runs
    monkeypatch.chdir(tmp_path)
    assert find_credential(args(), {}) is None  # no .chargepath here
    (tmp_path / ".chargepath").mkdir()
    (tmp_path / ".chargepath" / "operator.key").write_text(file_key)
    found = find_credential(args(), {})
    assert found is not None and found.key == file_key


def test_credential_errors_name_their_source_and_never_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConnectionOptionError, match=r"^--api-key: not a Chargepath API key"):
        find_credential(args(api_key="cpk_secret-typo"), {})
    with pytest.raises(ConnectionOptionError, match=r"^CHARGEPATH_API_KEY: ") as err:
        find_credential(args(), {"CHARGEPATH_API_KEY": "hunter2"})
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConnectionOptionError, match=r"^--data-dir: no operator.key in "):
        find_credential(args(data_dir=str(tmp_path / "missing")), {})
