"""What only the integration suites under tests/ use: their `integration` marker, by directory, and the fixtures
of a real nix on a private store with a builder, of an MCP server, and of a stalling TCP proxy."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters, stdio_client

from tests.helpers import (
    ANSWER_WINDOW,
    HOSTS,
    MCP_SCRIPT,
    REBOOT_SCRIPT,
    REPO,
    BuilderProcess,
    commit_flake,
    fake_system,
    flake_text,
    nix_env,
)

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    # Marked by where they live, so `pytest -m "not integration"` runs the unit suite alone.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def nix_store(tmp_path_factory):
    return nix_env(tmp_path_factory.mktemp("nix"))


@pytest.fixture
def start_builder(nats_server, nix_store, tmp_path):
    started: list[BuilderProcess] = []

    def start(repos: dict[str, str], *extra: str, expect_ready: bool = True) -> BuilderProcess:
        config = {"repos": {name: {"url": url, "default_branch": "main"} for name, url in repos.items()}}
        builder = BuilderProcess(nats_server, tmp_path / f"builder{len(started)}", config, nix_store, *extra)
        started.append(builder)
        return builder.start(expect_ready)

    yield start
    for builder in started:
        builder.stop()


@pytest.fixture
def flake(tmp_path):
    """flake(hosts) -> URL of a fresh git flake; more repos and branches by name and branch, or its own text."""

    def make(hosts: dict = HOSTS, name: str = "fleet", branch: str = "main", text: str | None = None) -> str:
        return commit_flake(tmp_path / "repos" / name, text or flake_text(hosts), branch)

    return make


@pytest.fixture
def rebooting_host(start_listener, tmp_path):
    """rebooting_host(hostname, needs=True, *flags) -> a listener booted into generation 1 whose profile is at
    generation 2, with a new kernel when `needs`; its reboot command is REBOOT_SCRIPT."""
    script = tmp_path / "reboot"
    script.write_text(REBOOT_SCRIPT.format(python=sys.executable))
    script.chmod(0o755)

    def start(hostname: str, *flags: str, needs: bool = True, role: str | None = None, tier: str = "test"):
        d = tmp_path / hostname
        host = start_listener(
            hostname,
            tier,
            role,
            "--booted-system",
            str(d / "booted-system"),
            "--boot-id-file",
            str(d / "boot_id"),
            "--reboot-command",
            f"{script} {d}",
            *flags,
        )
        generations = host.standin.profile.parent
        (d / "booted-system").symlink_to(fake_system(generations / "system-1-link"))
        (d / "boot_id").write_text("first-boot")
        fake_system(generations / "system-2-link", kernel="k2" if needs else "k1")
        host.standin.set_generation(2)
        return host

    return start


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def mcp_server(nats_server, tmp_path):
    """Connect an MCP client to a fresh server process (stopped when the `async with` ends); its stderr is kept."""
    errlog = tmp_path / "mcp-stderr.log"

    @contextlib.asynccontextmanager
    async def connect(*flags: str, user: str = "test-deployer", program: list[str] = MCP_SCRIPT):
        args = [
            *program,
            "--nats-url",
            nats_server.url,
            "--nkey-file",
            str(nats_server.seeds[user]),
            "--answer-window",
            ANSWER_WINDOW,
            *flags,
        ]
        with open(errlog, "a") as err:
            params = StdioServerParameters(command=sys.executable, args=args, cwd=str(REPO))
            async with Client(stdio_client(params, errlog=err)) as client:
                yield client

    connect.errlog = errlog
    yield connect
    # An exception a tool did not expect reaches the assistant only as "Error executing tool ..."; none may occur.
    assert not errlog.exists() or "Traceback" not in errlog.read_text(), errlog.read_text()


class StallingProxy:
    """A TCP proxy on 127.0.0.1 in front of nats-server. It forwards both ways until it has forwarded a client's
    `PUB deploy.` or `PUB build.` line; from then on it drops every byte from the server (the request arrived,
    its confirmation never does)."""

    TRIGGERS = (b"PUB deploy.", b"PUB build.")

    def __init__(self, server_port: int):
        self.server_port = server_port
        self.stalled = threading.Event()
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.listening.getsockname()[1]}"

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listening.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.server_port))
            self.sockets += [client, server]
            threading.Thread(target=self.pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, False), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail = b""  # a trigger may span two reads
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                if from_client:
                    if any(t in tail + data for t in self.TRIGGERS):
                        self.stalled.set()  # before forwarding: no answer to this line may get through
                    tail = data[-16:]
                elif self.stalled.is_set():
                    continue
                sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in [self.listening, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked in accept() and recv()
            sock.close()


@pytest.fixture
def stalling_proxy(nats_server):
    proxy = StallingProxy(nats_server.port)
    yield proxy
    proxy.close()


REGISTRY_USERS = ("web1", "web2", "p1", "tdep", "admin", "ops", "mcp")


@pytest.fixture
def registry_server(tmp_path):
    """A nats-server with JetStream and exactly `nats-config`'s users for a fleet of web1, web2 (test, role web) and
    p1 (prod), deployers tdep (test), admin and ops (setup), and an MCP server mcp (test tier); its streams and
    buckets made by `setup-jetstream` with ops, whose output is kept in `setup_output`."""
    import homelab_deploy as hd
    from tests.helpers import NatsServer, run_cli

    server = NatsServer(tmp_path, {name: {} for name in REGISTRY_USERS})
    pub = server.public
    doc = {
        "hosts": [
            {"hostname": "web1", "tier": "test", "role": "web", "nkey": pub["web1"]},
            {"hostname": "web2", "tier": "test", "role": "web", "nkey": pub["web2"]},
            {"hostname": "p1", "tier": "prod", "nkey": pub["p1"]},
        ],
        "deployers": [
            {"name": "tdep", "access": "test", "nkey": pub["tdep"]},
            {"name": "admin", "access": "admin", "nkey": pub["admin"]},
            {"name": "ops", "access": "setup", "nkey": pub["ops"]},
        ],
        "mcp": [{"name": "mcp", "nkey": pub["mcp"]}],
    }
    server.credentials = hd.fleet_credentials(doc)
    server.config.write_text(
        f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        + hd.authorization_config(server.credentials)
    )
    server.start()
    try:
        setup = run_cli("setup-jetstream", "--nats-url", server.url, "--nkey-file", str(server.seeds["ops"]))
        assert setup.returncode == 0, setup.stderr
        server.setup_output = setup.stdout
        yield server
    finally:
        server.stop()


@pytest.fixture
def registry_fleet(registry_server, tmp_path):
    """start(hostname) -> a listener of registry_server's fleet (web1, web2: test, web; p1: prod), stopped after."""
    from tests.helpers import Listener

    started: list[Listener] = []

    def start(hostname: str, *extra: str) -> Listener:
        tier, role = ("prod", None) if hostname == "p1" else ("test", "web")
        started.append(Listener(registry_server, hostname, tier, role, tmp_path, *extra).start())
        return started[-1]

    yield start
    for host in started:
        host.stop()
