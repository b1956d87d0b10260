"""Fixtures with real parts: nats-server with NKey users and tiered permissions, listener processes,
and a stand-in `nixos-rebuild` on PATH that records its argv."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nkeys
import pytest

REPO = Path(__file__).resolve().parent
PROGRAM = [sys.executable, str(REPO / "homelab_deploy.py")]
sys.path.insert(0, str(REPO))


def wait_for(condition, timeout: float = 20.0, what: str = "condition", interval: float = 0.02):
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a test process and everything in its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def make_user_key(directory: Path, name: str) -> tuple[Path, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = directory / f"{name}.seed"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


def listener_permissions(hostname: str, tier: str, role: str | None) -> dict:
    own = [f"deploy.{tier}.{hostname}", f"deploy.{tier}.all"] + ([f"deploy.{tier}.role.{role}"] if role else [])
    return {"subscribe": own + ["deploy.discover", "deploy.status"],
            "publish": ["deploy.responses.>", f"deploy.events.{tier}.{hostname}"]}


# The credentials of the spec's example configuration: who may publish and subscribe where.
FLEET = {
    "testhost1": listener_permissions("testhost1", "test", None),
    "testhost2": listener_permissions("testhost2", "test", "web"),
    "dns1": listener_permissions("dns1", "prod", "dns"),
    "test-deployer": {"publish": ["deploy.test.>", "deploy.discover", "deploy.status"],
                      "subscribe": ["deploy.responses.>", "deploy.discover", "deploy.events.test.>"]},
    "admin": {"publish": ["deploy.>", "$JS.API.STREAM.INFO.HOMELAB_DEPLOY_EVENTS",
                          "$JS.API.CONSUMER.CREATE.HOMELAB_DEPLOY_EVENTS.*.deploy.events.>",
                          "$JS.API.CONSUMER.CREATE.HOMELAB_DEPLOY_EVENTS.*.build.events.>"],
              "subscribe": ["deploy.>", "build.events.>"]},
    # The builder serves repos fleet and evalfail; the build client may also ask for `unknown`, which no
    # builder serves, but not for `second`.
    "builder": {"publish": ["build.responses.>", "build.events.>"], "subscribe": ["build.fleet.*", "build.evalfail.*"]},
    "build-client": {"publish": ["build.fleet.*", "build.evalfail.*", "build.unknown.*"],
                     "subscribe": ["build.responses.>", "build.events.fleet"]},
}


class NatsServer:
    def __init__(self, workdir: Path, users: dict[str, dict]):
        self.workdir = workdir
        self.seeds: dict[str, Path] = {}
        self.public: dict[str, str] = {}
        entries = []
        for name, perms in users.items():
            self.seeds[name], self.public[name] = make_user_key(workdir, name)
            entries.append({"nkey": self.public[name], "permissions": perms})
        self.stranger_seed, _ = make_user_key(workdir, "stranger")  # a valid key the server does not know
        self.config = workdir / "nats.conf"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.write_config(entries)

    def write_config(self, entries: list[dict], port: int | str = -1) -> None:
        # nats-server reads JSON-compatible values in its config format.
        self.config.write_text(f"listen: 127.0.0.1:{port}\nmax_payload: 1MB\n"
                               f"authorization {{ users = {json.dumps(entries, indent=1)} }}\n")

    def start(self) -> None:
        log = self.workdir / "nats.log"
        log.write_text("")
        self.proc = subprocess.Popen(["nats-server", "-c", str(self.config), "-l", str(log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        match = wait_for(lambda: re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)",
                                           log.read_text()), what="nats-server to listen")
        self.port = int(match.group(1))

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    # Restarts on the same port (test_reliability.py): clients reconnect to the URL they were given.
    monitor_port: int | None = None

    def start_again(self, *flags: str) -> None:
        """Start after stop() on the port of the first start. `flags` are more nats-server flags; with
        ("-m", "-1") the monitoring endpoint (/connz, /routez) listens on self.monitor_port."""
        assert self.port, "start() chooses the port; start_again() reuses it"
        log = self.workdir / "nats.log"
        log.write_text("")
        self.proc = subprocess.Popen(["nats-server", "-c", str(self.config), "-l", str(log), "-p", str(self.port),
                                      *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(lambda: f"Listening for client connections on 127.0.0.1:{self.port}" in log.read_text()
                 or self.proc.poll() is not None, what=f"nats-server to listen again on port {self.port}")
        assert self.proc.poll() is None, log.read_text()
        match = re.search(r"Starting http monitor on 127\.0\.0\.1:(\d+)", log.read_text())
        self.monitor_port = int(match.group(1)) if match else None

    def restart(self, *flags: str) -> None:
        self.stop()
        self.start_again(*flags)


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path, FLEET)
    server.start()
    yield server
    server.stop()


STANDIN = """\
#!{python}
# Stand-in for nixos-rebuild: records argv, then behaves as $STANDIN_DIR/mode says.
import atexit, json, os, subprocess, sys, time
d = os.environ["STANDIN_DIR"]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
# spans: its start and end times (time.time()), a line each
with open(os.path.join(d, "times"), "a") as f:
    f.write(f"{{time.time()}}\\n")
