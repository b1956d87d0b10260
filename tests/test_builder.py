"""Tests of the builder and the build client.

The protocol tests need nothing. The others run a real nats-server with the spec's builder and build
client permissions (helpers.FLEET), builder processes, and a real `nix` (Debian's nix-bin) without a daemon on
a private store, building local git flakes with no inputs whose `nixosConfigurations.<host>` are trivial
derivations. A `nix` wrapper first on the builder's PATH records every argv, so the tests can show that no
command ever ran with an unvalidated argument.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import threading
import urllib.request

import pytest

import homelab_deploy as hd
from tests.helpers import (
    FINAL,
    GOOD,
    PROGRAM,
    TGKILL,
    iter_queue,
    needs_nix,
    run_cli,
    sigterm_to_a_thread,
    stop_process,
    wait_for,
)

# nixosConfigurations.host-<i> for i < COUNT, each throwing a 600-character message when evaluated
THROWING_FLEET = """{
  outputs = { self }: {
    nixosConfigurations = builtins.listToAttrs (map (i: {
      name = "host-${toString i}";
      value.config.system.build.toplevel =
        throw "host-${toString i}: ${builtins.concatStringsSep "" (builtins.genList (_: "x") 600)}";
    }) (builtins.genList (i: i) COUNT));
  };
}
"""


def attr(host: str) -> str:
    return f'nixosConfigurations."{host}".config.system.build.toplevel'


def send(bus, subject: str, fields: dict) -> queue.Queue:
    """Publish a raw build request (reply_to added unless given); returns the queue of replies."""
    reply_to = fields.get("reply_to") or hd.new_reply_subject("build", bus.public_key)
    q = bus.inbox(hd.answer_subject(reply_to, "*"))
    bus.publish(subject, json.dumps({"reply_to": reply_to, **fields}).encode(), confirm=True)
    return q


def until_final(q: queue.Queue, timeout: float = 60) -> list[dict]:
    got: list[dict] = []
    wait_for(
        lambda: got.extend(iter_queue(q)) or (got and got[-1]["status"] in FINAL), timeout, what="a final build status"
    )
    return got


def cli_args(server, user: str, *rest: str) -> list[str]:
    return ["--nats-url", server.url, "--nkey-file", str(server.seeds[user]), "--answer-window", "1", *rest]


# ---------------------------------------------------------------- protocol, validation and command lines

HOSTILE_TARGETS = [
    "x;rm -rf /",
    "../x",
    "-rf",
    "$(id)",
    "a b",
    "",
    "ALL;",
    "host#x",
    "h?ref=x",
    "x" * 100,
    "web.example",
    None,
    42,
    ["all"],
    {"host": "a"},
]
HOSTILE_BRANCHES = [
    "main;id",
    "--foo",
    "a..b",
    "main#x",
    "main?ref=y",
    "$(id)",
    "-",
    "main id",
    "../etc",
    "x" * 300,
    42,
    ["main"],
    True,
]


class TestBuildProtocol:
    def request(self, **fields) -> bytes:
        return json.dumps(
            {"repo": "fleet", "target": "all", "branch": "main", "reply_to": "build.responses.me.abc", **fields}
        ).encode()

    def test_valid_requests(self):
        assert hd.BuildRequest.parse(self.request()) == hd.BuildRequest(
            "fleet", "all", "main", "build.responses.me.abc"
        )
        for branch in (None, ""):  # missing or empty: the repo's default branch
            assert hd.BuildRequest.parse(self.request(branch=branch)).branch is None
        req = hd.BuildRequest("fleet", "web-1_y", "feature/x", "build.responses.me.abc")
        assert hd.BuildRequest.parse(req.to_json()) == req

    def test_dotted_target_is_refused_with_the_way_out(self):
        with pytest.raises(hd.ProtocolError) as e:
            hd.BuildRequest.parse(self.request(target="web.example"))
        assert e.value.code is hd.BuildErrorCode.INVALID_TARGET
        assert "no '.': it is sent to build.<repo>.<host>" in str(e.value) and "with --all" in str(e.value)

    def test_refs_outside_branches_and_tags_need_the_opt_in(self):
        for branch in ("refs/heads/main", "refs/tags/v1", "0" * 40):
            assert hd.BuildRequest.parse(self.request(branch=branch)).branch == branch
        with pytest.raises(hd.ProtocolError) as e:
            hd.BuildRequest.parse(self.request(branch="refs/pull/1/head"))
        assert e.value.code is hd.BuildErrorCode.INVALID_BRANCH
        assert "start the builder with --allow-any-ref" in str(e.value)
        assert (
            hd.BuildRequest.parse(self.request(branch="refs/pull/1/head"), allow_any_ref=True).branch
            == "refs/pull/1/head"
        )

    @pytest.mark.parametrize("target", HOSTILE_TARGETS)
    def test_hostile_target(self, target):
        with pytest.raises(hd.ProtocolError) as e:
            hd.BuildRequest.parse(self.request(target=target))
        assert e.value.code is hd.BuildErrorCode.INVALID_TARGET and e.value.reply_to == "build.responses.me.abc"

    @pytest.mark.parametrize("branch", HOSTILE_BRANCHES)
    def test_hostile_branch(self, branch):
        with pytest.raises(hd.ProtocolError) as e:
            hd.BuildRequest.parse(self.request(branch=branch))
        assert e.value.code is hd.BuildErrorCode.INVALID_BRANCH

    @pytest.mark.parametrize("repo", ["a.b", "*", ">", "a b", "", None, 1, "-x"])
    def test_bad_repo(self, repo):
        with pytest.raises(hd.ProtocolError) as e:
            hd.BuildRequest.parse(self.request(repo=repo))
        assert e.value.code is hd.BuildErrorCode.UNKNOWN_REPO

    @pytest.mark.parametrize("reply_to", ["deploy.responses.x", "build.fleet.all", "build.responses.>", None])
    def test_reply_to_outside_build_responses_is_unanswerable(self, reply_to):
        with pytest.raises(hd.ProtocolError) as e:
            hd.BuildRequest.parse(self.request(reply_to=reply_to))
        assert e.value.reply_to is None

    def test_response_uses_spec_field_names(self):
        response = hd.BuildResponse(
            hd.Status.COMPLETED,
            "built 2/2 hosts successfully",
            results=[{"host": "h1", "success": True, "duration_seconds": 1.5}],
            total_duration_seconds=3.14159,
            succeeded=2,
            failed=0,
        )
        d = response.to_dict()
        assert d == {
            "status": "completed",
            "message": "built 2/2 hosts successfully",
            "succeeded": 2,
            "failed": 0,
            "results": [{"host": "h1", "success": True, "duration_seconds": 1.5}],
            "total_duration_seconds": 3.142,
        }
        assert hd.BuildResponse.parse(json.dumps(d).encode()).to_dict() == d
        for bad in (
            {"status": "accepted"},
            {"status": "progress", "duration_seconds": "1"},
            {"status": "failed", "results": ["x"]},
            {"status": "started", "hosts_total": "3"},
            {},
        ):
            with pytest.raises(hd.ProtocolError):
                hd.BuildResponse.parse(json.dumps(bad).encode())

    def test_answers_are_sized_to_fit(self):
        """The builder's budget is half the server's max_payload (512 KiB of 1 MiB). 150 failing hosts with
        600-character errors make more than a request may be, and fit whole; 20,000 are cut to the first results
        that fit, and the message says so."""

        def failing(n: int) -> list[dict]:
            return [
                {"host": f"host-{i}", "success": False, "duration_seconds": 0.25, "error": f"host-{i}: " + "x" * 600}
                for i in range(n)
            ]

        budget = 512 * 1024
        small = hd.BuildResponse(hd.Status.FAILED, "built 0/150 hosts", results=failing(150), succeeded=0, failed=150)
        assert len(json.dumps(small.to_dict())) > hd.MAX_MESSAGE_BYTES and small.fitted(budget) == small
        message = "built 0/20000 hosts; failed: " + ", ".join(f"host-{i}" for i in range(20000))
        big = hd.BuildResponse(hd.Status.FAILED, message, results=failing(20000), succeeded=0, failed=20000)
        fitted = big.fitted(budget)
        kept = len(fitted.results)
        assert (
            len(json.dumps(fitted.to_dict()))
            <= budget
            < len(json.dumps(fitted._replace(results=big.results[: kept + 1]).to_dict()))
        )  # as many as fit
        assert fitted.results == big.results[:kept] and (fitted.succeeded, fitted.failed) == (0, 20000)
        assert fitted.message.startswith("built 0/20000 hosts; failed: host-0, host-1, ") and fitted.message.endswith(
            f"... (results: the first {kept} of 20000 hosts, as many as NATS max_payload allows; every host's result "
            "is in its progress message and the builder's log)"
        )
        assert len(fitted.message) <= hd.ANSWER_TEXT_CHARS
        progress = hd.BuildResponse(
            hd.Status.PROGRESS, "h failed", host="h", error="e" * 5000, output=["o" * 900] * 100
        ).fitted(budget)  # texts cut as a client would
        assert progress.error == "e" * (hd.ANSWER_TEXT_CHARS - 3) + "..."
        assert progress.output == ["o" * (hd.OUTPUT_LINE_CHARS - 3) + "..."] * hd.OUTPUT_TAIL_LINES

    def test_argv(self):
        url = "git+https://g.example/c.git"
        assert hd.flake_show_argv(url, "main") == ["nix", "flake", "show", "--json", "--refresh", f"{url}?ref=main"]
        assert hd.flake_metadata_argv(url, "main") == [
            "nix",
            "flake",
            "metadata",
            "--json",
            "--refresh",
            f"{url}?ref=main",
        ]
        assert hd.build_argv(url + "?dir=x", "0" * 40, "web1") == [
            "nix",
            "build",
            "--no-link",
            "--json",
            f"{url}?dir=x&rev={'0' * 40}#{attr('web1')}",
        ]

    def test_nix_error_summary(self):
        build = [
            "building '/nix/store/x-broken.drv'...",
            "error: builder for '/nix/store/x-broken.drv' failed with exit code 1;",
            "       last 1 log lines:",
            "       > intentional build failure",
            "       For full logs, run 'nix log /nix/store/x-broken.drv'.",
        ]
        assert (
            hd.nix_error_summary(build)
            == "error: builder for '/nix/store/x-broken.drv' failed with exit code 1: intentional build failure"
        )
        dependency = [*build, "error: 1 dependencies of derivation '/nix/store/y-system.drv' failed to build"]
        assert hd.nix_error_summary(dependency) == hd.nix_error_summary(build)  # the first error, the cause
        trace = [  # newer nix: a bare `error:` opens the trace, the message is indented, the hint comes last
            "error:",
            "       … while evaluating the attribute 'config.system.build.toplevel'",
            "       error: undefined variable 'nginxx'",
            "(use '--show-trace' to show detailed location information)",
        ]
        assert hd.nix_error_summary(trace) == "error: undefined variable 'nginxx'"
        git = ["fatal: couldn't find remote ref refs/heads/nope", "error: program 'git' failed with exit code 128"]
        assert hd.nix_error_summary(git) == "fatal: couldn't find remote ref refs/heads/nope"
        assert (
            hd.nix_error_summary(["cannot run nix: No such file or directory"])
            == "cannot run nix: No such file or directory"
        )

    def test_client_validates_before_sending(self):
        for repo, target, branch, word in [
            ("a.b", "all", None, "repo"),
            ("fleet", "x;id", None, "target"),
            ("fleet", "all", "--foo", "branch"),
        ]:
            with pytest.raises(ValueError, match=f"invalid {word}"):
                hd.build_repo(None, repo, target, branch, 10)  # no bus: nothing may be sent


class TestBuilderConfig:
    def load(self, tmp_path, text: str):
        path = tmp_path / "builder.yaml"
        path.write_text(text)
        return hd.Repo.parse_config(str(path))

    def test_valid(self, tmp_path):
        repos = self.load(
            tmp_path,
            "repos:\n  nixos-servers:\n    url: git+https://g.example/s.git\n"
            "    default_branch: master\n"
            "  homelab:\n    url: git+ssh://git@g.example/h.git?dir=x\n",
        )
        assert repos == {
            "nixos-servers": hd.Repo("nixos-servers", "git+https://g.example/s.git", "master"),
            "homelab": hd.Repo("homelab", "git+ssh://git@g.example/h.git?dir=x", "master"),
        }
        # JSON is YAML: the NixOS module writes its generated config that way
        assert self.load(tmp_path, '{"repos": {"r": {"url": "git+file:///x", "default_branch": "main"}}}') == {
            "r": hd.Repo("r", "git+file:///x", "main")
        }

    @pytest.mark.parametrize(
        "text,message",
        [
            ("repos:\n  r: {url: x}\nextra: 1\n", "unknown top-level key(s) extra"),
            ("repos:\n  r: {url: x, branch: main}\n", "unknown key(s) branch"),
            ("repos:\n  r: {default_branch: main}\n", "missing `url`"),
            ("repos:\n  a.b: {url: x}\n", "must be one NATS subject token"),
            ("repos:\n  'a b': {url: x}\n", "must be one NATS subject token"),
            ("repos:\n  '>': {url: x}\n", "must be one NATS subject token"),
            ("repos:\n  r: {url: 'git+https://x/y.git#frag'}\n", "without '#'"),
            ("repos:\n  r: {url: 'git+https://x/ y.git'}\n", "whitespace"),
            ("repos:\n  r: {url: [a]}\n", "must be a flake URL string"),
            ("repos:\n  r: {url: 'git+https://x/y.git?ref=main'}\n", "ref= or rev="),
            ("repos:\n  r: {url: 'git+https://x/y.git?dir=a&r%65v=abc'}\n", "ref= or rev="),
            ("repos:\n  r: {url: x, default_branch: 'main;id'}\n", "default_branch 'main;id'"),
            ("repos:\n  r: url\n", "must be a mapping"),
            ("repos: {}\n", "at least one repository"),
            ("nothing: here\n", "at least one repository"),
            ("repos: [\n", "not valid YAML"),
        ],
    )
    def test_errors_name_the_problem(self, tmp_path, text, message):
        with pytest.raises(ValueError) as e:
            self.load(tmp_path, text)
        assert message in str(e.value) and str(tmp_path) in str(e.value)

    def test_cli_exits_2_with_a_clear_message(self, tmp_path):
        (tmp_path / "bad.yaml").write_text("repos:\n  a.b: {url: x}\n")
        common = ["--nats-url", "nats://127.0.0.1:1", "--nkey-file", str(tmp_path / "unused.seed")]
        r = run_cli("builder", "--config", str(tmp_path / "bad.yaml"), *common, timeout=30)
        assert r.returncode == 2 and "error:" in r.stderr and "repo name 'a.b'" in r.stderr, r.stderr
        r = run_cli("builder", "--config", str(tmp_path / "missing.yaml"), *common, timeout=30)
        assert r.returncode == 2 and "cannot read builder config" in r.stderr


# ---------------------------------------------------------------- builder over NATS with real nix


@needs_nix
class TestBuilder:
    def test_all_hosts_progress_and_unsafe_name_skipped(self, nats_server, start_builder, flake, bus_factory):
        url = flake()
        builder = start_builder({"fleet": url})
        events: list[dict] = []
        final = hd.build_repo(bus_factory(nats_server, "build-client"), "fleet", "all", None, 60, 1, events.append)
        assert final is events[-1]
        assert [e["status"] for e in events] == ["started", "started", "progress", "progress", "progress", "failed"]
        assert "hosts_total" not in events[0] and events[1]["hosts_total"] == 3
        assert "1 host(s) with unsafe names skipped" in events[1]["message"]
        progress = events[2:5]
        assert [p["hosts_completed"] for p in progress] == [1, 2, 3] and {p["hosts_total"] for p in progress} == {3}
        assert {p["host"]: p["host_success"] for p in progress} == {"good1": True, "good2": True, "broken": False}
        assert all(p["duration_seconds"] > 0 for p in progress)
        broken = next(p for p in progress if p["host"] == "broken")
        assert "intentional build failure" in broken["error"] and broken["output"]
        assert {k: final[k] for k in ("status", "message", "succeeded", "failed", "repo", "branch", "error_code")} == {
            "status": "failed",
            "message": "built 2/3 hosts; failed: broken",
            "succeeded": 2,
            "failed": 1,
            "repo": "fleet",
            "branch": "main",
            "error_code": "build_failed",
        }
        assert [(r["host"], r["success"]) for r in final["results"]] == [
            ("broken", False),
            ("good1", True),
            ("good2", True),
        ]
        assert "intentional build failure" in final["results"][0]["error"]
        assert "error" not in final["results"][1] and final["total_duration_seconds"] > 0
        assert "bad;name" not in json.dumps(events)
        # the unsafe name was logged and never reached a command
        assert "skipping 'bad;name'" in builder.log_text()
        assert not any("bad;name" in arg or "bad_name" in arg for call in builder.nix_calls for arg in call)
        assert sorted(builder.builds()) == sorted(attr(h) for h in ("good1", "good2", "broken"))
        # the branch is resolved to its commit once; every host then builds that commit
        assert builder.nix_calls[0] == ["flake", "metadata", "--json", "--refresh", f"{url}?ref=main"]
        assert builder.nix_calls[1] == ["flake", "show", "--json", "--refresh", f"{url}?rev={final['commit']}"]

    def test_single_host_and_missing_host(self, nats_server, start_builder, flake, bus_factory):
        url = flake()
        builder = start_builder({"fleet": url})
        bus = bus_factory(nats_server, "build-client")
        final = hd.build_repo(bus, "fleet", "good1", "main", 60, 1)
        assert (final["status"], final["message"], final["succeeded"], final["failed"]) == (
            "completed",
            "built 1/1 hosts successfully",
            1,
            0,
        )
        assert [r["host"] for r in final["results"]] == ["good1"]
        commit = final["commit"]
        assert builder.nix_calls == [
            ["flake", "metadata", "--json", "--refresh", f"{url}?ref=main"],
            ["flake", "show", "--json", "--refresh", f"{url}?rev={commit}"],
            ["build", "--no-link", "--json", f"{url}?rev={commit}#{attr('good1')}"],
        ]
        final = hd.build_repo(bus, "fleet", "nosuch", None, 60, 1)
        assert (final["status"], final["error_code"]) == ("failed", "eval_failed")
        assert "has no nixosConfigurations.nosuch" in final["message"] and "good1" in final["message"]
        assert len(builder.builds()) == 1

    def test_hostile_and_misdirected_requests_rejected_nothing_built(
        self, nats_server, start_builder, flake, bus_factory
    ):
        builder = start_builder({"fleet": flake(), "evalfail": flake(name="evalfail")})
        bus = bus_factory(nats_server, "build-client")
        cases = [
            ("build.fleet.all", {"repo": "fleet", "target": t, "branch": "main"}, "invalid_target")
            for t in HOSTILE_TARGETS
        ]
        cases += [
            ("build.fleet.-rf", {"repo": "fleet", "target": "-rf"}, "invalid_target"),
            ("build.fleet.all", {"repo": "fleet", "target": "good1"}, "invalid_target"),  # not the subject's
            ("build.fleet.good1", {"repo": "fleet", "target": "all"}, "invalid_target"),
        ]
        cases += [
            ("build.fleet.all", {"repo": "fleet", "target": "all", "branch": b}, "invalid_branch")
            for b in HOSTILE_BRANCHES
        ]
        cases += [
            ("build.fleet.all", {"repo": r, "target": "all"}, "unknown_repo")
            for r in ("evalfail", "nope", "fleet.x", None)
        ]  # a configured repo, but not the subject's
        cases += [("build.evalfail.all", {"repo": "fleet", "target": "all"}, "unknown_repo")]
        for subject, fields, code in cases:
            got = until_final(send(bus, subject, fields))
            assert [(r["status"], r["error_code"]) for r in got] == [("rejected", code)], (subject, fields, got)
            assert got[0]["message"].startswith(("invalid", "repo", "target"))
        # no reply possible: logged and ignored
        for payload in [
            b"garbage",
            b"[]",
            b"x" * (hd.MAX_MESSAGE_BYTES + 1),
            json.dumps({"repo": "fleet", "target": "all", "reply_to": "build.fleet.all"}).encode(),
            json.dumps({"repo": "fleet", "target": "all", "reply_to": "deploy.responses.x"}).encode(),
        ]:
            bus.publish("build.fleet.all", payload, confirm=True)
        wait_for(lambda: builder.log_text().count("rejected:") == len(cases) + 5, what="every rejection logged")
        assert builder.nix_calls == []
        assert hd.build_repo(bus, "fleet", "good2", None, 60, 1)["status"] == "completed"  # still serving

    def test_evaluation_errors_fail_with_nix_output(self, nats_server, start_builder, flake, bus_factory):
        start_builder(
            {
                "fleet": flake(),
                "evalfail": flake(
                    name="evalfail", text='{ outputs = { self }: { nixosConfigurations = throw "eval boom"; }; }\n'
                ),
            }
        )
        bus = bus_factory(nats_server, "build-client")
        final = hd.build_repo(bus, "fleet", "all", "no-such-branch", 60, 1)  # a valid ref that does not exist
        assert (final["status"], final["error_code"], final["branch"]) == ("failed", "eval_failed", "no-such-branch")
        assert "cannot list the hosts of fleet at no-such-branch" in final["message"]
        assert any(line.startswith(("error:", "fatal:")) for line in final["output"])
        final = hd.build_repo(bus, "evalfail", "all", None, 60, 1)
        assert (final["status"], final["error_code"]) == ("failed", "eval_failed")
        assert "eval boom" in final["message"] and any("eval boom" in line for line in final["output"])

    def test_one_build_per_repo_at_a_time(self, nats_server, start_builder, flake, bus_factory, tmp_path):
        marker, release = tmp_path / "started", tmp_path / "release"
        blocking = f"touch {marker}; while [ ! -e {release} ]; do sleep 0.05; done; {GOOD}"
        builder = start_builder(
            {"fleet": flake({"blocker": blocking, "good1": GOOD}), "evalfail": flake(name="evalfail")}
        )
        bus = bus_factory(nats_server, "build-client")
        try:
            first = send(bus, "build.fleet.all", {"repo": "fleet", "target": "all"})
            wait_for(marker.exists, what="the first build to run")
            got = until_final(send(bus, "build.fleet.good1", {"repo": "fleet", "target": "good1"}))
            assert [(r["status"], r["error_code"]) for r in got] == [("rejected", "already_running")]
            assert "a build of fleet is already running (all at main, for" in got[0]["message"]
            # another repo is not blocked
            assert hd.build_repo(bus, "evalfail", "good2", None, 60, 1)["status"] == "completed"
        finally:
            release.touch()
        final = until_final(first)[-1]
        assert final["status"] == "completed" and final["succeeded"] == 2
        assert builder.builds().count(attr("blocker")) == 1

    def test_the_next_build_may_follow_a_final_answer_at_once(
        self, nats_server, flake, nix_store, bus_factory, monkeypatch
    ):
        """A client may ask again the moment a final answer arrives: the repo is free before that answer goes out.
        In process, where the builder's publish of its final answer can be held until the next request is answered."""
        for key in set(os.environ) - set(nix_store):
            monkeypatch.delenv(key)
        for key, value in nix_store.items():
            monkeypatch.setenv(key, value)  # the builder's nix runs on the private store
        builder_bus, client = bus_factory(nats_server, "builder"), bus_factory(nats_server, "build-client")
        builder = hd.Builder(
            {"fleet": hd.Repo("fleet", flake({"good1": GOOD}), "main")},
            builder_bus,
            timeout=60,
            parallel=1,
            metrics=None,
            stop=threading.Event(),
            allow_any_ref=False,
        )
        publish, held, following = builder_bus.publish, [], []

        def hold_the_first_final_answer(subject: str, payload: bytes, confirm: bool = False) -> None:
            if json.loads(payload).get("status") in FINAL and not held:
                held.append(subject)
                following.append(send(client, "build.fleet.good1", {"repo": "fleet", "target": "good1"}))
                wait_for(lambda: not following[0].empty(), what="the next request's first answer")
            publish(subject, payload, confirm)

        monkeypatch.setattr(builder_bus, "publish", hold_the_first_final_answer)
        builder.start()
        assert hd.build_repo(client, "fleet", "good1", None, 60, 1)["status"] == "completed"
        assert [r["status"] for r in until_final(following[0])] == ["started", "started", "progress", "completed"]

    def test_per_host_timeout_kills_the_build(self, nats_server, start_builder, flake, bus_factory, tmp_path):
        pidfile = tmp_path / "slow.pid"
        builder = start_builder(
            {"fleet": flake({"good1": GOOD, "slow": f"echo $$ > {pidfile}; exec sleep 300"})}, "--timeout", "2"
        )
        final = hd.build_repo(bus_factory(nats_server, "build-client"), "fleet", "all", None, 60, 1)
        assert (final["status"], final["message"]) == ("failed", "built 1/2 hosts; failed: slow")
        slow = final["results"][1]
        assert slow["host"] == "slow" and slow["error"] == "timed out after 2s; its process group was killed"
        assert 2 <= slow["duration_seconds"] < 15
        pid = int(pidfile.read_text())
        wait_for(
            lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
            what="the timed-out build to be killed",
        )
        assert "exceeded 2s; killing its process group" in builder.log_text()

    def test_parallel_builds(self, nats_server, start_builder, flake, bus_factory, tmp_path):
        # each host waits for the other to start: only a parallel builder can finish them
        a, b = tmp_path / "a", tmp_path / "b"
        hosts = {
            "ha": f"touch {a}; while [ ! -e {b} ]; do sleep 0.05; done; {GOOD}",
            "hb": f"touch {b}; while [ ! -e {a} ]; do sleep 0.05; done; {GOOD}",
        }
        start_builder({"fleet": flake(hosts)}, "--parallel", "2", "--timeout", "30")
        final = hd.build_repo(bus_factory(nats_server, "build-client"), "fleet", "all", None, 60, 1)
        assert (final["status"], final["succeeded"]) == ("completed", 2)

    def test_shutdown_cancels_running_build(self, nats_server, start_builder, flake, bus_factory, tmp_path):
        pidfile = tmp_path / "pid"
        builder = start_builder({"fleet": flake({"hang": f"echo $$ > {pidfile}; exec sleep 300", "later": GOOD})})
        q = send(bus_factory(nats_server, "build-client"), "build.fleet.all", {"repo": "fleet", "target": "all"})
        wait_for(pidfile.exists, what="the build to run")
        wait_for(lambda: pidfile.read_text().strip(), what="the pid")
        builder.proc.terminate()
        final = until_final(q)[-1]
        assert final["status"] == "failed" and final["failed"] == 2
        assert {r["error"] for r in final["results"]} == {"cancelled: the builder is shutting down"}
        assert builder.proc.wait(30) == 0
        pid = int(pidfile.read_text())
        wait_for(
            lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
            what="the cancelled build to be killed",
        )
        assert builder.builds() == [attr("hang")]

    def test_pull_request_ref_needs_allow_any_ref(self, nats_server, start_builder, flake, bus_factory, tmp_path):
        """A commit only on refs/pull/1/head (nobody merged it) is built with --allow-any-ref only; real nix
        fetches such a ref, so the default must refuse it."""
        url = flake({"good1": GOOD})
        flake({"pr-only": GOOD}, branch="pr-1")
        repo = tmp_path / "repos" / "fleet"
        for args in (
            ["checkout", "-q", "main"],
            ["update-ref", "refs/pull/1/head", "pr-1"],
            ["branch", "-q", "-D", "pr-1"],
        ):
            subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
        strict = start_builder({"fleet": url})
        bus = bus_factory(nats_server, "build-client")
        final = hd.build_repo(bus, "fleet", "pr-only", "refs/pull/1/head", 60, 1)
        assert (final["status"], final["error_code"]) == ("rejected", "invalid_branch")
        assert "start the builder with --allow-any-ref" in final["message"]
        assert strict.nix_calls == []
        assert hd.build_repo(bus, "fleet", "good1", "refs/heads/main", 60, 1)["status"] == "completed"
        strict.stop()
        trusting = start_builder({"fleet": url}, "--allow-any-ref")
        final = hd.build_repo(bus, "fleet", "pr-only", "refs/pull/1/head", 60, 1)
        assert (final["status"], final["branch"]) == ("completed", "refs/pull/1/head"), final
        assert trusting.builds() == [attr("pr-only")]

    def test_credential_must_allow_every_repo(self, start_builder, flake):
        builder = start_builder({"fleet": flake(), "second": flake(name="second")}, expect_ready=False)
        assert builder.proc.returncode == 1
        assert "permission denied" in builder.log_text() and "build.second.*" in builder.log_text()

    def test_metrics(self, nats_server, start_builder, flake, bus_factory):
        from prometheus_client.parser import text_string_to_metric_families

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start_builder(
            {"fleet": flake(), "evalfail": flake(name="evalfail")},
            "--metrics-enabled",
            "--metrics-addr",
            f"127.0.0.1:{port}",
        )

        def scrape() -> tuple[dict, dict, str]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            families = list(text_string_to_metric_families(text))
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
            return {f.name: f.type for f in families}, samples, text

        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read() == b"ok"
        types, before, _ = scrape()
        assert types == {
            "homelab_deploy_builds": "counter",
            "homelab_deploy_build_host": "counter",
            "homelab_deploy_build_duration_seconds": "histogram",
            "homelab_deploy_build_last_timestamp": "gauge",
            "homelab_deploy_build_last_success_timestamp": "gauge",
            "homelab_deploy_build_last_failure_timestamp": "gauge",
        }
        for repo in ("fleet", "evalfail"):
            for status in ("success", "failure"):
                assert before[("homelab_deploy_builds_total", (("repo", repo), ("status", status)))] == 0
            assert before[("homelab_deploy_build_last_timestamp", (("repo", repo),))] == 0
        bus = bus_factory(nats_server, "build-client")
        hd.build_repo(bus, "fleet", "all", None, 60, 1)
        hd.build_repo(bus, "fleet", "good1", None, 60, 1)
        until_final(send(bus, "build.fleet.all", {"repo": "fleet", "target": "all", "branch": "x;y"}))  # rejected
        _, after, text = scrape()
        builds = lambda status: after[  # noqa: E731
            ("homelab_deploy_builds_total", (("repo", "fleet"), ("status", status)))
        ]
        hosts = lambda host, status: after[
            (
                "homelab_deploy_build_host_total",  # noqa: E731
                (("host", host), ("repo", "fleet"), ("status", status)),
            )
        ]
        assert (builds("success"), builds("failure")) == (1, 1)  # the rejection is not a build
        assert (hosts("good1", "success"), hosts("good2", "success"), hosts("broken", "failure")) == (2, 1, 1)
        assert after[("homelab_deploy_build_duration_seconds_count", (("host", "good1"), ("repo", "fleet")))] == 2
        buckets = sorted(
            float(dict(labels)["le"])
            for (name, labels) in after
            if name == "homelab_deploy_build_duration_seconds_bucket" and dict(labels)["host"] == "good1"
        )
        assert buckets == [
            5,
            10,
            30,
            60,
            120,
            300,
            600,
            900,
            1200,
            1800,
            2700,
            3600,
            5400,
            7200,
            10800,
            14400,
            float("inf"),
        ]
        last = {
            name: after[(name, (("repo", "fleet"),))]
            for name in (
                "homelab_deploy_build_last_timestamp",
                "homelab_deploy_build_last_success_timestamp",
                "homelab_deploy_build_last_failure_timestamp",
            )
        }
        assert all(v > 1.7e9 for v in last.values())
        assert (
            last["homelab_deploy_build_last_success_timestamp"] >= last["homelab_deploy_build_last_failure_timestamp"]
        )
        assert after[("homelab_deploy_build_last_timestamp", (("repo", "evalfail"),))] == 0
        assert "bad;name" not in text


