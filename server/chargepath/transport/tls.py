"""TLS and mTLS on the gRPC port: server credentials that follow their files, and who a client
certificate says the caller is.

- :class:`ServerCertificates` turns a certificate chain file, a private key file and an optional
  client CA file into ``grpc.ServerCredentials``. With a client CA, every client must present a
  certificate that chains to it (mTLS); grpc refuses the handshake otherwise, before any call.
  The files are re-read when they change (their inode, size or mtime): grpc asks for the
  configuration before each new handshake, so new connections get the new certificate while
  open connections, and the streams on them, keep the one they were opened with. A replaced
  pair is installed only once it is whole and valid (a new certificate beside the old key is
  skipped until the key follows); until then the server keeps what it has.
- :func:`peer_identities` reads the names grpc verified on the client certificate of a call, and
  an :class:`IdentityMap` (a small YAML file) says which tenant and role, or the operator, each
  name stands for.

Errors in the files are one line each (:class:`TlsConfigError`), or, for the identity map, one
structure per bad field with its line (:class:`IdentityMapError`).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, get_args

import grpc
import yaml

from chargepath.core.validation import check_tenant

log = logging.getLogger("chargepath.tls")

Role = Literal["meter", "viewer", "operator"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
TENANT_ROLES: Final[frozenset[str]] = frozenset({"meter", "viewer"})

# auth_context() properties that name the verified peer certificate's subject, in the order a
# peer's identities are listed: the SAN URIs (e.g. SPIFFE ids), the SAN DNS names, then the
# subject's common name. grpc sets them only on a connection whose client certificate it has
# verified, which a server with a client CA requires of every connection.
IDENTITY_PROPERTIES: Final[tuple[str, ...]] = ("peer_uri", "peer_dns", "x509_common_name")


class TlsConfigError(ValueError):
    """A certificate, key or client CA file that cannot serve: one line naming the file and
    what is wrong with it."""


class TlsFilesChangingError(TlsConfigError):
    """The files changed while they were being read: a replacement is in progress."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the server's TLS material lives. ``client_ca`` set means mTLS: a client must
    present a certificate issued by one of the CAs in that file."""

    cert_chain: Path
    private_key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def paths(self) -> tuple[Path, ...]:
        return (self.cert_chain, self.private_key) + (
            (self.client_ca,) if self.client_ca is not None else ()
        )


@dataclass(frozen=True, slots=True)
class CertificateMaterial:
    """The PEM bytes of one valid configuration: the chain matches the key."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


# What a file looked like when it was last read: (device, inode, size, mtime in ns), or the
# errno of a failed stat. A rename over the file (how certificate tools and Kubernetes secret
# volumes replace files) changes the inode; an in-place write changes the size or mtime.
_Stamp = tuple[int, ...]


def _stamp(paths: Iterable[Path]) -> tuple[_Stamp, ...]:
    out: list[_Stamp] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            out.append((-1, exc.errno or 0))
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


CHAIN, KEY, CLIENT_CA = "TLS certificate chain", "TLS private key", "TLS client CA"


