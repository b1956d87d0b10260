#!/usr/bin/env python3
"""homelab-deploy: message-based NixOS deployments over NATS.

A listener on every NixOS host runs `nixos-rebuild` when a deploy request
arrives on its subjects; a builder pre-builds every host of a flake; the CLI
deploys, builds and lists hosts. All traffic authenticates with NATS NKeys.
Sections follow the data: protocol and validation, NATS facade, subprocess
runner, metrics, listener, clients, CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import enum
import json
import logging
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid

__version__ = "0.1.0"
log = logging.getLogger("homelab_deploy")


# ---------------------------------------------------------------- protocol and validation

MAX_MESSAGE_BYTES = 64 * 1024  # requests are tiny; anything bigger is hostile
OUTPUT_TAIL_LINES = 20  # lines of nixos-rebuild / nix output kept for a failure report
TIERS = ("test", "prod")
DEFAULT_SUBJECTS = ("deploy.<tier>.<hostname>", "deploy.<tier>.all", "deploy.<tier>.role.<role>")

# A git ref: no flake-URL syntax (? & # = %), no whitespace, no leading '-'.
REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# Build targets and hostnames found in `nix flake show` output (the security commit).
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
# One NATS subject token: hostnames, roles and repo names that are put into subjects.
TOKEN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")
REPLY_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Action(enum.Enum):
    SWITCH = "switch"
    BOOT = "boot"
    TEST = "test"
    DRY_ACTIVATE = "dry-activate"


class Status(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (Status.REJECTED, Status.COMPLETED, Status.FAILED)


class ErrorCode(enum.Enum):
    INVALID_REVISION = "invalid_revision"
    INVALID_ACTION = "invalid_action"
    ALREADY_RUNNING = "already_running"
    BUILD_FAILED = "build_failed"
    TIMEOUT = "timeout"


class ProtocolError(Exception):
    """A message that cannot be acted on; `reply_to` is set when the sender can be told."""

    def __init__(self, message: str, code: ErrorCode | None = None, reply_to: str | None = None):
        super().__init__(message)
        self.code = code
        self.reply_to = reply_to


def is_valid_ref(ref: object) -> bool:
    """A branch, tag or commit that is safe inside a flake URL and an argv."""
    if not isinstance(ref, str) or not REF_RE.fullmatch(ref):
        return False
    parts = ref.split("/")
    return (
        ".." not in ref
        and all(p and not p.startswith(".") and not p.endswith(".lock") for p in parts)
        and not ref.endswith(".")
    )


def is_subject_token(value: object) -> bool:
    return isinstance(value, str) and TOKEN_RE.fullmatch(value) is not None


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def is_publish_subject(subject: str) -> bool:
    """A concrete NATS subject: dot-separated non-empty tokens, no wildcards or whitespace."""
    tokens = subject.split(".")
    return len(subject) <= 255 and all(
        t and t not in ("*", ">") and not any(c.isspace() or c in "*>" for c in t) for t in tokens
    )


def decode_message(data: bytes) -> dict:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"message is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_reply_to(obj: dict, kind: str) -> str:
    """The reply subject, which must be <kind>.responses.<token> so a message cannot redirect replies."""
    reply_to = obj.get("reply_to")
    prefix = f"{kind}.responses."
    if not (
        isinstance(reply_to, str)
        and reply_to.startswith(prefix)
        and REPLY_TOKEN_RE.fullmatch(reply_to[len(prefix):])
    ):
        raise ProtocolError(f"reply_to must be {prefix}<token>, got {str(reply_to)[:80]!r}; ignoring the message")
    return reply_to


def new_reply_subject(kind: str) -> str:
    return f"{kind}.responses.{uuid.uuid4().hex}"


def expand_subjects(templates: list[str], hostname: str, tier: str, role: str | None) -> list[str]:
    """Expand <hostname>, <tier>, <role>; templates naming <role> are skipped without a role."""
    subjects = []
    for template in templates:
        if "<role>" in template and not role:
            continue
        subject = template.replace("<hostname>", hostname).replace("<tier>", tier).replace("<role>", role or "")
        if not is_publish_subject(subject) or "<" in subject:
            raise ValueError(f"deploy subject {template!r} expands to {subject!r}, which is not a valid NATS subject")
        if subject not in subjects:
            subjects.append(subject)
    return subjects


@dataclasses.dataclass(frozen=True)
class DeployRequest:
    action: Action
    revision: str
    reply_to: str

    @classmethod
    def parse(cls, data: bytes) -> DeployRequest:
        obj = decode_message(data)
        reply_to = parse_reply_to(obj, "deploy")
        action = obj.get("action")
        if action not in [a.value for a in Action]:
            raise ProtocolError(
                f"invalid action {str(action)[:40]!r}: must be one of {', '.join(a.value for a in Action)}",
                ErrorCode.INVALID_ACTION, reply_to)
        revision = obj.get("revision")
        if not is_valid_ref(revision):
            raise ProtocolError(
                f"invalid revision {str(revision)[:40]!r}: must be a git branch, tag or 40-hex commit "
                "(letters, digits, '.', '_', '/', '-'; starting with a letter or digit)",
                ErrorCode.INVALID_REVISION, reply_to)
        return cls(Action(action), revision, reply_to)

    def to_json(self) -> bytes:
        return json.dumps({"action": self.action.value, "revision": self.revision, "reply_to": self.reply_to}).encode()


@dataclasses.dataclass(frozen=True)
class DeployResponse:
    hostname: str
    status: Status
    error: ErrorCode | None = None
    message: str = ""
    duration_seconds: float | None = None
    output: list[str] | None = None  # last lines of nixos-rebuild's output, on failure

    @classmethod
    def parse(cls, data: bytes) -> DeployResponse:
        obj = decode_message(data)
        try:
            hostname, status = obj["hostname"], Status(obj["status"])
            error = ErrorCode(obj["error"]) if obj.get("error") else None
        except (KeyError, ValueError, TypeError) as e:
            raise ProtocolError(f"malformed deploy response: {e}") from None
        if not isinstance(hostname, str):
            raise ProtocolError("malformed deploy response: hostname is not a string")
        output = obj.get("output")
        return cls(hostname, status, error, str(obj.get("message") or ""), obj.get("duration_seconds"),
                   [str(line) for line in output] if isinstance(output, list) else None)

    def to_dict(self) -> dict:
        d = {"hostname": self.hostname, "status": self.status.value,
             "error": self.error.value if self.error else None, "message": self.message}
        if self.duration_seconds is not None:
            d["duration_seconds"] = round(self.duration_seconds, 3)
        if self.output is not None:
            d["output"] = self.output
        return d


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """A listener's answer to discovery."""

    hostname: str
    tier: str
    role: str | None
    deploy_subjects: list[str]
    version: str
    deploying: bool

    @classmethod
    def parse(cls, data: bytes) -> HostInfo:
        obj = decode_message(data)
        try:
            info = cls(obj["hostname"], obj["tier"], obj.get("role"), list(obj["deploy_subjects"]),
                       str(obj.get("version", "")), bool(obj.get("deploying", False)))
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"malformed discovery answer: {e}") from None
        if not (isinstance(info.hostname, str) and isinstance(info.tier, str)):
            raise ProtocolError("malformed discovery answer: hostname and tier must be strings")
        return info


