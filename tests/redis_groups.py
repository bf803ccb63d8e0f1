"""Private Redis deployments for tests: a 6-node Redis Cluster and a Sentinel group.

Every process runs on free loopback ports from a temporary directory, and is killed by
``stop()``; the shared Redis at 6379 is never touched. A missing ``redis-server`` or
``redis-cli`` fails the test that needs them (never a skip).
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 30.0


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (the Cluster and Sentinel tests need it)")
    return path


# Below Linux's ephemeral range (32768-60999), where free_port() and outgoing connections
# take theirs: a port handed out here is never also handed to another server by the kernel.
_PORTS = range(20000, 32000)
_handed_out: set[int] = set()


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        ports.append(port)
    return ports


def _wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"redis-server on port {port} did not start")


def _until(check: Any, what: str, seconds: float = START_TIMEOUT) -> None:
    """Poll ``check()`` until it is true; fail the test with ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # a node still starting or just killed: poll again
            pass
        time.sleep(0.05)
    pytest.fail(f"{what} within {seconds:g} s")


def _client(port: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)


class _Processes:
    """redis-server processes by port, all killed by ``stop()``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.server = _binary("redis-server")

    def spawn(self, port: int, args: list[str]) -> None:
        log = (self.directory / f"{port}.log").open("ab")
        try:
            self.processes[port] = subprocess.Popen(
                [self.server, *args], cwd=self.directory, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()

    def signal(self, port: int, signum: int) -> None:
        self.processes[port].send_signal(signum)

    def kill(self, port: int) -> None:
        """SIGKILL the server on ``port`` (no shutdown, no save: a crash)."""
        process = self.processes.pop(port, None)
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)


class RedisClusterServers:
    """A Redis Cluster of 3 primaries and 3 replicas (one each), private to the tests.

    ``node_timeout_ms`` is the cluster's failure detection time: a killed primary's
    replica is promoted about a second after it.
    """

    def __init__(self, directory: Path, *, node_timeout_ms: int = 2000) -> None:
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.ports = _free_ports(6)
        self.bus_ports = dict(zip(self.ports, _free_ports(6), strict=True))
        self._procs = _Processes(directory)

    @property
    def url(self) -> str:
        """The store URL: three of the nodes (the others are discovered)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:3])

    def _spawn(self, port: int) -> None:
        self._procs.spawn(
            port,
            [
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(self.bus_ports[port]),
                "--cluster-config-file",
                str(self.directory / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # A replica may always take over (its data is as fresh as replication).
                "--cluster-replica-validity-factor",
                "0",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                # A replica (re)syncs at once, not after the default 5 s wait for others.
                "--repl-diskless-sync-delay",
                "0",
            ],
        )

    def start(self) -> None:
        cli = _binary("redis-cli")
        deadline = time.monotonic() + START_TIMEOUT
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            _wait_listening(port, deadline)
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout!r} {created.stderr!r}")
        self.wait_healthy()

    def live_ports(self) -> list[int]:
        return [port for port in self.ports if port in self._procs.processes]

    def roles(self) -> dict[int, str]:
        """``"master"`` or ``"slave"`` per live node, from its own ``ROLE``."""
        out: dict[int, str] = {}
        for port in self.live_ports():
            client = _client(port)
            try:
                out[port] = client.execute_command("ROLE")[0].decode()
            finally:
                client.close()
        return out

    def primaries(self) -> list[int]:
        return [port for port, role in self.roles().items() if role == "master"]

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot``, as a live node sees it."""
        client = _client(self.live_ports()[0])
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            client.close()
        raise AssertionError(f"no node serves slot {slot}")

    def _healthy(self) -> bool:
        live = self.live_ports()
        for port in live:
            client = _client(port)
            try:
                info = client.cluster("info")
                if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) < 6:
                    return False
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
            finally:
                client.close()
        return len(self.primaries()) == 3

    def wait_healthy(self, seconds: float = START_TIMEOUT) -> None:
        """Wait until every live node says ``cluster_state:ok`` and each replica is in sync."""
        _until(self._healthy, "the Redis Cluster was not healthy", seconds)

    def kill(self, port: int) -> None:
        """Crash the node on ``port`` (SIGKILL)."""
        self._procs.kill(port)

    def pause(self, port: int) -> None:
        """Freeze the node on ``port`` (SIGSTOP): keep it shorter than the node timeout,
        or the cluster fails it over."""
        self._procs.signal(port, signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self._procs.signal(port, signal.SIGCONT)

    def restart(self, port: int) -> None:
        """Start the node on ``port`` again: it rejoins (a killed primary as a replica)."""
        self._spawn(port)
        _wait_listening(port, time.monotonic() + START_TIMEOUT)

    def stop(self) -> None:
        self._procs.stop()


class SentinelGroup:
    """One primary, one replica and three sentinels watching them as ``service``."""

    def __init__(
        self,
        directory: Path,
        *,
        service: str = "armor",
        down_after_ms: int = 1500,
        failover_timeout_ms: int = 6000,
    ) -> None:
        self.directory = directory
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data_ports = _free_ports(2)
        self.sentinel_ports = _free_ports(3)
        self._procs = _Processes(directory)

    @property
    def url(self) -> str:
        """The store URL: the three sentinels and the service."""
        sentinels = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{sentinels}/{self.service}/0"

    def start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        primary, replica = self.data_ports
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        common += ["--repl-diskless-sync-delay", "0"]
        common += ["--dir", str(self.directory)]
        self._procs.spawn(primary, ["--port", str(primary), *common])
        self._procs.spawn(
            replica, ["--port", str(replica), "--replicaof", "127.0.0.1", str(primary), *common]
        )
        for port in self.data_ports:
            _wait_listening(port, deadline)
        _until(lambda: self._link_up(replica), "the replica did not sync")
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n",
                encoding="utf-8",
            )
            self._procs.spawn(port, [str(conf), "--sentinel"])
        for port in self.sentinel_ports:
            _wait_listening(port, deadline)
        self.wait_ready()

    def _link_up(self, port: int) -> bool:
        client = _client(port)
        try:
            return bool(client.info("replication")["master_link_status"] == "up")
        finally:
            client.close()

    def _sentinel_ready(self, port: int) -> bool:
        client = _client(port)
        try:
            state = client.sentinel_master(self.service)
            return bool(
                state["num-other-sentinels"] == 2
                and state["num-slaves"] >= 1
                and not state["is_sdown"]
            )
        finally:
            client.close()

    def wait_ready(self, seconds: float = START_TIMEOUT) -> None:
        """Wait until every sentinel knows the others and a replica (a failover can run)."""
        _until(
            lambda: all(self._sentinel_ready(port) for port in self.sentinel_ports),
            "the sentinels were not ready",
            seconds,
        )

    def master_port(self) -> int:
        """The master's port, as the first answering sentinel says."""
        for port in self.sentinel_ports:
            if port not in self._procs.processes:
                continue
            client = _client(port)
            try:
                _host, master = client.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
                )
                return int(master)
            finally:
                client.close()
        raise AssertionError("no sentinel answers")

    def kill(self, port: int) -> None:
        """Crash the server on ``port`` (SIGKILL)."""
        self._procs.kill(port)

    def stop(self) -> None:
        self._procs.stop()
