"""The servicer of ``chargepath.v1.KeyService``: API keys, for operators.

Who may call it is the permission table's business (operators only, enforced by
:class:`~chargepath.transport.auth.AuthInterceptor`); this module validates input, maps between
protobuf and the key store, and never puts a secret or a hash in a listing. The plaintext key
leaves only in the responses of CreateKey and RotateKey.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from chargepath.core.auth import KeyRecord, Role, is_key_id
from chargepath.core.model import FieldViolation
from chargepath.core.validation import check_tenant
from chargepath.store.base import (
    KeyNotFoundError,
    KeyNotRotatableError,
    KeyStore,
    StoreUnavailableError,
)
from chargepath.transport.audit import pending_audit
from chargepath.transport.errors import abort, abort_invalid
from chargepath_protos.v1 import keys_pb2, keys_pb2_grpc

MAX_DESCRIPTION = 256
MAX_GRACE_S = 30 * 86_400
# Timestamp's valid range: 0001-01-01 to 9999-12-31.
_MAX_TIMESTAMP_S = 253_402_300_799

_ROLES: dict[int, Role] = {
    keys_pb2.ROLE_METER: Role.METER,
    keys_pb2.ROLE_VIEWER: Role.VIEWER,
    keys_pb2.ROLE_OPERATOR: Role.OPERATOR,
}
_ROLE_CODES: dict[Role, Any] = {role: code for code, role in _ROLES.items()}


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def api_key(record: KeyRecord) -> keys_pb2.ApiKey:
    """A record as the API shows it: everything but the hash."""
    message = keys_pb2.ApiKey(
        key_id=record.key_id,
        tenant=record.tenant or "",
        role=_ROLE_CODES[record.role],
        created_at=_timestamp(record.created_ms),
        description=record.description,
    )
    if record.expires_ms is not None:
        message.expires_at.CopyFrom(_timestamp(record.expires_ms))
    if record.revoked_ms is not None:
        message.revoked_at.CopyFrom(_timestamp(record.revoked_ms))
    return message


def _check_key_id(key_id: str) -> FieldViolation | None:
    if not is_key_id(key_id):
        return FieldViolation("key_id", "must be 12 characters of a-z and 2-7")
    return None


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):
    """KeyService on a :class:`KeyStore`. ``wall_ms`` is the clock that a requested expiry
    must lie after (the gateway's clock, as the authenticator checks expiry against it)."""

    def __init__(
        self,
        keys: KeyStore,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._keys = keys
        self._wall_ms = wall_ms

    async def CreateKey(self, request: Any, context: Any) -> keys_pb2.CreateKeyResponse:
        violations: list[FieldViolation] = []
        role = _ROLES.get(request.role)
        if role is None:
            violations.append(
                FieldViolation("role", "must be ROLE_METER, ROLE_VIEWER or ROLE_OPERATOR")
            )
        if role is Role.OPERATOR:
            if request.tenant:
                violations.append(
                    FieldViolation("tenant", "must be empty for an operator key (it acts for all)")
                )
        elif (v := check_tenant(request.tenant, "tenant")) is not None:
            violations.append(v)
        expires_ms: int | None = None
        if request.HasField("expires_at"):
            ts = request.expires_at
            if not 0 <= ts.nanos < 1_000_000_000 or not 0 < ts.seconds <= _MAX_TIMESTAMP_S:
                violations.append(FieldViolation("expires_at", "is not a valid timestamp"))
            else:
                expires_ms = ts.seconds * 1000 + ts.nanos // 1_000_000
                if expires_ms <= self._wall_ms():
                    violations.append(FieldViolation("expires_at", "must be in the future"))
        if len(request.description) > MAX_DESCRIPTION:
            violations.append(
                FieldViolation("description", f"must be at most {MAX_DESCRIPTION} characters")
            )
        if violations or role is None:
            await abort_invalid(context, violations)
        try:
            record, key = await self._keys.create(
                None if role is Role.OPERATOR else request.tenant,
                role,
                expires_ms,
                request.description,
            )
        except StoreUnavailableError:
            await _unavailable(context)
        return keys_pb2.CreateKeyResponse(key=api_key(record), secret_key=key.plaintext)

    async def ListKeys(self, request: Any, context: Any) -> keys_pb2.ListKeysResponse:
        if request.tenant and (v := check_tenant(request.tenant, "tenant")) is not None:
            await abort_invalid(context, [v])
        try:
            records = await self._keys.list(request.tenant or None)
        except StoreUnavailableError:
            await _unavailable(context)
        now = self._wall_ms()
        return keys_pb2.ListKeysResponse(
            keys=[
                api_key(r)
                for r in records
                if request.include_revoked or r.revoked_ms is None or r.revoked_ms > now
            ]
        )

    async def RotateKey(self, request: Any, context: Any) -> keys_pb2.RotateKeyResponse:
        violations = [v for v in [_check_key_id(request.key_id)] if v is not None]
        grace_s = 0.0
        if request.HasField("grace_period"):
            grace: duration_pb2.Duration = request.grace_period
            if (
                not 0 <= grace.nanos < 1_000_000_000
                or not 0 <= grace.seconds < MAX_GRACE_S
                or (grace.seconds == MAX_GRACE_S and grace.nanos == 0)
            ):
                violations.append(
                    FieldViolation("grace_period", f"must be between 0 and {MAX_GRACE_S} seconds")
                )
            else:
                grace_s = grace.seconds + grace.nanos / 1e9
        if violations:
            await abort_invalid(context, violations)
        try:
            record, key = await self._keys.rotate(request.key_id, grace_s)
            previous = await self._keys.get(request.key_id)
        except StoreUnavailableError:
            await _unavailable(context)
        except KeyNotFoundError:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no key {request.key_id}")
        except KeyNotRotatableError as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        _audit_tenant(record)
        response = keys_pb2.RotateKeyResponse(key=api_key(record), secret_key=key.plaintext)
        if previous is not None:
            response.previous.CopyFrom(api_key(previous))
        return response

    async def RevokeKey(self, request: Any, context: Any) -> keys_pb2.RevokeKeyResponse:
        if (v := _check_key_id(request.key_id)) is not None:
            await abort_invalid(context, [v])
        try:
            record = await self._keys.revoke(request.key_id)
        except StoreUnavailableError:
            await _unavailable(context)
        except KeyNotFoundError:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no key {request.key_id}")
        _audit_tenant(record)
        return keys_pb2.RevokeKeyResponse(key=api_key(record))


def _audit_tenant(record: KeyRecord) -> None:
    """Name the key's tenant in the call's audit event (the request names only the key id)."""
    audit = pending_audit()
    if audit is not None and record.tenant:
        audit.add_tenants([record.tenant])


async def _unavailable(context: Any) -> NoReturn:
    await abort(context, grpc.StatusCode.UNAVAILABLE, "the key store is unavailable")