class _EncryptedKeyError(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for the key's password.
    raise _EncryptedKeyError


def _check_certificates(what: str, path: Path, data: bytes) -> None:
    """Every certificate in the file parses (a chain, or a bundle of CAs)."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsConfigError(f"{what} {path}: no PEM certificate in it (BEGIN CERTIFICATE)")
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{what} {path}: not a valid PEM certificate: {exc.reason}") from None


def _encrypted(path: Path) -> TlsConfigError:
    return TlsConfigError(f"{KEY} {path}: is encrypted; gRPC needs an unencrypted key")


def _check_private_key(path: Path, data: bytes) -> None:
    if b"PRIVATE KEY-----" not in data:
        raise TlsConfigError(f"{KEY} {path}: no PEM private key in it (BEGIN ... PRIVATE KEY)")
    if b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        raise _encrypted(path)


def _check_pair(files: TlsFiles) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert_chain, files.private_key, password=_no_password)
    except _EncryptedKeyError:
        raise _encrypted(files.private_key) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                f"TLS certificate {files.cert_chain} and private key {files.private_key} do not "
                "match: the key is not the one the certificate was issued for"
            ) from None
        raise TlsConfigError(
            f"{KEY} {files.private_key}: not a valid PEM private key: {exc.reason or exc}"
        ) from None
    except OSError as exc:  # the file went away since it was read
        raise TlsConfigError(
            f"TLS certificate chain or private key: cannot read: {exc.strerror or exc}"
        ) from None


def load_material(files: TlsFiles) -> CertificateMaterial:
    """Read and check the files as they are now. Raises :class:`TlsConfigError` if one is
    missing, unreadable or not PEM, if the key is encrypted or is not the certificate's, or if
    a file changed while it was being read (a replacement in progress: try again later)."""
    chain = _read(files.cert_chain, CHAIN)
    key = _read(files.private_key, KEY)
    ca = _read(files.client_ca, CLIENT_CA) if files.client_ca is not None else None
    _check_certificates(CHAIN, files.cert_chain, chain)
    _check_private_key(files.private_key, key)
    if files.client_ca is not None and ca is not None:
        _check_certificates(CLIENT_CA, files.client_ca, ca)
    # ssl checks the pair by path: the bytes grpc gets must be the ones it checked.
    _check_pair(files)
    again = [_read(files.cert_chain, CHAIN), _read(files.private_key, KEY)]
    if files.client_ca is not None:
        again.append(_read(files.client_ca, CLIENT_CA))
    if again != [chain, key, *([ca] if ca is not None else [])]:
        raise TlsFilesChangingError(
            f"TLS files {', '.join(map(str, files.paths()))}: changed while being read"
        )
    return CertificateMaterial(chain, key, ca)


class ServerCertificates:
    """The server's TLS configuration, following its files.

    Construct it at start-up: it loads the files once and raises :class:`TlsConfigError` if
    they cannot serve, so a bad file stops the start rather than every handshake. Then pass
    :meth:`credentials` to ``server.add_secure_port``.

    grpc calls :meth:`fetch` (from its own threads, possibly several at once) before every new
    TLS handshake. It costs a ``stat`` of each file when nothing changed; when one did, it
    re-reads and re-checks them and returns the new configuration, or keeps the current one
    (and logs a warning once per change) if the new files do not make a valid whole yet.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        stamp = _stamp(files.paths())
        self._material = load_material(files)
        self._seen = stamp
        self.reloads = 0
        """Configurations installed since start-up (not counting the first)."""
        self.last_error: str | None = None
        """Why the latest change of the files was not installed; None once one is."""

    @property
    def material(self) -> CertificateMaterial:
        """The configuration new handshakes use now."""
        return self._material

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``: TLS, and with a client CA, client certificates
        required and verified."""
        return grpc.dynamic_ssl_server_credentials(
            self._material.configuration(),
            self.fetch,
            require_client_authentication=self.files.mutual,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate configuration fetcher: a new configuration if the files changed
        into a valid one since the last call, else None (keep the current one). Never raises:
        an exception here would fail the handshake of the client that triggered it."""
        try:
            return self._fetch()
        except Exception:
            log.exception("TLS certificate reload failed; keeping the current certificate")
            return None

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = _stamp(self.files.paths())
        if stamp == self._seen:
            return None
        with self._lock:
            if stamp == self._seen:  # another handshake got here first
                return None
            try:
                material = load_material(self.files)
            except TlsFilesChangingError:
                return None  # mid-write: the next handshake looks again
            except TlsConfigError as exc:
                self._seen = stamp
                self.last_error = str(exc)
                log.warning(
                    "TLS files changed but cannot serve (%s); keeping the current ones", exc
                )
                return None
            self._seen = stamp
            if material == self._material:
                return None
            self._material = material
            self.reloads += 1
            self.last_error = None
            log.info("TLS certificate reloaded from %s", self.files.cert_chain)
            return material.configuration()


# --- who a client certificate says the caller is ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """A caller known by its client certificate: the certificate ``identity`` that the
    identity map names, its ``role``, and the ``tenant`` it acts for (None for the operator,
    who acts for every tenant)."""

    identity: str
    role: Role
    tenant: str | None


def peer_identities(auth_context: Mapping[str, Sequence[bytes]]) -> tuple[str, ...]:
    """The names on the verified client certificate of a call, from the servicer context's
    ``auth_context()``: its SAN URIs, then its SAN DNS names, then its subject common name,
    without repeats. Empty on a plaintext connection, or on a TLS one without a client
    certificate (a server without a client CA does not ask for one)."""
    if list(auth_context.get("transport_security_type", ())) != [b"ssl"]:
        return ()
    seen: dict[str, None] = {}
    for prop in IDENTITY_PROPERTIES:
        for value in auth_context.get(prop, ()):
            seen.setdefault(value.decode("utf-8", "replace"), None)
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class IdentityIssue:
    """One bad field of an identity map file: where (its line, None if unknown), which field
    (a dotted path such as ``identities.meter-1.role``), and why."""

    line: int | None
    field: str
    reason: str

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.field}: {self.reason}"


class IdentityMapError(ValueError):
    """An identity map file that does not validate; ``issues`` lists every bad field."""

    def __init__(self, source: str, issues: list[IdentityIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__(
            "invalid identity map:\n  " + "\n  ".join(i.render(source) for i in issues)
        )


@dataclass(frozen=True, slots=True)
class _Grant:
    role: Role
    tenant: str | None


_ENTRY_FIELDS: Final = ("role", "tenant")


class IdentityMap:
    """Which certificate identity stands for which caller.

    The file is YAML: one mapping ``identities`` from a certificate identity (a SAN URI, a SAN
    DNS name, or a subject common name, exactly as written in the certificate) to its role,
    and, for ``meter`` and ``viewer``, its tenant::

        identities:
          spiffe://example.net/slice-controller:  {role: meter, tenant: mvno-demo}
          billing.example.net:                    {role: viewer, tenant: mvno-demo}
          ops-1:                                  {role: operator}

    A peer whose identities are not in the map is nobody (:meth:`resolve` gives None, and the
    caller refuses the call). So is a peer whose certificate names two identities that the map
    gives different roles or tenants: a certificate stands for one caller.
    """

    def __init__(self, grants: Mapping[str, tuple[Role, str | None]]) -> None:
        self._grants = {identity: _Grant(*grant) for identity, grant in grants.items()}

    def __len__(self) -> int:
        return len(self._grants)

    def resolve(self, identities: Sequence[str]) -> Peer | None:
        """The caller that ``identities`` (a peer's, :func:`peer_identities`) stand for."""
        found = [(i, self._grants[i]) for i in identities if i in self._grants]
        if not found or any(grant != found[0][1] for _, grant in found):
            return None
        identity, grant = found[0]
        return Peer(identity, grant.role, grant.tenant)

    def peer(self, auth_context: Mapping[str, Sequence[bytes]]) -> Peer | None:
        """The caller of a call, from its servicer context's ``auth_context()``."""
        return self.resolve(peer_identities(auth_context))

    @classmethod
    def from_file(cls, path: str | Path) -> IdentityMap:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            issue = IdentityIssue(None, "(file)", f"cannot read: {reason}")
            raise IdentityMapError(str(p), [issue]) from None
        return cls.from_text(text, source=str(p))

    @classmethod
    def from_text(cls, text: str, *, source: str = "identity map") -> IdentityMap:
        """Parse and validate the YAML text; raise :class:`IdentityMapError` naming every bad
        field with its line."""
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or "cannot parse"
            issue = IdentityIssue(line, "(document)", f"not valid YAML: {problem}")
            raise IdentityMapError(source, [issue]) from None
        issues: list[IdentityIssue] = []
        grants: dict[str, tuple[Role, str | None]] = {}
        entries = _top_level(root, issues)
        if entries is not None:
            seen: dict[str, int] = {}
            for key_node, value_node in entries.value:
                line = key_node.start_mark.line + 1
                identity = _scalar(key_node)
                if not identity:
                    issues.append(
                        IdentityIssue(line, "identities", "an identity must be a non-empty string")
                    )
                    continue
                if identity in seen:
                    issues.append(
                        IdentityIssue(
                            line,
                            f"identities.{identity}",
                            f"listed twice (first on line {seen[identity]})",
                        )
                    )
                    continue
                seen[identity] = line
                grant = _entry(identity, value_node, issues)
                if grant is not None:
                    grants[identity] = grant
        if issues:
            raise IdentityMapError(source, issues)
        return cls(grants)


def _scalar(node: yaml.Node) -> str | None:
    if isinstance(node, yaml.ScalarNode) and isinstance(node.value, str) and node.value.strip():
        return str(node.value)
    return None


def _top_level(root: yaml.Node | None, issues: list[IdentityIssue]) -> yaml.MappingNode | None:
    if not isinstance(root, yaml.MappingNode):
        line = root.start_mark.line + 1 if root is not None else None
        issues.append(
            IdentityIssue(line, "(document)", "must be a mapping with one key, identities")
        )
        return None
    entries: yaml.MappingNode | None = None
    for key_node, value_node in root.value:
        name = _scalar(key_node)
        line = key_node.start_mark.line + 1
        if name != "identities":
            issues.append(IdentityIssue(line, str(name), "unknown field (expected identities)"))
        elif not isinstance(value_node, yaml.MappingNode):
            issues.append(
                IdentityIssue(
                    value_node.start_mark.line + 1,
                    "identities",
                    "must be a mapping of certificate identity to {role, tenant}",
                )
            )
        else:
            entries = value_node
    if entries is None and not issues:
        issues.append(IdentityIssue(root.start_mark.line + 1, "identities", "missing"))
    return entries


def _entry(
    identity: str, node: yaml.Node, issues: list[IdentityIssue]
) -> tuple[Role, str | None] | None:
    path = f"identities.{identity}"
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        issues.append(IdentityIssue(line, path, "must be a mapping with role (and tenant)"))
        return None
    fields: dict[str, tuple[str | None, int]] = {}
    ok = True
    for key_node, value_node in node.value:
        name = _scalar(key_node) or "(empty)"
        value_line = value_node.start_mark.line + 1
        if name not in _ENTRY_FIELDS:
            issues.append(
                IdentityIssue(
                    key_node.start_mark.line + 1,
                    f"{path}.{name}",
                    f"unknown field (expected {' or '.join(_ENTRY_FIELDS)})",
                )
            )
            ok = False
            continue
        fields[name] = (_scalar(value_node), value_line)
    role_value, role_line = fields.get("role", (None, line))
    tenant_value, tenant_line = fields.get("tenant", (None, line))
    role: Role | None = None
    if "role" not in fields:
        issues.append(IdentityIssue(line, f"{path}.role", f"missing (one of {', '.join(ROLES)})"))
    elif role_value not in ROLES:
        issues.append(
            IdentityIssue(
                role_line,
                f"{path}.role",
                f"must be one of {', '.join(ROLES)}, got {role_value!r}",
            )
        )
    else:
        role = role_value
    if role in TENANT_ROLES:
        if "tenant" not in fields:
            issues.append(IdentityIssue(line, f"{path}.tenant", f"missing: a {role} acts for one"))
            role = None
        else:
            bad = check_tenant(tenant_value or "", f"{path}.tenant")
            if bad is not None:
                issues.append(IdentityIssue(tenant_line, bad.field, bad.reason))
                role = None
    elif role == "operator" and "tenant" in fields:
        issues.append(
            IdentityIssue(
                tenant_line, f"{path}.tenant", "an operator acts for every tenant: remove it"
            )
        )
        role = None
    if role is None or not ok:
        return None
    return role, tenant_value if role in TENANT_ROLES else None
