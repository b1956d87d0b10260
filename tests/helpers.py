"""The harness with real parts, shared by the suites (fixtures that use it are in fixtures.py and conftest.py):
nats-server with NKey users and tiered permissions, listener processes, a stand-in `nixos-rebuild` on PATH that
records its argv, a builder on a real nix with a private store, and the small helpers several suites call."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nkeys
import pytest

REPO = Path(__file__).resolve().parent.parent  # the repository root
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
    return {
        "subscribe": own + ["deploy.discover", "deploy.status", f"deploy.logs.{tier}.{hostname}"],
        "publish": ["deploy.responses.>", f"deploy.events.{tier}.{hostname}"],
    }


# The credentials of the spec's example configuration: who may publish and subscribe where.
FLEET = {
    "testhost1": listener_permissions("testhost1", "test", None),
    "testhost2": listener_permissions("testhost2", "test", "web"),
    "dns1": listener_permissions("dns1", "prod", "dns"),
    "test-deployer": {
        "publish": ["deploy.test.>", "deploy.discover", "deploy.status", "deploy.logs.test.*"],
        "subscribe": ["deploy.responses.>", "deploy.discover", "deploy.events.test.>"],
    },
    "admin": {
        "publish": [
            "deploy.>",
            "$JS.API.STREAM.INFO.HOMELAB_DEPLOY_EVENTS",
            "$JS.API.CONSUMER.CREATE.HOMELAB_DEPLOY_EVENTS.*.deploy.events.>",
            "$JS.API.CONSUMER.CREATE.HOMELAB_DEPLOY_EVENTS.*.build.events.>",
        ],
        "subscribe": ["deploy.>", "build.events.>"],
    },
    # The builder serves repos fleet and evalfail; the build client may also ask for `unknown`, which no
    # builder serves, but not for `second`.
    "builder": {"publish": ["build.responses.>", "build.events.>"], "subscribe": ["build.fleet.*", "build.evalfail.*"]},
    "build-client": {
        "publish": ["build.fleet.*", "build.evalfail.*", "build.unknown.*"],
        "subscribe": ["build.responses.>", "build.events.fleet"],
    },
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
        self.config.write_text(
            f"listen: 127.0.0.1:{port}\nmax_payload: 1MB\nauthorization {{ users = {json.dumps(entries, indent=1)} }}\n"
        )

    def start(self) -> None:
        log = self.workdir / "nats.log"
        log.write_text("")
        self.proc = subprocess.Popen(
            ["nats-server", "-c", str(self.config), "-l", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        match = wait_for(
            lambda: re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", log.read_text()),
            what="nats-server to listen",
        )
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
        self.proc = subprocess.Popen(
            ["nats-server", "-c", str(self.config), "-l", str(log), "-p", str(self.port), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(
            lambda: (
                f"Listening for client connections on 127.0.0.1:{self.port}" in log.read_text()
                or self.proc.poll() is not None
            ),
            what=f"nats-server to listen again on port {self.port}",
        )
        assert self.proc.poll() is None, log.read_text()
        match = re.search(r"Starting http monitor on 127\.0\.0\.1:(\d+)", log.read_text())
        self.monitor_port = int(match.group(1)) if match else None

    def restart(self, *flags: str) -> None:
        self.stop()
        self.start_again(*flags)


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
if mode == "eval-error":  # nix's evaluation error as a terminal shows it: coloured, the show-trace hint last
    for line in ("\\x1b[31;1merror:\\x1b[0m undefined variable 'nginxx'", "",
                 "       at /nix/store/abc-source/hosts/web.nix:3:5:",
                 "(use '--show-trace' to show detailed location information)"):
        print(line, file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "fail-long":  # 300 lines at once, one with a password in a URL, then a failure
    for i in range(1, 301):
        print(f"line {{i}} of 300" + (": fetching git+https://alice:hunter2@git.example.com/c.git" if i == 150 else ""))
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
        f.write("#!/bin/sh\\n")
        f.write(f"echo '{{{{\\"nixosVersion\\": \\"25.05\\", \\"configurationRevision\\": \\"{{rev}}\\"}}}}'\\n")
    os.chmod(version, 0o755)
os.symlink(f"system-{{gen}}-link", profile + ".tmp")
os.replace(profile + ".tmp", profile)
print("activating the configuration...", flush=True)
if mode == "activation-fails":  # the new generation is installed, then units fail, as nixos-rebuild reports it
    print("warning: the following units failed: network-setup.service", file=sys.stderr, flush=True)
    sys.exit(4)
"""