atexit.register(lambda: open(os.path.join(d, "times"), "a").write(f"{{time.time()}}\\n"))
mode = open(os.path.join(d, "mode")).read().strip() if os.path.exists(os.path.join(d, "mode")) else "succeed"
profile = os.path.join(d, "profiles", "system")
if "--rollback" in sys.argv:  # back to the generation before the current one; fails if $STANDIN_DIR/rollback-fails
    if os.path.exists(os.path.join(d, "rollback-fails")):
        print("error: cannot roll back: no generation before", file=sys.stderr, flush=True)
        sys.exit(1)
    os.symlink(f"system-{{int(os.readlink(profile).split('-')[1]) - 1}}-link", profile + ".tmp")
    os.replace(profile + ".tmp", profile)
    sys.exit(0)
print("building the system configuration...", flush=True)
if mode == "fail":
    print("error: builder for '/nix/store/xyz-nixos-system.drv' failed with exit code 1", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "slow":  # a deploy that takes a moment, so that overlapping runs would show in the spans
    time.sleep(0.3)
if mode == "block":  # until the test creates the release file; a grandchild proves the group is killed
    child = subprocess.Popen(["sleep", "3600"])
    with open(os.path.join(d, "pids"), "a") as f:
        f.write(f"{{os.getpid()}} {{child.pid}}\\n")
    while not os.path.exists(os.path.join(d, "release")):
        time.sleep(0.05)
    child.kill()
gen = int(os.readlink(profile).split("-")[1]) + 1 if os.path.islink(profile) else 1
os.makedirs(os.path.dirname(profile), exist_ok=True)
if os.path.exists(os.path.join(d, "revision")):  # the new system's nixos-version reports this configurationRevision
    version = os.path.join(d, "profiles", f"system-{{gen}}-link", "sw", "bin", "nixos-version")
    os.makedirs(os.path.dirname(version))
    with open(version, "w") as f:
        rev = open(os.path.join(d, "revision")).read().strip()
        f.write(f"#!/bin/sh\\necho '{{{{\\"nixosVersion\\": \\"25.05\\", \\"configurationRevision\\": \\"{{rev}}\\"}}}}'\\n")
    os.chmod(version, 0o755)
os.symlink(f"system-{{gen}}-link", profile + ".tmp")
os.replace(profile + ".tmp", profile)
print("activating the configuration...", flush=True)
if mode == "activation-fails":  # the new generation is installed, then units fail, as nixos-rebuild reports it
    print("warning: the following units failed: network-setup.service", file=sys.stderr, flush=True)
    sys.exit(4)
"""


class StandIn:
    """A `nixos-rebuild` on PATH for one listener; modes: succeed, fail, slow (0.3 s), block (until release()),
    activation-fails (installs the generation, exits 4)."""

    def __init__(self, directory: Path):
        self.dir = directory
        (directory / "bin").mkdir(parents=True)
        script = directory / "bin" / "nixos-rebuild"
        script.write_text(STANDIN.format(python=sys.executable))
        script.chmod(0o755)
        self.profile = directory / "profiles" / "system"

    def set_mode(self, mode: str) -> None:
        (self.dir / "mode").write_text(mode)

    def set_revision(self, revision: str) -> None:
        """Generations made from now on report `revision` as their configurationRevision (nixos-version --json)."""
        (self.dir / "revision").write_text(revision)

    def release(self) -> None:
        (self.dir / "release").write_text("")

    def set_generation(self, generation: int) -> None:
        """Point the system profile at `generation`, as if the host had been switched to it before."""
        self.profile.parent.mkdir(parents=True, exist_ok=True)
        self.profile.unlink(missing_ok=True)
        self.profile.symlink_to(f"system-{generation}-link")

    @property
    def generation(self) -> int:
        return int(os.readlink(self.profile).split("-")[1])

    @property
    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def spans(self) -> list[tuple[float, float]]:
        """(start, end) of each finished run, by time.time()."""
        path = self.dir / "times"
        times = [float(t) for t in path.read_text().split()] if path.exists() else []
        return list(zip(times[::2], times[1::2]))

    @property
    def pids(self) -> list[int]:
        path = self.dir / "pids"
        return [int(p) for p in path.read_text().split()] if path.exists() else []


class Listener:
    def __init__(self, server: NatsServer, hostname: str, tier: str, role: str | None, workdir: Path, *extra: str):
        self.hostname = hostname
        self.standin = StandIn(workdir / hostname)
        self.log = workdir / f"{hostname}.log"
        self.argv = [*PROGRAM, "listener", "--hostname", hostname, "--tier", tier, "--nats-url", server.url,
                     "--nkey-file", str(server.seeds[hostname]), "--flake-url", "git+https://git.example.com/cfg.git",
                     "--system-profile", str(self.standin.profile), "--state-dir", str(self.standin.dir / "state"),
                     *(["--role", role] if role else []), *extra]
        self.env = {**os.environ, "PATH": f"{self.standin.dir / 'bin'}:{os.environ['PATH']}",
                    "STANDIN_DIR": str(self.standin.dir)}
        self.proc: subprocess.Popen | None = None

    def start(self, expect_ready: bool = True) -> Listener:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: " ready " in self.log.read_text() or self.proc.poll() is not None,
                 what=f"listener {self.hostname} to be ready")
        assert (self.proc.poll() is None) == expect_ready, self.log.read_text()
        return self

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)


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


class Rogue:
    """A second connection on a daemon's own credential, which may publish answers: on each request on `subject`
    it publishes the loaded answers where the daemon answers the request's reply_to,
    flushes, then resumes the daemons it paused, so all of them reach the client before any genuine answer."""

    def __init__(self, server: NatsServer, user: str, subject: str, daemons: list):
        import homelab_deploy

        self.bus = homelab_deploy.Bus(server.url, str(server.seeds[user]), f"rogue-{user}")
        self.daemons = daemons  # anything with a running `proc`: Listener, test_builder.BuilderProcess
        # where the daemon answers: <reply_to>.<hostname>, or <reply_to>.<repo> for a builder (its credential may)
        self.responder = subject.split(".")[1] if subject.startswith("build.") else user
        self.answers: list[bytes] = []
        self.bus.subscribe(subject, self.answer)

    def load(self, answers: list[bytes]) -> None:
        """Answer the next request with `answers` (at least one); the daemons pause (SIGSTOP) until they are out."""
        self.answers = answers
        for daemon in self.daemons:
            os.kill(daemon.proc.pid, signal.SIGSTOP)

    def answer(self, subject: str, data: bytes, received: float) -> None:
        import homelab_deploy

        try:
            answer_to = homelab_deploy.answer_subject(json.loads(data)["reply_to"], self.responder)
            for payload in self.answers[:-1]:
                self.bus.publish(answer_to, payload)
            self.bus.publish(answer_to, self.answers[-1], confirm=True)  # flushed: the server has routed them all
        finally:
            self.resume()

    def resume(self) -> None:
        for daemon in self.daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self.bus.close()


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


def start_deploy(bus, subject: str, action: str = "switch", revision: str = "main"):
    """Publish a deploy request with a fresh reply subject; returns (reply_to, queue of (subject, raw reply))."""
    import homelab_deploy

    reply_to = homelab_deploy.new_reply_subject("deploy", bus.public_key)
    replies = bus.inbox(homelab_deploy.answer_subject(reply_to, "*"))
    bus.publish(subject, json.dumps({"action": action, "revision": revision, "reply_to": reply_to}).encode(),
                confirm=True)
    return reply_to, replies


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


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
        listener = homelab_deploy.Listener(homelab_deploy.ListenerConfig(
            "testhost1", "test", "git+https://git.example.com/c.git", deploy_subjects=("deploy.test.testhost1",),
            state_dir=str(tmp_path / "state"), profile=str(standin.profile), **config),
            bus_factory(nats_server, "testhost1"), stop=threading.Event())
        os.makedirs(listener.config.state_dir)
        listener.start()
        return listener, standin

    return make