@needs_nix
class TestBuilderLifeCycle:
    @pytest.mark.slow
    @pytest.mark.skipif(TGKILL is None, reason="tgkill's syscall number is known for x86_64 and aarch64 only")
    def test_sigterm_during_build_every_time(self, nats_server, start_builder, flake, bus_factory, tmp_path):
        """20 SIGTERMs, each to another thread of a builder running a build: every one stops it."""
        pidfile = tmp_path / "pid"
        url = flake({"hang": f"echo $$ > {pidfile}; exec sleep 300"})
        bus = bus_factory(nats_server, "build-client")
        exits = []
        for run in range(20):
            pidfile.unlink(missing_ok=True)
            builder = start_builder({"fleet": url})
            q = send(bus, "build.fleet.all", {"repo": "fleet", "target": "all"})
            wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the build to run")
            sigterm_to_a_thread(builder.proc.pid, run)
            final = until_final(q)[-1]
            assert (final["status"], final["failed"]) == ("failed", 1), final
            exits.append(builder.proc.wait(30))  # killing nix takes at most 15 s, then the final status goes out
        assert exits == [0] * 20

    def test_unexpected_error_after_started(self, nats_server, flake, nix_store, bus_factory, monkeypatch):
        """A bug inside a build (injected in an in-process builder on a real NATS connection) answers
        `failed`/internal_error once; the builder then builds normally."""
        for key, value in nix_store.items():
            monkeypatch.setenv(key, value)
        repos = {"fleet": hd.Repo("fleet", flake({"good1": GOOD}), "main")}
        builder = hd.Builder(
            repos,
            bus_factory(nats_server, "builder"),
            timeout=600,
            parallel=1,
            metrics=None,
            stop=threading.Event(),
            allow_any_ref=False,
        )
        builder.start()
        bus = bus_factory(nats_server, "build-client")

        def broken(*args):
            raise RuntimeError("injected fault")

        with monkeypatch.context() as patch:
            patch.setattr(hd.Builder, "list_hosts", broken)
            q = send(bus, "build.fleet.all", {"repo": "fleet", "target": "all"})
            got = until_final(q)
            assert [r["status"] for r in got] == ["started", "failed"]
            assert got[-1]["error_code"] == "internal_error"
            assert "failed unexpectedly (RuntimeError: injected fault)" in got[-1]["message"]
            with pytest.raises(queue.Empty):
                q.get(timeout=0.5)  # exactly one final status
        final = hd.build_repo(bus, "fleet", "all", None, 120, 5)
        assert (final["status"], final["succeeded"]) == ("completed", 1)