class StandIn:
    """A `nixos-rebuild` on PATH for one listener; modes: succeed, fail, eval-error (nix's error, then its
    show-trace hint), fail-long (300 lines, then exit 1), slow (0.3 s), block (until release()), activation-fails
    (installs the generation, exits 4)."""

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
        return list(zip(times[::2], times[1::2], strict=False))

    @property
    def pids(self) -> list[int]:
        path = self.dir / "pids"
        return [int(p) for p in path.read_text().split()] if path.exists() else []


def fake_system(path: Path, kernel: str = "k1", initrd: str = "i1", modules: str = "m1") -> Path:
    """A directory standing for a NixOS system (a generation, /run/booted-system): its kernel, initrd and
    kernel-modules links point at directories of those names in a store beside it."""
    store = path.parent / "store"
    path.mkdir(parents=True)
    for link, target in (("kernel", kernel), ("initrd", initrd), ("kernel-modules", modules)):
        (store / target).mkdir(parents=True, exist_ok=True)
        (path / link).symlink_to(store / target)
    return path


REBOOT_SCRIPT = """\
#!{python}
# Stands for `systemctl reboot`: records that it ran, then leaves the host as a reboot would, on a new boot id with
# the profile's system booted. The test restarts the listener, as the host's boot would.
import os, sys
d = sys.argv[1]
with open(os.path.join(d, "reboots"), "a") as f:
    f.write("ran\\n")
with open(os.path.join(d, "boot_id"), "w") as f:
    f.write(os.urandom(16).hex())
os.symlink(os.path.realpath(os.path.join(d, "profiles", "system")), os.path.join(d, "booted.tmp"))
os.replace(os.path.join(d, "booted.tmp"), os.path.join(d, "booted-system"))
"""


def ran(host) -> int:
    """How often the host's reboot command ran."""
    path = Path(host.standin.dir) / "reboots"
    return len(path.read_text().splitlines()) if path.exists() else 0


def boot_again(host) -> None:
    """The host is back: its listener starts again (the reboot script already gave it a new boot)."""
    host.stop()
    host.start()


class Listener:
    def __init__(self, server: NatsServer, hostname: str, tier: str, role: str | None, workdir: Path, *extra: str):
        self.hostname = hostname
        self.standin = StandIn(workdir / hostname)
        self.log = workdir / f"{hostname}.log"
        self.argv = [
            *PROGRAM,
            "listener",
            "--hostname",
            hostname,
            "--tier",
            tier,
            "--nats-url",
            server.url,
            "--nkey-file",
            str(server.seeds[hostname]),
            "--flake-url",
            "git+https://git.example.com/cfg.git",
            "--system-profile",
            str(self.standin.profile),
            "--state-dir",
            str(self.standin.dir / "state"),
            *(["--role", role] if role else []),
            *extra,
        ]
        self.env = {
            **os.environ,
            "PATH": f"{self.standin.dir / 'bin'}:{os.environ['PATH']}",
            "STANDIN_DIR": str(self.standin.dir),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, expect_ready: bool = True) -> Listener:
        with open(self.log, "ab") as log:
            start = log.tell()  # a restart: only this run's "ready" counts
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log, start_new_session=True)
        wait_for(
            lambda: b" ready " in self.log.read_bytes()[start:] or self.proc.poll() is not None,
            what=f"listener {self.hostname} to be ready",
        )
        assert (self.proc.poll() is None) == expect_ready, self.log.read_text()
        return self

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)


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


def history_records(state_dir: Path) -> list[dict]:
    """A listener's history file as written: a JSON list, then a record a line appended after it."""
    first, *appended = (state_dir / "history.json").read_text().split("\n")
    return json.loads(first) + [json.loads(line) for line in appended]


def start_deploy(bus, subject: str, action: str = "switch", revision: str = "main"):
    """Publish a deploy request with a fresh reply subject; returns (reply_to, queue of (subject, raw reply))."""
    import homelab_deploy

    reply_to = homelab_deploy.new_reply_subject("deploy", bus.public_key)
    replies = bus.inbox(homelab_deploy.answer_subject(reply_to, "*"))
    bus.publish(
        subject, json.dumps({"action": action, "revision": revision, "reply_to": reply_to}).encode(), confirm=True
    )
    return reply_to, replies


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PROGRAM, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


