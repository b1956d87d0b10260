"""Reliability under faults, load and hostile input (issue 7), shown against real processes.

- Broker restarts: nats-server restarted 10 times on the same port under an idle listener and builder; after
  each, a deploy and a build succeed, and every daemon holds each of its subscriptions exactly once.
- Cluster failover: a 3-node cluster routed on loopback; the node a listener is connected to is killed (twice);
  deploys through the CLI, given all three URLs, keep succeeding.
- Outage during a deploy: the server goes down and comes back while a deploy runs; the CLI gets the final
  status and exits 0, also when it resubscribes only after the deploy ended, and when the listener restarted
  after the switch meanwhile.
- Stall after publishing: a proxy drops everything nats-server sends once a request went through; the CLI
  says the outcome is unknown (exit 5) and the listener or builder, connected directly, acts on the request.
- Hostile input at scale: hypothesis throws at least 1,000 generated messages per subject class (deploy,
  discover, build) at running daemons; the validators are property-tested on their own.
- Hostile answers at the clients: hypothesis generates malformed answers that a daemon's own credential publishes
  into a running client's reply subject ahead of the genuine ones (deploy_hosts, discover_hosts, build_repo and
  their CLI commands); the answer validators are property-tested on their own, and the builder's answer sizing.
- Load: 50 requests/s for 30 s at a busy listener; every one is answered and RSS and threads return to baseline.
- Overload: a flood of discovery requests neither delays a deploy nor grows the listener; a deploy request held
  past the time its sender waits is answered `rejected` and never run.
- Sites: a hub and two leaf-node sites configured by `nats-config`; discovery and fan-out reach both, the hub's
  permissions for each site hold across the link, and a final status crosses once a stopped leaf node is back.
- Metrics port flood: hundreds of idle and half-sent connections to a daemon's metrics port take a bounded number
  of its threads and descriptors, are cut off, and deploys and builds go on meanwhile.

Each test prints a `[figures]` line (run with `-s`) with what it measured; the Reliability section of docs/operations.md
quotes them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import re
import signal
import socket
import statistics
import string
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import homelab_deploy as hd
from tests.helpers import (
    FINAL,
    FLEET,
    GOOD,
    HOSTS,
    NIX,
    PROGRAM,
    BuilderProcess,
    Listener,
    NatsServer,
    collect,
    commit_flake,
    flake_text,
    has_final,
    nix_env,
    run_cli,
    stop_process,
    wait_for,
)

NO_BUILDER = None if NIX else "nix not found (Debian: apt-get install nix-bin)"  # the builder's half


ACTIONS = ("switch", "boot", "test", "dry-activate")  # the spec's actions
DEPLOY_STATUSES = {"accepted", "rejected", "started", "completed", "failed"}  # the spec's deploy statuses
DEPLOY_ERRORS = {"invalid_revision", "invalid_action", "already_running", "build_failed", "timeout"}  # the spec's
BUILD_STATUSES = {"started", "progress", "completed", "failed", "rejected"}  # the spec's build statuses
TESTHOST1_SUBJECTS = {"deploy.test.testhost1", "deploy.test.all", "deploy.discover"}


# ---------------------------------------------------------------- helpers


def monitor(port: int, endpoint: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{endpoint}", timeout=5) as response:
        return json.loads(response.read())


def connections(monitor_port: int) -> dict[str, list[dict]]:
    """The server's client connections by client name, each with its `subscriptions_list`."""
    by_name: dict[str, list[dict]] = collections.defaultdict(list)
    for conn in monitor(monitor_port, "connz?subs=1&limit=10000").get("connections") or []:
        by_name[conn.get("name", "")].append(conn)
    return by_name


def drain(q: queue.Queue) -> list[dict]:
    got = []
    while True:
        try:
            got.append(json.loads(q.get_nowait()[1]))
        except queue.Empty:
            return got


def request(bus: hd.Bus, subject: str, body: dict, kind: str = "deploy", timeout: float = 60) -> list[dict]:
    """Send a request with a fresh reply subject and return every status up to the final one."""
    reply_to = hd.new_reply_subject(kind, bus.public_key)
    q = bus.inbox(hd.answer_subject(reply_to, "*"))
    bus.publish(subject, json.dumps({**body, "reply_to": reply_to}).encode(), confirm=True)
    return collect(q, has_final, timeout, f"a final status for {subject}")


def answers_discovery(bus: hd.Bus, hostnames: set[str]) -> bool:
    """One discovery round: do all of `hostnames` answer within 2 s? For wait_for."""
    reply_to = hd.new_reply_subject("deploy", bus.public_key)
    q = bus.inbox(hd.answer_subject(reply_to, "*"))
    bus.publish("deploy.discover", json.dumps({"reply_to": reply_to}).encode(), confirm=True)
    seen: set[str] = set()
    deadline = time.monotonic() + 2
    while not hostnames <= seen and (remaining := deadline - time.monotonic()) > 0:
        with contextlib.suppress(queue.Empty):
            seen.add(json.loads(q.get(timeout=min(remaining, 0.5))[1]).get("hostname"))
    return hostnames <= seen


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, thread count) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


@contextlib.contextmanager
def bus_for(url: str, seed: Path, name: str):
    bus = hd.Bus(url, str(seed), name)
    try:
        yield bus
    finally:
        bus.close()


class CliRun:
    """A CLI process run in the background, its stdout and stderr in files readable while it runs."""

    def __init__(self, workdir: Path, *args: str):
        name = f"cli-{uuid.uuid4().hex[:8]}"
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([*PROGRAM, *args], stdout=out, stderr=err, start_new_session=True)

    def stderr(self) -> str:
        return self.err.read_text()

    def stdout(self) -> str:
        return self.out.read_text()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)  # a test may have stopped it
        stop_process(self.proc)


@pytest.fixture
def cli_run(tmp_path):
    runs: list[CliRun] = []

    def start(*args: str) -> CliRun:
        runs.append(CliRun(tmp_path, *args))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()


def standin_argv_ok(argv: list[str], hostname: str, revisions: set[str]) -> bool:
    """A recorded nixos-rebuild argv: a spec action, known flags, and a flake URL whose ref is one of the sent,
    valid `revisions` and whose attribute is this host."""
    if len(argv) != 4 or argv[0] not in ACTIONS or argv[1:3] != ["--refresh", "--flake"]:
        return False
    m = re.fullmatch(r"git\+https://git\.example\.com/cfg\.git\?(ref|rev)=(?P<rev>[^#]*)#(?P<host>.*)", argv[3])
    return bool(m) and m["host"] == hostname and ref_ok(m["rev"]) and m["rev"] in revisions


def nix_argv_ok(argv: list[str], url: str, hosts: set[str], branches: set[str]) -> bool:
    """A recorded nix argv: flake metadata of this repo's URL at a sent, valid branch, then flake show or build
    at that branch or the commit it resolved to; builds only of `hosts` (safe names from the flake); no option
    other than the builder's own."""
    if any(a.startswith("-") and a not in ("--json", "--refresh", "--no-link") for a in argv):
        return False
    m = re.fullmatch(
        re.escape(url) + r"\?(ref|rev)=(?P<branch>[^#]*)(#nixosConfigurations\.\"?(?P<host>[^\"]*)\"?"
        r"\.config\.system\.build\.toplevel)?",
        argv[-1],
    )
    if not m or not ref_ok(m["branch"]):
        return False
    if argv[:2] == ["flake", "metadata"]:
        return m["host"] is None and m["branch"] in branches
    if m["branch"] not in branches and not re.fullmatch("[0-9a-f]{40}", m["branch"]):
        return False
    if argv[:2] == ["flake", "show"]:
        return m["host"] is None
    return argv[:2] == ["build", "--no-link"] and m["host"] in hosts and name_ok(m["host"])


# ---------------------------------------------------------------- the rules, written from the spec and DESIGN.md

ALNUM = string.ascii_letters + string.digits
REF_CHARS = ALNUM + "._/-"  # a git ref: letters, digits, . _ / -
TOKEN_CHARS = ALNUM + "_-"  # one NATS subject token (hostname, role, repo)
NAME_CHARS = ALNUM + "._-"  # a build target / host found in `nix flake show`
REPLY_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # never a leading "-": a token reaches the watchdog's argv


def ref_ok(s: object) -> bool:
    """Safe in a flake URL and an argv, and a valid git ref: the DESIGN's alphabet, first character
    alphanumeric, no '..', at most 255 characters; git's rules for components (non-empty, not starting with
    '.', not ending with '.lock') and for the end (not '.')."""
    return (
        isinstance(s, str)
        and 1 <= len(s) <= 255
        and all(c in REF_CHARS for c in s)
        and s[0] in ALNUM
        and ".." not in s
        and not s.endswith(".")
        and all(p and not p.startswith(".") and not p.endswith(".lock") for p in s.split("/"))
    )


def token_ok(s: object) -> bool:
    return isinstance(s, str) and 1 <= len(s) <= 63 and s[0] in ALNUM + "_" and all(c in TOKEN_CHARS for c in s)


def name_ok(s: object) -> bool:
    return isinstance(s, str) and 1 <= len(s) <= 63 and s[0] in ALNUM + "_" and all(c in NAME_CHARS for c in s)


def reply_ok(kind: str, s: object) -> bool:
    prefix = f"{kind}.responses."
    tokens = s[len(prefix) :].split(".") if isinstance(s, str) and s.startswith(prefix) else []
    return len(tokens) == 2 and all(REPLY_TOKEN.fullmatch(t) for t in tokens)


# ---------------------------------------------------------------- strategies


def git_refs() -> st.SearchStrategy[str]:
    word = st.text(TOKEN_CHARS, min_size=1, max_size=8)
    component = st.lists(word, min_size=1, max_size=3).map(".".join).filter(lambda c: not c.endswith(".lock"))
    path = st.builds(
        lambda first, parts: first + "/".join(parts),
        st.sampled_from(ALNUM),
        st.lists(component, min_size=1, max_size=6),
    )
    return st.one_of(
        path,
        st.text("0123456789abcdef", min_size=40, max_size=40),  # a commit
        st.builds(
            lambda first, rest: first + rest, st.sampled_from(ALNUM), st.text(ALNUM + "_-", min_size=150, max_size=254)
        ),  # long, up to the bound
        st.sampled_from(["main", "master", "HEAD", "v1.2.3", "feature/x-1", "release_2024", "a"]),
    )


def tokens(chars: str = TOKEN_CHARS) -> st.SearchStrategy[str]:
    return st.builds(lambda first, rest: first + rest, st.sampled_from(ALNUM + "_"), st.text(chars, max_size=62))


# Characters outside every alphabet above: shell and flake-URL syntax, whitespace, control, non-ASCII.
SHELL_AND_URL = list(" \t\n\r\x00\x7f?&#=%;$`|<>*~^:\\'\"{}[]@!,+()")
FORBIDDEN = st.one_of(
    st.sampled_from(SHELL_AND_URL),
    st.sampled_from(SHELL_AND_URL),
    st.characters(max_codepoint=31),
    st.characters(min_codepoint=128),
)

INJECTIONS = [
    "main; rm -rf /",
    "$(reboot)",
    "`id`",
    "main && id",
    "main|id",
    "--upgrade",
    "-rf",
    "--flake",
    "-L",
    "--option build-hook /tmp/x",
    "--override-input nixpkgs github:evil/pkgs",
    "main#evil",
    "main?rev=1",
    "main&ref=x",
    "a=b",
    "100%",
    "%00",
    "../etc",
    "main/../x",
    "a..b",
    "main\nid",
    "main\r\nPUB x 1\r\n",
    "\x00",
    "main\x00",
    "ünïcode",
    "ref.lock",
    "trailing/",
    "trailing.",
    "a//b",
    "~main",
    "main^",
    "main:x",
    "*",
    ">",
    "deploy.>",
    "'; DROP TABLE hosts; --",
    "${IFS}id",
    "\u202emain",
    "\ufeffmain",
    " main",
    "main ",
    "\t",
    "#",
    "git+https://evil.example/x.git",
    "switch --upgrade",
    "switch\n",
    "SWITCH",
    "build-vm",
    "dry_activate",
    "",
]
HOSTILE_REPLY_TO = [
    "deploy.test.testhost2",
    "deploy.test.testhost1",
    "deploy.test.all",
    "deploy.prod.all",
    "deploy.discover",
    "build.x",
    "build.fleet.all",
    "build.responses.abc",
    "deploy.responses.abc",
    ">",
    "*",
    "deploy.>",
    "deploy.responses.>",
    "deploy.responses.*",
    "build.responses.>",
    "deploy.responses.",
    "deploy.responses",
    "build.responses.",
    "deploy.responses.a.b.c",
    "deploy.responses.a b",
    "deploy.responses.é",
    "deploy.responses.\x00",
    "deploy.responses." + "x" * 65,
    "build.responses." + "y" * 65,
    "deploy.responses.abc\r\nPUB deploy.prod.all 2",
    "_INBOX.abc",
    "$SYS.REQ.SERVER.PING",
    "",
    " ",
    "deploy.responses.abc ",
    " deploy.responses.abc",
    "DEPLOY.RESPONSES.abc",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
huge_strings = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(100, 10_000))


