"""The Python client stands alone: `pip install ./clients/python` in a fresh venv brings
grpcio, grpcio-status and protobuf (and what they need), never the gateway's Redis, pydantic
or OpenTelemetry, and the installed client checks and streams against a live gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, GatewayProcess

pytestmark = pytest.mark.e2e

# Distributions of the gateway's stack that a client install must not pull.
FORBIDDEN_PREFIXES = ("redis", "hiredis", "pydantic", "opentelemetry-", "chargepath")

# Run by the fresh venv's interpreter, outside the repository: it sees only what pip put there.
CLIENT_SCRIPT = """
import asyncio, importlib.util, json, os, sys
import chargepath_client
from chargepath_client import AsyncClient, Client

KEY = os.environ["CHARGEPATH_API_KEY"]

async def stream_one(address):
    async with AsyncClient(address, api_key=KEY) as client, client.stream() as stream:
        return await stream.submit(
            tenant="mvno-demo", slice="1-000001", metric="slice.bytes", amount=1500
        )

address = sys.argv[1]
with Client(address, api_key=KEY) as client:
    checked = client.check("cpaas-demo", "api.sms.send", 1, key="install-test")
streamed = asyncio.run(stream_one(address))
print(json.dumps({
    "client_file": chargepath_client.__file__,
    "gateway_importable": importlib.util.find_spec("chargepath") is not None,
    "check": [checked.decision.value, checked.reason.value, checked.recorded],
    "stream": [streamed.decision.value, streamed.reason.value, streamed.recorded],
}))
"""


def run(
    args: list[str], *, cwd: Path, timeout: float, extra_env: dict[str, str] | None = None
) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra_env or {})
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with `pip install ./clients/python` done (from a copy of the folder, so
    that the build leaves nothing in the work tree); its python."""
    work = tmp_path_factory.mktemp("client-install")
    source = work / "python"
    shutil.copytree(
        ROOT / "clients" / "python",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=work, timeout=120)
    python = venv / "bin" / "python"
    # PyPI (or the local wheel cache) must answer within the timeout: the test stays bounded.
    run([str(python), "-m", "pip", "install", "--quiet", str(source)], cwd=work, timeout=300)
    yield python


def installed(python: Path) -> dict[str, str]:
    listing: list[dict[str, Any]] = json.loads(
        run([str(python), "-m", "pip", "list", "--format=json"], cwd=python.parent, timeout=60)
    )
    return {item["name"].lower().replace("_", "-"): item["version"] for item in listing}


def test_a_client_install_pulls_grpc_and_protobuf_only(client_venv: Path) -> None:
    distributions = installed(client_venv)
    assert {"chargepath-client", "grpcio", "grpcio-status", "protobuf"} <= set(distributions)
    forbidden = sorted(
        name
        for name in distributions
        if name != "chargepath-client" and name.startswith(FORBIDDEN_PREFIXES)
    )
    assert forbidden == []


def test_the_installed_client_checks_and_streams_against_a_live_gateway(
    client_venv: Path, gateway: GatewayProcess
) -> None:
    outside = client_venv.parent.parent  # the tmp folder: not the repository
    out = run(
        [str(client_venv), "-c", CLIENT_SCRIPT, gateway.address],
        cwd=outside,
        timeout=60,
        extra_env={"CHARGEPATH_API_KEY": gateway.operator_key},
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert Path(result["client_file"]).is_relative_to(client_venv.parent.parent)
    assert result["gateway_importable"] is False
    assert result["check"] == ["allow", "ok", True]
    assert result["stream"] == ["allow", "ok", True]