# ---------------------------------------------------------------- requests and answers


def deploy_args(server, user: str, *rest: str) -> list[str]:
    return ["--nats-url", server.url, "--nkey-file", str(server.seeds[user]), *rest]


def iter_queue(q: queue.Queue):
    while True:
        try:
            yield json.loads(q.get_nowait()[1])
        except queue.Empty:
            return


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def collect(q: queue.Queue, done, timeout: float, what: str) -> list[dict]:
    """Decoded messages from `q` until done(messages) holds; fails after `timeout` seconds."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; got {got}")
        try:
            got.append(json.loads(q.get(timeout=min(remaining, 0.5))[1]))
        except queue.Empty:
            pass
    return got


FINAL = {"completed", "failed", "rejected"}


def has_final(messages: list[dict]) -> bool:
    return any(m.get("status") in FINAL for m in messages)


def trusted(server, *users: str) -> list[str]:
    return [flag for user in users for flag in ("--trusted-key", f"{server.public[user]}={user}")]


def fleet_doc(tmp_path: Path) -> tuple[dict, dict[str, Path]]:
    """A fleet with one credential of every kind; returns the document and each credential's seed."""
    names = ["t1", "t2", "p1", "tdep", "admin", "builder", "bclient", "mcp", "mcpadmin"]
    seeds = {n: make_user_key(tmp_path, n)[0] for n in names}
    pub = lambda n: nkeys.from_seed(bytearray(seeds[n].read_bytes().strip())).public_key.decode()  # noqa: E731
    doc = {
        "hosts": [
            {"hostname": "t1", "tier": "test", "nkey": pub("t1")},
            {"hostname": "t2", "tier": "test", "role": "web", "seed": "t2.seed"},
            {"hostname": "p1", "tier": "prod", "role": "dns", "nkey": pub("p1")},
        ],
        "deployers": [
            {"name": "tdep", "access": "test", "nkey": pub("tdep")},
            {"name": "admin", "access": "admin", "nkey": pub("admin")},
        ],
        "builders": [{"name": "builder", "repos": ["r1"], "nkey": pub("builder")}],
        "build_clients": [{"name": "bclient", "repos": ["r1"], "nkey": pub("bclient")}],
        "mcp": [{"name": "mcp", "nkey": pub("mcp"), "admin_seed": "mcpadmin.seed", "build_repos": ["r1"]}],
    }
    return doc, seeds


# ---------------------------------------------------------------- processes and signals


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


def sigterm_to_a_thread(pid: int, run: int) -> None:
    """SIGTERM through tgkill to one of the process's other threads, a different one each run: the kernel may hand
    a process-directed signal to any thread that does not block it, and CPython handles it on the main thread."""
    threads = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert (
        threads
        and ctypes.CDLL(None, use_errno=True).syscall(TGKILL, pid, threads[run % len(threads)], signal.SIGTERM) == 0
    )


# ---------------------------------------------------------------- the builder: real nix, private store, git flakes

NIX = shutil.which("nix")
needs_nix = pytest.mark.skipif(NIX is None, reason="nix not found (Debian: apt-get install nix-bin)")

GOOD = "echo ok > $out"
HOSTS = {"good1": GOOD, "good2": GOOD, "broken": "echo 'intentional build failure' >&2; exit 1", "bad;name": GOOD}


NIX_CONFIG = "\n".join(
    [
        "experimental-features = nix-command flakes",
        "sandbox = false",  # Debian's nix-bin has no sandbox; the builder sees the host file system
        "build-users-group =",  # build as the calling user, no nixbld users
        "substituters =",  # never try a binary cache
        "flake-registry =",  # never fetch the global registry
        "eval-cache = false",
        "tarball-ttl = 0",
        "build-poll-interval = 1",
        "",
    ]
)


