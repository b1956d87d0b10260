"""The fixtures every suite may use, the unit suite at the root included (the root conftest.py loads this module):
a real nats-server with the spec's NKey users, listener processes, in-process clients, a git repository."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from tests.helpers import FLEET, Listener, NatsServer, Rogue, StandIn


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path, FLEET)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_listener(nats_server, tmp_path):
    started: list[Listener] = []

    def start(hostname: str, tier: str, role: str | None = None, *extra: str, expect_ready: bool = True) -> Listener:
        listener = Listener(nats_server, hostname, tier, role, tmp_path, *extra)
        started.append(listener)
        return listener.start(expect_ready)

    yield start
    for listener in started:
        listener.stop()


@pytest.fixture
def rogue(nats_server):
    """rogue(user, subject, *daemons) -> a Rogue on nats_server, closed (and its daemons resumed) after the test."""
    made: list[Rogue] = []

    def make(user: str, subject: str, *daemons) -> Rogue:
        made.append(Rogue(nats_server, user, subject, list(daemons)))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def bus_factory():
    """Real in-process NATS clients (homelab_deploy.Bus), closed after the test."""
    import homelab_deploy

    buses = []

    def make(server: NatsServer, user: str):
        bus = homelab_deploy.Bus(server.url, str(server.seeds[user]), f"test-{user}")
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close()


@pytest.fixture
def listener_in_process(nats_server, bus_factory, tmp_path, monkeypatch):
    """make(**config) -> (listener, standin): a started homelab_deploy.Listener for testhost1 in this process (its
    ListenerConfig fields as keywords; no CLI parser), on a real NATS connection, with its own nixos-rebuild
    stand-in; for tests that inject a fault or a hook."""
    import homelab_deploy

    def make(**config):
        standin = StandIn(tmp_path / "standin")
        monkeypatch.setenv("PATH", f"{standin.dir / 'bin'}:{os.environ['PATH']}")
        monkeypatch.setenv("STANDIN_DIR", str(standin.dir))
        listener = homelab_deploy.Listener(
            homelab_deploy.ListenerConfig(
                "testhost1",
                "test",
                "git+https://git.example.com/c.git",
                deploy_subjects=("deploy.test.testhost1",),
                state_dir=str(tmp_path / "state"),
                profile=str(standin.profile),
                **config,
            ),
            bus_factory(nats_server, "testhost1"),
            stop=threading.Event(),
        )
        os.makedirs(listener.config.state_dir)
        listener.start()
        return listener, standin

    return make


@pytest.fixture
def git_repo(tmp_path):
    """A real git repository with a branch `main` and an annotated tag `v1` on its first commit: (flake URL, git)."""
    repo = tmp_path / "fleet-config"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()

    repo.mkdir()
    git("init", "-q", "-b", "main")
    git("commit", "-q", "--allow-empty", "-m", "first")
    git("tag", "-a", "v1", "-m", "release 1")
    git("commit", "-q", "--allow-empty", "-m", "second")
    return f"git+file://{repo}?dir=hosts", git