def insert(s: str, what: str, where: int) -> str:
    i = where % (len(s) + 1)
    return s[:i] + what + s[i:]


# Near misses: a valid value with one forbidden character, or broken by a rule at an edge.
near_refs = st.one_of(
    st.builds(insert, git_refs(), FORBIDDEN, st.integers(min_value=0)),
    st.builds(insert, git_refs(), FORBIDDEN, st.integers(min_value=0)),
    st.builds(
        lambda ref, edge: edge[0] + ref + edge[1],
        git_refs(),
        st.sampled_from(
            [
                ("-", ""),
                (".", ""),
                ("/", ""),
                ("", "/"),
                ("", "."),
                ("", ".lock"),
                ("", "/.x"),
                ("", "//x"),
                ("", "/../x"),
                ("", "..x"),
                ("", "?ref=x"),
                ("", "#x"),
                ("", " "),
                (" ", ""),
                ("", "\n"),
                ("", "x" * 255),
            ]
        ),
    ),
)
near_names = st.one_of(
    st.builds(insert, tokens(NAME_CHARS), FORBIDDEN, st.integers(min_value=0)),
    st.sampled_from(
        [
            "x;y",
            "$(id)",
            "-rf",
            "--option",
            "a`b`",
            "a|b",
            "a&b",
            "a#b",
            "a?b",
            "a=b",
            "a%b",
            "a'b",
            'a"b',
            "a\\b",
            "a{b}",
            "-",
            ".x",
            "x" * 64,
        ]
    ),
)
near_actions = st.one_of(
    st.builds(
        insert, st.sampled_from(ACTIONS), FORBIDDEN | st.sampled_from(list(ALNUM + "-_.")), st.integers(min_value=0)
    ),
    st.sampled_from(ACTIONS).map(str.upper),
    st.sampled_from(ACTIONS).map(lambda a: "--" + a),
)
near_misses = st.one_of(near_refs, near_names, near_actions)
hostile_values = st.one_of(
    st.sampled_from(INJECTIONS),
    near_misses,
    st.text(max_size=60),
    st.text(st.characters(max_codepoint=31), max_size=10),
    huge_strings,
    json_values,
)

OURS = "@@OURS@@"  # replaced, when the message is sent, by a fresh reply subject the test listens on


def hostile_reply_to(kind: str) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(HOSTILE_REPLY_TO), st.text(max_size=40), json_values).filter(
        lambda r: not reply_ok(kind, r)
    )


@dataclass(frozen=True)
class Field:
    valid: st.SearchStrategy  # what the spec allows
    near: st.SearchStrategy  # almost that: the cases a validator is most likely to get wrong
    rule: object = None  # answers: the rule a present value must pass (None is missing)
    required: bool = False  # answers: missing is malformed


@st.composite
def messages(draw, kind: str, fields: dict[str, Field]) -> bytes:
    """One message for a subject class: random bytes, random JSON, a request whose fields are each valid, a
    near miss, hostile or missing, an all-valid request, an oversized one, a huge integer, or duplicate reply_to
    keys. The reply_to is mostly valid, so that most requests get as far as the validation of the other fields."""
    shape = draw(
        st.sampled_from(
            ["bytes", "json", "fields", "fields", "fields", "fields", "valid", "oversized", "bigint", "dupkeys"]
        )
    )
    if shape == "bytes":
        return draw(st.binary(max_size=500))
    if shape == "json":
        return json.dumps(draw(json_values)).encode()
    if shape == "bigint":
        return b'{"reply_to": "' + OURS.encode() + b'", "action": ' + b"9" * draw(st.integers(4301, 20_000)) + b"}"
    body = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))  # unknown keys
    for name, spec in {**fields, "reply_to": Field(st.just(OURS), hostile_reply_to(kind))}.items():
        choices = (
            ["valid"] * 6 + ["near", "missing"]
            if name == "reply_to"
            else ["valid", "valid", "near", "near", "hostile", "missing"]
        )
        how = "valid" if shape in ("valid", "oversized", "dupkeys") else draw(st.sampled_from(choices))
        if how == "missing":
            body.pop(name, None)
        else:
            body[name] = draw({"valid": spec.valid, "near": spec.near, "hostile": hostile_values}[how])
    if shape == "oversized":
        body["padding"] = "x" * draw(st.integers(hd.MAX_MESSAGE_BYTES, hd.MAX_MESSAGE_BYTES + 100_000))
    text = json.dumps(body)
    if shape == "dupkeys":  # two reply_to keys; a JSON parser keeps one of them
        other = json.dumps(draw(hostile_reply_to(kind)))
        text = (
            text[:-1] + f', "reply_to": {other}}}' if draw(st.booleans()) else '{"reply_to": ' + other + ", " + text[1:]
        )
    return text.encode()


def parse_like_a_daemon(payload: bytes, limit: int = hd.MAX_MESSAGE_BYTES) -> dict | None:
    """The JSON object a daemon (or, with the server's max_payload as `limit`, a client) can act on, or None
    (oversized, not JSON, not an object)."""
    if len(payload) > limit:
        return None
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


FUZZ_SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


# ---------------------------------------------------------------- answers: the rules and strategies

MAX_PAYLOAD = 1024 * 1024  # the nats_server fixture's nats-server: the largest answer a client gets
# the spec's, and the ones docs/protocol.md adds
DEPLOY_ERROR_CODES = DEPLOY_ERRORS | {
    "interrupted",
    "internal_error",
    "rolled_back",
    "rollback_failed",
    "health_check_failed",
    "reboot_failed",
    "unauthorized",
    "invalid_store_path",
}
BUILD_ERROR_CODES = {
    "unknown_repo",
    "invalid_target",
    "invalid_branch",
    "already_running",
    "eval_failed",
    "build_failed",
}


def number_ok(v: object, whole: bool = False) -> bool:
    """A count or a number of seconds: not a bool, finite, 0 <= n < 1e9."""
    return type(v) in ((int,) if whole else (int, float)) and 0 <= v < 1e9


def lines_ok(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(line, str) for line in v)


def answer_ok(fields: dict[str, Field], obj: object) -> bool:
    """An answer a client must accept: an object whose fields are each missing (if optional) or pass their rule."""
    return isinstance(obj, dict) and all(
        (obj.get(name) is None and not f.required) or (obj.get(name) is not None and f.rule(obj[name]))
        for name, f in fields.items()
    )


def wrong(rule, *near) -> st.SearchStrategy:
    """Present values `rule` rejects: the near misses given (values or strategies), and any JSON value."""
    return st.one_of(*[n if isinstance(n, st.SearchStrategy) else st.just(n) for n in near], json_values).filter(
        lambda v: v is not None and not rule(v)
    )


def field(rule, valid: st.SearchStrategy, *near, required: bool = False) -> Field:
    return Field(valid, wrong(rule, *near), rule, required)


long_text = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(100, 2500))
TEXT = field(lambda v: isinstance(v, str), st.text(max_size=60) | long_text, 0, 1.5, True, ["a"], {"a": "b"})
LINES = field(
    lines_ok,
    st.lists(st.text(max_size=40), max_size=30) | st.lists(long_text, max_size=3),
    "line",
    [1],
    ["a", None],
    [["a"]],
)
SECONDS = field(
    number_ok,
    st.floats(0, 1e6) | st.integers(0, 10**6),
    "soon",
    "1.5",
    True,
    False,
    -1,
    -0.5,
    1e9,
    10**12,
    float("nan"),
    float("inf"),
    -float("inf"),
    [],
    {},
)
COUNT = field(lambda v: number_ok(v, whole=True), st.integers(0, 10**6), 1.5, 3.0, True, "3", -1, 10**9)
FLAG = field(lambda v: isinstance(v, bool), st.booleans(), 0, 1, "true", "false", [], {})


def name_field(rule, valid: st.SearchStrategy, *near, required: bool = False) -> Field:
    """A name or a choice: a string `rule` accepts; an optional one may also be "" (Go's empty string for none)."""
    return field(
        lambda v: isinstance(v, str) and (rule(v) or (v == "" and not required)), valid, "", *near, required=required
    )


def choice(values: set[str], *near, required: bool = False) -> Field:
    return name_field(values.__contains__, st.sampled_from(sorted(values)), *near, required=required)


HOST_NAME = name_field(token_ok, tokens(), "a.b", "testhost1 ", "testhost1\n", "x" * 64, near_names, required=True)


DEPLOY_ANSWER = {
    "hostname": HOST_NAME,
    "status": choice(DEPLOY_STATUSES, "progress", "ACCEPTED", "complete", " completed", "accepted\n", required=True),
    "error": choice(DEPLOY_ERROR_CODES, "build-failed", "BUILD_FAILED", "unknown", "x" * 3000),
    "message": TEXT,
    "duration_seconds": SECONDS,
    "output": LINES,
    "commit": name_field(ref_ok, git_refs(), "a..b", "main;id", "-rf", near_names),  # the new system's revision
    "log": LINES,  # output lines while it runs, to a `follow` request
    "needs_reboot": FLAG,  # after a completed switch or boot
}
DISCOVERY_ANSWER = {
    "hostname": HOST_NAME,
    "tier": choice({"test", "prod"}, "staging", "Test", required=True),
    "role": name_field(token_ok, tokens(), "a.b", "dns ", 5, near_names),
    "deploy_subjects": replace(LINES, required=True),
    "version": TEXT,
    "deploying": FLAG,
    "unsigned": FLAG,
}
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"  # nix's: no e, o, u, t


def store_path_ok(v: object) -> bool:
    """<an absolute directory>/<32 of nix base32>-<name>: no '.', '..' or empty component, no whitespace."""
    if not isinstance(v, str):
        return False
    directory, _, name = v.rpartition("/")
    parts = directory.split("/")
    return (
        re.fullmatch(rf"[{NIX_BASE32}]{{32}}-(?!\.)[A-Za-z0-9+._?=-]{{1,211}}", name) is not None
        and parts[0] == ""
        and len(parts) > 1
        and all(p not in ("", ".", "..") and not any(c.isspace() for c in p) for p in parts[1:])
    )


STORE_PATH = name_field(
    store_path_ok,
    st.builds(
        lambda h, n: f"/nix/store/{h}-{n}",
        st.text(NIX_BASE32, min_size=32, max_size=32),
        st.text(ALNUM + "+._?=-", min_size=1, max_size=40).filter(lambda n: not n.startswith(".")),
    ),
    "/nix/store/short-x",
    f"/nix/store/{'e' * 32}-x",
    f"/nix/store/../{'a' * 32}-x",
    f"/nix/store/{'a' * 32}-a b",
    f"nix/store/{'a' * 32}-x",
    f"/nix/store/{'a' * 32}-.x",
    5,
)
COMMIT = name_field(
    lambda v: re.fullmatch("[0-9a-f]{40}", v) is not None,
    st.text("0123456789abcdef", min_size=40, max_size=40),
    "main",
    "0" * 39,
    "0" * 41,
    "G" * 40,
    5,
)
BUILD_RESULT = {
    "host": name_field(name_ok, tokens(NAME_CHARS), "a;b", "-rf", "x" * 64, near_names, required=True),
    "success": replace(FLAG, required=True),
    "duration_seconds": SECONDS,
    "error": TEXT,
    "output": LINES,
    "store_path": STORE_PATH,
}


