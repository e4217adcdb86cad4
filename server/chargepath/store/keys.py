"""API keys in Redis: stored hashed, changes announced to every gateway process.

Key layout (every auth key shares the hash tag ``{auth}``):

==========================  ===================================================================
``cp:{auth}:key:<key_id>``  hash: ``hash`` (SHA-256 of the secret, hex), ``tenant`` ("" for an
                            operator), ``role``, ``created_ms``, ``expires_ms`` and
                            ``revoked_ms`` (ms since the epoch, "" = none), ``description``
``cp:{auth}:keys``          set: every key id
``cp:{auth}:epoch``         integer: bumped by every change
==========================  ===================================================================

Every change also PUBLISHes the key id on the channel ``cp:auth:events``. Gateways evict the key
from their cache on the message, and poll the epoch as a backstop for missed messages.

One hash tag for all of them: a change writes a record, the index and the epoch in one atomic
script, which on Redis Cluster needs one slot; and listing reads one node. The cost is that all
keys live on one node: a few hundred bytes per key, read once per gateway process and key
(verified keys are cached), so even thousands of keys put no weight on that node. Pub/sub
channels are not bound to slots (a PUBLISH reaches every node of a cluster).

Every Redis failure raises :class:`~chargepath.store.base.StoreUnavailableError`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from chargepath.core.auth import (
    ApiKey,
    KeyFormatError,
    KeyRecord,
    Role,
    hash_secret,
    is_key_id,
    new_key,
    parse_key,
    secret_matches,
)
from chargepath.store.base import (
    KeyNotFoundError,
    KeyNotRotatableError,
    StoreUnavailableError,
)
from chargepath.store.connect import RedisClient, RedisTarget, connect

log = logging.getLogger("chargepath.auth")

KEY_PREFIX = "cp:{auth}:key:"
INDEX_KEY = "cp:{auth}:keys"
EPOCH_KEY = "cp:{auth}:epoch"
EVENTS_CHANNEL = "cp:auth:events"
OPERATOR_KEY_FILE = "operator.key"


def record_key(key_id: str) -> str:
    return f"{KEY_PREFIX}{key_id}"


def _script(name: str) -> str:
    return (resources.files("chargepath.store") / "scripts" / name).read_text(encoding="utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_ms(value: str) -> int | None:
    return int(value) if value else None


def _unavailable(exc: Exception) -> StoreUnavailableError:
    return StoreUnavailableError(f"{type(exc).__name__}: {exc}")


class RedisKeyStore:
    """API keys on Redis (or Valkey, or Redis Cluster) through redis.asyncio.

    Times are milliseconds since the Unix epoch on Redis' clock (``TIME``). Each change (create,
    rotate, revoke) is one atomic script. The plaintext key exists only in the value returned by
    :meth:`create` and :meth:`rotate`. Safe to call concurrently from one event loop.
    """

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._create = client.register_script(_script("auth_create.lua"))
        self._revoke = client.register_script(_script("auth_revoke.lua"))
        self._rotate = client.register_script(_script("auth_rotate.lua"))

    @classmethod
    def from_url(
        cls, url: str, *, cluster: bool = False, connect_timeout: float = 1.0
    ) -> RedisKeyStore:
        return cls.connect(RedisTarget(url=url, cluster=cluster), connect_timeout=connect_timeout)

    @classmethod
    def connect(cls, target: RedisTarget, *, connect_timeout: float = 1.0) -> RedisKeyStore:
        """Keys on their own connections to ``target`` (one node, a cluster, or Sentinel's
        master)."""
        return cls(connect(target, connect_timeout=connect_timeout))

    async def close(self) -> None:
        await self.client.aclose()

    async def create(
        self,
        tenant: str | None,
        role: Role,
        expires_ms: int | None = None,
        description: str = "",
    ) -> tuple[KeyRecord, ApiKey]:
        """A new key: its record, and the key itself (the only time the secret is seen).
        ``tenant`` is None for an operator key and required otherwise."""
        if (role is Role.OPERATOR) != (tenant is None):
            raise ValueError("an operator key has no tenant; a meter or viewer key needs one")
        for _ in range(3):  # a taken id is a 1 in 2^60 event; drawing again settles it
            key = new_key()
            secret_hash = hash_secret(key.secret)
            try:
                created_ms = int(
                    await self._create(
                        keys=[record_key(key.key_id), INDEX_KEY, EPOCH_KEY],
                        args=[
                            key.key_id,
                            secret_hash,
                            tenant or "",
                            role.value,
                            "" if expires_ms is None else expires_ms,
                            description,
                            EVENTS_CHANNEL,
                        ],
                    )
                )
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
            if created_ms:
                record = KeyRecord(
                    key_id=key.key_id,
                    role=role,
                    tenant=tenant,
                    secret_hash=secret_hash,
                    created_ms=created_ms,
                    expires_ms=expires_ms,
                    description=description,
                )
                return record, key
        raise RuntimeError("could not draw an unused key id")

    async def get(self, key_id: str) -> KeyRecord | None:
        """The key's record, or None if there is none. One HGETALL."""
        if not is_key_id(key_id):
            return None
        try:
            fields: Any = await self.client.hgetall(record_key(key_id))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return self._record(key_id, fields)

    async def list(self, tenant: str | None = None) -> builtins.list[KeyRecord]:
        """Every key (of ``tenant`` only, if given), oldest first."""
        try:
            ids: Any = await self.client.smembers(INDEX_KEY)
            key_ids = sorted(_text(i) for i in ids)
            async with self.client.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.hgetall(record_key(key_id))
                replies: builtins.list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        records = [
            r
            for key_id, fields in zip(key_ids, replies, strict=True)
            if (r := self._record(key_id, fields)) is not None
            and (tenant is None or r.tenant == tenant)
        ]
        return sorted(records, key=lambda r: (r.created_ms, r.key_id))

    async def rotate(self, key_id: str, grace_s: float = 0.0) -> tuple[KeyRecord, ApiKey]:
        """A new key (a new key id) with the old one's tenant, role, expiry and description; the
        old one is revoked ``grace_s`` seconds from now (0: now). Raises
        :class:`KeyNotFoundError` or :class:`KeyNotRotatableError`."""
        if grace_s < 0:
            raise ValueError("grace_s must be >= 0")
        if not is_key_id(key_id):
            raise KeyNotFoundError(key_id)
        for _ in range(3):
            key = new_key()
            try:
                reply: Any = await self._rotate(
                    keys=[record_key(key_id), record_key(key.key_id), INDEX_KEY, EPOCH_KEY],
                    args=[
                        key_id,
                        key.key_id,
                        hash_secret(key.secret),
                        round(grace_s * 1000),
                        EVENTS_CHANNEL,
                    ],
                )
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
            status = int(reply[0])
            if status == 0:
                raise KeyNotFoundError(key_id)
            if status == -1:
                raise KeyNotRotatableError(f"key {key_id} is revoked or already rotated")
            if status == -2:
                raise KeyNotRotatableError(f"key {key_id} has expired")
            if status == 1:
                record = await self.get(key.key_id)
                if record is None:  # pragma: no cover - only if deleted by hand in between
                    raise KeyNotFoundError(key.key_id)
                return record, key
        raise RuntimeError("could not draw an unused key id")

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke the key now (a pending grace period is cut short; a revoked key stays as it
        is). Raises :class:`KeyNotFoundError`."""
        if not is_key_id(key_id):
            raise KeyNotFoundError(key_id)
        try:
            revoked_ms = int(
                await self._revoke(
                    keys=[record_key(key_id), EPOCH_KEY], args=[key_id, EVENTS_CHANNEL]
                )
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        record = await self.get(key_id) if revoked_ms else None
        if record is None:
            raise KeyNotFoundError(key_id)
        return record

    async def epoch(self) -> int:
        """The change counter: it moves on every change. Cheap, for polling."""
        try:
            value: Any = await self.client.get(EPOCH_KEY)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return int(value or 0)

    @contextlib.asynccontextmanager
    async def changes(self) -> AsyncIterator[AsyncIterator[str]]:
        """Subscribe to :data:`EVENTS_CHANNEL` on a pub/sub connection of its own; yields an
        iterator of changed key ids. Redis errors come out as StoreUnavailableError."""
        if isinstance(self.client, RedisCluster):
            # The cluster client learns the slot map on its first command; a pub/sub
            # connection picks its node from that map.
            try:
                await self.client.initialize()
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
        pubsub = self.client.pubsub()
        try:
            try:
                await pubsub.subscribe(EVENTS_CHANNEL)
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
            yield self._changed_ids(pubsub)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    @staticmethod
    async def _changed_ids(pubsub: PubSub) -> AsyncIterator[str]:
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
            if message is not None and message.get("type") == "message":
                data = message["data"]
                yield data.decode() if isinstance(data, bytes) else str(data)

    @staticmethod
    def _record(key_id: str, fields: Any) -> KeyRecord | None:
        if not fields:
            return None
        f = {_text(k): _text(v) for k, v in fields.items()}
        return KeyRecord(
            key_id=key_id,
            role=Role(f["role"]),
            tenant=f.get("tenant") or None,
            secret_hash=f["hash"],
            created_ms=int(f["created_ms"]),
            expires_ms=_optional_ms(f.get("expires_ms", "")),
            revoked_ms=_optional_ms(f.get("revoked_ms", "")),
            description=f.get("description", ""),
        )


async def bootstrap_operator_key(store: RedisKeyStore, data_dir: Path) -> Path:
    """Make sure ``<data_dir>/operator.key`` holds a valid operator key; return its path.

    On first start this creates an operator key and writes it there (mode 0600, the folder made
    0700 if new). A file holding a key that is still valid is kept as it is (only its mode is
    tightened to 0600 if it was looser). A missing, unreadable, unknown, revoked or expired key
    is replaced. Gateway processes on one machine share the data dir, so they take a file lock
    around the check: only one of them creates a key. Raises
    :class:`~chargepath.store.base.StoreUnavailableError` if the store cannot be reached.
    """
    path = data_dir / OPERATOR_KEY_FILE
    lock = await asyncio.to_thread(_lock_data_dir, data_dir)
    try:
        text = await asyncio.to_thread(_read_key_file, path)
        if text is not None and await _is_valid_operator_key(store, text):
            await asyncio.to_thread(_tighten_mode, path)
            return path
        record, key = await store.create(None, Role.OPERATOR, description="bootstrap operator key")
        await asyncio.to_thread(_write_key_file, path, key.plaintext)
        log.info("created operator key %s in %s", record.key_id, path)
        return path
    finally:
        await asyncio.to_thread(_unlock, lock)


def _lock_data_dir(data_dir: Path) -> int:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(data_dir / (OPERATOR_KEY_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _unlock(lock: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(lock, fcntl.LOCK_UN)
    os.close(lock)


def _read_key_file(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _tighten_mode(path: Path) -> None:
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def _write_key_file(path: Path, plaintext: str) -> None:
    """Write a new file beside ``path`` (created 0600, never readable by others even for a
    moment), then rename it over ``path``: a reader sees the old key or the new one."""
    tmp = path.with_name(f".{OPERATOR_KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(plaintext + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


async def _is_valid_operator_key(store: RedisKeyStore, text: str) -> bool:
    try:
        key = parse_key(text)
    except KeyFormatError:
        return False
    record = await store.get(key.key_id)
    if record is None or record.role is not Role.OPERATOR:
        return False
    if not secret_matches(key.secret, record.secret_hash):
        return False
    # The store's clock decides, as for every other time the store writes.
    try:
        seconds, micros = await store.client.time()
    except (RedisError, OSError) as exc:
        raise _unavailable(exc) from exc
    return record.refusal_at(int(seconds) * 1000 + int(micros) // 1000) is None
