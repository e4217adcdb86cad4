"""The client's public API is exactly `chargepath_client.__all__` (as httpx enforces its own)."""

from __future__ import annotations

import enum
from typing import Any

import pytest

import chargepath_client
from chargepath_client import Decision, LimitKind, Reason, Scope
from chargepath_protos.v1 import metering_pb2 as pb

pytestmark = pytest.mark.unit


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(chargepath_client) if not name.startswith("_")}
    assert public == set(chargepath_client.__all__)


def test_all_is_sorted_and_unique() -> None:
    assert chargepath_client.__all__ == sorted(set(chargepath_client.__all__))


def test_public_objects_claim_the_package_as_their_module() -> None:
    for name in chargepath_client.__all__:
        assert getattr(chargepath_client, name).__module__ == "chargepath_client", name


@pytest.mark.parametrize(
    ("client_enum", "pb_enum", "prefix"),
    [
        (Decision, pb.Decision, "DECISION_"),
        (Reason, pb.Reason, "REASON_"),
        (LimitKind, pb.LimitKind, "LIMIT_KIND_"),
        (Scope, pb.Scope, "SCOPE_"),
    ],
)
def test_every_enum_value_of_the_contract_has_a_client_member(
    client_enum: type[enum.StrEnum], pb_enum: Any, prefix: str
) -> None:
    names = {name.removeprefix(prefix).lower() for name, _ in pb_enum.items()}
    assert names == {member.value for member in client_enum}


def test_the_client_verdict_carries_every_field_of_the_wire_verdict() -> None:
    """A new field of `chargepath.v1.Verdict` (e.g. `spooled`) must reach the client's own
    Verdict. `violations` is left out on purpose: an invalid usage raises `InvalidUsage`."""
    import dataclasses

    from chargepath_client import Verdict

    wire = {f.name for f in pb.Verdict.DESCRIPTOR.fields} - {"violations"}
    assert wire == {f.name for f in dataclasses.fields(Verdict)} - {"raw"}
    flags = pb.Verdict(degraded=True, spooled=True)
    v = Verdict.from_pb(flags)
    assert (v.degraded, v.spooled, v.recorded, v.replayed) == (True, True, False, False)


def test_both_clients_hold_leases_with_the_same_local_api() -> None:
    from chargepath_client import AsyncClient, AsyncLease, Client, Lease

    for client_cls, lease_cls in ((Client, Lease), (AsyncClient, AsyncLease)):
        assert callable(client_cls.lease)
        for name in ("try_acquire", "available", "final", "spent", "unreported", "lease_id"):
            assert hasattr(lease_cls, name), (lease_cls, name)
    assert hasattr(Lease, "__enter__") and hasattr(AsyncLease, "__aenter__")