# ---------------------------------------------------------------- build CLI


@needs_nix
class TestBuildCLI:
    def test_json_progress_and_exit_codes(self, nats_server, start_builder, flake):
        start_builder({"fleet": flake()})
        r = run_cli("build", "fleet", "--all", "--json", *cli_args(nats_server, "build-client"))
        assert r.returncode == 1, r.stderr
        doc = json.loads(r.stdout)
        assert (doc["status"], doc["succeeded"], doc["failed"]) == ("failed", 2, 1)
        assert {"results", "total_duration_seconds", "message"} <= set(doc)
        lines = r.stderr.splitlines()
        assert [line.split()[0] for line in lines if line.startswith("[")] == ["[1/3]", "[2/3]", "[3/3]"]
        assert any(
            line.startswith("[") and " broken FAILED " in line and "intentional build failure" in line for line in lines
        )
        assert any(line.startswith("[") and " good1 ok " in line and line.endswith("s") for line in lines)
        assert "fleet: built 2/3 hosts; failed: broken" in lines
        r = run_cli("build", "fleet", "good1", "--json", *cli_args(nats_server, "build-client"))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["message"] == "built 1/1 hosts successfully"

    def test_final_answer_larger_than_a_request_arrives(self, nats_server, start_builder, flake, tmp_path):
        """150 hosts whose evaluation throws a long message (nix's line is kept to 500 characters): the final answer,
        with every host's error, is about 88 KB, more than a request may be and well under the server's
        max_payload. The CLI gets it and exits 1 as soon as it arrives; it does not wait for --timeout."""
        hosts = [f"host-{i}" for i in range(150)]
        start_builder({"fleet": flake(text=THROWING_FLEET.replace("COUNT", str(len(hosts))))}, "--parallel", "4")
        with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
            proc = subprocess.Popen(
                [
                    *PROGRAM,
                    "build",
                    "fleet",
                    "--all",
                    "--json",
                    "--timeout",
                    "3600",
                    *cli_args(nats_server, "build-client"),
                ],
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        try:
            assert proc.wait(600) == 1, (tmp_path / "err").read_text()[-3000:]  # a deadline far below --timeout
        finally:
            stop_process(proc)
        final = json.loads((tmp_path / "out").read_text())
        assert len(json.dumps(final)) > hd.MAX_MESSAGE_BYTES
        assert (final["status"], final["succeeded"], final["failed"]) == ("failed", 0, len(hosts))
        assert sorted(r["host"] for r in final["results"]) == sorted(hosts)
        assert all(
            r["error"].startswith(f"error: {r['host']}: xxxx") and len(r["error"]) == hd.OUTPUT_LINE_CHARS
            for r in final["results"]
        )

    def test_env_vars(self, nats_server, start_builder, flake):
        url = flake()
        flake(name="fleet", branch="feature/x")
        builder = start_builder({"fleet": url})
        env = {
            "HOMELAB_DEPLOY_NATS_URL": nats_server.url,
            "HOMELAB_DEPLOY_NKEY_FILE": str(nats_server.seeds["build-client"]),
            "HOMELAB_DEPLOY_BRANCH": "feature/x",
            "HOMELAB_DEPLOY_BUILD_TIMEOUT": "120",
        }
        r = run_cli("build", "fleet", "good2", "--answer-window", "1", env=env)
        assert r.returncode == 0, r.stderr
        assert builder.nix_calls[0] == ["flake", "metadata", "--json", "--refresh", f"{url}?ref=feature/x"]
        assert builder.nix_calls[-1][:3] == ["build", "--no-link", "--json"]
        assert builder.nix_calls[-1][3].startswith(f"{url}?rev=") and builder.nix_calls[-1][3].endswith(attr("good2"))

    def test_invalid_arguments_send_nothing(self, nats_server, start_builder, flake):
        builder = start_builder({"fleet": flake()})
        for args in (
            ["fleet", "good1", "--all"],
            ["fleet", "bad;name"],
            ["fleet", "--branch", "main;id"],
            ["fleet", "-x", "--all"],
            ["a.b", "--all"],
            ["fleet", "--branch", "--all"],
        ):
            r = run_cli("build", *args, *cli_args(nats_server, "build-client"))
            assert r.returncode == 2 and "error:" in r.stderr, (args, r.stderr)
        assert builder.nix_calls == []

    def test_dotted_host_is_built_with_all_only(self, nats_server, start_builder, flake):
        """build.fleet.web.example never reaches build.fleet.*: the CLI refuses it before sending; --all builds it."""
        builder = start_builder({"fleet": flake({"web.example": GOOD, "good1": GOOD})})
        r = run_cli("build", "fleet", "web.example", *cli_args(nats_server, "build-client"))
        assert r.returncode == 2 and "error: invalid target 'web.example'" in r.stderr, r.stderr
        assert "build hosts named with '.' with --all" in r.stderr and builder.nix_calls == []
        r = run_cli("build", "fleet", "--all", "--json", *cli_args(nats_server, "build-client"))
        assert r.returncode == 0, r.stderr
        assert [(h["host"], h["success"]) for h in json.loads(r.stdout)["results"]] == [
            ("good1", True),
            ("web.example", True),
        ]
        assert sorted(builder.builds()) == [attr("good1"), attr("web.example")]

    def test_rejected_gives_exit_1(self, nats_server, start_builder, flake, tmp_path):
        marker, release = tmp_path / "started", tmp_path / "release"
        start_builder(
            {"fleet": flake({"blocker": f"touch {marker}; while [ ! -e {release} ]; do sleep 0.05; done; {GOOD}"})}
        )
        proc = subprocess.Popen(
            [*PROGRAM, "build", "fleet", *cli_args(nats_server, "build-client")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for(marker.exists, what="the first build to run")
            r = run_cli("build", "fleet", "--json", *cli_args(nats_server, "build-client"))
            assert r.returncode == 1 and json.loads(r.stdout)["status"] == "rejected"
            assert "already running" in r.stderr
        finally:
            release.touch()
            assert proc.wait(60) == 0
            stop_process(proc)

    def test_permission_denied_and_nobody_answers(self, nats_server, start_builder, flake):
        start_builder({"fleet": flake()})
        r = run_cli("build", "second", "--all", *cli_args(nats_server, "build-client"))
        assert r.returncode == 3 and "permission denied" in r.stderr and "build.second.all" in r.stderr, r.stderr
        r = run_cli("build", "unknown", "--all", *cli_args(nats_server, "build-client"))
        assert r.returncode == 4 and "no builder answered on build.unknown.all" in r.stderr, r.stderr
        r = run_cli("build", "fleet", *cli_args(nats_server, "test-deployer"))  # a deployer may not build
        assert r.returncode == 3 and "permission denied" in r.stderr