def nix_env(base: Path) -> dict:
    """Environment for a daemonless nix with its own store, config and caches under `base`.
    The fetcher cache (XDG_CACHE_HOME) remembers store paths, so it must belong to this store only."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NIX_REMOTE", "NIX_PATH", "NIX_USER_CONF_FILES", "NIX_STORE_DIR", "NIX_STATE_DIR", "NIX_LOG_DIR")
    }
    (base / "etc").mkdir(parents=True, exist_ok=True)
    (base / "etc" / "nix.conf").touch()
    (base / "home").mkdir(exist_ok=True)
    env.update(
        NIX_CONFIG=NIX_CONFIG,
        NIX_CONF_DIR=str(base / "etc"),
        HOME=str(base / "home"),
        XDG_CACHE_HOME=str(base / "cache"),
        XDG_CONFIG_HOME=str(base / "config"),
        NIX_STORE_DIR=str(base / "store"),
        NIX_STATE_DIR=str(base / "state"),
        NIX_LOG_DIR=str(base / "log"),
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0="safe.directory",
        GIT_CONFIG_VALUE_0="*",
    )
    return env


def nix_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def flake_text(hosts: dict[str, str]) -> str:
    """A flake whose nixosConfigurations.<host>.config.system.build.toplevel runs `script` with /bin/sh.
    Store path names cannot hold ';' and the like, so the derivation name is sanitised; the host name is not."""
    system = {"x86_64": "x86_64-linux", "aarch64": "aarch64-linux"}.get(
        platform.machine(), f"{platform.machine()}-linux"
    )
    drv_name = lambda host: "".join(c if c.isalnum() or c in "-._" else "_" for c in host)  # noqa: E731
    entries = "\n".join(
        f"      {nix_str(host)} = mk {nix_str(drv_name(host))} {nix_str(script)};" for host, script in hosts.items()
    )
    return f"""{{
  outputs = {{ self }}:
    let
      mk = name: script: {{
        config.system.build.toplevel = builtins.derivation {{
          inherit name;
          system = "{system}";
          builder = "/bin/sh";
          args = [ "-c" script ];
          PATH = "/usr/local/bin:/usr/bin:/bin";
          nonce = "{uuid.uuid4().hex}";
        }};
      }};
    in {{
      nixosConfigurations = {{
{entries}
      }};
    }};
}}
"""


def commit_flake(repo: Path, text: str, branch: str = "main") -> str:
    """Commit flake.nix on `branch` of a git repo (created if needed); returns the flake URL without ?ref."""
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_SYSTEM": "/dev/null",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
        ).stdout

    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        git("init", "-q", "-b", branch)
    elif branch not in git("branch", "--list", branch):
        git("checkout", "-q", "-b", branch)
    (repo / "flake.nix").write_text(text)
    git("add", "flake.nix")  # flakes only see tracked files
    git("commit", "-q", "-m", "flake")
    return f"git+file://{repo.resolve()}"


NIX_WRAPPER = """\
#!{python}
# Records its argv, then runs the real nix in the same process (same process group).
import json, os, sys
with open(os.environ["NIX_ARGV_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
os.execv({nix!r}, ["nix", *sys.argv[1:]])
"""


class BuilderProcess:
    def __init__(self, server, workdir: Path, config: dict, env: dict, *extra: str):
        import yaml

        self.dir = workdir
        self.dir.mkdir(parents=True)
        (self.dir / "bin").mkdir()
        wrapper = self.dir / "bin" / "nix"
        wrapper.write_text(NIX_WRAPPER.format(python=sys.executable, nix=NIX))
        wrapper.chmod(0o755)
        self.config = self.dir / "builder.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.calls_file = self.dir / "nix-argv.jsonl"
        self.log = self.dir / "builder.log"
        self.argv = [
            *PROGRAM,
            "builder",
            "--nats-url",
            server.url,
            "--nkey-file",
            str(server.seeds["builder"]),
            "--config",
            str(self.config),
            *extra,
        ]
        self.env = {**env, "PATH": f"{self.dir / 'bin'}:{env['PATH']}", "NIX_ARGV_LOG": str(self.calls_file)}
        self.proc: subprocess.Popen | None = None

    def start(self, expect_ready: bool = True) -> BuilderProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: "builder ready" in self.log_text() or self.proc.poll() is not None, what="builder to start")
        assert (self.proc.poll() is None) == expect_ready, self.log_text()
        return self

    def log_text(self) -> str:
        return self.log.read_text()

    @property
    def nix_calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def builds(self) -> list[str]:
        """The flake attribute of every `nix build` run."""
        return [call[-1].split("#", 1)[1] for call in self.nix_calls if call[0] == "build"]

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, timeout=30)


# ---------------------------------------------------------------- the MCP server

MCP_SCRIPT = [str(REPO / "homelab_deploy_mcp.py")]
ANSWER_WINDOW = "1"  # local listeners answer within milliseconds; keeps the nobody-answers cases short


def text(result) -> str:
    return "\n".join(block.text for block in result.content)
