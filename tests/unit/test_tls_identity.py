"""Who a client certificate says the caller is: the names grpc exposes, and the identity map."""

from __future__ import annotations

from pathlib import Path

import pytest

from chargepath.transport.tls import (
    IdentityIssue,
    IdentityMap,
    IdentityMapError,
    Peer,
    peer_identities,
)

pytestmark = pytest.mark.unit

MAP = """\
# who may connect with a client certificate
identities:
  spiffe://example.net/slice-controller: {role: meter, tenant: mvno-demo}
  billing.example.net:
    role: viewer
    tenant: mvno-demo
  ops-1: {role: operator}
"""

# auth_context() of a verified client certificate as grpc 1.85 gives it (trimmed).
AUTH_CONTEXT = {
    "transport_security_type": [b"ssl"],
    "x509_common_name": [b"controller-7"],
    "x509_subject_alternative_name": [b"spiffe://example.net/slice-controller", b"c7.example.net"],
    "peer_uri": [b"spiffe://example.net/slice-controller"],
    "peer_dns": [b"c7.example.net"],
    "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----..."],
}


def issues_of(text: str) -> list[IdentityIssue]:
    with pytest.raises(IdentityMapError) as err:
        IdentityMap.from_text(text, source="ids.yaml")
    return err.value.issues


def test_peer_identities_lists_uris_then_dns_names_then_the_common_name() -> None:
    assert peer_identities(AUTH_CONTEXT) == (
        "spiffe://example.net/slice-controller",
        "c7.example.net",
        "controller-7",
    )


def test_no_identities_without_a_client_certificate() -> None:
    assert peer_identities({}) == ()  # plaintext: grpc gives no transport properties
    assert peer_identities({"transport_security_type": [b"ssl"]}) == ()
    # a name on an insecure connection is nobody's (only verified certificates count)
    assert peer_identities({"x509_common_name": [b"ops-1"]}) == ()


def test_each_identity_maps_to_its_tenant_and_role() -> None:
    ids = IdentityMap.from_text(MAP)
    assert len(ids) == 3
    assert ids.peer(AUTH_CONTEXT) == Peer(
        "spiffe://example.net/slice-controller", "meter", "mvno-demo"
    )
    assert ids.resolve(["billing.example.net"]) == Peer(
        "billing.example.net", "viewer", "mvno-demo"
    )
    assert ids.resolve(["x.example.net", "ops-1"]) == Peer("ops-1", "operator", None)


def test_an_unknown_identity_is_nobody() -> None:
    ids = IdentityMap.from_text(MAP)
    assert ids.resolve(["stranger.example.net"]) is None
    assert ids.resolve([]) is None
    assert ids.peer({}) is None


def test_a_certificate_naming_two_different_callers_is_nobody() -> None:
    ids = IdentityMap.from_text(MAP)
    assert ids.resolve(["billing.example.net", "ops-1"]) is None
    assert ids.resolve(["spiffe://example.net/slice-controller", "billing.example.net"]) is None


def test_two_names_of_the_same_caller_are_that_caller() -> None:
    ids = IdentityMap.from_text(
        "identities:\n  a.example.net: {role: operator}\n  a-cn: {role: operator}\n"
    )
    assert ids.resolve(["a.example.net", "a-cn"]) == Peer("a.example.net", "operator", None)


def test_errors_name_the_line_and_the_field() -> None:
    text = """\
identities:
  meter-1:
    role: biller
    tenant: cpaas-demo
  viewer-1:
    role: viewer
  ops-1:
    role: operator
    tenant: cpaas-demo
  meter-2: {role: meter, tenant: "bad tenant"}
  meter-3: {role: meter, tenant: t, quota: 5}
  meter-1: {role: meter, tenant: t}
"""
    issues = issues_of(text)
    assert [(i.line, i.field) for i in issues] == [
        (3, "identities.meter-1.role"),
        (6, "identities.viewer-1.tenant"),
        (9, "identities.ops-1.tenant"),
        (10, "identities.meter-2.tenant"),
        (11, "identities.meter-3.quota"),
        (12, "identities.meter-1"),
    ]
    assert "biller" in issues[0].reason
    assert "listed twice (first on line 2)" in issues[5].reason
    rendered = str(IdentityMapError("ids.yaml", issues))
    assert "ids.yaml:3: identities.meter-1.role: must be one of meter, viewer, operator" in rendered


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("", None, "(document)"),
        ("- a\n- b\n", 1, "(document)"),
        ("identity:\n  a: {role: operator}\n", 1, "identity"),
        ("identities: [a, b]\n", 1, "identities"),
        ("identities:\n  a: operator\n", 2, "identities.a"),
        ("identities:\n  a: {tenant: t}\n", 2, "identities.a.role"),
        ("identities: {a: {role: meter}\n", 2, "(document)"),
    ],
)
def test_bad_shapes_are_named(text: str, line: int | None, field: str) -> None:
    [issue] = issues_of(text)
    assert (issue.line, issue.field) == (line, field)


def test_from_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ids.yaml"
    path.write_text("identities:\n  a: {role: root}\n")
    with pytest.raises(IdentityMapError) as err:
        IdentityMap.from_file(path)
    expected = f"{path}:2: identities.a.role: must be one of meter, viewer, operator, got 'root'"
    assert str(err.value).endswith(expected)
    with pytest.raises(IdentityMapError, match="cannot read: No such file"):
        IdentityMap.from_file(tmp_path / "missing.yaml")
