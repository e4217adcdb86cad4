"""A real Redis Sentinel deployment for tests: a master, its replicas and three sentinels
(``redis-server --sentinel``), each a child process on a free port, stopped at the end."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from chargepath.store.connect import RedisTarget
from chargepath.store.embedded import find_redis_server, free_port

MASTER_NAME = "mymaster"


class Node:
    """One redis-server process (a data node or a sentinel)."""

    def __init__(self, binary: str, folder: Path, args: list[str], port: int) -> None:
        self.port = port
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder
        )

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)

    def wait_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited")
            try:
                with self.client() as c:
                    c.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not answer")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        p, self.process = self.process, None
        if p is not None:
            p.send_signal(signal.SIGKILL)
            p.wait()

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class SentinelDeployment:
    """``replicas`` replicas of a master (started with ``master_args`` too), watched by three
    sentinels (quorum 2, master down after ``down_after_ms``). :meth:`start` returns once
    every sentinel sees the master, the replicas and the two other sentinels."""

    def __init__(
        self,
        folder: Path,
        *,
        replicas: int = 1,
        down_after_ms: int = 1000,
        master_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = find_redis_server()
        self.folder = folder
        self.replica_count = replicas
        self.down_after_ms = down_after_ms
        self.master_args = list(master_args)
        self.master: Node | None = None
        self.replicas: list[Node] = []
        self.sentinels: list[Node] = []

    @property
    def target(self) -> RedisTarget:
        return RedisTarget(
            sentinels=tuple(("127.0.0.1", s.port) for s in self.sentinels), master=MASTER_NAME
        )

    @property
    def sentinel_option(self) -> str:
        """The ``--redis-sentinel`` value."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def _data_node(self, name: str, extra: list[str]) -> Node:
        port = free_port()
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        return Node(self.binary, self.folder / name, [*args, *extra], port)

    def start(self, timeout: float = 30.0) -> None:
        self.master = self._data_node("master", self.master_args)
        self.master.wait_up()
        for i in range(self.replica_count):
            node = self._data_node(
                f"replica-{i}", ["--replicaof", "127.0.0.1", str(self.master.port)]
            )
            node.wait_up()
            self.replicas.append(node)
        deadline = time.monotonic() + timeout
        with self.master.client() as m:
            while int(m.info("replication")["connected_slaves"]) < self.replica_count:
                self._before(deadline, "the replicas did not connect")
        for i in range(3):
            port = free_port()
            folder = self.folder / f"sentinel-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            node = Node(self.binary, folder, [str(conf), "--sentinel"], port)
            node.wait_up()
            self.sentinels.append(node)
        for s in self.sentinels:
            with s.client() as c:
                while True:
                    state = c.sentinel_master(MASTER_NAME)
                    if (
                        int(state["num-other-sentinels"]) == 2
                        and int(state["num-slaves"]) == self.replica_count
                    ):
                        break
                    self._before(deadline, "the sentinels did not find each other")

    @staticmethod
    def _before(deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)

    def master_port(self) -> int:
        """The master's port as the sentinels name it now."""
        with self.sentinels[0].client() as c:
            _, port = c.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote a replica without waiting for the master to fail."""
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL FAILOVER", MASTER_NAME)

    def wait_for_new_master(self, old_port: int, timeout: float = 30.0) -> int:
        """The port of the master that replaced ``old_port``, once every sentinel names it and
        it answers as a master."""
        deadline = time.monotonic() + timeout
        while True:
            ports = set()
            for s in self.sentinels:
                with s.client() as c:
                    addr = c.sentinel_get_master_addr_by_name(MASTER_NAME)
                    ports.add(int(addr[1]) if addr else 0)
            if len(ports) == 1 and old_port not in ports:
                port = ports.pop()
                try:
                    with redis.Redis(port=port, decode_responses=True) as c:
                        if c.execute_command("ROLE")[0] == "master":
                            return port
                except redis.ConnectionError:
                    pass
            self._before(deadline, "no new master")

    def stop(self) -> None:
        for node in [*self.sentinels, *self.replicas, *([self.master] if self.master else [])]:
            node.stop()