@st.composite
def answer_objects(draw, fields: dict[str, Field], poison: str) -> dict:
    """An answer object: each field valid or, if optional, missing; the `poison`ed ones ("none", "some": at
    least one, "any") wrong or, if required, missing; unknown keys beside them."""
    names = draw(
        st.sets(
            st.sampled_from(sorted(fields)), min_size=int(poison == "some"), max_size=0 if poison == "none" else None
        )
    )
    body = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2))
    for name, f in fields.items():
        how = draw(
            st.sampled_from(
                (["wrong", "missing"] if f.required else ["wrong"])
                if name in names
                else ["valid"]
                if f.required
                else ["valid", "valid", "missing"]
            )
        )
        if how == "missing":
            body.pop(name, None)
        else:
            body[name] = draw(f.valid if how == "valid" else f.near)
    return body


BUILD_ANSWER = {
    "status": choice(BUILD_STATUSES, "accepted", "COMPLETED", "done", required=True),
    "error_code": choice(BUILD_ERROR_CODES, "unknown", "BUILD_FAILED", "timeout"),
    "message": TEXT,
    "error": TEXT,
    "output": LINES,
    "repo": name_field(token_ok, tokens(), "a.b", 5, near_names),
    "branch": name_field(ref_ok, git_refs(), 5, near_refs),
    "host": name_field(name_ok, tokens(NAME_CHARS), "a;b", "-rf", "x" * 64, near_names),
    "host_success": FLAG,
    "hosts_total": COUNT,
    "hosts_completed": COUNT,
    "succeeded": COUNT,
    "failed": COUNT,
    "duration_seconds": SECONDS,
    "total_duration_seconds": SECONDS,
    "commit": COMMIT,
    "store_path": STORE_PATH,
    "results": field(
        lambda v: isinstance(v, list) and all(answer_ok(BUILD_RESULT, r) for r in v),
        st.lists(answer_objects(BUILD_RESULT, "none"), max_size=4),
        st.lists(answer_objects(BUILD_RESULT, "some"), min_size=1, max_size=3),
        st.lists(json_values.filter(lambda v: not isinstance(v, dict)), min_size=1, max_size=3),
    ),
}