# ---------------------------------------------------------------- NATS facade

class NatsError(Exception):
    """A connection, credential or permission problem, worded for the operator."""


def read_seed(path: str) -> str:
    """Read and check an NKey user seed; warn when others can read it. Never logs the seed."""
    import nkeys

    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read(4096).strip()
    except OSError as e:
        raise NatsError(f"cannot read NKey seed file {path}: {e.strerror}; pass --nkey-file with a seed "
                        "made by `homelab-deploy keygen` or `nk -gen user`") from None
    try:
        public = nkeys.from_seed(bytearray(raw)).public_key.decode()
    except Exception:
        raise NatsError(f"{path} does not hold a valid NKey user seed (expected one line starting with 'SU'); "
                        "generate one with `homelab-deploy keygen --out FILE`") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("NKey seed file %s is readable by group or others (mode %o); run `chmod 600 %s`",
                    path, stat.S_IMODE(st.st_mode), path)
    log.debug("using NKey %s from %s", public, path)
    return raw.decode()


class Bus:
    """nats-py behind blocking calls: one asyncio loop in a daemon thread, handlers on worker threads.

    Daemons (`daemon=True`) wait for the server and reconnect forever; the CLI fails within
    `connect_timeout` seconds with a clear message.
    """

    def __init__(self, urls: str, nkey_file: str, name: str, daemon: bool = False,
                 connect_timeout: float = 5.0, stop: threading.Event | None = None):
        self.servers = [u.strip() for u in urls.split(",") if u.strip()]
        if not self.servers:
            raise NatsError("no NATS server given; pass --nats-url nats://HOST:4222 (comma-separated for a cluster)")
        seed = read_seed(nkey_file)
        self.nkey_file = nkey_file
        self.permission_errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="nats-loop", daemon=True).start()
        self.workers = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="nats-handler")
        self.nc = None
        self.closing = False
        delay = 1.0
        while True:
            try:
                self.nc = self._call(self._connect(seed, name, daemon, connect_timeout), connect_timeout + 1)
                break
            except NatsError as e:
                if not daemon:
                    self.close()
                    raise
                log.error("%s; retrying in %.0fs", e, delay)
                if (stop or threading.Event()).wait(delay):
                    self.close()
                    raise
                delay = min(delay * 2, 30.0)
        log.info("connected to NATS at %s", self.nc.connected_url.netloc if self.nc.connected_url else self.servers)

    def _call(self, coro, timeout: float | None = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self, seed: str, name: str, daemon: bool, connect_timeout: float):
        import nats

        last_error: list[BaseException] = []
        rejected = asyncio.Event()  # the server refused our key: retrying the same key cannot help

        async def on_error(e):
            text = str(e)
            if "ermissions violation" in text:
                self.permission_errors.append(text)
                log.warning("NATS refused: %s", text)
            else:
                last_error.append(e)
                log.debug("NATS error: %r", e)
                if "uthorization" in text:
                    rejected.set()

        async def on_disconnect():
            if not self.closing:
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect():
            log.info("reconnected to NATS at %s", self.nc.connected_url.netloc if self.nc else "?")

        connecting = asyncio.ensure_future(nats.connect(
            servers=self.servers, nkeys_seed_str=seed, name=name, error_cb=on_error,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            connect_timeout=min(2, connect_timeout), reconnect_time_wait=1,
            max_reconnect_attempts=-1, allow_reconnect=True, ping_interval=20 if daemon else 5,
            max_outstanding_pings=3))
        refused = asyncio.ensure_future(rejected.wait())
        await asyncio.wait([connecting, refused], timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        refused.cancel()
        error = None if not connecting.done() or connecting.cancelled() else connecting.exception()
        if connecting.done() and error is None:
            return connecting.result()
        connecting.cancel()
        if rejected.is_set() or "uthorization" in str(error):
            raise NatsError(f"NATS rejected the credentials in {self.nkey_file} (authorization violation); "
                            "add this key's public key to the server's authorization block "
                            "(`homelab-deploy keygen --pubout --in FILE` prints it)")
        cause = f" (last error: {error or last_error[-1]})" if error or last_error else ""
        raise NatsError(f"cannot reach NATS at {', '.join(self.servers)} within {connect_timeout:.0f}s{cause}; "
                        "check --nats-url and that nats-server is running")

    def denied(self, subject: str) -> str | None:
        """The server's permission error for `subject`, if it sent one."""
        return next((e for e in self.permission_errors if f'"{subject}"' in e), None)

    def _check_permission(self, subject: str, what: str) -> None:
        # The server sends -ERR for a denied subject within a round trip or two; flush twice to see it.
        for _ in range(2):
            if self.denied(subject):
                break
            try:
                self._call(self.nc.flush(timeout=5), 6)
            except Exception as e:
                raise NatsError(f"NATS did not confirm the {what} of {subject}: {e!r}") from None
        if self.denied(subject):
            raise NatsError(f"permission denied: this credential ({self.nkey_file}) may not {what} {subject!r}; "
                            "use a credential whose NATS permissions allow it")

    def publish(self, subject: str, payload: bytes, confirm: bool = False) -> None:
        """Publish; with `confirm`, wait for the server and raise NatsError if it refused the subject."""
        self._call(self.nc.publish(subject, payload))
        if confirm:
            self._check_permission(subject, "publish to")

    def subscribe(self, subject: str, handler) -> None:
        """Call handler(subject, data) on a worker thread for every message; errors are logged, never raised."""

        def run(msg_subject: str, data: bytes) -> None:
            try:
                handler(msg_subject, data)
            except Exception:
                log.exception("handler for %s failed", msg_subject)

        async def on_message(msg):
            self.workers.submit(run, msg.subject, msg.data)

        self._call(self.nc.subscribe(subject, cb=on_message))
        self._check_permission(subject, "subscribe to")

    def inbox(self, subject: str) -> queue.Queue:
        """Subscribe and return a queue of message payloads in arrival order."""
        q: queue.Queue = queue.Queue()

        async def on_message(msg):
            q.put(msg.data)

        self._call(self.nc.subscribe(subject, cb=on_message))
        self._check_permission(subject, "subscribe to")
        return q

    def close(self) -> None:
        self.closing = True
        if self.nc is not None and not self.nc.is_closed:
            try:
                self._call(self.nc.drain(), 10)
            except Exception as e:
                log.debug("NATS drain failed: %r", e)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.workers.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- subprocess runner

@dataclasses.dataclass(frozen=True)
class RunResult:
    returncode: int | None
    timed_out: bool
    output: list[str]  # last lines of stdout+stderr
    duration: float


def kill_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's whole process group (nix passes it on to its builders), SIGKILL after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_with_timeout(argv: list[str], timeout: float, log_prefix: str = "", env: dict | None = None) -> RunResult:
    """Run argv (never a shell) in its own process group; kill the group after `timeout` seconds."""
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    except OSError as e:
        return RunResult(None, False, [f"cannot run {argv[0]}: {e.strerror}"], time.monotonic() - started)

    def read_output() -> None:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line[:500])
            log.debug("%s%s", log_prefix, line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.warning("%s%s exceeded %ss; killing its process group", log_prefix, argv[0], timeout)
        kill_process_group(proc)
    reader.join(5)  # a grandchild outside the group may hold the pipe; don't wait for it forever
    return RunResult(proc.returncode, timed_out, list(tail), time.monotonic() - started)


# ---------------------------------------------------------------- metrics

DEPLOY_BUCKETS = (1, 5, 10, 30, 60, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600)


def serve_metrics(address: str, registry) -> object:
    """Serve /metrics and /health on address (host:port, ':port' for all interfaces) in a daemon thread."""
    import http.server

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    host, _, port = address.rpartition(":")
    host = host.strip("[]")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/metrics":
                body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            elif path == "/health":
                body, ctype, code = b"ok", "text/plain; charset=utf-8", 200
            else:
                body, ctype, code = b"not found; try /metrics or /health\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            log.debug("metrics http: " + fmt, *args)

    server_class = http.server.ThreadingHTTPServer
    if ":" in host:
        import socket

        server_class = type("V6Server", (http.server.ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, int(port)), Handler)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot serve metrics on {address!r}: {e}; pass --metrics-addr HOST:PORT") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("serving metrics on http://%s:%d/metrics", host or "0.0.0.0", server.server_address[1])
    return server


class ListenerMetrics:
    """The spec's four listener metrics; every label combination exists from start-up."""

    def __init__(self, hostname: str, tier: str, role: str | None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.deployments = Counter("homelab_deploy_deployments_total", "Total deployment requests processed",
                                   ["status", "action", "error_code"], registry=self.registry)
        self.duration = Histogram("homelab_deploy_deployment_duration_seconds", "Deployment execution time",
                                  ["action", "success"], buckets=DEPLOY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("homelab_deploy_deployment_in_progress", "1 if deployment running, 0 otherwise",
                                 registry=self.registry)
        info = Gauge("homelab_deploy_info", "Static instance metadata", ["hostname", "tier", "role", "version"],
                     registry=self.registry)
        info.labels(hostname, tier, role or "", __version__).set(1)
        codes = [""] + [c.value for c in ErrorCode]
        for action in [a.value for a in Action]:
            for status in ("completed", "failed", "rejected"):
                for code in codes:
                    self.deployments.labels(status, action, code)
            for success in ("true", "false"):
                self.duration.labels(action, success)
        # A request with an invalid action has no action to label it with.
        self.deployments.labels("rejected", "", ErrorCode.INVALID_ACTION.value)

    def count(self, status: Status, action: Action | None, error: ErrorCode | None) -> None:
        self.deployments.labels(status.value, action.value if action else "", error.value if error else "").inc()


# ---------------------------------------------------------------- listener

def rebuild_argv(action: Action, flake_url: str, revision: str, hostname: str) -> list[str]:
    """The one place the nixos-rebuild command line is built; every part was validated before."""
    key = "rev" if COMMIT_RE.fullmatch(revision) else "ref"
    sep = "&" if "?" in flake_url else "?"
    return ["nixos-rebuild", action.value, "--refresh", "--flake", f"{flake_url}{sep}{key}={revision}#{hostname}"]


def current_generation(profile: str) -> int | None:
    """The generation number the system profile points to (system-42-link -> 42)."""
    try:
        m = re.fullmatch(r".*-(\d+)-link", os.readlink(profile))
    except OSError:
        return None
    return int(m.group(1)) if m else None


class Listener:
    def __init__(self, args: argparse.Namespace, subjects: list[str], bus: Bus, metrics: ListenerMetrics | None):
        self.hostname, self.tier, self.role = args.hostname, args.tier, args.role
        self.flake_url, self.timeout, self.profile = args.flake_url, args.timeout, args.system_profile
        self.heartbeat_interval = args.heartbeat_interval
        self.subjects = subjects
        self.discover_subject = args.discover_subject
        self.bus, self.metrics = bus, metrics
        self.busy = threading.Lock()  # one deploy at a time
        self.current: DeployRequest | None = None
        self.current_since = 0.0

    def start(self) -> None:
        for subject in self.subjects:
            self.bus.subscribe(subject, self.handle_deploy)
        self.bus.subscribe(self.discover_subject, self.handle_discover)
        log.info("host=%s listening on %s and %s", self.hostname, ", ".join(self.subjects), self.discover_subject)

    def reply(self, reply_to: str, status: Status, error: ErrorCode | None = None, message: str = "", **extra) -> None:
        response = DeployResponse(self.hostname, status, error, message, **extra)
        self.bus.publish(reply_to, json.dumps(response.to_dict()).encode())

    def handle_deploy(self, subject: str, data: bytes) -> None:
        try:
            request = DeployRequest.parse(data)
        except ProtocolError as e:
            log.warning("host=%s subject=%s request=%s rejected: %s", self.hostname, subject,
                        e.reply_to or "-", e)
            if e.reply_to:
                self.reply(e.reply_to, Status.REJECTED, e.code, str(e))
                if self.metrics:
                    action = None if e.code is ErrorCode.INVALID_ACTION else Action(decode_message(data)["action"])
                    self.metrics.count(Status.REJECTED, action, e.code)
            return
        rid = request.reply_to.rsplit(".", 1)[1]
        if not self.busy.acquire(blocking=False):
            running = self.current
            message = (f"a deploy is already running on {self.hostname} ({running.action.value} of "
                       f"{running.revision}, for {time.monotonic() - self.current_since:.0f}s); retry when it ends"
                       if running else f"a deploy is already running on {self.hostname}")
            log.warning("host=%s request=%s rejected: already running", self.hostname, rid)
            self.reply(request.reply_to, Status.REJECTED, ErrorCode.ALREADY_RUNNING, message)
            if self.metrics:
                self.metrics.count(Status.REJECTED, request.action, ErrorCode.ALREADY_RUNNING)
            return
        try:
            self.current, self.current_since = request, time.monotonic()
            self.deploy(request, rid)
        finally:
            self.current = None
            self.busy.release()

    def deploy(self, request: DeployRequest, rid: str) -> None:
        action, revision = request.action, request.revision
        argv = rebuild_argv(action, self.flake_url, revision, self.hostname)
        log.info("host=%s request=%s accepted %s of %s", self.hostname, rid, action.value, revision)
        self.reply(request.reply_to, Status.ACCEPTED, message=f"{action.value} of {revision} accepted")
        self.reply(request.reply_to, Status.STARTED, message=f"running {' '.join(argv)}")
        if self.metrics:
            self.metrics.in_progress.set(1)
        done = threading.Event()

        def heartbeat() -> None:
            started = time.monotonic()
            while not done.wait(self.heartbeat_interval):
                self.reply(request.reply_to, Status.STARTED,
                           message=f"{action.value} still running after {time.monotonic() - started:.0f}s")

        beat = threading.Thread(target=heartbeat, name="heartbeat", daemon=True)
        beat.start()
        try:
            result = run_with_timeout(argv, self.timeout, f"host={self.hostname} request={rid} ")
        finally:
            done.set()
            if self.metrics:
                self.metrics.in_progress.set(0)
        success = result.returncode == 0 and not result.timed_out
        if self.metrics:
            self.metrics.duration.labels(action.value, str(success).lower()).observe(result.duration)
        if success:
            generation = current_generation(self.profile)
            gen = f"generation {generation}" if generation is not None else "the new generation"
            message = {
                Action.SWITCH: f"Successfully switched to {gen}",
                Action.BOOT: f"Successfully set {gen} as the boot default; it is active after a reboot",
                Action.TEST: f"Successfully activated {revision} (test: not added to the boot menu)",
                Action.DRY_ACTIVATE: f"Dry activation of {revision} succeeded; nothing was changed",
            }[action]
            status, error = Status.COMPLETED, None
        elif result.timed_out:
            status, error = Status.FAILED, ErrorCode.TIMEOUT
            message = f"nixos-rebuild {action.value} did not finish within {self.timeout}s; its process group was killed"
        else:
            status, error = Status.FAILED, ErrorCode.BUILD_FAILED
            last = next((line for line in reversed(result.output) if line.strip()), "no output")
            message = f"nixos-rebuild {action.value} failed (exit code {result.returncode}): {last}"
        log.info("host=%s request=%s %s in %.1fs: %s", self.hostname, rid, status.value, result.duration, message)
        self.reply(request.reply_to, status, error, message, duration_seconds=result.duration,
                   output=None if success else result.output)
        if self.metrics:
            self.metrics.count(status, action, error)

    def handle_discover(self, subject: str, data: bytes) -> None:
        try:
            reply_to = parse_reply_to(decode_message(data), "deploy")
        except ProtocolError as e:
            log.warning("host=%s discovery request ignored: %s", self.hostname, e)
            return
        info = HostInfo(self.hostname, self.tier, self.role, self.subjects, __version__, self.busy.locked())
        self.bus.publish(reply_to, json.dumps(dataclasses.asdict(info)).encode())
        log.debug("host=%s answered discovery on %s", self.hostname, reply_to)


def run_listener(args: argparse.Namespace) -> int:
    for flag, value in (("--hostname", args.hostname), ("--role", args.role)):
        if value is not None and not is_subject_token(value):
            raise SystemExit(f"error: {flag} {value!r} must be one NATS subject token "
                             "(letters, digits, '_' and '-', starting with a letter, digit or '_')")
    if not args.flake_url or args.flake_url.startswith("-") or any(c.isspace() or c == "#" for c in args.flake_url):
        raise SystemExit(f"error: --flake-url {args.flake_url!r} must be a flake URL without '#' or whitespace, "
                         "e.g. git+https://git.example.com/user/nixos-configs.git")
    if args.timeout <= 0 or args.heartbeat_interval <= 0:
        raise SystemExit("error: --timeout and --heartbeat-interval must be positive")
    if not is_publish_subject(args.discover_subject):
        raise SystemExit(f"error: --discover-subject {args.discover_subject!r} is not a valid NATS subject")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = ListenerMetrics(args.hostname, args.tier, args.role) if args.metrics_enabled else None
    try:
        subjects = expand_subjects(args.deploy_subject or list(DEFAULT_SUBJECTS), args.hostname, args.tier, args.role)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if metrics:
        serve_metrics(args.metrics_addr, metrics.registry)
    try:
        bus = Bus(args.nats_url, args.nkey_file, f"homelab-deploy-listener/{args.hostname}", daemon=True, stop=stop)
    except NatsError as e:
        log.error("%s", e)
        return 0 if stop.is_set() else 1
    listener = Listener(args, subjects, bus, metrics)
    listener.start()
    log.info("host=%s tier=%s role=%s ready (%s)", args.hostname, args.tier, args.role or "-", ", ".join(subjects))
    stop.wait()
    log.info("host=%s shutting down", args.hostname)
    bus.close()
    return 0


# ---------------------------------------------------------------- clients

ANSWER_WINDOW = 2.0  # seconds without a new host answering before the client stops waiting for more


def resolve_alias(target: str) -> str:
    """deploy prod-dns -> $HOMELAB_DEPLOY_ALIAS_PROD_DNS, if set."""
    return os.environ.get("HOMELAB_DEPLOY_ALIAS_" + target.upper().replace("-", "_"), target)


class Progress:
    """Prints host events: a line each, or on a TTY a status line redrawn in place and a line per final status."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self.status_line = False

    def event(self, line: str, final: bool) -> None:
        if self.quiet:
            return
        if self.tty and not final:
            self.stream.write("\r\x1b[K" + line[: os.get_terminal_size(self.stream.fileno()).columns - 1])
            self.status_line = True
        else:
            self.stream.write(("\r\x1b[K" if self.status_line else "") + line + "\n")
            self.status_line = False
        self.stream.flush()

    def done(self) -> None:
        if self.status_line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.status_line = False


def collect_answers(bus: Bus, replies: queue.Queue, subject: str, timeout: float, window: float,
                    on_message, is_done) -> bool:
    """Feed replies to on_message until is_done() holds and `window` passed since the last new answer,
    nobody answered within `window`, or `timeout` passed. Returns False on timeout."""
    start = last_new = time.monotonic()
    deadline = start + timeout
    anyone = False
    while True:
        now = time.monotonic()
        if bus.denied(subject):
            raise NatsError(f"permission denied: this credential ({bus.nkey_file}) may not publish to {subject!r}; "
                            "use a credential whose NATS permissions allow it")
        if now - last_new >= window and (is_done() or not anyone):
            return True
        if now >= deadline:
            return False
        try:
            data = replies.get(timeout=min(0.1, deadline - now))
        except queue.Empty:
            continue
        if on_message(data):
            last_new, anyone = time.monotonic(), True


def deploy_hosts(bus: Bus, subject: str, action: Action, revision: str, timeout: float,
                 window: float = ANSWER_WINDOW, on_event=None) -> tuple[dict[str, DeployResponse], bool]:
    """Publish a deploy request and gather every answering host's responses.
    Returns the last response per host and whether everything finished before the timeout."""
    reply_to = new_reply_subject("deploy")
    replies = bus.inbox(reply_to)
    hosts: dict[str, DeployResponse] = {}

    def on_message(data: bytes) -> bool:
        try:
            response = DeployResponse.parse(data)
        except ProtocolError as e:
            log.warning("ignoring malformed response: %s", e)
            return False
        new = response.hostname not in hosts
        if not new and hosts[response.hostname].status.final:
            return False  # a final status is final
        hosts[response.hostname] = response
        if on_event:
            on_event(response)
        return new

    bus.publish(subject, DeployRequest(action, revision, reply_to).to_json(), confirm=True)
    finished = collect_answers(bus, replies, subject, timeout, window, on_message,
                               lambda: bool(hosts) and all(r.status.final for r in hosts.values()))
    return hosts, finished


def discover_hosts(bus: Bus, discover_subject: str = "deploy.discover", window: float = ANSWER_WINDOW) -> list[HostInfo]:
    reply_to = new_reply_subject("deploy")
    replies = bus.inbox(reply_to)
    hosts: dict[str, HostInfo] = {}

    def on_message(data: bytes) -> bool:
        try:
            info = HostInfo.parse(data)
        except ProtocolError as e:
            log.warning("ignoring malformed discovery answer: %s", e)
            return False
        new = info.hostname not in hosts
        hosts[info.hostname] = info
        return new

    bus.publish(discover_subject, json.dumps({"reply_to": reply_to}).encode(), confirm=True)
    collect_answers(bus, replies, discover_subject, window, window, on_message, lambda: True)
    return sorted(hosts.values(), key=lambda h: (h.tier, h.hostname))


def describe(response: DeployResponse) -> str:
    parts = [f"{response.hostname}: {response.status.value}"]
    if response.error:
        parts.append(f"[{response.error.value}]")
    if response.message:
        parts.append(f"- {response.message}")
    if response.duration_seconds is not None:
        parts.append(f"({response.duration_seconds:.1f}s)")
    return " ".join(parts)


def deploy_command(args: argparse.Namespace) -> int:
    subject = resolve_alias(args.target)
    if not is_publish_subject(subject):
        print(f"error: {subject!r} is not a deploy subject (e.g. deploy.test.myhost, deploy.prod.all, "
              "deploy.prod.role.dns) and no HOMELAB_DEPLOY_ALIAS_* names it", file=sys.stderr)
        return 2
    if args.action not in [a.value for a in Action]:
        print(f"error: invalid --action {args.action!r}; use one of {', '.join(a.value for a in Action)}",
              file=sys.stderr)
        return 2
    if not is_valid_ref(args.branch):
        print(f"error: invalid --branch {args.branch!r}; use a git branch, tag or 40-hex commit", file=sys.stderr)
        return 2
    progress = Progress(quiet=False)
    try:
        bus = Bus(args.nats_url, args.nkey_file, "homelab-deploy-cli")
    except NatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    try:
        hosts, finished = deploy_hosts(bus, subject, Action(args.action), args.branch, args.timeout,
                                       args.answer_window,
                                       lambda r: progress.event(describe(r), r.status.final))
    except NatsError as e:
        progress.done()
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        bus.close()
    progress.done()
    counts = collections.Counter(r.status.value if r.status.final else "unfinished" for r in hosts.values())
    ok = bool(hosts) and counts["completed"] == len(hosts)
    if args.json:
        print(json.dumps({"subject": subject, "action": args.action, "revision": args.branch, "success": ok,
                          "hosts": [hosts[h].to_dict() for h in sorted(hosts)]}, indent=2))
    if not hosts:
        print(f"error: no host answered on {subject} within {args.answer_window:.0f}s; check the subject "
              "(`homelab-deploy list-hosts` shows what is listening) and that the listeners are connected",
              file=sys.stderr)
        return 4
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{subject}: {counts['completed']}/{len(hosts)} hosts completed ({summary})", file=sys.stderr)
    if not finished:
        waiting = [h for h, r in sorted(hosts.items()) if not r.status.final]
        print(f"error: no final status within {args.timeout:.0f}s from: {', '.join(waiting)}", file=sys.stderr)
    return 0 if ok else 1


def list_hosts_command(args: argparse.Namespace) -> int:
    try:
        bus = Bus(args.nats_url, args.nkey_file, "homelab-deploy-cli")
    except NatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    try:
        hosts = discover_hosts(bus, args.discover_subject, args.answer_window)
    except NatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        bus.close()
    hosts = [h for h in hosts if args.tier is None or h.tier == args.tier]
    if args.json:
        print(json.dumps([dataclasses.asdict(h) for h in hosts], indent=2))
    else:
        rows = [("HOSTNAME", "TIER", "ROLE", "STATE", "SUBJECTS")] + [
            (h.hostname, h.tier, h.role or "-", "deploying" if h.deploying else "idle", " ".join(h.deploy_subjects))
            for h in hosts]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    if not hosts:
        print("no host answered" + (f" in tier {args.tier}" if args.tier else ""), file=sys.stderr)
        return 4
    return 0


# ---------------------------------------------------------------- CLI

def env_default(name: str, fallback=None, convert=str):
    value = os.environ.get(name)
    if value is None or value == "":
        return fallback
    try:
        return convert(value)
    except ValueError:
        raise SystemExit(f"error: ${name}={value!r} is not a valid {convert.__name__}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homelab-deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"homelab-deploy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def nats_flags(p: argparse.ArgumentParser, env: bool) -> None:
        url = env_default("HOMELAB_DEPLOY_NATS_URL") if env else None
        key = env_default("HOMELAB_DEPLOY_NKEY_FILE") if env else None
        hint = " (env HOMELAB_DEPLOY_NATS_URL)" if env else ""
        p.add_argument("--nats-url", default=url, required=url is None,
                       help=f"NATS server URL; comma-separated for a cluster{hint}")
        p.add_argument("--nkey-file", default=key, required=key is None,
                       help="path to NKey seed file" + (" (env HOMELAB_DEPLOY_NKEY_FILE)" if env else ""))
        p.add_argument("--debug", action="store_true", help="log debug detail (child output, NATS events)")

    p = sub.add_parser("listener", help="run on a NixOS host: deploy when a request arrives")
    nats_flags(p, env=False)
    p.add_argument("--hostname", required=True, help="hostname for this listener (one subject token)")
    p.add_argument("--tier", required=True, choices=TIERS, help="deployment tier")
    p.add_argument("--flake-url", required=True, help="git flake URL for nixos-rebuild")
    p.add_argument("--role", help="role for role-based targeting")
    p.add_argument("--timeout", type=int, default=600, help="deployment timeout in seconds (default: 600)")
    p.add_argument("--deploy-subject", action="append", metavar="SUBJECT",
                   help="NATS subject to subscribe to, repeatable; <hostname>, <tier>, <role> are expanded "
                        f"(default: {' '.join(DEFAULT_SUBJECTS)})")
    p.add_argument("--discover-subject", default="deploy.discover", help="discovery subject (default: deploy.discover)")
    p.add_argument("--metrics-enabled", action="store_true", help="enable the Prometheus metrics endpoint")
    p.add_argument("--metrics-addr", default=":9972", help="metrics HTTP server address (default: :9972)")
    p.add_argument("--heartbeat-interval", type=float, default=30.0,
                   help="seconds between 'still running' messages during a deploy (default: 30)")
    p.add_argument("--system-profile", default="/nix/var/nix/profiles/system",
                   help="system profile whose generation is reported after switch/boot "
                        "(default: /nix/var/nix/profiles/system)")
    p.set_defaults(func=run_listener, daemon=True)

    p = sub.add_parser("deploy", help="deploy to the hosts behind a subject or alias")
    p.add_argument("target", metavar="SUBJECT_OR_ALIAS",
                   help="deploy subject (deploy.<tier>.<host>|all|role.<role>) or alias from HOMELAB_DEPLOY_ALIAS_<NAME>")
    nats_flags(p, env=True)
    p.add_argument("--branch", default=env_default("HOMELAB_DEPLOY_BRANCH", "master"),
                   help="git branch or commit (env HOMELAB_DEPLOY_BRANCH, default: master)")
    p.add_argument("--action", default=env_default("HOMELAB_DEPLOY_ACTION", "switch"),
                   help="nixos-rebuild action: switch, boot, test, dry-activate "
                        "(env HOMELAB_DEPLOY_ACTION, default: switch)")
    p.add_argument("--timeout", type=float, default=env_default("HOMELAB_DEPLOY_TIMEOUT", 900.0, float),
                   help="response timeout in seconds (env HOMELAB_DEPLOY_TIMEOUT, default: 900)")
    p.add_argument("--answer-window", type=float, default=ANSWER_WINDOW,
                   help=f"seconds to wait for more hosts to answer (default: {ANSWER_WINDOW:.0f})")
    p.add_argument("--json", action="store_true", help="print the final status of every host as JSON")
    p.set_defaults(func=deploy_command)

    p = sub.add_parser("list-hosts", help="list the listening hosts (discovery)")
    nats_flags(p, env=True)
    p.add_argument("--tier", choices=TIERS, help="only hosts of this tier")
    p.add_argument("--discover-subject", default="deploy.discover", help="discovery subject (default: deploy.discover)")
    p.add_argument("--answer-window", type=float, default=ANSWER_WINDOW,
                   help=f"seconds to wait for more hosts to answer (default: {ANSWER_WINDOW:.0f})")
    p.add_argument("--json", action="store_true", help="print the hosts as JSON")
    p.set_defaults(func=list_hosts_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = logging.INFO if getattr(args, "daemon", False) else logging.WARNING  # the CLI prints its own lines
    logging.basicConfig(level=logging.DEBUG if getattr(args, "debug", False) else quiet,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if not getattr(args, "debug", False):
        logging.getLogger("nats").setLevel(logging.CRITICAL)  # its reconnect noise; we log our own line
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