@st.composite
def answers(draw, fields: dict[str, Field], poison: str) -> bytes:
    """An encoded answer (see answer_objects); sometimes, unless poison is "none", no JSON object at all."""
    if poison != "none" and draw(st.integers(0, 5)) == 0:
        return draw(
            st.binary(max_size=200)
            | json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())
        )
    data = json.dumps(draw(answer_objects(fields, poison))).encode()
    assume(len(data) <= MAX_PAYLOAD // 2)  # the server refuses more than MAX_PAYLOAD; half keeps the runs light
    return data


# ---------------------------------------------------------------- validators on their own (no daemon)


class TestValidatorProperties:
    @FUZZ_SETTINGS
    @given(git_refs())
    def test_every_valid_git_ref_accepted(self, ref):
        assert ref_ok(ref) and hd.is_valid_ref(ref)

    @FUZZ_SETTINGS
    @given(git_refs(), FORBIDDEN, st.integers(min_value=0))
    def test_ref_with_a_forbidden_character_rejected(self, ref, char, where):
        i = where % (len(ref) + 1)
        assert not hd.is_valid_ref(ref[:i] + char + ref[i:])

    @FUZZ_SETTINGS
    @given(
        st.one_of(
            git_refs(),
            st.text(max_size=40),
            st.text(REF_CHARS + "?&#=% ~^:\\\n", max_size=40),
            st.builds(lambda a, b: a + b, git_refs(), st.sampled_from(["/", ".", "..", ".lock", "/.x", "//"])),
        )
    )
    def test_ref_validator_is_exactly_the_rule(self, s):
        assert hd.is_valid_ref(s) == ref_ok(s), s

    @FUZZ_SETTINGS
    @given(st.one_of(tokens(), tokens(NAME_CHARS)))
    def test_valid_hostnames_and_names_accepted(self, name):
        assert hd.is_valid_name(name)
        assert hd.is_subject_token(name) == ("." not in name)

    @FUZZ_SETTINGS
    @given(tokens(), FORBIDDEN, st.integers(min_value=0))
    def test_hostname_with_a_forbidden_character_rejected(self, name, char, where):
        i = where % (len(name) + 1)
        assert not hd.is_subject_token(name[:i] + char + name[i:])
        assert not hd.is_valid_name(name[:i] + char + name[i:])
        assert not hd.is_subject_token(name[:i] + "." + name[i:])  # a '.' would split the subject

    @FUZZ_SETTINGS
    @given(st.one_of(st.text(max_size=80), st.text(NAME_CHARS + "*> /", max_size=70)))
    def test_name_validators_are_exactly_the_rule(self, s):
        assert hd.is_subject_token(s) == token_ok(s) and hd.is_valid_name(s) == name_ok(s)

    def test_names_are_bounded(self):
        assert hd.is_valid_name("x" * 63) and not hd.is_valid_name("x" * 64) and not hd.is_subject_token("x" * 64)

    @FUZZ_SETTINGS
    @given(json_values.filter(lambda v: not isinstance(v, str)))
    def test_non_strings_rejected(self, value):
        assert not hd.is_valid_ref(value) and not hd.is_subject_token(value) and not hd.is_valid_name(value)

    @FUZZ_SETTINGS
    @given(
        st.sampled_from(["deploy", "build"]),
        st.one_of(
            st.text(TOKEN_CHARS, min_size=1, max_size=64), st.sampled_from(HOSTILE_REPLY_TO), st.text(max_size=70)
        ),
    )
    def test_reply_to_is_exactly_kind_responses_requester_token(self, kind, token):
        for reply_to in (f"{kind}.responses.{token}", f"{kind}.responses.requester.{token}", token):
            try:
                accepted = hd.parse_reply_to({"reply_to": reply_to}, kind) == reply_to
            except hd.ProtocolError:
                accepted = False
            assert accepted == reply_ok(kind, reply_to), reply_to

    @FUZZ_SETTINGS
    @given(st.sampled_from([hd.Action(a) for a in hd.REBUILD_ACTIONS]), git_refs(), tokens())
    def test_validated_values_stay_inside_their_argv_element(self, action, ref, host):
        argv = hd.rebuild_argv(action, "git+https://g.example/c.git", ref, host)
        assert len(argv) == 5 and argv[:4] == ["nixos-rebuild", action.value, "--refresh", "--flake"]
        m = re.fullmatch(r"git\+https://g\.example/c\.git\?(ref|rev)=([^#?&=%]*)#([^#?&]*)", argv[4])
        assert m and m[2] == ref and m[3] == host


def parsed(parse, data: bytes):
    """What a client makes of an answer: the parsed answer, or None when it skips it (ProtocolError, nothing else)."""
    try:
        return parse(data, MAX_PAYLOAD)
    except hd.ProtocolError:
        return None


def lines_bounded(lines: list[str] | None) -> bool:
    return lines is None or (len(lines) <= hd.OUTPUT_TAIL_LINES and all(len(x) <= hd.OUTPUT_LINE_CHARS for x in lines))


PRINTED_CHARS = hd.ANSWER_TEXT_CHARS + 200  # the longest line a client prints for one answer


class TestAnswerValidatorProperties:
    """Every answer a client can get (up to the server's max_payload) is accepted exactly when the rules hold, and
    then has bounded texts and output that the clients print without error; otherwise it is a ProtocolError."""

    @FUZZ_SETTINGS
    @given(answers(DEPLOY_ANSWER, "any"))
    def test_deploy_answers(self, data):
        response = parsed(hd.DeployResponse.parse, data)
        assert (response is not None) == answer_ok(DEPLOY_ANSWER, parse_like_a_daemon(data, MAX_PAYLOAD)), data[:300]
        if response:
            assert len(response.message) <= hd.ANSWER_TEXT_CHARS and lines_bounded(response.output)
            assert len(hd.describe(response)) <= PRINTED_CHARS and json.dumps(response.to_dict())

    @FUZZ_SETTINGS
    @given(answers(DISCOVERY_ANSWER, "any"))
    def test_discovery_answers(self, data):
        info = parsed(hd.HostInfo.parse, data)
        assert (info is not None) == answer_ok(DISCOVERY_ANSWER, parse_like_a_daemon(data, MAX_PAYLOAD)), data[:300]
        if info:
            assert lines_bounded(info.deploy_subjects) and len(info.version) <= hd.ANSWER_TEXT_CHARS
            assert isinstance(info.deploying, bool) and json.dumps(info._asdict())

    @FUZZ_SETTINGS
    @given(answers(BUILD_ANSWER, "any"))
    def test_build_answers(self, data):
        response = parsed(lambda d, limit: hd.BuildResponse.parse(d, limit).to_dict(), data)
        assert (response is not None) == answer_ok(BUILD_ANSWER, parse_like_a_daemon(data, MAX_PAYLOAD)), data[:300]
        if response:
            assert len(hd.describe_build(response)) <= PRINTED_CHARS and lines_bounded(response.get("output"))
            for r in response.get("results") or []:
                assert len(r.get("error") or "") <= hd.ANSWER_TEXT_CHARS and lines_bounded(r.get("output"))

    @settings(FUZZ_SETTINGS, max_examples=100)
    @given(st.integers(0, 200), st.integers(0, 2500), st.text(max_size=2500), st.integers(32 * 1024, MAX_PAYLOAD // 2))
    def test_build_answers_are_fitted_to_any_budget(self, n, chars, message, budget):
        """The builder's answers fit its budget (half the server's max_payload): the first results that fit, and the
        message says so exactly when some had to be left out; a client keeps the answer as it is."""
        results = [
            {
                "host": f"host-{i}",
                "success": i % 3 == 0,
                "duration_seconds": 1.25,
                **({} if i % 3 == 0 else {"error": ("é" if i % 2 else "e") * chars}),
            }
            for i in range(n)
        ]
        answer = hd.BuildResponse(
            hd.Status.FAILED, message, results=results, succeeded=-(-n // 3), failed=n - -(-n // 3)
        )
        fitted = answer.fitted(budget)
        encoded = json.dumps(fitted.to_dict())
        assert len(encoded) <= budget and hd.BuildResponse.parse(encoded.encode(), MAX_PAYLOAD) == fitted
        cut = [{**r, "error": hd.clip(r["error"])} if "error" in r else r for r in results]
        k = len(fitted.results)
        assert fitted.results == cut[:k] and (fitted.succeeded, fitted.failed) == (answer.succeeded, answer.failed)
        whole = answer._replace(message=hd.clip(hd.printable(message)), results=cut)
        cut_short = f"(results: the first {k} of {n} hosts" in fitted.message
        assert cut_short == (len(json.dumps(whole.to_dict())) > budget)
        assert k == n or len(json.dumps(fitted._replace(results=cut[: k + 1]).to_dict())) > budget  # as many as fit
        assert len(fitted.message) <= hd.ANSWER_TEXT_CHARS


# ---------------------------------------------------------------- broker restarts


@pytest.fixture
def builder_on(tmp_path):
    """builder_on(server, hosts) -> a running builder of repo `fleet` (a local git flake of `hosts`)."""
    started = []

    def start(server: NatsServer, hosts: dict[str, str]):
        url = commit_flake(tmp_path / "repos" / "fleet", flake_text(hosts))
        builder = BuilderProcess(
            server,
            tmp_path / f"builder{len(started)}",
            {"repos": {"fleet": {"url": url, "default_branch": "main"}}},
            nix_env(tmp_path / "nix"),
        )
        started.append(builder)
        return builder.start(), url

    yield start
    for builder in started:
        builder.stop()


RESTARTS = 10


@pytest.mark.slow
@pytest.mark.skipif(NO_BUILDER is not None, reason=f"the builder half needs it: {NO_BUILDER}")
def test_broker_restarted_10_times(nats_server, start_listener, builder_on):
    listener = start_listener("testhost1", "test")
    builder, _ = builder_on(nats_server, {"good1": GOOD, "good2": GOOD})
    daemons = {
        "homelab-deploy-listener/testhost1": (listener, TESTHOST1_SUBJECTS),
        "homelab-deploy-builder": (builder, {"build.fleet.*"}),
    }
    deploys = builds = 0
    started = time.monotonic()
    for i in range(1, RESTARTS + 1):
        nats_server.restart("-m", "-1")
        for name, (daemon, _subjects) in daemons.items():
            wait_for(lambda: daemon.log_text().count("reconnected to NATS") >= i, 30, f"{name} to reconnect ({i})")
            assert daemon.proc.poll() is None
        conns = connections(nats_server.monitor_port)
        for name, (_daemon, subjects) in daemons.items():  # each subscription exactly once: no duplicates
            assert len(conns[name]) == 1, conns.keys()
            subs = conns[name][0].get("subscriptions_list") or []
            assert len(subs) == len(set(subs)) and set(subs) >= subjects, (i, name, subs)
        with bus_for(nats_server.url, nats_server.seeds["admin"], "test-admin") as admin:
            got = request(admin, "deploy.test.testhost1", {"action": "switch", "revision": "main"})
            assert [r["status"] for r in got] == ["accepted", "started", "completed"], (i, got)
            deploys += 1
        with bus_for(nats_server.url, nats_server.seeds["build-client"], "test-build-client") as client:
            got = request(client, "build.fleet.all", {"repo": "fleet", "target": "all", "branch": "main"}, "build")
            assert got[-1]["status"] == "completed" and got[-1]["succeeded"] == 2, (i, got)
            assert [r["host"] for r in got if r["status"] == "progress"] == ["good1", "good2"]
            builds += 1
    assert (deploys, builds) == (RESTARTS, RESTARTS)
    assert len(listener.standin.calls) == RESTARTS  # each deploy request ran exactly once
    assert [c[:2] for c in builder.nix_calls].count(["flake", "show"]) == RESTARTS
    assert len(builder.builds()) == 2 * RESTARTS
    for daemon, _ in daemons.values():
        text = daemon.log_text()
        assert text.count("disconnected from NATS") == text.count("reconnected to NATS") == RESTARTS
        assert "Traceback" not in text
    print(
        f"\n[figures] broker restarts: {RESTARTS}/{RESTARTS} survived; {deploys} deploys and {builds} builds "
        f"succeeded; nixos-rebuild ran {len(listener.standin.calls)}x, nix build {len(builder.builds())}x "
        f"(no duplicate subscriptions); {time.monotonic() - started:.1f}s"
    )


# ---------------------------------------------------------------- cluster failover


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    port: int = 0
    route_port: int = 0
    monitor_port: int = 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class NatsCluster:
    """nats-server nodes routed on loopback, with helpers.FLEET's users in the same authorization block."""

    def __init__(self, workdir: Path, size: int = 3):
        self.workdir, self.size = workdir, size
        self.keys = NatsServer(workdir, FLEET)  # its keys and config; the single server itself never starts
        self.seeds = self.keys.seeds
        self.nodes: list[Node] = []
        self.listeners: list[Listener] = []  # started by the test, stopped with the cluster

    def start(self) -> None:
        authorization = self.keys.config.read_text()
        for i in range(1, self.size + 1):
            routes = [f"nats-route://127.0.0.1:{n.route_port}" for n in self.nodes]  # gossip completes the mesh
            config = self.workdir / f"n{i}.conf"
            config.write_text(
                f"{authorization}server_name: n{i}\ncluster {{\n  name: homelab\n"
                f"  listen: 127.0.0.1:-1\n  routes: {json.dumps(routes)}\n}}\n"
            )
            log = self.workdir / f"n{i}.log"
            log.write_text("")
            proc = subprocess.Popen(
                ["nats-server", "-c", str(config), "-l", str(log), "-m", "-1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            node = Node(f"n{i}", proc, log)
            self.nodes.append(node)
            ports = (
                r"client connections on 127\.0\.0\.1:(\d+)",
                r"route connections on 127\.0\.0\.1:(\d+)",
                r"http monitor on 127\.0\.0\.1:(\d+)",
            )  # logged in no fixed order around "Server is ready"
            wait_for(
                lambda: all(re.search(p, log.read_text()) for p in ports) or proc.poll() is not None, what=f"node n{i}"
            )
            assert node.alive, log.read_text()
            text = log.read_text()
            node.port, node.route_port, node.monitor_port = (int(re.search(p, text)[1]) for p in ports)
        wait_for(self.meshed, what="every node to route to every other")

    def meshed(self) -> bool:
        alive = [n for n in self.nodes if n.alive]
        return all(
            {r["remote_name"] for r in monitor(n.monitor_port, "routez").get("routes") or []}
            >= {m.name for m in alive if m is not n}
            for n in alive
        )

    @property
    def url(self) -> str:
        """All nodes, dead ones included: what an operator configures."""
        return ",".join(n.url for n in self.nodes)

    def node_of(self, daemon) -> Node:
        """The node a listener is connected to now, from its log (`(re)connected to NATS at 127.0.0.1:PORT`)."""
        port = int(re.findall(r"connected to NATS at 127\.0\.0\.1:(\d+)", daemon.log_text())[-1])
        return next(n for n in self.nodes if n.port == port)

    def kill(self, node: Node) -> None:
        os.killpg(node.proc.pid, signal.SIGKILL)  # a crash, not a shutdown
        node.proc.wait(10)

    def stop(self) -> None:
        for node in self.nodes:
            stop_process(node.proc)


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        for listener in c.listeners:
            listener.stop()
        c.stop()


@pytest.mark.slow
def test_cluster_failover(cluster, tmp_path):
    for args in (("testhost1", "test", None), ("testhost2", "test", "web")):
        cluster.listeners.append(Listener(cluster, *args, tmp_path).start())
    hosts = cluster.listeners
    assert all(h.argv[h.argv.index("--nats-url") + 1] == cluster.url for h in hosts)  # all three URLs
    deploys = []

    def deploy_all() -> None:
        r = run_cli(
            "deploy", "deploy.test.all", "--nats-url", cluster.url, "--nkey-file", str(cluster.seeds["admin"]), "--json"
        )
        assert r.returncode == 0, r.stderr
        assert {h["hostname"]: h["status"] for h in json.loads(r.stdout)["hosts"]} == {
            "testhost1": "completed",
            "testhost2": "completed",
        }
        deploys.append([n.name for n in cluster.nodes if n.alive])

    def reachable_everywhere() -> None:
        """Both listeners answer discovery through every live node: their interest has reached all of them."""
        for node in [n for n in cluster.nodes if n.alive]:
            with bus_for(node.url, cluster.seeds["admin"], "test-admin") as bus:
                wait_for(
                    lambda: answers_discovery(bus, {"testhost1", "testhost2"}),
                    30,
                    f"both listeners to be reachable through {node.name}",
                )

    reachable_everywhere()
    deploy_all()
    killed = []
    for _ in range(2):  # three nodes, then two, then one
        node = cluster.node_of(hosts[0])
        cluster.kill(node)
        killed.append(node.name)
        for host in hosts:  # both listeners are on a live node again
            wait_for(lambda: cluster.node_of(host).alive, 30, f"{host.hostname} to fail over from {node.name}")
        reachable_everywhere()
        deploy_all()
        deploy_all()
    assert [len(h.standin.calls) for h in hosts] == [len(deploys)] * 2
    assert hosts[0].log_text().count("reconnected to NATS") == len(killed)  # it was on each killed node
    assert all(h.proc.poll() is None and "Traceback" not in h.log_text() for h in hosts)
    print(
        f"\n[figures] cluster failover: killed {' then '.join(killed)} (the node testhost1 was on); "
        f"{len(deploys)}/{len(deploys)} CLI deploys to 2 hosts succeeded, with live nodes {deploys}"
    )


# ---------------------------------------------------------------- outage during a deploy


def start_blocked_deploy(nats_server, start_listener, cli_run, *flags: str):
    """A listener (with more `flags`) whose nixos-rebuild blocks, and a CLI deploy to it that is waiting for the
    final status."""
    nats_server.restart("-m", "-1")  # the monitoring endpoint shows who is connected and subscribed
    host = start_listener("testhost1", "test", None, "--debug", *flags)  # --debug: failed reconnects are logged
    host.standin.set_mode("block")
    cli = cli_run(
        "deploy",
        "deploy.test.testhost1",
        "--nats-url",
        nats_server.url,
        "--nkey-file",
        str(nats_server.seeds["admin"]),
        "--timeout",
        "120",
        "--json",
        "--debug",
    )
    wait_for(lambda: host.standin.pids and "testhost1: started" in cli.stderr(), what="the deploy to run")
    return host, cli


def failed_reconnects(log_text: str) -> int:
    """Connection attempts refused since the last disconnect, from a --debug log."""
    after = log_text.rsplit("disconnected from NATS; reconnecting", 1)[-1]
    return len(re.findall(r"NATS error: .*(?:ConnectionRefused|Connect call failed)", after))


def subscribed(nats_server, name: str, prefix: str) -> bool:
    """Is a client called `name` connected with a subscription starting with `prefix`?"""
    return any(
        s.startswith(prefix)
        for c in connections(nats_server.monitor_port).get(name, [])
        for s in c.get("subscriptions_list") or []
    )


def check_completed(cli: CliRun, host) -> None:
    assert cli.proc.wait(60) == 0, cli.stderr()
    doc = json.loads(cli.stdout())
    assert doc["success"] is True and [(h["hostname"], h["status"]) for h in doc["hosts"]] == [
        ("testhost1", "completed")
    ]
    assert len(host.standin.calls) == 1  # ran once, never again after the reconnects


def test_outage_during_a_deploy(nats_server, start_listener, cli_run):
    host, cli = start_blocked_deploy(nats_server, start_listener, cli_run)
    down = time.monotonic()
    nats_server.stop()
    wait_for(
        lambda: (
            "disconnected from NATS; reconnecting" in host.log_text()
            and "disconnected from NATS; reconnecting" in cli.stderr()
        ),
        what="both sides to notice the outage",
    )
    # The outage lasts until both sides have tried, and failed, to reconnect three times (>= 2 s: the client
    # waits reconnect_time_wait = 1 s between attempts at the same server).
    wait_for(
        lambda: all(failed_reconnects(text) >= 3 for text in (host.log_text(), cli.stderr())),
        30,
        "both sides to fail to reconnect three times",
    )
    nats_server.start_again("-m", "-1")
    outage = time.monotonic() - down
    wait_for(
        lambda: "reconnected to NATS" in host.log_text() and "reconnected to NATS" in cli.stderr(),
        30,
        "the listener and the CLI to log their reconnect",
    )
    wait_for(
        lambda: (
            subscribed(nats_server, "homelab-deploy-cli", "deploy.responses.")
            and subscribed(nats_server, "homelab-deploy-listener/testhost1", "deploy.test.testhost1")
        ),
        30,
        "both to be subscribed again",
    )
    assert cli.proc.poll() is None  # still waiting for the final status
    host.standin.release()
    check_completed(cli, host)
    for line in ("WARNING disconnected from NATS; reconnecting", "WARNING reconnected to NATS at 127.0.0.1:"):
        assert line in cli.stderr()  # at WARNING, so the CLI shows them without --debug too
    print(f"\n[figures] outage during a deploy: server down {outage:.1f}s; CLI got `completed`, exit 0")


def test_final_status_reaches_a_deployer_that_resubscribes_after_the_deploy_ended(nats_server, start_listener, cli_run):
    """The server comes back before the deploy ends, but the deployer reconnects later than the listener (its
    machine was suspended, or its reconnect back-off is out of phase): the final status goes out while nobody
    listens on the reply subject, and must still reach the deployer."""
    host, cli = start_blocked_deploy(nats_server, start_listener, cli_run)
    os.killpg(cli.proc.pid, signal.SIGSTOP)
    nats_server.stop()
    wait_for(lambda: "disconnected from NATS" in host.log_text(), what="the listener to notice the outage")
    nats_server.start_again("-m", "-1")
    wait_for(lambda: "reconnected to NATS" in host.log_text(), 30, "the listener to reconnect")
    assert not subscribed(nats_server, "homelab-deploy-cli", "deploy.responses.")
    host.standin.release()
    wait_for(lambda: re.search(r"request=\S+ completed in", host.log_text()), what="the deploy to end")
    os.killpg(cli.proc.pid, signal.SIGCONT)
    check_completed(cli, host)


# ---------------------------------------------------------------- a stall right after publishing


class TestStallAfterPublishing:
    """The request reached nats-server, the client never hears back: the CLI must say the outcome is unknown
    (exit 5), never that it failed, and the listener or builder, connected directly, does act on it."""

    def test_deploy_outcome_unknown_and_the_deploy_ran(self, nats_server, start_listener, stalling_proxy):
        host = start_listener("testhost1", "test")
        started = time.monotonic()
        r = run_cli(
            "deploy",
            "deploy.test.testhost1",
            "--nats-url",
            stalling_proxy.url,
            "--nkey-file",
            str(nats_server.seeds["test-deployer"]),
            timeout=60,
        )
        took = time.monotonic() - started
        assert stalling_proxy.stalled.is_set()
        assert r.returncode == 5, r.stderr
        assert (
            "error: OUTCOME UNKNOWN: the request on deploy.test.testhost1 went out but was not confirmed "
            "(the NATS server did not answer in time: nats: flush timeout)" in r.stderr
        ), r.stderr
        assert "`homelab-deploy list-hosts` shows which hosts are deploying" in r.stderr
        wait_for(lambda: re.search(r"request=\S+ completed in", host.log_text()), what="the deploy to end")
        assert len(host.standin.calls) == 1
        print(
            f"\n[figures] stall after publishing: CLI exit {r.returncode} after {took:.1f}s; nixos-rebuild ran 1 time"
        )

    @pytest.mark.skipif(NO_BUILDER is not None, reason=f"the builder needs it: {NO_BUILDER}")
    def test_build_outcome_unknown_and_the_build_ran(self, nats_server, builder_on, stalling_proxy):
        builder, _ = builder_on(nats_server, {"good1": GOOD})
        r = run_cli(
            "build",
            "fleet",
            "--nats-url",
            stalling_proxy.url,
            "--nkey-file",
            str(nats_server.seeds["build-client"]),
            timeout=60,
        )
        assert stalling_proxy.stalled.is_set()
        assert r.returncode == 5, r.stderr
        assert "error: OUTCOME UNKNOWN: the request on build.fleet.all went out" in r.stderr
        assert "repeated build is answered already_running" in r.stderr, r.stderr
        wait_for(lambda: "built 1/1 hosts" in builder.log_text(), 60, "the build to end")
        assert len(builder.builds()) == 1


def test_final_status_re_sent_by_the_listener_that_starts_after_a_switch(nats_server, start_listener, cli_run):
    """As above, with --restart-after-switch (the NixOS module sets it): the listener exits right after the switch,
    before its first re-send; the re-sends it left in the state directory are made by the next listener."""
    host, cli = start_blocked_deploy(nats_server, start_listener, cli_run, "--restart-after-switch")
    os.killpg(cli.proc.pid, signal.SIGSTOP)
    nats_server.stop()
    wait_for(lambda: "disconnected from NATS" in host.log_text(), what="the listener to notice the outage")
    nats_server.start_again("-m", "-1")
    wait_for(lambda: "reconnected to NATS" in host.log_text(), 30, "the listener to reconnect")
    host.standin.release()
    assert host.proc.wait(30) == 0  # restarting after the switch
    state = host.standin.dir / "state"
    [pending] = state.glob("resend-*.json")
    assert pending.stat().st_mode & 0o777 == 0o600 and "re-sent the final status" not in host.log_text()
    host.start()  # what systemd's Restart=always does, on the same state directory
    os.killpg(cli.proc.pid, signal.SIGCONT)
    check_completed(cli, host)
    restarted = host.log_text().rsplit("resuming the re-sends of its final status", 1)
    assert len(restarted) == 2 and "re-sent the final status after a reconnect" in restarted[1]


# ---------------------------------------------------------------- hostile input at scale


@dataclass
class Fleet:
    """A module-wide server with a listener (metrics on) and, with nix, a builder; a `chaos` user may publish
    and subscribe anything, so it can throw messages anywhere and see every message anyone publishes."""

    server: NatsServer
    listener: Listener
    chaos: hd.Bus
    metrics_port: int
    builder: object = None
    flake_url: str = ""

    def metrics_total(self) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("homelab_deploy_deployments_total{")
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    server = NatsServer(workdir, {**FLEET, "chaos": {"publish": [">"], "subscribe": [">"]}})
    with contextlib.ExitStack() as stack:
        server.start()
        stack.callback(server.stop)
        listener = Listener(
            server, "testhost1", "test", None, workdir, "--metrics-enabled", "--metrics-addr", "127.0.0.1:0"
        )
        stack.callback(listener.stop)
        listener.start()
        metrics_port = int(re.search(r"serving metrics on http://127\.0\.0\.1:(\d+)", listener.log_text())[1])
        builder, url = None, ""
        if NO_BUILDER is None:
            url = commit_flake(workdir / "repos" / "fleet", flake_text(HOSTS))
            builder = BuilderProcess(
                server,
                workdir / "builder",
                {"repos": {"fleet": {"url": url, "default_branch": "main"}}},
                nix_env(workdir / "nix"),
            )
            stack.callback(builder.stop)
            builder.start()
        chaos = hd.Bus(server.url, str(server.seeds["chaos"]), "chaos")
        stack.callback(chaos.close)
        yield Fleet(server, listener, chaos, metrics_port, builder, url)


@pytest.fixture
def spy(fleet):
    """Every message anyone publishes while the test runs, as (subject, payload)."""
    seen: list[tuple[str, bytes]] = []
    bus = hd.Bus(fleet.server.url, str(fleet.server.seeds["chaos"]), "spy")
    bus.subscribe(">", lambda subject, data, received: seen.append((subject, data)))
    yield seen
    bus.close()


class Thrower:
    """Publishes generated messages of one subject class and keeps what the daemons answered."""

    def __init__(self, fleet: Fleet, kind: str):
        self.fleet, self.kind = fleet, kind
        self.published: collections.Counter = collections.Counter()  # subject -> messages sent there
        self.answered: dict[str, tuple[dict, queue.Queue, list]] = {}  # reply subject -> (request, queue, replies)
        self.ignored = 0

    def throw(self, subject: str, template: bytes) -> tuple[dict | None, list[dict]]:
        """Send one message; for one the daemon must answer, wait for its first answer and return it."""
        payload = template.replace(OURS.encode(), hd.new_reply_subject(self.kind, self.fleet.chaos.public_key).encode())
        obj = parse_like_a_daemon(payload)
        reply_to = obj.get("reply_to") if obj is not None and reply_ok(self.kind, obj.get("reply_to")) else None
        q = None
        if reply_to:
            assert reply_to not in self.answered, "reply subjects are fresh for every message"
            q = self.fleet.chaos.inbox(hd.answer_subject(reply_to, "*"))
        self.fleet.chaos.publish(subject, payload)
        self.published[subject] += 1
        if not reply_to:
            self.ignored += 1
            return None, []
        got = collect(q, lambda g: bool(g), 60, f"an answer to {payload[:200]!r} on {subject}")
        self.answered[reply_to] = (obj, q, got)
        return obj, got

    def check_spy(self, spy: list) -> None:
        """Nothing was published anywhere but on the valid reply subjects of answered messages and, as audit
        events, on the daemon's own events subject; nothing more on the subjects thrown at than was thrown."""
        audit = ("deploy.events.test.testhost1", "build.events.fleet", "build.events.evalfail")
        for subject, payload in list(spy):
            if subject in audit:
                hd.AuditEvent.parse(payload)  # a valid event, or this raises
        seen = collections.Counter(s for s, _ in list(spy) if s not in audit)
        for subject, n in seen.items():
            if subject in self.published:
                assert n <= self.published[subject], f"{n - self.published[subject]} extra message(s) on {subject}"
            else:
                reply_to, _, responder = subject.rpartition(".")
                assert (
                    reply_to in self.answered
                    and reply_ok(self.kind, reply_to)
                    and responder in ("testhost1", "fleet", "evalfail")
                ), f"a reply went to {subject!r}"

    def audit(self, spy: list, handled_pattern: str, log_text, expected_handled: int) -> None:
        """Once every message was handled (one log line each, counted with `handled_pattern`), check the spy."""
        wait_for(
            lambda: self.check_spy(spy) or len(re.findall(handled_pattern, log_text())) >= expected_handled,
            120,
            f"the daemon to handle all {expected_handled} messages",
        )
        assert len(re.findall(handled_pattern, log_text())) == expected_handled  # each handled exactly once
        wait_for(
            lambda: collections.Counter(s for s, _ in list(spy) if s in self.published) == self.published,
            60,
            "the spy to see every thrown message",
        )
        self.check_spy(spy)


def check_deploy_reply(r: dict) -> None:
    assert isinstance(r, dict) and {"hostname", "status", "error", "message"} <= set(r), r
    assert r["hostname"] == "testhost1" and isinstance(r["message"], str), r
    assert r["status"] in DEPLOY_STATUSES and (r["error"] is None or r["error"] in DEPLOY_ERRORS), r
    assert (r["error"] is not None) == (r["status"] in ("rejected", "failed")), r


def deploy_outcomes(obj: dict) -> set[tuple]:
    """What a listener may answer a request it can reply to, by the spec's rules."""
    action_ok, revision_ok = obj.get("action") in ACTIONS, ref_ok(obj.get("revision"))
    codes = ({"invalid_action"} if not action_ok else set()) | ({"invalid_revision"} if not revision_ok else set())
    if codes:
        return {(("rejected", code),) for code in codes}
    return {(("accepted", None), ("started", None), ("completed", None)), (("rejected", "already_running"),)}


DEPLOY_FIELDS = {"action": Field(st.sampled_from(ACTIONS), near_actions), "revision": Field(git_refs(), near_refs)}
LISTENER_HANDLED = r"host=testhost1 (?:subject=\S+ )?request=\S+ (?:rejected:|accepted )"


SENTINEL_DEPLOY = json.dumps({"action": "switch", "revision": "main", "reply_to": OURS}).encode()


@pytest.mark.slow
def test_hostile_messages_on_deploy_subjects(fleet, spy):
    listener, thrower = fleet.listener, Thrower(fleet, "deploy")
    log_start, calls_before, metrics_before = (
        len(listener.log_text()),
        len(listener.standin.calls),
        fleet.metrics_total(),
    )
    completed_revisions: set[str] = set()
    outcomes: collections.Counter = collections.Counter()
    started = time.monotonic()

    def throw_one(subject: str, template: bytes) -> None:
        """Send; for a message that must be answered, check its first answer. Valid deploys are not waited
        for: the next ones meet a busy host (`already_running`) or an idle one."""
        obj, first = thrower.throw(subject, template)
        assert listener.proc.poll() is None, listener.log_text()[-3000:]
        if obj is not None:
            check_deploy_reply(first[0])
            assert any(outcome[0] == (first[0]["status"], first[0]["error"]) for outcome in deploy_outcomes(obj)), (
                obj,
                first,
            )

    def finish(answered: dict) -> None:
        """Every answered request's whole sequence up to its final status, as the spec allows."""
        for _reply_to, (obj, q, got) in answered.items():
            got += collect(q, lambda g: has_final(got + g), 120, f"a final status for {obj}")
            for r in got:
                check_deploy_reply(r)
            assert tuple((r["status"], r["error"]) for r in got) in deploy_outcomes(obj), (obj, got)
            outcomes[got[-1]["error"] or got[-1]["status"]] += 1
            if got[-1]["status"] == "completed":
                completed_revisions.add(obj["revision"])

    @FUZZ_SETTINGS
    @given(st.sampled_from(["deploy.test.testhost1", "deploy.test.all"]), messages("deploy", DEPLOY_FIELDS))
    def throw(subject, template):
        throw_one(subject, template)

    throw()
    thrown = sum(thrower.published.values())
    finish(thrower.answered)
    throw_one("deploy.test.testhost1", SENTINEL_DEPLOY)  # still alive, still deploying
    sentinel = list(thrower.answered)[-1]
    finish({sentinel: thrower.answered[sentinel]})
    assert thrower.answered[sentinel][2][-1]["status"] == "completed"
    log_text = lambda: listener.log_text()[log_start:]  # noqa: E731
    thrower.audit(spy, LISTENER_HANDLED, log_text, sum(thrower.published.values()))
    for reply_to, (_, q, _) in thrower.answered.items():
        assert drain(q) == [], f"more answers after the final one on {reply_to}"
    calls = listener.standin.calls[calls_before:]
    bad = [argv for argv in calls if not standin_argv_ok(argv, "testhost1", completed_revisions)]
    assert bad == []
    assert len(calls) == outcomes["completed"]  # one run per completed deploy, no other
    assert fleet.metrics_total() - metrics_before == len(thrower.answered)  # every answered request counted
    assert "Traceback" not in log_text() and listener.proc.poll() is None
    assert thrown >= 1000
    print(
        f"\n[figures] deploy subjects: {thrown} messages thrown in {time.monotonic() - started:.0f}s; "
        f"{len(thrower.answered) - 1} answered ({dict(outcomes)}, sentinel included), {thrower.ignored} ignored "
        f"(no valid reply_to); nixos-rebuild ran {len(calls)}x, with a bad argument 0x; replies elsewhere 0; "
        "crashes 0"
    )


@pytest.mark.slow
def test_hostile_messages_on_the_discover_subject(fleet, spy):
    listener, thrower = fleet.listener, Thrower(fleet, "deploy")
    log_start, calls_before = len(listener.log_text()), len(listener.standin.calls)
    started = time.monotonic()

    def throw_one(template: bytes) -> list[dict]:
        obj, got = thrower.throw("deploy.discover", template)
        assert listener.proc.poll() is None, listener.log_text()[-3000:]
        if obj is not None:
            [answer] = got
            assert answer["hostname"] == "testhost1" and answer["tier"] == "test" and answer["role"] is None
            assert set(answer["deploy_subjects"]) == TESTHOST1_SUBJECTS - {"deploy.discover"}
            assert isinstance(answer["deploying"], bool)
        return got

    @FUZZ_SETTINGS
    @given(st.one_of(messages("deploy", DEPLOY_FIELDS), st.just(json.dumps({"reply_to": OURS}).encode())))
    def throw(template):
        throw_one(template)

    throw()
    thrown = sum(thrower.published.values())
    assert len(throw_one(json.dumps({"reply_to": OURS}).encode())) == 1  # still answering
    log_text = lambda: listener.log_text()[log_start:]  # noqa: E731
    thrower.audit(spy, r"host=testhost1 discovery request ignored", log_text, thrower.ignored)
    for reply_to, (_, q, _got) in thrower.answered.items():
        assert drain(q) == [], f"more than one answer on {reply_to}"
    assert listener.standin.calls[calls_before:] == []  # discovery never deploys
    assert "Traceback" not in log_text() and listener.proc.poll() is None
    assert thrown >= 1000
    print(
        f"\n[figures] discover subject: {thrown} messages thrown in {time.monotonic() - started:.0f}s; "
        f"{len(thrower.answered)} answered, {thrower.ignored} ignored; nixos-rebuild ran 0x; replies elsewhere 0; "
        "crashes 0"
    )


BUILD_TARGETS = ["all", "good1", "good2", "broken", "nosuch"]
BUILD_FIELDS = {
    "repo": Field(
        st.sampled_from(["fleet", "fleet", "second"]),
        st.builds(insert, st.just("fleet"), FORBIDDEN | st.just("."), st.integers(min_value=0))
        | st.sampled_from(["Fleet", "fleet ", "fleet.all", "*", ">"]),
    ),
    "target": Field(st.one_of(st.sampled_from(BUILD_TARGETS), tokens(NAME_CHARS)), near_names),
    "branch": Field(st.one_of(st.just("main"), st.none(), st.just(""), git_refs()), near_refs),
}


def nats_token_ok(s: object) -> bool:
    """A subject token NATS accepts, though unsafe for a command line (e.g. `x;y`, `$(id)`, `-rf`)."""
    return isinstance(s, str) and 0 < len(s) <= 100 and all(32 < ord(c) < 127 and c not in ".*>" for c in s)


def check_build_reply(r: dict) -> None:
    assert isinstance(r, dict) and r.get("status") in BUILD_STATUSES and isinstance(r.get("message"), str), r
    assert r.get("error_code") is None or r["error_code"] in {c.value for c in hd.BuildErrorCode}, r
    if r["status"] == "progress":
        assert isinstance(r["host"], str) and isinstance(r["host_success"], bool), r
        assert isinstance(r["hosts_completed"], int) and isinstance(r["hosts_total"], int), r
    if r["status"] == "completed":
        assert isinstance(r["results"], list) and isinstance(r["total_duration_seconds"], (int, float)), r
        assert r["succeeded"] == len(r["results"]) and r["failed"] == 0, r


def build_request_valid(subject: str, obj: dict) -> bool:
    """By the spec's security commit: target `all` or a safe name, a safe branch (or none: the default), the
    repo and target of the subject."""
    target, branch = obj.get("target"), obj.get("branch")
    return (
        obj.get("repo") == "fleet"
        and (target == "all" or name_ok(target))
        and subject == f"build.fleet.{target}"
        and (branch is None or branch == "" or ref_ok(branch))
    )


@pytest.mark.slow
@pytest.mark.skipif(NO_BUILDER is not None, reason=f"the build class needs the builder: {NO_BUILDER}")
def test_hostile_messages_on_build_subjects(fleet, spy):
    builder, thrower = fleet.builder, Thrower(fleet, "build")
    log_start, calls_before = len(builder.log_text()), len(builder.nix_calls)
    branches: set[str] = {"main"}
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(st.data())
    def throw(data):
        template = data.draw(messages("build", BUILD_FIELDS))
        obj = parse_like_a_daemon(template)
        target = obj.get("target") if obj else None
        subject = data.draw(
            st.sampled_from(
                [f"build.fleet.{t}" for t in BUILD_TARGETS]
                + ([f"build.fleet.{target}"] * 3 if nats_token_ok(target) else [])
            )
        )
        obj, first = thrower.throw(subject, template)
        assert builder.proc.poll() is None, builder.log_text()[-3000:]
        if obj is None:
            return
        for r in first:
            check_build_reply(r)
        if not build_request_valid(subject, obj):
            assert [r["status"] for r in first] == ["rejected"], (subject, obj, first)
        else:
            assert first[0]["status"] == "started" or first[0].get("error_code") == "already_running", (obj, first)
            if isinstance(obj.get("branch"), str) and obj["branch"]:
                branches.add(obj["branch"])

    def finish(answered: dict) -> None:
        """Wait for the final status of every answered request; exactly one each."""
        for _reply_to, (obj, q, got) in answered.items():
            got += collect(q, lambda g: has_final(got + g), 120, f"a final status for {obj}")
            for r in got:
                check_build_reply(r)
            assert sum(r["status"] in FINAL for r in got) == 1, got
            finals[got[-1].get("error_code") or got[-1]["status"]] += 1

    finals: collections.Counter = collections.Counter()
    throw()
    thrown = sum(thrower.published.values())
    finish(thrower.answered)
    sentinel = json.dumps({"repo": "fleet", "target": "good1", "branch": "main", "reply_to": OURS}).encode()
    obj, _ = thrower.throw("build.fleet.good1", sentinel)  # still alive, still building
    finish({obj["reply_to"]: thrower.answered[obj["reply_to"]]})
    assert thrower.answered[obj["reply_to"]][2][-1]["status"] == "completed"
    log_text = lambda: builder.log_text()[log_start:]  # noqa: E731
    thrower.audit(
        spy,
        r"repo=\S+ (?:host=\S+ request=\S+ rejected:|request=\S+ host=\S+ branch=\S+ accepted)",
        log_text,
        sum(thrower.published.values()),
    )
    for reply_to, (_, q, _) in thrower.answered.items():
        assert drain(q) == [], f"more answers after the final one on {reply_to}"
    calls = builder.nix_calls[calls_before:]
    bad = [argv for argv in calls if not nix_argv_ok(argv, fleet.flake_url, {"good1", "good2", "broken"}, branches)]
    assert bad == []
    assert "Traceback" not in log_text() and builder.proc.poll() is None
    assert thrown >= 1000
    print(
        f"\n[figures] build subjects: {thrown} messages thrown in {time.monotonic() - started:.0f}s; "
        f"{len(thrower.answered) - 1} answered (finals {dict(finals)}, sentinel included), {thrower.ignored} "
        f"ignored; nix ran {len(calls)}x ({sum(c[0] == 'build' for c in calls)} builds), with a bad argument 0x; "
        "replies elsewhere 0; crashes 0"
    )


CLIENT_FUZZ = settings(FUZZ_SETTINGS, max_examples=100)  # one client run per example, 5 to 20 answers each
CLI_FUZZ = settings(FUZZ_SETTINGS, max_examples=10)  # one CLI process per example, 10 to 40 answers each


def malformed_logged(caplog) -> int:
    """Answers skipped as malformed since caplog.clear(); fails on any error logged (a handler's exception)."""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-3000:]
    return sum("ignoring a malformed answer" in r.getMessage() for r in caplog.records)


def throw_answers(liar, fields: dict[str, Field], caplog, in_process, cli_args: list[str], cli_ok, what: str) -> int:
    """Run the client in_process() 100 times, then the CLI (cli_args + --json) 10 times, each time after loading `liar`
    with generated malformed answers, which all reach the client ahead of the genuine ones. in_process() and
    cli_ok(exit code, JSON output) check the genuine result; each malformed answer must be logged once and skipped,
    without a traceback or a printed line longer than one answer may make. Returns the number of client runs."""
    thrown: list[int] = []

    @CLIENT_FUZZ
    @given(st.lists(answers(fields, "some"), min_size=5, max_size=20))
    def run_in_process(hostile):
        liar.load(hostile)
        caplog.clear()
        in_process()
        assert malformed_logged(caplog) == len(hostile)
        thrown.append(len(hostile))

    @CLI_FUZZ
    @given(st.lists(answers(fields, "some"), min_size=10, max_size=40))
    def run_cli_process(hostile):
        liar.load(hostile)
        r = run_cli(*cli_args, "--json")
        assert "Traceback" not in r.stderr and cli_ok(r.returncode, json.loads(r.stdout)), r.stderr[-3000:]
        assert r.stderr.count("ignoring a malformed answer") == len(hostile), r.stderr[-3000:]
        assert max(map(len, (r.stderr + r.stdout).splitlines())) <= PRINTED_CHARS
        thrown.append(len(hostile))

    run_in_process()
    runs = len(thrown)
    run_cli_process()
    print(
        f"\n[figures] hostile answers at the {what} clients: malformed answers ahead of the genuine ones, "
        f"{sum(thrown[:runs])} in {runs} in-process calls and {sum(thrown[runs:])} in {len(thrown) - runs} CLI runs; "
        "all skipped and logged, every genuine result reported, crashes 0"
    )
    return len(thrown)


@pytest.mark.slow
class TestHostileAnswersAtClients:
    """Malformed answers (generated: wrong types, values out of range, texts and lists of any length, not JSON at
    all) published with a daemon's own credential into the reply subject of a running client, before the daemon's
    genuine answers: the client never crashes, logs each malformed answer once and reports the genuine result.
    In process (deploy_hosts, discover_hosts, build_repo) and through the CLI (deploy, list-hosts, build)."""

    def test_deploy(self, nats_server, start_listener, rogue, bus_factory, caplog):
        host = start_listener("testhost1", "test")
        bus = bus_factory(nats_server, "test-deployer")

        def in_process() -> None:
            events: list[hd.DeployResponse] = []
            hosts, finished = hd.deploy_hosts(
                bus, "deploy.test.testhost1", hd.Action.SWITCH, "main", 60, on_event=events.append
            )
            assert finished and [(h, r.status, r.error) for h, r in hosts.items()] == [
                ("testhost1", hd.Status.COMPLETED, None)
            ]
            assert [e.status.value for e in events] == ["accepted", "started", "completed"]

        runs = throw_answers(
            rogue("testhost1", "deploy.test.testhost1", host),
            DEPLOY_ANSWER,
            caplog,
            in_process,
            [
                "deploy",
                "deploy.test.testhost1",
                "--nats-url",
                nats_server.url,
                "--nkey-file",
                str(nats_server.seeds["test-deployer"]),
            ],
            lambda code, doc: (
                code == 0 and [(h["hostname"], h["status"]) for h in doc["hosts"]] == [("testhost1", "completed")]
            ),
            "deploy",
        )
        assert len(host.standin.calls) == runs  # every request deployed once, whatever came before it
        assert "Traceback" not in host.log_text() and host.proc.poll() is None

    def test_discovery(self, nats_server, start_listener, rogue, bus_factory, caplog):
        host = start_listener("testhost1", "test")
        bus = bus_factory(nats_server, "test-deployer")
        genuine = hd.HostInfo(
            "testhost1",
            "test",
            None,
            ["deploy.test.testhost1", "deploy.test.all"],
            hd.__version__,
            False,
            unsigned=True,
        )

        def in_process() -> None:
            assert hd.discover_hosts(bus, stragglers=0.05) == [genuine]

        throw_answers(
            rogue("testhost1", "deploy.discover", host),
            DISCOVERY_ANSWER,
            caplog,
            in_process,
            [
                "list-hosts",
                "--nats-url",
                nats_server.url,
                "--nkey-file",
                str(nats_server.seeds["test-deployer"]),
                "--straggler-window",
                "0.05",
            ],
            # list-hosts --json adds online and last_seen (null: no registry on this server)
            lambda code, doc: code == 0 and doc == [{**genuine._asdict(), "online": True, "last_seen": None}],
            "discovery",
        )
        assert "Traceback" not in host.log_text() and host.proc.poll() is None

    @pytest.mark.skipif(NO_BUILDER is not None, reason=f"needs the builder: {NO_BUILDER}")
    def test_build(self, nats_server, builder_on, rogue, bus_factory, caplog):
        builder, _ = builder_on(nats_server, {"good1": GOOD})
        bus = bus_factory(nats_server, "build-client")

        def in_process() -> None:
            events: list[dict] = []
            final = hd.build_repo(bus, "fleet", "good1", None, 120, on_event=events.append)
            assert [e["status"] for e in events] == ["started", "started", "progress", "completed"]
            assert final is events[-1] and (final["succeeded"], [r["host"] for r in final["results"]]) == (1, ["good1"])

        runs = throw_answers(
            rogue("builder", "build.fleet.*", builder),
            BUILD_ANSWER,
            caplog,
            in_process,
            [
                "build",
                "fleet",
                "good1",
                "--nats-url",
                nats_server.url,
                "--nkey-file",
                str(nats_server.seeds["build-client"]),
            ],
            lambda code, doc: (
                code == 0 and (doc["status"], [r["host"] for r in doc["results"]]) == ("completed", ["good1"])
            ),
            "build",
        )
        assert len(builder.builds()) == runs  # every request built once
        assert "Traceback" not in builder.log_text() and builder.proc.poll() is None


def test_deeply_nested_json_is_rejected_cleanly(nats_server, start_listener, bus_factory):
    """JSON nested deeper than Python's recursion limit, within the size limit: rejected like any malformed
    message, not an unhandled exception in a handler."""
    host = start_listener("testhost1", "test")
    admin = bus_factory(nats_server, "admin")
    nested = b'{"reply_to": "deploy.responses.x", "action": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    assert len(nested) <= hd.MAX_MESSAGE_BYTES
    for subject in ("deploy.test.testhost1", "deploy.discover"):
        admin.publish(subject, nested, confirm=True)
    wait_for(
        lambda: (
            host.log_text().count(" rejected: ")
            + host.log_text().count("request ignored")
            + host.log_text().count("failed\nTraceback")
            >= 2
        ),
        what="both messages to be handled",
    )
    assert "Traceback" not in host.log_text()
    got = request(admin, "deploy.test.testhost1", {"action": "switch", "revision": "main"})
    assert got[-1]["status"] == "completed"


# ---------------------------------------------------------------- overload

FLOOD_REQUESTS = 100_000  # discovery requests; the unbounded queue of before grew the listener by ~0.7 KiB each


def flood_discovery(url: str, seed: Path, half_sent: threading.Event) -> None:
    """Publish FLOOD_REQUESTS discovery requests as fast as nats-py can, with a deployer's credential (hosts may
    not publish on deploy.discover); sets `half_sent` halfway."""
    import asyncio

    import nats

    async def flood() -> None:
        nc = await nats.connect(url, nkeys_seed_str=seed.read_text().strip())
        body = json.dumps({"reply_to": "deploy.responses.flood.x"}).encode()
        for i in range(FLOOD_REQUESTS):
            await nc.publish("deploy.discover", body)
            if i == FLOOD_REQUESTS // 2:
                half_sent.set()
        await nc.drain()

    asyncio.run(flood())


class TestOverload:
    def test_discovery_flood_neither_delays_a_deploy_nor_grows_the_listener(
        self, nats_server, start_listener, bus_factory
    ):
        host = start_listener("testhost1", "test")
        pid, half_sent, flood_over = host.proc.pid, threading.Event(), threading.Event()
        rss = [proc_status(pid)[0]]

        def sample_rss() -> None:
            while not flood_over.wait(0.05):
                rss.append(proc_status(pid)[0])

        threads = [
            threading.Thread(target=sample_rss),
            threading.Thread(
                target=flood_discovery, args=(nats_server.url, nats_server.seeds["test-deployer"], half_sent)
            ),
        ]
        for thread in threads:
            thread.start()
        try:
            assert half_sent.wait(60), "the flood did not start"
            deploy = run_cli(
                "deploy",
                "deploy.test.testhost1",
                "--branch",
                "main",
                "--json",
                "--nats-url",
                nats_server.url,
                "--nkey-file",
                str(nats_server.seeds["test-deployer"]),
            )
            threads[1].join(120)
            admin = bus_factory(nats_server, "admin")
            wait_for(lambda: answers_discovery(admin, {"testhost1"}), 60, "the listener to answer discovery again")
        finally:
            flood_over.set()
            for thread in threads:
                thread.join(120)
        assert deploy.returncode == 0, deploy.stderr
        assert json.loads(deploy.stdout)["hosts"][0]["status"] == "completed"
        assert len(host.standin.calls) == 1
        assert "lane=deploy.discover full (1024 messages waiting)" in host.log_text()
        growth = (max(rss) - rss[0]) / 1024
        assert growth < 50, f"the listener grew by {growth:.0f} MiB"
        print(
            f"\n[figures] discovery flood: {FLOOD_REQUESTS} requests; a deploy sent halfway completed (exit 0); "
            f"listener RSS {rss[0] / 1024:.1f} MiB -> peak {max(rss) / 1024:.1f} MiB"
        )

    def test_deploy_held_past_its_senders_wait_is_not_run(self, nats_server, listener_in_process, monkeypatch, caplog):
        """The CLI says how long it waits for `accepted` (expires_in: half its answer window). A request held in
        the listener longer than that after it arrived (a hook holds it, as a full queue would) is answered
        `rejected`/timeout and never run; the next one runs."""
        listener, standin = listener_in_process()
        parse, gate = hd.DeployRequest.parse, threading.Event()

        def held(data: bytes, allow_any_ref: bool = False) -> hd.DeployRequest:
            gate.wait(60)
            return parse(data, allow_any_ref)

        monkeypatch.setattr(hd.DeployRequest, "parse", staticmethod(held))
        cli = [
            "deploy",
            "deploy.test.testhost1",
            "--branch",
            "main",
            "--answer-window",
            "1",
            "--nats-url",
            nats_server.url,
            "--nkey-file",
            str(nats_server.seeds["test-deployer"]),
        ]
        assert run_cli(*cli).returncode == 4  # nothing answered within its window: the sender gave up
        gate.set()
        wait_for(lambda: "the request waited" in caplog.text or standin.calls, what="the held request to be handled")
        assert standin.calls == []
        assert re.search(
            r"rejected: not run: the request waited \d+\.\ds in the listener's queue on testhost1, "
            r"longer than the 0\.5s its sender waits for `accepted` \(expires_in\)",
            caplog.text,
        )
        assert run_cli(*cli).returncode == 0 and len(standin.calls) == 1


# ---------------------------------------------------------------- metrics port flood

FLOOD = 300  # connections that never finish a request
NOFILE = 256  # the listener's descriptor limit here; on a host, 1,022 idle connections used up systemd's 1,024
SLACK = 4  # threads or descriptors the daemon may open meanwhile for other work (NATS handlers, a refused socket)


def threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:  # closed with the half-sent request unread
        return True


class MetricsFlood:
    """FLOOD connections to a daemon's metrics port: idle, or a request without its blank line that grows by a
    byte whenever the test looks (a per-read timeout never fires). The peak of the daemon's threads and descriptors
    is sampled while they are opened."""

    def __init__(self, pid: int, log_text: str):
        self.pid = pid
        self.port = int(re.search(r"serving metrics on http://127\.0\.0\.1:(\d+)", log_text)[1])
        self.scrape()  # the baseline includes everything a scrape loads
        self.baseline = threads_and_fds(pid)
        self.peak = self.baseline
        self.cpu = self.cpu_seconds()
        self.sockets: list[socket.socket] = []
        for i in range(FLOOD):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            self.sockets.append(sock)
            if i % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sock.setblocking(False)
            self.peak = tuple(map(max, self.peak, threads_and_fds(pid)))
        self.open, self.trickling = set(self.sockets), set(self.sockets[1::2])

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def still_open(self) -> int:
        self.open = {s for s in self.open if not closed_by_server(s)}
        for sock in self.open & self.trickling:
            with contextlib.suppress(OSError):
                sock.send(b"x")
        return len(self.open)

    def check_bounded(self) -> None:
        """Every connection beyond the cap is closed at once; threads and descriptors grew by the cap at most."""
        wait_for(
            lambda: self.still_open() <= hd.METRICS_CONNECTIONS,
            30,
            f"the daemon to close the connections beyond its {hd.METRICS_CONNECTIONS}",
        )
        for name, base, peak in zip(("threads", "descriptors"), self.baseline, self.peak, strict=True):
            assert peak <= base + hd.METRICS_CONNECTIONS + SLACK, f"{name}: {base} before the flood, {peak} during it"

    def check_cut_off(self) -> str:
        """Every connection is closed by the daemon, then /metrics answers; returns the figures."""
        started = time.monotonic()
        wait_for(lambda: self.still_open() == 0, 30, f"the daemon to cut off connections after {hd.METRICS_DEADLINE}s")
        self.scrape()
        return (
            f"{FLOOD} connections: threads {self.baseline[0]} -> peak {self.peak[0]}, descriptors "
            f"{self.baseline[1]} -> peak {self.peak[1]}; the last cut off {time.monotonic() - started:.1f}s after "
            f"the check; CPU {self.cpu_seconds() - self.cpu:.2f}s during the flood"
        )

    def scrape(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


METRICS_ON = ("--metrics-enabled", "--metrics-addr", "127.0.0.1:0")


@contextlib.contextmanager
def flooded(daemon):
    """Start a daemon (a helpers.Listener or BuilderProcess given METRICS_ON), flood its metrics port and check
    the bounds; yields the flood; stops both."""
    with contextlib.ExitStack() as stack:
        stack.callback(daemon.stop)
        daemon.start()
        flood = MetricsFlood(daemon.proc.pid, daemon.log_text())
        stack.callback(flood.close)
        flood.check_bounded()
        yield flood


class TestMetricsPortFlood:
    """Issue 13: connections to the metrics port that never finish a request took a thread and a descriptor each,
    forever; at the descriptor limit the next deploy was `accepted` and never ran."""

    def test_listener_keeps_deploying(self, nats_server, bus_factory, tmp_path):
        listener = Listener(nats_server, "testhost1", "test", None, tmp_path, *METRICS_ON)
        listener.argv = ["prlimit", f"--nofile={NOFILE}", "--", *listener.argv]  # prlimit execs: same pid
        with flooded(listener) as flood:
            got = request(
                bus_factory(nats_server, "admin"), "deploy.test.testhost1", {"action": "switch", "revision": "main"}
            )
            assert [r["status"] for r in got] == ["accepted", "started", "completed"]
            assert len(listener.standin.calls) == 1
            figures = flood.check_cut_off()
            assert (
                'homelab_deploy_deployments_total{action="switch",error_code="",status="completed"} 1.0'
                in flood.scrape()
            )
        print(f"\n[figures] listener metrics flood: {figures}")

    @pytest.mark.skipif(NO_BUILDER is not None, reason=f"builds need it: {NO_BUILDER}")
    def test_builder_keeps_building(self, nats_server, bus_factory, tmp_path):
        url = commit_flake(tmp_path / "repos" / "fleet", flake_text({"good1": GOOD}))
        builder = BuilderProcess(
            nats_server,
            tmp_path / "builder",
            {"repos": {"fleet": {"url": url, "default_branch": "main"}}},
            nix_env(tmp_path / "nix"),
            *METRICS_ON,
        )
        with flooded(builder) as flood:
            final = hd.build_repo(bus_factory(nats_server, "build-client"), "fleet", "good1", None, 120, 5)
            assert final and final["status"] == "completed", final
            figures = flood.check_cut_off()
            assert 'homelab_deploy_builds_total{repo="fleet",status="success"} 1.0' in flood.scrape()
        print(f"\n[figures] builder metrics flood: {figures}")


# ---------------------------------------------------------------- load

RATE, SECONDS = 50, 30


@pytest.mark.slow
def test_load_50_requests_per_second_for_30_seconds(nats_server, start_listener, bus_factory):
    host = start_listener("testhost1", "test")
    host.standin.set_mode("block")
    pid = host.proc.pid
    admin = bus_factory(nats_server, "admin")
    replies: dict[str, list[tuple[float, bytes]]] = collections.defaultdict(list)
    lock = threading.Lock()

    def on_reply(subject: str, data: bytes, received: float) -> None:
        with lock:
            replies[subject].append((time.monotonic(), data))

    admin.subscribe("deploy.responses.>", on_reply)
    body = {"action": "switch", "revision": "main"}
    first = hd.new_reply_subject("deploy", admin.public_key)
    admin.publish("deploy.test.testhost1", json.dumps({**body, "reply_to": first}).encode(), confirm=True)
    wait_for(lambda: host.standin.pids, what="the deploy that keeps the host busy")

    def send(tag: str, n: int, pace: bool) -> dict[str, float]:
        sent, start = {}, time.monotonic()
        for i in range(n):
            if pace:  # a monotonic schedule: request i goes out at start + i/RATE
                time.sleep(max(0.0, start + i / RATE - time.monotonic()))
            reply_to = f"deploy.responses.{tag}.{i:05d}-{uuid.uuid4().hex[:8]}"
            sent[reply_to] = time.monotonic()
            admin.publish("deploy.test.testhost1", json.dumps({**body, "reply_to": reply_to}).encode())
            if pace and i % RATE == 0:
                peak.append(proc_status(pid))
        return sent

    def all_answered(sent: dict) -> bool:
        with lock:
            return all(hd.answer_subject(s, "testhost1") in replies for s in sent)

    peak: list[tuple[int, int]] = []
    cold_rss, cold_threads = proc_status(pid)
    warmup = send("warmup", 500, pace=False)  # a burst: the handler pool grows to its bound
    wait_for(lambda: all_answered(warmup), 60, "the warm-up to be answered")
    base_rss, base_threads = proc_status(pid)
    load_started = time.monotonic()
    sent = send("load", RATE * SECONDS, pace=True)
    load_took = time.monotonic() - load_started
    wait_for(lambda: all_answered(sent), 60, f"all {len(sent)} requests to be answered")
    with lock:
        answers = {s: list(replies[hd.answer_subject(s, "testhost1")]) for s in sent}
    assert all(len(a) == 1 for a in answers.values())  # every reply subject answered exactly once
    decoded = [json.loads(a[0][1]) for a in answers.values()]
    for r in decoded:
        check_deploy_reply(r)
    assert collections.Counter((r["status"], r["error"]) for r in decoded) == {
        ("rejected", "already_running"): RATE * SECONDS
    }
    latency = sorted(answers[s][0][0] - sent[s] for s in sent)
    wait_for(
        lambda: proc_status(pid)[0] <= base_rss + 20 * 1024 and abs(proc_status(pid)[1] - base_threads) <= 2,
        30,
        f"RSS and threads to return to baseline ({base_rss} KiB, {base_threads} threads)",
    )
    after_rss, after_threads = proc_status(pid)
    host.standin.release()
    wait_for(
        lambda: any(
            json.loads(d)["status"] == "completed" for _, d in list(replies[hd.answer_subject(first, "testhost1")])
        ),
        30,
        "the deploy that kept the host busy to complete",
    )
    assert len(host.standin.calls) == 1 and host.proc.poll() is None
    rss = (
        f"{cold_rss / 1024:.1f} MiB cold, {base_rss / 1024:.1f} after a 500-request warm-up burst, peak "
        f"{max(p[0] for p in peak) / 1024:.1f}, after {after_rss / 1024:.1f}"
    )
    threads = (
        f"{cold_threads} cold, {base_threads} after warm-up, peak {max(p[1] for p in peak)}, after {after_threads}"
    )
    print(
        f"\n[figures] load: {len(sent)} requests in {load_took:.1f}s ({len(sent) / load_took:.1f}/s) -> "
        f"{len(sent)} answers (all rejected already_running); latency p50 {statistics.median(latency) * 1000:.1f} ms,"
        f" p99 {latency[int(len(latency) * 0.99)] * 1000:.1f} ms, max {latency[-1] * 1000:.1f} ms; RSS {rss}; "
        f"threads {threads}"
    )


# ---------------------------------------------------------------- sites: a hub and two leaf nodes


class SiteServer(NatsServer):
    """A nats-server run from a config `nats-config` generated: the hub, or a site's leaf node."""

    def __init__(self, workdir: Path, config: str, seeds: dict[str, Path]):
        workdir.mkdir()
        self.workdir, self.seeds, self.port, self.proc = workdir, seeds, 0, None
        self.config = workdir / "nats.conf"
        self.config.write_text(config)
        checked = subprocess.run(["nats-server", "-t", "-c", str(self.config)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr + checked.stdout


class Sites:
    """A hub with the deployers and two leaf-node sites, `home` (testhost1, dns1 in prod) and `vps` (testhost2),
    each configured by `nats-config` from one fleet file; one listener per host on its site's leaf node. The vps
    leaf node also has an all-access local user, `rogue`: a site server taken over, which the hub's permissions
    for the site's leaf user must still contain."""

    HOSTS = {"testhost1": ("test", None, "home"), "dns1": ("prod", "dns", "home"), "testhost2": ("test", "web", "vps")}

    def __init__(self, workdir: Path):
        self.workdir = workdir
        keys = workdir / "keys"
        self.seeds = {
            name: keys / f"{name}.seed" for name in [*self.HOSTS, "home", "vps", "test-deployer", "admin", "rogue"]
        }
        keys.mkdir()
        for path in self.seeds.values():
            hd.new_user_seed(str(path))
        self.fleet = {
            "hosts": [
                {
                    "hostname": h,
                    "tier": tier,
                    "seed": f"keys/{h}.seed",
                    "site": site,
                    **({"role": role} if role else {}),
                }
                for h, (tier, role, site) in self.HOSTS.items()
            ],
            "deployers": [
                {"name": "test-deployer", "access": "test", "seed": "keys/test-deployer.seed"},
                {"name": "admin", "access": "admin", "seed": "keys/admin.seed"},
            ],
        }
        # The hub's own config has no remote: any leaf-node URL does.
        self.hub = SiteServer(
            workdir / "hub",
            "listen: 127.0.0.1:-1\nleafnodes { listen: 127.0.0.1:-1 }\n" + self.nats_config("nats-leaf://127.0.0.1:1"),
            self.seeds,
        )
        self.leaves: dict[str, SiteServer] = {}
        self.listeners: dict[str, Listener] = {}

    def nats_config(self, hub_url: str, *flags: str) -> str:
        self.fleet["sites"] = [{"name": s, "hub": hub_url, "seed": f"keys/{s}.seed"} for s in ("home", "vps")]
        (self.workdir / "fleet.json").write_text(json.dumps(self.fleet))  # YAML reads JSON
        r = run_cli("nats-config", *flags, str(self.workdir / "fleet.json"))
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start(self) -> None:
        self.hub.start()
        leaf_port = re.search(
            r"leafnode connections on 127\.0\.0\.1:(\d+)", (self.hub.workdir / "nats.log").read_text()
        )
        for site in ("home", "vps"):
            config = self.nats_config(f"nats-leaf://127.0.0.1:{leaf_port[1]}", "--site", site)
            if site == "vps":
                rogue = hd.public_key_of(str(self.seeds["rogue"]))
                config = config.replace(
                    "users = [\n",
                    f'users = [\n {{ nkey: "{rogue}", permissions: {{ publish: [">"], subscribe: [">"] }} }}\n',
                    1,
                )
            self.leaves[site] = SiteServer(self.workdir / site, "listen: 127.0.0.1:-1\n" + config, self.seeds)
            self.leaves[site].start()
        wait_for(
            lambda: (self.hub.workdir / "nats.log").read_text().count("Leafnode connection created") >= 2,
            what="both leaf nodes to join the hub",
        )
        for host, (tier, role, site) in self.HOSTS.items():
            self.listeners[host] = Listener(self.leaves[site], host, tier, role, self.workdir).start()

    def stop(self) -> None:
        for server in [*self.listeners.values(), *self.leaves.values(), self.hub]:
            server.stop()


@pytest.fixture
def sites(tmp_path):
    s = Sites(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()


class TestLeafSites:
    """Listeners at two leaf-node sites, the deployers on the hub, every config from `nats-config`."""

    def test_discovery_and_fan_out_reach_every_site(self, sites):
        hub = sites.hub
        r = run_cli("list-hosts", "--nats-url", hub.url, "--nkey-file", str(sites.seeds["admin"]), "--json")
        assert r.returncode == 0, r.stderr
        assert sorted(h["hostname"] for h in json.loads(r.stdout)) == ["dns1", "testhost1", "testhost2"]
        r = run_cli(
            "deploy",
            "deploy.test.all",
            "--nats-url",
            hub.url,
            "--nkey-file",
            str(sites.seeds["test-deployer"]),
            "--json",
        )
        assert r.returncode == 0, r.stderr
        assert {h["hostname"]: h["status"] for h in json.loads(r.stdout)["hosts"]} == {
            "testhost1": "completed",
            "testhost2": "completed",
        }
        assert [len(sites.listeners[h].standin.calls) for h in ("testhost1", "testhost2", "dns1")] == [1, 1, 0]

    def test_permissions_hold_across_the_link(self, sites, bus_factory):
        r = run_cli(
            "deploy", "deploy.prod.dns1", "--nats-url", sites.hub.url, "--nkey-file", str(sites.seeds["test-deployer"])
        )
        assert r.returncode != 0 and "permission" in r.stderr.lower(), r.stderr
        # The taken-over vps leaf node gets only its hosts' requests and may answer only as its hosts: the hub's
        # permissions for its leaf user. Each check ends with a message that may cross, sent after the ones
        # that may not by the same sender, so the absence of the others is certain once it arrived.
        admin, rogue = bus_factory(sites.hub, "admin"), bus_factory(sites.leaves["vps"], "rogue")
        forged = hd.answer_subject(f"deploy.responses.{admin.public_key}.forged", "")
        seen_at_vps, seen_at_hub = rogue.inbox("deploy.>"), admin.inbox(forged + "*")  # as a client subscribes
        wait_for(lambda: answers_discovery(admin, {"testhost2"}), what="the admin's interest to reach vps")
        for subject in ("deploy.prod.dns1", "deploy.test.testhost1", "deploy.prod.all", "deploy.test.testhost2"):
            admin.publish(subject, b"{}", confirm=True)
        for host in ("testhost1", "dns1", "testhost2"):
            rogue.publish(forged + host, b"{}", confirm=True)

        def drained(inbox: queue.Queue, kept: list[str], last: str) -> bool:
            while not inbox.empty():
                kept.append(inbox.get()[0])
            return last in kept

        requests, answers = [], []  # the rogue saw discovery and its answers too
        wait_for(lambda: drained(seen_at_vps, requests, "deploy.test.testhost2"), what="the allowed request at vps")
        wait_for(lambda: drained(seen_at_hub, answers, forged + "testhost2"), what="the allowed answer at the hub")
        assert [s for s in requests if s.startswith(("deploy.test.", "deploy.prod."))] == ["deploy.test.testhost2"]
        assert answers == [forged + "testhost2"]
        assert [len(sites.listeners[h].standin.calls) for h in ("testhost1", "testhost2", "dns1")] == [0, 0, 0]

    def test_final_status_crosses_after_the_leaf_link_returns(self, sites, cli_run):
        host, leaf = sites.listeners["testhost2"], sites.leaves["vps"]
        host.standin.set_mode("block")
        cli = cli_run(
            "deploy",
            "deploy.test.testhost2",
            "--nats-url",
            sites.hub.url,
            "--nkey-file",
            str(sites.seeds["test-deployer"]),
            "--timeout",
            "120",
            "--json",
        )
        wait_for(lambda: host.standin.pids and "testhost2: started" in cli.stderr(), what="the deploy to run")
        leaf.stop()  # the site's link and its hosts' connections go down with it
        wait_for(lambda: "disconnected from NATS" in host.log_text(), what="the listener to notice")
        host.standin.release()
        wait_for(lambda: re.search(r"request=\S+ completed in", host.log_text()), what="the deploy to end")
        leaf.start_again()
        assert cli.proc.wait(60) == 0, cli.stderr()
        assert [(h["hostname"], h["status"]) for h in json.loads(cli.stdout())["hosts"]] == [("testhost2", "completed")]
        assert len(host.standin.calls) == 1  # ran once; the final status crossed on reconnect or by a re-send
