"""Tests for homelab_deploy, grouped by the part they exercise.

Unit tests need nothing; tests marked `integration` run a real nats-server with the spec's tiered NKey
permissions, real listener processes and a stand-in `nixos-rebuild` that records its argv.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import homelab_deploy as hd
from tests import helpers
from tests.helpers import (
    COMMIT_A,
    COMMIT_B,
    REPO,
    TGKILL,
    deploy_args,
    history_records,
    iter_queue,
    run_cli,
    sigterm_to_a_thread,
    start_deploy,
    wait_for,
)

HOSTILE_REVISIONS = [
    "main; rm -rf /",
    "$(reboot)",
    "`id`",
    "main && id",
    "main|id",
    "--upgrade",
    "-rf",
    "main#evil",
    "main?rev=1",
    "main&ref=x",
    "a=b",
    "100%",
    "../etc",
    "main/../x",
    "a..b",
    "main\nid",
    "main id",
    "\tmain",
    "",
    ".hidden",
    "x" * 300,
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
    42,
    None,
    ["main"],
    {"ref": "main"},
    True,
]
HOSTILE_ACTIONS = ["reboot", "switch; id", "--help", "SWITCH", "switch ", "", "build-vm", 1, None, ["switch"]]


# ---------------------------------------------------------------- validation and protocol


def test_module_docstring_names_every_section_in_order():
    """The docstring is the module's table of contents: one line per `# ---- name` banner, in the file's order."""
    import re

    banners = re.findall(r"^# -{20,} (.+)$", (REPO / "homelab_deploy.py").read_text(), re.M)
    contents = hd.__doc__.partition("follow the data:\n")[2]
    listed = [re.split(r"\s{2,}", line.strip())[0] for line in contents.splitlines() if line.strip()]
    assert listed == banners and len(banners) >= 12


def test_no_function_is_over_80_lines_but_the_parser_and_the_listener_is_in_parts():
    """Each function of both modules fits on a screen (build_parser is a table of flags); the listener is three
    parts of at most 250 lines: intake and replies, its state files, the rollback."""
    import ast

    long = {}
    for module in ("homelab_deploy.py", "homelab_deploy_mcp.py"):
        for node in ast.walk(ast.parse((REPO / module).read_text())):
            length = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length > 80:
                long[node.name] = length
            if isinstance(node, ast.ClassDef) and node.name in ("Listener", "ListenerState", "Rollback"):
                assert length <= 250, (node.name, length)
    assert set(long) == {"build_parser"}, long


def test_mypy_passes(tmp_path):
    """mypy, configured in pyproject.toml ([tool.mypy]), finds nothing in either module."""
    pytest.importorskip("mypy", reason="mypy is not installed here (.ci/run installs it)")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    assert "Success: no issues found in 2 source files" in out, out


class TestValidation:
    @pytest.mark.parametrize(
        "ref",
        [
            "main",
            "master",
            "feature/x-1",
            "v1.2.3",
            "release_2024",
            "a" * 255,
            "0123456789abcdef0123456789abcdef01234567",
            "HEAD",
            "user/feat.v2",
        ],
    )
    def test_valid_refs_accepted(self, ref):
        assert hd.is_valid_ref(ref)

    @pytest.mark.parametrize("ref", HOSTILE_REVISIONS)
    def test_hostile_refs_rejected(self, ref):
        assert not hd.is_valid_ref(ref)

    @pytest.mark.parametrize(
        "token,ok",
        [
            ("myhost", True),
            ("dns-1", True),
            ("_x", True),
            ("a.b", False),
            ("*", False),
            (">", False),
            ("a b", False),
            ("", False),
            ("-x", False),
        ],
    )
    def test_subject_tokens(self, token, ok):
        assert hd.is_subject_token(token) is ok

    @pytest.mark.parametrize(
        "ref,ok",
        [
            ("main", True),
            ("pull/1/head", True),
            ("0" * 40, True),
            ("HEAD", True),
            ("refs/heads/main", True),
            ("refs/tags/v1.0", True),
            ("refs/pull/1/head", False),
            ("refs/merge-requests/1/head", False),
            ("refs/remotes/origin/main", False),
            ("refs/heads", False),
        ],
    )
    def test_branch_or_tag(self, ref, ok):
        assert hd.is_branch_or_tag(ref) is ok

    @pytest.mark.parametrize(
        "url,ok",
        [
            ("git+https://g.example/c.git", True),
            ("git+https://g.example/c.git?dir=x", True),
            ("git+https://g.example/c.git?refresh=1", True),
            ("git+https://g.example/c.git?ref=main", False),
            ("git+https://g.example/c.git?dir=x&rev=" + "0" * 40, False),
            ("git+https://g.example/c.git?r%65f=main", False),
            ("git+https://g.example/c.git#h1", False),
            ("-x", False),
            ("", False),
        ],
    )
    def test_flake_url(self, url, ok):
        assert hd.is_flake_url(url) is ok

    SEED = "SUAIBDPBAUTWCWBKIO6XTTUUWEBH5EMNKCMNKRX4KVPG3OLDJJ5SEBRSAI"  # the example seed of the nkeys docs

    @pytest.mark.parametrize(
        "text,shown",
        [
            (
                f"cannot read NKey seed file {SEED}: No such file",
                "cannot read NKey seed file <an NKey seed, redacted>: No such file",
            ),
            (f"/run/secrets/{SEED}", "/run/secrets/<an NKey seed, redacted>"),
            (
                "cannot reach NATS at nats://deploy:s3cret@h:4222, nats://tok3n@h2:4222 within 5s",
                "cannot reach NATS at nats://deploy:***@h:4222, nats://***@h2:4222 within 5s",
            ),
            ("connected to NATS at deploy:s3cret@127.0.0.1:4222", "connected to NATS at deploy:***@127.0.0.1:4222"),
            ("nats://u:p@ss@h:4222", "nats://u:***@h:4222"),
            (  # a public key is kept
                "nats://127.0.0.1:4222 UDVRWFORRSGNSBF354R4CMAMEGYAXK27DSM5MQHSY6WNGTUP3KMVCLYW",
                "nats://127.0.0.1:4222 UDVRWFORRSGNSBF354R4CMAMEGYAXK27DSM5MQHSY6WNGTUP3KMVCLYW",
            ),
        ],
    )
    def test_redact(self, text, shown):
        assert hd.redact(text) == shown
        assert str(hd.NatsError(text)) == shown

    @pytest.mark.parametrize(
        "subject,ok",
        [
            ("deploy.test.all", True),
            ("deploy.prod.role.dns", True),
            ("deploy.*.all", False),
            ("deploy.>", False),
            ("deploy..x", False),
            ("deploy.test.a b", False),
            ("", False),
            ("deploy.test.", False),
        ],
    )
    def test_publish_subjects(self, subject, ok):
        assert hd.is_publish_subject(subject) is ok


class TestProtocol:
    def request(self, **fields) -> bytes:
        return json.dumps(
            {"action": "switch", "revision": "main", "reply_to": "deploy.responses.me.abc", **fields}
        ).encode()

    def test_valid_request(self):
        req = hd.DeployRequest.parse(self.request(action="dry-activate"))
        assert req == hd.DeployRequest(hd.Action.DRY_ACTIVATE, "main", "deploy.responses.me.abc")
        assert hd.DeployRequest.parse(req.to_json()) == req

    @pytest.mark.parametrize("revision", HOSTILE_REVISIONS)
    def test_hostile_revision_is_invalid_revision(self, revision):
        with pytest.raises(hd.ProtocolError) as e:
            hd.DeployRequest.parse(self.request(revision=revision))
        assert e.value.code is hd.ErrorCode.INVALID_REVISION
        assert e.value.reply_to == "deploy.responses.me.abc"

    def test_follow_is_a_boolean_sent_only_when_true(self):
        assert b"follow" not in hd.DeployRequest(hd.Action.SWITCH, "main", "deploy.responses.me.abc").to_json()
        req = hd.DeployRequest.parse(self.request(follow=True))
        assert req.follow and hd.DeployRequest.parse(req.to_json()) == req
        with pytest.raises(hd.ProtocolError, match="invalid follow 'yes': must be true") as e:
            hd.DeployRequest.parse(self.request(follow="yes"))
        assert e.value.reply_to == "deploy.responses.me.abc"

    def test_deploy_output_is_redacted_clipped_and_keeps_the_last_2_mib(self):
        sent: list[list[str]] = []
        with hd.DeployOutput(sent.append) as output:
            output.line("x" * 1000)
            output.line("git+https://alice:hunter2@git.example.com/c.git")
        assert sent == [["x" * 497 + "...", "git+https://alice:***@git.example.com/c.git"]]
        kept = hd.DeployOutput(None)
        for i in range(3000):
            kept.line(f"{i:04d} " + "y" * 1000)
        lines = kept.lines()
        assert lines[0] == f"[the first {3000 - len(lines) + 1} line(s) are not kept: a log keeps the last 2 MiB]"
        assert lines[-1].startswith("2999 ") and sum(len(line) + 1 for line in lines[1:]) <= 2 * 1024 * 1024
        assert 2 * 1024 * 1024 - sum(len(line) + 1 for line in lines[1:]) < 1006  # one line fewer would not fit

    def test_refs_outside_branches_and_tags_need_the_opt_in(self):
        for revision in ("main", "refs/heads/main", "refs/tags/v1", "0" * 40):
            assert hd.DeployRequest.parse(self.request(revision=revision)).revision == revision
        with pytest.raises(hd.ProtocolError) as e:
            hd.DeployRequest.parse(self.request(revision="refs/pull/1/head"))
        assert e.value.code is hd.ErrorCode.INVALID_REVISION and e.value.reply_to == "deploy.responses.me.abc"
        assert "outside branches and tags" in str(e.value) and "start the listener with --allow-any-ref" in str(e.value)
        assert (
            hd.DeployRequest.parse(self.request(revision="refs/pull/1/head"), allow_any_ref=True).revision
            == "refs/pull/1/head"
        )

    def test_expires_in_is_optional_and_a_positive_number(self):
        assert hd.DeployRequest.parse(self.request()).expires_in is None
        req = hd.DeployRequest.parse(self.request(expires_in=1.5))
        assert req.expires_in == 1.5 and json.loads(req.to_json())["expires_in"] == 1.5
        assert "expires_in" not in json.loads(req._replace(expires_in=None).to_json())  # as the Go tool sends it
        for bad in (0, -1, True, "1", [1], float("inf"), float("nan")):
            with pytest.raises(hd.ProtocolError) as e:
                hd.DeployRequest.parse(self.request(expires_in=bad))
            assert e.value.code is None and e.value.reply_to == "deploy.responses.me.abc"
            assert "invalid expires_in" in str(e.value) and "a number greater than 0" in str(e.value)

    def test_reboot_request_has_no_action_or_revision_and_now_is_a_boolean(self):
        reply_to = "deploy.responses.me.abc"
        for now in (False, True):
            req = hd.DeployRequest(hd.Action.REBOOT, "", reply_to, 1.0, now=now)
            assert json.loads(req.to_json()) == {"reboot": True, "reply_to": reply_to, "expires_in": 1.0} | (
                {"now": True} if now else {}
            )
            assert hd.DeployRequest.parse(req.to_json()) == req
        for bad in (
            {"reboot": "yes"},
            {"reboot": False},
            {"reboot": True, "action": "switch"},
            {"reboot": True, "revision": "main"},
            {"reboot": True, "now": 1},
        ):
            with pytest.raises(hd.ProtocolError) as e:
                hd.DeployRequest.parse(json.dumps({"reply_to": reply_to, **bad}).encode())
            assert e.value.code is hd.ErrorCode.INVALID_ACTION and e.value.reply_to == reply_to, bad
        # "reboot" stays an invalid `action` (HOSTILE_ACTIONS): only the reboot field asks for one
        assert "reboot" not in hd.REBUILD_ACTIONS

    @pytest.mark.parametrize("action", HOSTILE_ACTIONS)
    def test_hostile_action_is_invalid_action(self, action):
        with pytest.raises(hd.ProtocolError) as e:
            hd.DeployRequest.parse(self.request(action=action))
        assert e.value.code is hd.ErrorCode.INVALID_ACTION

    @pytest.mark.parametrize(
        "reply_to",
        [
            "deploy.test.all",
            "build.responses.x",
            "deploy.responses.",
            "deploy.responses.a.b.c",
            "deploy.responses.>",
            "deploy.responses.*",
            "x",
            None,
            5,
        ],
    )
    def test_reply_to_outside_responses_is_unanswerable(self, reply_to):
        with pytest.raises(hd.ProtocolError) as e:
            hd.DeployRequest.parse(self.request(reply_to=reply_to))
        assert e.value.reply_to is None

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"not json",
            b"\xff\xfe",
            b"[1,2]",
            b'"s"',
            b"null",
            b"{" * 10000,
            b'{"a":' + b" " * (hd.MAX_MESSAGE_BYTES + 1) + b"1}",
        ],
    )
    def test_malformed_messages(self, data):
        with pytest.raises(hd.ProtocolError) as e:
            hd.DeployRequest.parse(data)
        assert e.value.reply_to is None

    def test_response_round_trip_uses_spec_field_names(self):
        response = hd.DeployResponse("myhost", hd.Status.COMPLETED, None, "Successfully switched to generation 42")
        d = response.to_dict()
        assert d == {
            "hostname": "myhost",
            "status": "completed",
            "error": None,
            "message": "Successfully switched to generation 42",
        }
        assert hd.DeployResponse.parse(json.dumps(d).encode()) == response

    @pytest.mark.parametrize(
        "parse,answer,problem",
        [
            (
                hd.DeployResponse.parse,
                {"hostname": "h1", "status": "completed", "duration_seconds": "soon"},
                "malformed deploy answer: duration_seconds is 'soon', not a number",
            ),
            (
                hd.HostInfo.parse,
                {"hostname": "h1", "tier": "test", "role": 5, "deploy_subjects": []},
                "malformed discovery answer: role is 5, not a valid role",
            ),
            (
                hd.BuildResponse.parse,
                {"status": "failed", "results": [{"host": "h1", "success": "no"}]},
                "malformed build result: success is 'no', not true or false",
            ),
        ],
    )
    def test_malformed_answers_are_protocol_errors(self, parse, answer, problem):
        """The answers of issue 13 that crashed the clients: a ProtocolError, which collect_answers logs and skips."""
        with pytest.raises(hd.ProtocolError) as e:
            parse(json.dumps(answer).encode())
        assert str(e.value).startswith(problem)

    def test_answers_may_be_as_large_as_the_server_allows(self):
        """Requests stay capped at 64 KiB; answers are read up to the limit a client passes (its connection's
        max_payload), their texts and output cut to the bounds."""
        answer = json.dumps(
            {
                "hostname": "h1",
                "status": "failed",
                "error": "build_failed",
                "message": "m" * 100_000,
                "output": ["o" * 1000] * 100,
            }
        ).encode()
        request = self.request(padding="x" * hd.MAX_MESSAGE_BYTES)
        for data, parse in ((answer, hd.DeployResponse.parse), (request, hd.DeployRequest.parse)):
            with pytest.raises(hd.ProtocolError, match=f"exceeds the {hd.MAX_MESSAGE_BYTES}-byte limit"):
                parse(data)
        response = hd.DeployResponse.parse(answer, 1024 * 1024)
        assert response.message == "m" * (hd.ANSWER_TEXT_CHARS - 3) + "..."
        assert response.output == ["o" * (hd.OUTPUT_LINE_CHARS - 3) + "..."] * hd.OUTPUT_TAIL_LINES


class TestCommandLine:
    def test_exit_codes_are_the_documented_ones(self):
        """hd.Exit is docs/cli.md's exit-code table, code for code."""
        import re

        table = (REPO / "docs" / "cli.md").read_text().partition("Exit codes, the same for every client command")[2]
        documented = [int(code) for code in re.findall(r"^\| `(\d+)` \|", table.partition("\n\n\n")[0], re.M)]
        assert documented == [code.value for code in hd.Exit] and len(documented) >= 7

    def test_client_errors_are_printed_in_one_place(self):
        """Client commands raise CommandError (or NatsError): from the clients section on, only main() prints
        `error: ...`, and env_default, which runs while the parser is built, before main() can catch anything."""
        import ast

        source = (REPO / "homelab_deploy.py").read_text()
        clients = source[: source.index("\n# " + "-" * 64 + " clients\n")].count("\n") + 1
        printers = {
            function.name
            for function in ast.walk(ast.parse(source))
            if isinstance(function, ast.FunctionDef) and function.lineno > clients
            for call in ast.walk(function)
            if isinstance(call, ast.Call)
            and call.args
            and getattr(call.func, "id", None) == "print"
            and ast.unparse(call.args[0]).lstrip("f").strip("'\"").startswith("error:")
        }
        assert printers == {"env_default", "main"}

    def test_deploy_exit_is_the_outcome_table(self):
        done, failed, running, skipped = (
            hd.DeployResponse(f"h{i}", status)
            for i, status in enumerate((hd.Status.COMPLETED, hd.Status.FAILED, hd.Status.STARTED, hd.Status.SKIPPED))
        )
        assert hd.deploy_exit([]) is hd.Exit.NO_ANSWER and hd.deploy_exit([done]) is hd.Exit.OK
        assert [hd.deploy_exit([done, other]) for other in (failed, running, skipped)] == [hd.Exit.FAILED] * 3

    def test_a_command_ends_without_teardown_and_with_all_its_output(self, tmp_path):
        """main() of the whole process flushes stdout and ends at once (os._exit: no interpreter teardown): the
        output arrives whole, and an output that could not be written is an error, not a success."""
        seed = tmp_path / "deployer.seed"
        assert run_cli("keygen", "--out", str(seed)).returncode == 0
        public = hd.public_key_of(str(seed))
        r = run_cli("keygen", "--pubout", "--in", str(seed))
        assert (r.returncode, r.stdout, r.stderr) == (0, public + "\n", "")
        read, write = os.pipe()
        os.close(read)  # a reader that went away, like `| head` done reading
        buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # written at the end, by main()
        with os.fdopen(write, "wb") as out:
            r = subprocess.run(
                [*helpers.PROGRAM, "keygen", "--pubout", "--in", str(seed)],
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                env=buffered,
            )
        assert (r.returncode, r.stderr) == (1, "error: the output was not all written (Broken pipe)\n")
        r = subprocess.run(  # descriptor 1 closed: Python has no sys.stdout, and print() writes nothing
            [*helpers.PROGRAM, "keygen", "--pubout", "--in", str(seed)],
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.close(1),
        )
        assert (r.returncode, r.stderr) == (0, "")

    def test_a_command_error_is_one_line_and_its_code(self, tmp_path, capsys):
        (tmp_path / "fleet.yaml").write_text("hosts: [1]\n")
        assert hd.main(["nats-config", str(tmp_path / "fleet.yaml")]) == hd.Exit.USAGE == 2
        assert capsys.readouterr().err == f"error: {tmp_path / 'fleet.yaml'}: hosts[0]: each entry must be a mapping\n"
        assert hd.main(["keygen"]) == 2
        assert capsys.readouterr().err == (
            "error: use `keygen --out FILE` to write a new seed, or `keygen --pubout --in FILE`\n"
        )

    def test_ref(self):
        assert hd.rebuild_argv(hd.Action.SWITCH, "git+https://g.example/c.git", "main", "web1") == [
            "nixos-rebuild",
            "switch",
            "--refresh",
            "--flake",
            "git+https://g.example/c.git?ref=main#web1",
        ]

    def test_commit_uses_rev(self):
        rev = "0123456789abcdef0123456789abcdef01234567"
        assert (
            hd.rebuild_argv(hd.Action.BOOT, "git+https://g.example/c.git", rev, "web1")[-1]
            == f"git+https://g.example/c.git?rev={rev}#web1"
        )

    def test_url_with_query(self):
        assert (
            hd.rebuild_argv(hd.Action.TEST, "git+https://g.example/c.git?dir=hosts", "feat/x", "web1")[-1]
            == "git+https://g.example/c.git?dir=hosts&ref=feat/x#web1"
        )

    def test_subject_templates(self):
        assert hd.expand_subjects(list(hd.DEFAULT_SUBJECTS), "h1", "prod", "dns") == [
            "deploy.prod.h1",
            "deploy.prod.all",
            "deploy.prod.role.dns",
        ]
        assert hd.expand_subjects(list(hd.DEFAULT_SUBJECTS), "h1", "test", None) == [
            "deploy.test.h1",
            "deploy.test.all",
        ]
        assert hd.expand_subjects(["site.<tier>.<hostname>.x"], "h1", "test", None) == ["site.test.h1.x"]
        with pytest.raises(ValueError):
            hd.expand_subjects(["deploy.<tier>.<nope>"], "h1", "test", None)

    def test_deploy_target(self, monkeypatch):
        """A deploy subject of a known tier, or an alias (which may name any subject, such as a listener's own
        --deploy-subject); anything else is a ValueError naming what was looked for (issue 15: `deploy prod-web`
        was sent as a subject and came back as "permission denied")."""
        monkeypatch.setenv("HOMELAB_DEPLOY_ALIAS_PROD_DNS", "deploy.prod.role.dns")
        monkeypatch.setenv("HOMELAB_DEPLOY_ALIAS_SITE", "site.test.h1")
        assert hd.resolve_target("prod-dns") == "deploy.prod.role.dns"
        assert hd.resolve_target("site") == "site.test.h1"
        for subject in ("deploy.test.all", "deploy.prod.h1", "deploy.test.role.dns", "deploy.prod.role"):
            assert hd.resolve_target(subject) == subject
        for target, message in [
            (
                "prod-web",
                "'prod-web' is neither a deploy subject (deploy.<test|prod>.<host>, "
                "deploy.<test|prod>.all or deploy.<test|prod>.role.<role>) nor an alias: "
                "$HOMELAB_DEPLOY_ALIAS_PROD_WEB is not set",
            ),
            ("deploy.staging.all", "'deploy.staging.all' is not a deploy subject: use deploy.<test|prod>.<host>"),
            ("deploy.test", "is not a deploy subject"),
            ("deploy.test.role.dns.x", "is not a deploy subject"),
            ("deploy.test.*", "is not a deploy subject"),
            ("deploy.responses.x", "is not a deploy subject"),
        ]:
            with pytest.raises(ValueError) as error:
                hd.resolve_target(target)
            assert message in str(error.value), target
        monkeypatch.setenv("HOMELAB_DEPLOY_ALIAS_PROD_DNS", "deploy.prod.role.dns ")
        with pytest.raises(ValueError, match=r"\$HOMELAB_DEPLOY_ALIAS_PROD_DNS is .* not a NATS subject"):
            hd.resolve_target("prod-dns")

    @pytest.mark.parametrize("command", ["deploy", "build"])
    def test_branch_help_says_tag_or_commit(self, command, capsys):
        with pytest.raises(SystemExit):
            hd.build_parser().parse_args([command, "--help"])
        assert "git branch, tag or commit" in " ".join(capsys.readouterr().out.split())

    @pytest.mark.parametrize("daemon", ["listener", "builder"])
    def test_metrics_without_prometheus_client(self, daemon, tmp_path):
        """The drop-in script on a host without prometheus-client: exit 2 naming the package and the fix, no
        traceback (the import is shadowed by a module that raises as a missing one does)."""
        (tmp_path / "shadow").mkdir()
        (tmp_path / "shadow" / "prometheus_client.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'prometheus_client'\", name='prometheus_client')\n"
        )
        (tmp_path / "builder.yaml").write_text("repos: {fleet: {url: 'git+https://git.example.com/fleet.git'}}\n")
        flags = {
            "listener": [
                "--hostname",
                "h1",
                "--tier",
                "test",
                "--flake-url",
                "git+https://g.example/c.git",
                "--state-dir",
                str(tmp_path / "state"),
            ],
            "builder": ["--config", str(tmp_path / "builder.yaml")],
        }[daemon]
        r = run_cli(
            daemon,
            *flags,
            "--nats-url",
            "nats://127.0.0.1:1",
            "--nkey-file",
            str(tmp_path / "k.seed"),
            "--metrics-enabled",
            env={"PYTHONPATH": str(tmp_path / "shadow")},
            timeout=30,
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert (
            "error: --metrics-enabled needs the Python package prometheus-client (No module named "
            "'prometheus_client'); install it (pip install prometheus-client) or leave out --metrics-enabled"
            in r.stderr
        )


class TestProgress:
    def test_terminal_without_a_width_gets_whole_lines(self):
        """A terminal that reports 0 columns (a fresh pty does) cut the last character of every redrawn line."""
        import pty

        master, replica = pty.openpty()
        assert os.get_terminal_size(replica).columns == 0
        with open(replica, "w") as stream, open(master, "rb", buffering=0) as screen:
            progress = hd.Progress(stream)
            progress.event("testhost1: started - running nixos-rebuild", final=False)
            progress.event("testhost1: completed - Successfully switched to generation 42", final=True)
            shown = b""
            while b"generation 42" not in shown:
                shown += screen.read(4096)
        assert b"\r\x1b[Ktesthost1: started - running nixos-rebuild\r\x1b[K" in shown

    def test_generation_from_profile(self, tmp_path):
        (tmp_path / "system").symlink_to("system-42-link")
        assert hd.current_generation(str(tmp_path / "system")) == 42
        assert hd.current_generation(str(tmp_path / "missing")) is None

    def test_run_with_timeout_kills_process_group(self, tmp_path):
        pidfile = tmp_path / "pid"
        result = hd.run_with_timeout(["sh", "-c", f"sleep 3600 & echo $! > {pidfile}; echo waiting; wait"], 0.5)
        assert result.timed_out and result.output == ["waiting"]
        grandchild = int(pidfile.read_text())
        wait_for(
            lambda: (
                not os.path.exists(f"/proc/{grandchild}") or open(f"/proc/{grandchild}/stat").read().split()[2] == "Z"
            ),
            what="grandchild to die",
        )

    def test_run_missing_program(self):
        result = hd.run_with_timeout(["/nonexistent/nixos-rebuild"], 5)
        assert result.returncode is None and "cannot run" in result.output[0]

    def test_run_with_timeout_keeps_lines_and_apart_stdout(self):
        result = hd.run_with_timeout(["sh", "-c", "printf 'one\\ntwo\\nthree'"], 30)
        assert (result.returncode, result.output) == (0, ["one", "two", "three"])  # the last line lacks its newline
        result = hd.run_with_timeout(
            ["sh", "-c", "echo '{\"a\": 1}'; echo warning >&2; exit 3"], 30, capture_stdout=True
        )
        assert (result.returncode, result.stdout, result.output) == (3, b'{"a": 1}\n', ["warning"])
        result = hd.run_with_timeout(["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x; echo; echo end"], 30)
        assert result.output == ["x" * hd.OUTPUT_LINE_CHARS, "end"]  # more than a pipe holds, read as it comes

    def test_run_with_timeout_calls_every_interval_in_the_calling_thread(self, tmp_path):
        flag, calls = tmp_path / "ticked", []

        def tick(running: float) -> None:
            calls.append((running, threading.current_thread(), threading.active_count()))
            flag.touch()

        threads = threading.active_count()
        result = hd.run_with_timeout(["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done"], 60, every=(0.1, tick))
        assert result.returncode == 0 and calls  # the child ends only once a tick came
        assert all(
            running >= 0.1 and thread is threading.current_thread() and count == threads
            for running, thread, count in calls
        )

    def test_run_with_timeout_returns_when_a_grandchild_keeps_the_pipe(self, tmp_path):
        pidfile = tmp_path / "pid"
        result = hd.run_with_timeout(["sh", "-c", f"sleep 3600 & echo $! > {pidfile}; echo started"], 60)
        grandchild = int(pidfile.read_text())
        try:
            assert (result.returncode, result.timed_out, result.output) == (0, False, ["started"])
            assert os.path.exists(f"/proc/{grandchild}")  # it held the pipe open all along
        finally:
            os.kill(grandchild, signal.SIGKILL)


# ---------------------------------------------------------------- listener and deploy over NATS


def responses(bus, subject: str, request: dict, until_final: int = 1, timeout: float = 30) -> list[dict]:
    """Publish a raw request with a fresh reply subject; collect decoded replies until `until_final` final ones."""
    reply_to = hd.new_reply_subject("deploy", bus.public_key)
    q = bus.inbox(hd.answer_subject(request.get("reply_to", reply_to), "*"))
    bus.publish(subject, json.dumps({**request, "reply_to": request.get("reply_to", reply_to)}).encode(), confirm=True)
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while sum(r["status"] in ("completed", "failed", "rejected") for r in got) < until_final:
        assert time.monotonic() < deadline, f"no final reply, got {got}"
        try:
            got.append(json.loads(q.get(timeout=0.1)[1]))
        except queue.Empty:
            pass
    return got


@pytest.mark.integration
class TestBus:
    def test_answers_leave_in_order_without_waiting_for_the_loop_until_the_outbox_is_full(
        self, nats_server, bus_factory
    ):
        sender, receiver = bus_factory(nats_server, "admin"), bus_factory(nats_server, "test-deployer")
        q = receiver.inbox("deploy.responses.order.*")
        busy = threading.Event()
        sender.loop.call_soon_threadsafe(busy.wait, 30)  # the loop thread is held up, as a starved one would be
        each = hd.OUTBOX_DEPTH // 4

        def publish(name: str, count: int) -> None:
            for i in range(count):
                sender.publish(f"deploy.responses.order.{name}", str(i).encode())

        threads = [threading.Thread(target=publish, args=(name, each)) for name in "abcd"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not busy.is_set() and not any(t.is_alive() for t in threads)  # filled the outbox before the loop ran
        over = threading.Thread(target=publish, args=("e", 1))
        over.start()
        over.join(0.5)
        assert over.is_alive()  # one more waits for room (OUTBOX_WAIT is 10 s): a flood of answers is paced
        busy.set()
        over.join(30)
        assert not over.is_alive()
        got: dict[str, list[int]] = {}

        def received_all() -> bool:
            while not q.empty():
                subject, data = q.get_nowait()
                got.setdefault(subject[-1], []).append(int(data))
            return sum(map(len, got.values())) == 4 * each + 1

        wait_for(received_all, what=f"{4 * each + 1} messages")
        assert got == {**{name: list(range(each)) for name in "abcd"}, "e": [0]}  # each publisher's, in its order

    def test_close_releases_a_publisher_waiting_for_room(self, nats_server, bus_factory):
        bus = bus_factory(nats_server, "admin")
        busy = threading.Event()
        bus.loop.call_soon_threadsafe(busy.wait, 30)  # the outbox cannot drain
        for _ in range(hd.OUTBOX_DEPTH):
            bus.publish("deploy.responses.full.x", b"{}")
        waiting = threading.Thread(target=bus.publish, args=("deploy.responses.full.x", b"{}"))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()
        closing = threading.Thread(target=bus.close)
        closing.start()
        try:
            waiting.join(5)  # OUTBOX_WAIT is 10 s: returning sooner means close() released it
            assert not waiting.is_alive()
        finally:
            busy.set()
            closing.join(30)

    def test_inline_handles_a_burst_up_to_its_rate_on_the_loop_and_the_rest_on_the_lane(self, nats_server, bus_factory):
        """Queries are answered on the event loop (no thread hop: one turn of a busy machine's CPU), at most
        `inline` a second; a flood's surplus goes to the bounded lane. An inline handler's answer never waits for
        the outbox it is the one to empty."""
        bus, sender = bus_factory(nats_server, "admin"), bus_factory(nats_server, "admin")
        answers = sender.inbox("deploy.responses.inline.*")
        threads: list[tuple[int, str]] = []

        def handler(subject: str, data: bytes, received: float) -> None:
            threads.append((int(data), threading.current_thread().name))
            bus.publish(f"deploy.responses.inline.{int(data)}", data)

        bus.subscribe("deploy.inline", handler, inline=2)
        with bus.outbox_room:  # a full outbox, as a flood of answers leaves it
            bus.outbox.extend([("deploy.responses.inline.fill", b"-1")] * hd.OUTBOX_DEPTH)
            bus.sending = True  # the loop drains it only once it is woken
        start = time.monotonic()
        for i in range(10):
            sender.publish("deploy.inline", str(i).encode())
        sender.round_trip()
        # an inline handler waiting for room would hold the loop, and the messages after it, for OUTBOX_WAIT (10 s)
        wait_for(lambda: len(threads) == 10, hd.OUTBOX_WAIT / 2, what="10 messages handled")
        elapsed = time.monotonic() - start
        inline = [i for i, name in threads if not name.startswith("lane-")]
        assert inline[:2] == [0, 1] and len(inline) <= 2 + 2 * elapsed + 1, (threads, elapsed)
        assert {name for i, name in threads if i not in inline} and all(
            name.startswith("lane-deploy.inline") for i, name in threads if i not in inline
        )
        bus.loop.call_soon_threadsafe(lambda: bus.loop.create_task(bus._send()))
        wait_for(lambda: answers.qsize() >= hd.OUTBOX_DEPTH + 10, what="every answer sent")

    def test_front_answers_what_callers_asked_nats_py_for(self, nats_server, bus_factory):
        bus = bus_factory(nats_server, "admin")
        bus.round_trip()
        assert bus.connected and not bus.closed and bus.max_payload == 1024 * 1024  # nats-server's default
        bus.close()
        assert bus.closed and not bus.connected

    def test_nothing_outside_bus_reaches_into_nats_py(self):
        """Only Bus holds the nats-py connection (`.nc`) and calls its private helpers (`._call`)."""
        import ast

        for path in (REPO / "homelab_deploy.py", REPO / "homelab_deploy_mcp.py"):
            tree = ast.parse(path.read_text())
            inside = {
                id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "Bus" for n in ast.walk(c)
            }
            reached = [
                f"{path.name}:{n.lineno}"
                for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and n.attr in ("nc", "_call") and id(n) not in inside
            ]
            assert reached == []


class TestNeedsReboot:
    """needs_reboot compares the resolved kernel, initrd and kernel-modules links of the booted system and the
    system profile: temp directories of symlinks stand for both."""

    def test_true_exactly_when_a_link_resolves_elsewhere(self, tmp_path):
        booted = helpers.fake_system(tmp_path / "booted")
        assert hd.needs_reboot(str(booted), str(booted)) is False
        same = helpers.fake_system(tmp_path / "same")  # other links, the same store paths
        assert hd.needs_reboot(str(booted), str(same)) is False
        for link in ("kernel", "initrd", "modules"):
            other = helpers.fake_system(tmp_path / f"new-{link}", **{link: "new"})
            assert hd.needs_reboot(str(booted), str(other)) is True, link

    def test_links_are_resolved_through_the_profile_and_a_missing_link_counts_only_when_missing_in_one(self, tmp_path):
        system = helpers.fake_system(tmp_path / "system-1-link")
        profile = tmp_path / "system"
        profile.symlink_to("system-1-link")  # as the system profile points at its generation
        booted = tmp_path / "booted-system"
        booted.symlink_to(system)
        assert hd.needs_reboot(str(booted), str(profile)) is False
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty2").mkdir()
        assert hd.needs_reboot(str(tmp_path / "empty"), str(tmp_path / "empty2")) is False
        assert hd.needs_reboot(str(tmp_path / "empty"), str(profile)) is True
        assert hd.needs_reboot(str(booted), str(tmp_path / "nowhere")) is True
        (system / "initrd").unlink()
        assert hd.needs_reboot(str(booted), str(profile)) is False  # one system: missing from both


class TestMaintenanceWindows:
    """next_window on its own: host local time as naive datetimes (2026-12-05 is a Saturday)."""

    def at(self, day: int, hour: int, minute: int = 0):
        import datetime

        return datetime.datetime(2026, 12, day, hour, minute)

    def test_inside_is_none_outside_is_the_next_opening(self):
        saturday = [hd.MaintenanceWindow.parse("Sat 02:00-05:00")]
        assert hd.next_window(saturday, self.at(5, 2)) is None
        assert hd.next_window(saturday, self.at(5, 4, 59)) is None
        assert hd.next_window(saturday, self.at(5, 5)) == self.at(12, 2)  # its end is outside: a week later
        assert hd.next_window(saturday, self.at(4, 23)) == self.at(5, 2)
        assert hd.next_window(saturday, self.at(6, 3)) == self.at(12, 2)

    def test_past_midnight_whole_days_and_the_earliest_of_several(self):
        night = [hd.MaintenanceWindow.parse("daily 22:00-02:00")]
        assert hd.next_window(night, self.at(6, 1, 30)) is None  # yesterday's window, still open
        assert hd.next_window(night, self.at(6, 2)) == self.at(6, 22)
        assert hd.next_window([hd.MaintenanceWindow.parse("Sun 00:00-24:00")], self.at(6, 23, 59)) is None
        both = [hd.MaintenanceWindow.parse(w) for w in ("Sat 02:00-05:00", "daily 03:00-04:00")]
        assert hd.next_window(both, self.at(5, 6)) == self.at(6, 3)
        assert hd.next_window([], self.at(5, 6)) is None  # no windows: reboots run at once

    @pytest.mark.parametrize(
        "spec",
        [
            "Sat 2:00-05:00",
            "sat 02:00-05:00",
            "weekly 02:00-03:00",
            "daily 05:00-05:00",
            "daily 24:00-01:00",
            "Sat 02:00-24:30",
            "daily 03:00-04:00 ",
            "daily 03:60-04:00",
            "",
        ],
    )
    def test_a_bad_spec_stops_the_listener_at_start_naming_the_format(self, spec):
        with pytest.raises(ValueError, match="must be DAY HH:MM-HH:MM in the host's local time"):
            hd.ListenerConfig(
                "h1", "test", "git+https://g.example/c.git", maintenance_windows=("daily 03:00-04:00", spec)
            )


@pytest.mark.integration
class TestListenerConfig:
    """Issue 27: a listener is built from a checked, frozen ListenerConfig record; nothing needs the CLI parser."""

    FLAKE = "git+https://g.example/c.git"

    def test_from_args_is_the_record_built_directly(self):
        args = hd.build_parser().parse_args(
            [
                "listener",
                "--hostname",
                "web1",
                "--tier",
                "prod",
                "--role",
                "web",
                "--flake-url",
                self.FLAKE,
                "--nats-url",
                "nats://127.0.0.1:1",
                "--nkey-file",
                "k",
                "--state-dir",
                "/srv/state",
                "--trusted-key",
                "UKEY=ci",
                "--trusted-keys-file",
                "keys",
                "--rollback-timeout",
                "30",
            ]
        )
        config = hd.ListenerConfig.from_args(args)
        assert config == hd.ListenerConfig(
            "web1",
            "prod",
            self.FLAKE,
            role="web",
            state_dir="/srv/state",
            trusted_keys=("UKEY=ci",),
            trusted_keys_files=("keys",),
            rollback_timeout=30,
        )
        assert config.subjects == ("deploy.prod.web1", "deploy.prod.all", "deploy.prod.role.web")
        with pytest.raises(AttributeError):  # frozen: a running listener's configuration does not change
            config.timeout = 1  # type: ignore[misc]

    @pytest.mark.parametrize(
        "field, value, message",
        [
            ("hostname", "web1.example", "--hostname 'web1.example' must be one NATS subject token"),
            ("hostname", None, "--hostname None must be one NATS subject token"),
            ("role", "dns.*", "--role 'dns.*' must be one NATS subject token"),
            ("tier", "staging", "--tier 'staging' must be one of test, prod"),
            ("flake_url", "git+https://g.example/c.git?ref=main", "must be a flake URL without '#'"),
            ("timeout", 0, "--timeout and --heartbeat-interval must be positive"),
            ("heartbeat_interval", -1.0, "--timeout and --heartbeat-interval must be positive"),
            ("shutdown_grace", -1.0, "--shutdown-grace not negative"),
            ("rollback_timeout", float("nan"), "--rollback-timeout a finite number of seconds"),
            ("discover_subject", "deploy.>", "--discover-subject 'deploy.>' is not a valid NATS subject"),
            ("deploy_subjects", ("deploy.<tier>.<host>",), "which is not a valid NATS subject"),
        ],
    )
    def test_bad_values_are_refused_naming_the_flag(self, field, value, message):
        with pytest.raises(ValueError) as e:
            hd.ListenerConfig(**{"hostname": "h1", "tier": "test", "flake_url": self.FLAKE, field: value})
        assert message in str(e.value)


class TestListener:
    def test_deploy_sequence_argv_and_generation(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        bus = bus_factory(nats_server, "test-deployer")
        got = responses(bus, "deploy.test.testhost1", {"action": "switch", "revision": "main"})
        assert [r["status"] for r in got] == ["accepted", "started", "completed"]
        assert all(set(r) >= {"hostname", "status", "error", "message"} and r["hostname"] == "testhost1" for r in got)
        assert got[-1]["error"] is None and got[-1]["message"] == "Successfully switched to generation 1"
        assert host.standin.calls == [
            ["switch", "--refresh", "--flake", "git+https://git.example.com/cfg.git?ref=main#testhost1"]
        ]
        got = responses(bus, "deploy.test.testhost1", {"action": "boot", "revision": "0" * 40})
        assert "generation 2" in got[-1]["message"]
        assert host.standin.calls[-1][-1] == f"git+https://git.example.com/cfg.git?rev={'0' * 40}#testhost1"

    def test_flake_url_with_query(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--flake-url", "git+https://g.example/c.git?dir=nixos")
        got = responses(
            bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1", {"action": "test", "revision": "v1.0"}
        )
        assert got[-1]["status"] == "completed"
        assert host.standin.calls == [
            ["test", "--refresh", "--flake", "git+https://g.example/c.git?dir=nixos&ref=v1.0#testhost1"]
        ]

    @pytest.mark.parametrize(
        "url", ["git+https://g.example/c.git?ref=main", "git+https://g.example/c.git?dir=x&r%65v=1"]
    )
    def test_flake_url_with_its_own_ref_is_refused_at_start(self, start_listener, url):
        """nix takes the first ref= of `<url>?ref=main&ref=<requested>`: the listener would report a revision it
        did not deploy."""
        host = start_listener("testhost1", "test", None, "--flake-url", url, expect_ready=False)
        assert host.proc.returncode == 1
        assert (
            f"error: --flake-url {url!r} must be a flake URL without '#', whitespace, ref= or rev=" in host.log_text()
        )
        assert host.standin.calls == []

    def test_refs_outside_branches_and_tags_need_allow_any_ref(self, nats_server, start_listener, bus_factory):
        strict = start_listener("testhost1", "test")
        trusting = start_listener("testhost2", "test", "web", "--allow-any-ref")
        bus = bus_factory(nats_server, "test-deployer")
        got = responses(bus, "deploy.test.testhost1", {"action": "test", "revision": "refs/pull/1/head"})
        assert [(r["status"], r["error"]) for r in got] == [("rejected", "invalid_revision")]
        assert "start the listener with --allow-any-ref" in got[0]["message"]
        for revision in ("refs/heads/main", "refs/tags/v1.0"):
            got = responses(bus, "deploy.test.testhost1", {"action": "test", "revision": revision})
            assert got[-1]["status"] == "completed", got
        assert [call[-1] for call in strict.standin.calls] == [
            "git+https://git.example.com/cfg.git?ref=refs/heads/main#testhost1",
            "git+https://git.example.com/cfg.git?ref=refs/tags/v1.0#testhost1",
        ]
        got = responses(bus, "deploy.test.testhost2", {"action": "test", "revision": "refs/pull/1/head"})
        assert got[-1]["status"] == "completed", got
        assert trusting.standin.calls[-1][-1] == "git+https://git.example.com/cfg.git?ref=refs/pull/1/head#testhost2"

    def test_failure_reports_build_failed_with_output(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        host.standin.set_mode("fail")
        got = responses(
            bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1", {"action": "switch", "revision": "main"}
        )
        final = got[-1]
        assert final["status"] == "failed" and final["error"] == "build_failed"
        assert "exit code 1" in final["message"] and "failed with exit code 1" in final["message"]
        assert any("builder for" in line for line in final["output"])

    def test_failure_message_names_nix_error_line_not_its_last_line(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        host.standin.set_mode("eval-error")
        got = responses(
            bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1", {"action": "switch", "revision": "main"}
        )
        assert (got[-1]["status"], got[-1]["error"]) == ("failed", "build_failed")
        assert got[-1]["message"] == "nixos-rebuild switch failed (exit code 1): error: undefined variable 'nginxx'"
        assert got[-1]["output"][-1] == "(use '--show-trace' to show detailed location information)"

    def test_hostile_requests_rejected_and_nothing_runs(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        bus = bus_factory(nats_server, "test-deployer")
        for revision in HOSTILE_REVISIONS:
            got = responses(bus, "deploy.test.testhost1", {"action": "switch", "revision": revision})
            assert [(r["status"], r["error"]) for r in got] == [("rejected", "invalid_revision")], revision
        for action in HOSTILE_ACTIONS:
            got = responses(bus, "deploy.test.testhost1", {"action": action, "revision": "main"})
            assert [(r["status"], r["error"]) for r in got] == [("rejected", "invalid_action")], action
        assert host.standin.calls == []
        assert host.proc.poll() is None

    def test_malformed_and_misdirected_messages_ignored(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        admin = bus_factory(nats_server, "admin")
        spy = admin.inbox("deploy.test.testhost2")  # where a hostile reply_to points
        for payload in [
            b"",
            b"garbage",
            b"\xff" * 100,
            b"[]",
            b"x" * (hd.MAX_MESSAGE_BYTES + 10),
            json.dumps({"action": "switch", "revision": "main", "reply_to": "deploy.test.testhost2"}).encode(),
        ]:
            admin.publish("deploy.test.testhost1", payload, confirm=True)
        wait_for(lambda: host.log_text().count("rejected:") >= 6, what="six rejections logged")
        got = responses(admin, "deploy.test.testhost1", {"action": "switch", "revision": "main"})
        assert got[-1]["status"] == "completed"  # still alive and working
        assert spy.empty() and len(host.standin.calls) == 1

    def test_already_running(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        host.standin.set_mode("block")
        bus = bus_factory(nats_server, "test-deployer")
        _, first = start_deploy(bus, "deploy.test.testhost1")
        wait_for(lambda: host.standin.pids, what="the first deploy to run")
        got = responses(bus, "deploy.test.all", {"action": "boot", "revision": "main"})
        assert [(r["status"], r["error"]) for r in got] == [("rejected", "already_running")]
        assert "already running" in got[0]["message"]
        host.standin.release()
        final = wait_for(lambda: [m for m in iter_queue(first) if m["status"] == "completed"], what="first deploy done")
        assert final and len(host.standin.calls) == 1

    def test_timeout_kills_hung_process_group(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--timeout", "1")
        host.standin.set_mode("block")
        got = responses(
            bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1", {"action": "switch", "revision": "main"}
        )
        assert (got[-1]["status"], got[-1]["error"]) == ("failed", "timeout")
        for pid in host.standin.pids:  # the stand-in and its grandchild `sleep`
            wait_for(
                lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
                what=f"pid {pid} killed",
            )

    def test_heartbeats_during_long_deploy(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--heartbeat-interval", "0.2")
        host.standin.set_mode("block")
        bus = bus_factory(nats_server, "test-deployer")
        _, q = start_deploy(bus, "deploy.test.testhost1")
        seen: list[dict] = []
        wait_for(
            lambda: seen.extend(iter_queue(q)) or sum("still running" in m["message"] for m in seen) >= 2,
            what="two heartbeats",
        )
        host.standin.release()
        wait_for(lambda: seen.extend(iter_queue(q)) or seen[-1]["status"] == "completed", what="completion")

    def test_discovery(self, nats_server, start_listener, bus_factory):
        start_listener("testhost1", "test")
        start_listener("dns1", "prod", "dns")
        hosts = hd.discover_hosts(bus_factory(nats_server, "test-deployer"))
        assert [(h.hostname, h.tier, h.role, h.deploying) for h in hosts] == [
            ("dns1", "prod", "dns", False),
            ("testhost1", "test", None, False),
        ]
        assert hosts[0].deploy_subjects == ["deploy.prod.dns1", "deploy.prod.all", "deploy.prod.role.dns"]
        assert hosts[0].version == hd.__version__

    def test_metrics_before_and_after(self, nats_server, start_listener, bus_factory):
        host, port, scrape = metrics_listener(start_listener)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read() == b"ok"
        before = scrape()
        key = lambda status, action, code: (
            "homelab_deploy_deployments_total",  # noqa: E731
            (("action", action), ("error_code", code), ("status", status)),
        )
        for status in ("completed", "failed", "rejected"):
            for action in ("switch", "boot", "test", "dry-activate"):
                for code in ("", "invalid_action", "invalid_revision", "already_running", "build_failed", "timeout"):
                    assert before[key(status, action, code)] == 0
        assert before[("homelab_deploy_deployment_in_progress", ())] == 0
        assert (
            before[
                (
                    "homelab_deploy_info",
                    (("hostname", "dns1"), ("role", "dns"), ("tier", "prod"), ("version", hd.__version__)),
                )
            ]
            == 1
        )
        buckets = {dict(labels)["le"] for (name, labels) in before if name.endswith("_bucket")}
        assert {"1.0", "60.0", "600.0", "3600.0", "+Inf"} <= buckets
        admin = bus_factory(nats_server, "admin")
        responses(admin, "deploy.prod.dns1", {"action": "switch", "revision": "main"})
        responses(admin, "deploy.prod.role.dns", {"action": "boot", "revision": "bad;rev"})
        host.standin.set_mode("fail")
        responses(admin, "deploy.prod.all", {"action": "test", "revision": "main"})
        after = scrape()
        assert after[key("completed", "switch", "")] == 1
        assert after[key("rejected", "boot", "invalid_revision")] == 1
        assert after[key("failed", "test", "build_failed")] == 1
        assert (
            after[("homelab_deploy_deployment_duration_seconds_count", (("action", "switch"), ("success", "true")))]
            == 1
        )
        assert (
            after[("homelab_deploy_deployment_duration_seconds_count", (("action", "test"), ("success", "false")))] == 1
        )

    def test_last_deploy_generation_and_age_of_success_survive_a_restart(
        self, nats_server, start_listener, bus_factory
    ):
        """The issue-16 gauges: before any deploy, after a completed and a failed one, and after a restart, when
        only the history file on disk knows the end times."""
        host, _, scrape = metrics_listener(start_listener)
        ended = lambda status: (
            "homelab_deploy_last_deployment_timestamp_seconds",  # noqa: E731
            (("status", status),),
        )
        generation, since = ("homelab_deploy_generation", ()), ("homelab_deploy_seconds_since_last_success", ())
        before = scrape()
        assert (before[ended("completed")], before[ended("failed")], before[generation], before[since]) == (0, 0, 0, -1)
        admin = bus_factory(nats_server, "admin")
        first = int(time.time())  # end times are whole seconds
        assert (
            responses(admin, "deploy.prod.dns1", {"action": "switch", "revision": "main"})[-1]["status"] == "completed"
        )
        completed = scrape()
        assert first <= completed[ended("completed")] <= time.time() and completed[ended("failed")] == 0
        assert completed[generation] == 1
        assert 0 <= completed[since] and time.time() - completed[since] >= completed[ended("completed")]
        host.standin.set_mode("fail")
        second = int(time.time())
        assert responses(admin, "deploy.prod.dns1", {"action": "boot", "revision": "main"})[-1]["status"] == "failed"
        failed = scrape()
        assert second <= failed[ended("failed")] <= time.time()
        assert failed[ended("completed")] == completed[ended("completed")] and failed[generation] == 1
        assert failed[since] >= completed[since]
        host.stop()
        host.log.write_text("")  # start() waits for a new " ready " line
        host.start()
        restarted = scrape()
        assert (restarted[ended("completed")], restarted[ended("failed")], restarted[generation]) == (
            failed[ended("completed")],
            failed[ended("failed")],
            1,
        )
        assert restarted[since] >= failed[since]

    def test_subjects_all_and_role(self, nats_server, start_listener, bus_factory):
        hosts = [
            start_listener("testhost1", "test"),
            start_listener("testhost2", "test", "web"),
            start_listener("dns1", "prod", "dns"),
        ]
        admin = bus_factory(nats_server, "admin")
        got = responses(admin, "deploy.test.all", {"action": "switch", "revision": "main"}, until_final=2)
        assert sorted(r["hostname"] for r in got if r["status"] == "completed") == ["testhost1", "testhost2"]
        got = responses(admin, "deploy.prod.role.dns", {"action": "switch", "revision": "main"})
        assert [r["hostname"] for r in got] == ["dns1"] * 3
        assert [len(h.standin.calls) for h in hosts] == [1, 1, 1]


def metrics_listener(start_listener):
    """Listener dns1 serving /metrics on a free loopback port: (listener, port, scrape), where scrape() returns
    {(name, sorted label items): value}."""
    import socket

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = start_listener("dns1", "prod", "dns", "--metrics-enabled", "--metrics-addr", f"127.0.0.1:{port}")

    def scrape() -> dict:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    return host, port, scrape


# ---------------------------------------------------------------- monitoring files in contrib/

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed; apt-get install prometheus (.ci/run does)"
)


class TestMonitoringFiles:
    """contrib/'s alert rules and Grafana dashboard: valid for Prometheus, and about metrics the code exports."""

    def queries(self) -> tuple[list[str], list[str]]:
        """(the dashboard's PromQL expressions with its variables, the rules' expressions)."""
        import yaml

        dashboard = json.loads((REPO / "contrib" / "grafana-dashboard.json").read_text())
        rules = yaml.safe_load((REPO / "contrib" / "prometheus-rules.yml").read_text())
        return (
            [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
            + [v["definition"] for v in dashboard["templating"]["list"]],
            [rule["expr"] for group in rules["groups"] for rule in group["rules"]],
        )

    @needs_promtool
    def test_rules_pass_promtool_check_and_their_unit_test(self):
        for command in (["check", "rules", "prometheus-rules.yml"], ["test", "rules", "prometheus-rules.test.yml"]):
            result = subprocess.run(
                ["promtool", *command], cwd=REPO / "contrib", capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stdout + result.stderr

    @needs_promtool
    def test_dashboard_queries_are_valid_promql(self, tmp_path):
        """promtool parses PromQL only in rule files: each panel query becomes a recording rule, with Grafana's
        variables replaced by values."""
        import re

        import yaml

        panels = [e for e in self.queries()[0] if not e.startswith("label_values(")]
        (tmp_path / "dashboard.yml").write_text(
            yaml.safe_dump(
                {
                    "groups": [
                        {
                            "name": "dashboard",
                            "rules": [
                                {
                                    "record": f"dashboard:query{i}",
                                    "expr": re.sub(r"\$__\w+", "5m", e).replace("$hostname", ".*"),
                                }
                                for i, e in enumerate(panels)
                            ],
                        }
                    ]
                }
            )
        )
        result = subprocess.run(
            ["promtool", "check", "rules", "dashboard.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0 and f"{len(panels)} rules found" in result.stdout, result.stdout + result.stderr

    def test_queries_name_only_metrics_the_listener_and_builder_export(self, tmp_path):
        import re

        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
        exported = {
            family.name + suffix
            for metrics in (
                hd.ListenerMetrics("web1", "prod", "web", str(tmp_path / "system")),
                hd.BuilderMetrics(["fleet"]),
            )
            for family in metrics.registry.collect()
            for suffix in suffixes[family.type]
        }
        dashboard, rules = self.queries()
        assert all(re.search(r"homelab_deploy_[a-z_]+", e) for e in dashboard), "a dashboard query names no metric"
        named = set(re.findall(r"homelab_deploy_[a-z_]+", " ".join(dashboard + rules)))
        assert {
            "homelab_deploy_generation",
            "homelab_deploy_seconds_since_last_success",
            "homelab_deploy_last_deployment_timestamp_seconds",
            "homelab_deploy_builds_total",
        } <= named
        assert named <= exported, f"not exported: {sorted(named - exported)}"


# ---------------------------------------------------------------- deploy and list-hosts CLI


@pytest.mark.integration
class TestDeployCLI:
    def test_deploy_json_and_exit_code(self, nats_server, start_listener):
        start_listener("testhost1", "test")
        start_listener("testhost2", "test", "web")
        r = run_cli("deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer", "--json"))
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["success"] is True
        assert [(h["hostname"], h["status"], h["error"]) for h in doc["hosts"]] == [
            ("testhost1", "completed", None),
            ("testhost2", "completed", None),
        ]
        assert "2/2 hosts completed" in r.stderr
        lines = [line for line in r.stderr.splitlines() if line.startswith("testhost1:")]
        assert [line.split()[1] for line in lines] == ["accepted", "started", "completed"]

    def test_a_fan_out_checks_a_constant_number_of_statuses_per_answer(self, nats_server, bus_factory, monkeypatch):
        """1,000 hosts' answers (the admin credential answers for all of them; 1,000 listener processes are the
        benchmark's): the client checked every host's status on every answer, about 500,000 checks here."""
        fleet = [f"host{i:04d}" for i in range(1000)]
        answerer = bus_factory(nats_server, "admin")

        def answer(subject: str, data: bytes, received: float) -> None:
            reply_to = json.loads(data)["reply_to"]
            for status in (hd.Status.ACCEPTED, hd.Status.STARTED, hd.Status.COMPLETED):
                for host in fleet:
                    answerer.publish(
                        hd.answer_subject(reply_to, host),
                        json.dumps(hd.DeployResponse(host, status).to_dict()).encode(),
                    )

        answerer.subscribe("deploy.test.all", answer)
        checks, final = [], hd.Status.final
        monkeypatch.setattr(hd.Status, "final", property(lambda status: checks.append(1) or final.fget(status)))
        hosts, finished = hd.deploy_hosts(
            bus_factory(nats_server, "test-deployer"), "deploy.test.all", hd.Action.SWITCH, "main", 60, stragglers=0.2
        )
        assert finished and sorted(hosts) == fleet and {r.status for r in hosts.values()} == {hd.Status.COMPLETED}
        assert len(checks) <= 5 * 3 * len(fleet), len(checks)

    def test_env_vars_and_alias(self, nats_server, start_listener):
        host = start_listener("testhost2", "test", "web")
        env = {
            "HOMELAB_DEPLOY_NATS_URL": nats_server.url,
            "HOMELAB_DEPLOY_NKEY_FILE": str(nats_server.seeds["admin"]),
            "HOMELAB_DEPLOY_BRANCH": "release/1.2",
            "HOMELAB_DEPLOY_ACTION": "boot",
            "HOMELAB_DEPLOY_TIMEOUT": "60",
            "HOMELAB_DEPLOY_ALIAS_TEST_WEB": "deploy.test.role.web",
        }
        r = run_cli("deploy", "test-web", env=env)
        assert r.returncode == 0, r.stderr
        assert host.standin.calls == [
            ["boot", "--refresh", "--flake", "git+https://git.example.com/cfg.git?ref=release/1.2#testhost2"]
        ]

    def test_failed_host_gives_nonzero_exit(self, nats_server, start_listener):
        start_listener("testhost1", "test")
        start_listener("testhost2", "test", "web").standin.set_mode("fail")
        r = run_cli("deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer", "--json"))
        assert r.returncode == 1
        doc = json.loads(r.stdout)
        assert {h["hostname"]: h["status"] for h in doc["hosts"]} == {"testhost1": "completed", "testhost2": "failed"}
        assert doc["success"] is False

    def test_named_host_ends_at_its_final_status(self, nats_server, start_listener):
        """deploy.<tier>.<host> names one host: the client exits at its final status. With both windows at
        600 s, waiting on either would run into the 120 s deadline below."""
        start_listener("testhost1", "test")
        r = run_cli(
            "deploy",
            "deploy.test.testhost1",
            *deploy_args(nats_server, "test-deployer", "--answer-window", "600", "--straggler-window", "600"),
            timeout=120,
        )
        assert r.returncode == 0 and "1/1 hosts completed" in r.stderr, r.stderr

    def test_host_answering_after_the_others_finished_is_reported(self, nats_server, start_listener, bus_factory):
        """deploy.test.all reaches an unknown number of hosts. A host whose `accepted` arrives only after every
        other host finished, within --straggler-window, is waited for and reported."""
        start_listener("testhost1", "test")
        late = bus_factory(nats_server, "admin")
        finished: set[str] = set()  # reply subjects on which testhost1's final status went out

        def watch(subject: str, data: bytes, received: float) -> None:
            if json.loads(data).get("hostname") == "testhost1" and json.loads(data)["status"] == "completed":
                finished.add(subject)

        def answer_late(subject: str, data: bytes, received: float) -> None:
            reply_to = json.loads(data)["reply_to"]
            wait_for(lambda: hd.answer_subject(reply_to, "testhost1") in finished, what="testhost1 to finish")
            for status in ("accepted", "started", "completed"):
                late.publish(
                    hd.answer_subject(reply_to, "late-host"),
                    json.dumps(
                        {"hostname": "late-host", "status": status, "error": None, "message": f"late {status}"}
                    ).encode(),
                )

        late.subscribe("deploy.responses.>", watch)
        late.subscribe("deploy.test.all", answer_late)
        r = run_cli(
            "deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer", "--json", "--straggler-window", "5")
        )
        assert r.returncode == 0, r.stderr
        assert {h["hostname"]: h["status"] for h in json.loads(r.stdout)["hosts"]} == {
            "testhost1": "completed",
            "late-host": "completed",
        }
        assert "2/2 hosts completed" in r.stderr

    def test_test_deployer_cannot_deploy_to_prod(self, nats_server, start_listener):
        prod = start_listener("dns1", "prod", "dns")
        for subject in ("deploy.prod.dns1", "deploy.prod.all", "deploy.prod.role.dns"):
            r = run_cli("deploy", subject, *deploy_args(nats_server, "test-deployer"))
            assert r.returncode == 3, r.stderr
            assert "permission denied" in r.stderr and subject in r.stderr
        assert prod.standin.calls == []

    def test_unknown_target_is_refused_before_sending(self, nats_server, start_listener, bus_factory):
        """`deploy prod-web` (an alias never set) and `deploy.staging.all` (no such tier) exited 3 with "permission
        denied" after publishing; now exit 2, naming the alias variable looked for, and nothing reaches NATS."""
        host = start_listener("testhost1", "test")
        seen: list[str] = []
        bus_factory(nats_server, "admin").subscribe("deploy.>", lambda subject, data, received: seen.append(subject))
        for target, message in [
            ("prod-web", "$HOMELAB_DEPLOY_ALIAS_PROD_WEB is not set"),
            ("deploy.staging.all", "'deploy.staging.all' is not a deploy subject"),
        ]:
            r = run_cli("deploy", target, *deploy_args(nats_server, "test-deployer"))
            assert r.returncode == 2 and message in r.stderr, r.stderr
        bus_factory(nats_server, "admin").publish("deploy.test.marker", b"{}", confirm=True)
        wait_for(lambda: seen, what="the spy to see the marker")
        assert seen == ["deploy.test.marker"] and host.standin.calls == []

    def test_nobody_answers(self, nats_server):
        r = run_cli("deploy", "deploy.test.nosuchhost", *deploy_args(nats_server, "test-deployer"))
        assert r.returncode == 4 and "no host answered" in r.stderr

    def test_invalid_input_sends_nothing(self, nats_server, start_listener):
        host = start_listener("testhost1", "test")
        for extra in (["--branch", "main;id"], ["--action", "reboot"], ["--branch", "-x"]):
            r = run_cli("deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer", *extra))
            assert r.returncode == 2 and "error:" in r.stderr, extra
        r = run_cli("deploy", "deploy.test.*", *deploy_args(nats_server, "test-deployer"))
        assert r.returncode == 2
        assert host.standin.calls == []

    def test_pull_request_ref_is_left_to_the_listener(self, nats_server, start_listener):
        """The CLI cannot know a listener's --allow-any-ref: it sends any valid ref and shows the verdict."""
        host = start_listener("testhost1", "test")
        r = run_cli(
            "deploy",
            "deploy.test.testhost1",
            *deploy_args(nats_server, "test-deployer", "--branch", "refs/pull/1/head", "--json"),
        )
        assert r.returncode == 1 and "start the listener with --allow-any-ref" in r.stderr, r.stderr
        assert [(h["status"], h["error"]) for h in json.loads(r.stdout)["hosts"]] == [("rejected", "invalid_revision")]
        assert host.standin.calls == []

    def test_secrets_never_in_errors(self, nats_server):
        seed = nats_server.seeds["admin"].read_text().strip()
        password_url = nats_server.url.replace("nats://", "nats://deploy:s3cret@")
        cases = [  # (argv, environment, exit code, what stderr must say)
            (
                deploy_args(nats_server, "admin")[:2] + ["--nkey-file", seed],
                {},
                3,
                "cannot read NKey seed file <an NKey seed, redacted>: No such file or directory; "
                "pass --nkey-file the path of a file holding the seed",
            ),
            (
                deploy_args(nats_server, "admin")[:2],
                {"HOMELAB_DEPLOY_NKEY_FILE": seed},
                3,
                "cannot read NKey seed file <an NKey seed, redacted>",
            ),
            (
                ["--nats-url", "nats://deploy:s3cret@127.0.0.1:1", "--nkey-file", str(nats_server.seeds["admin"])],
                {},
                3,
                "cannot reach NATS at nats://deploy:***@127.0.0.1:1",
            ),
            (
                ["--nats-url", password_url, "--nkey-file", str(nats_server.seeds["admin"]), "--debug"],
                {},
                4,
                f"connected to NATS at deploy:***@127.0.0.1:{nats_server.port}",
            ),
        ]
        for args, env, code, message in cases:
            r = run_cli("deploy", "deploy.test.nosuchhost", *args, "--answer-window", "0.5", env=env, timeout=30)
            assert r.returncode == code and message in r.stderr, (args, env, r.stderr)
            assert seed not in r.stderr and "s3cret" not in r.stderr

    def test_connection_errors_are_clear_and_fast(self, nats_server, tmp_path):
        bad_seed = tmp_path / "bad.seed"
        bad_seed.write_text("SUNOTAVALIDSEED\n")
        cases = [
            (["--nats-url", "nats://127.0.0.1:1", "--nkey-file", str(nats_server.seeds["admin"])], "cannot reach NATS"),
            (["--nats-url", nats_server.url, "--nkey-file", str(tmp_path / "missing.seed")], "cannot read NKey seed"),
            (["--nats-url", nats_server.url, "--nkey-file", str(bad_seed)], "valid NKey user seed"),
            (
                ["--nats-url", nats_server.url, "--nkey-file", str(nats_server.stranger_seed)],
                "rejected the credentials",
            ),
        ]
        for args, message in cases:
            started = time.monotonic()
            r = run_cli("deploy", "deploy.test.all", *args, timeout=30)
            assert r.returncode == 3 and message in r.stderr, (args, r.stderr)
            assert time.monotonic() - started < 20
            seeds = [open(a).read().strip() for a in args if a.endswith(".seed") and os.path.exists(a)]
            assert not any(seed in r.stderr for seed in seeds)  # no seed material in errors

    def test_missing_required_flag(self):
        r = run_cli("deploy", "deploy.test.all", env={"HOMELAB_DEPLOY_NATS_URL": "", "HOMELAB_DEPLOY_NKEY_FILE": ""})
        assert r.returncode == 2 and "--nats-url" in r.stderr

    def test_list_hosts_and_tier_filter(self, nats_server, start_listener):
        start_listener("testhost1", "test")
        start_listener("dns1", "prod", "dns")
        r = run_cli("list-hosts", *deploy_args(nats_server, "test-deployer", "--json"))
        assert r.returncode == 0, r.stderr
        assert [h["hostname"] for h in json.loads(r.stdout)] == ["dns1", "testhost1"]
        r = run_cli("list-hosts", *deploy_args(nats_server, "test-deployer", "--tier", "prod"))
        assert r.returncode == 0
        assert "dns1" in r.stdout and "testhost1" not in r.stdout and "deploy.prod.role.dns" in r.stdout


# ------------------------------------------------------------ rollouts (deploy --canary/--batch-size/--max-failures)


class TestRolloutFlags:
    def test_batches_canary_then_sizes_of_the_plan(self):
        hosts = [hd.HostInfo(f"h{i:02}", "test", None, [], "", False) for i in range(10)]
        for rollout, sizes in [
            (hd.Rollout(1, "30%"), [1, 3, 3, 3]),
            (hd.Rollout(0, "4"), [4, 4, 2]),
            (hd.Rollout(2), [2, 8]),
            (hd.Rollout(0, "1%"), [1] * 10),
            (hd.Rollout(12, "5"), [10]),
        ]:
            batches = rollout.batches(hosts)
            assert [len(b) for _, b in batches] == sizes
            assert [h for _, b in batches for h in b] == hosts
            assert [n for n, _ in batches] == ["canary"] * bool(rollout.canary) + [
                f"batch {i}" for i in range(1, len(sizes) + 1 - bool(rollout.canary))
            ]

    @pytest.mark.parametrize(
        "flags, message",
        [
            (["--batch-size", "0"], "'0' is not a batch size"),
            (["--batch-size", "0%"], "from 1% to 100%"),
            (["--batch-size", "101%"], "from 1% to 100%"),
            (["--batch-size", "x"], "not a batch size"),
            (["--canary", "-1"], "'-1' is not a number of hosts"),
            (["--max-failures", "two"], "whole number 0 or more"),
        ],
    )
    def test_invalid_values_exit_2_before_connecting(self, flags, message):
        r = run_cli(
            "deploy", "deploy.test.all", "--nats-url", "nats://127.0.0.1:1", "--nkey-file", "/nonexistent", *flags
        )
        assert r.returncode == 2 and message in r.stderr, r.stderr


ROLLOUT_HOSTS = ("r1", "r2", "r3", "r4")


@pytest.mark.integration
class TestRollout:
    """A rollout deploys discovery's plan batch by batch, each host on deploy.<tier>.<host>."""

    @pytest.fixture
    def nats_server(self, tmp_path):  # the spec's fleet plus test hosts r1..r4 (role web) for start_listener
        server = helpers.NatsServer(
            tmp_path, {**helpers.FLEET, **{h: helpers.listener_permissions(h, "test", "web") for h in ROLLOUT_HOSTS}}
        )
        server.start()
        yield server
        server.stop()

    @staticmethod
    def fleet(start_listener, *modes: str) -> list:
        hosts = [start_listener(h, "test", "web") for h in ROLLOUT_HOSTS[: len(modes)]]
        for host, mode in zip(hosts, modes, strict=True):
            host.standin.set_mode(mode)
        return hosts

    def test_batches_never_overlap_and_the_canary_runs_alone(self, nats_server, start_listener):
        """--answer-window 600: a batch ends when its named hosts are final, not when a window closes."""
        hosts = self.fleet(start_listener, "slow", "slow", "slow", "slow")
        start_listener("testhost1", "test")  # not in role web: not in the plan
        r = run_cli(
            "deploy",
            "deploy.test.role.web",
            *deploy_args(
                nats_server, "test-deployer", "--canary", "1", "--batch-size", "2", "--answer-window", "600", "--json"
            ),
        )
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["success"] is True and {h["status"] for h in doc["hosts"]} == {"completed"}
        assert [(b["name"], [h["hostname"] for h in b["hosts"]]) for b in doc["batches"]] == [
            ("canary", ["r1"]),
            ("batch 1", ["r2", "r3"]),
            ("batch 2", ["r4"]),
        ]
        assert "canary: deploying r1" in r.stderr and "batch 1: deploying r2, r3" in r.stderr
        assert "4/4 hosts completed (4 completed) in 3 batches" in r.stderr
        spans = {h.hostname: h.standin.spans for h in hosts}
        assert all(len(s) == 1 for s in spans.values()), spans
        batches = [["r1"], ["r2", "r3"], ["r4"]]
        for before, after in zip(batches, batches[1:], strict=False):
            assert max(spans[h][0][1] for h in before) < min(spans[h][0][0] for h in after), spans

    def test_failures_over_the_budget_stop_the_rollout_and_skip_the_rest(self, nats_server, start_listener):
        hosts = self.fleet(start_listener, "succeed", "fail", "fail", "succeed")
        r = run_cli(
            "deploy",
            "deploy.test.all",
            *deploy_args(nats_server, "test-deployer", "--batch-size", "1", "--max-failures", "1", "--json"),
        )
        assert r.returncode == 1, r.stderr
        assert {h["hostname"]: h["status"] for h in json.loads(r.stdout)["hosts"]} == {
            "r1": "completed",
            "r2": "failed",
            "r3": "failed",
            "r4": "skipped",
        }
        assert "stopping the rollout: 2 hosts failed, more than the 1 allowed" in r.stderr
        assert "2 failed, 1 skipped" in r.stderr and hosts[3].standin.calls == []

    def test_a_failed_canary_stops_whatever_the_budget(self, nats_server, start_listener):
        hosts = self.fleet(start_listener, "fail", "succeed", "succeed")
        r = run_cli(
            "deploy",
            "deploy.test.all",
            *deploy_args(nats_server, "test-deployer", "--canary", "1", "--max-failures", "5"),
        )
        assert r.returncode == 1 and "stopping the rollout: the canary failed" in r.stderr, r.stderr
        assert "r2: skipped - not started: the canary failed" in r.stderr
        assert [h.standin.calls for h in hosts[1:]] == [[], []]

    def test_a_host_gone_since_the_plan_is_reported_and_counts_as_failed(self, nats_server, start_listener):
        hosts = self.fleet(start_listener, "block", "succeed", "succeed")
        cli = subprocess.Popen(
            [
                *helpers.PROGRAM,
                "deploy",
                "deploy.test.all",
                *deploy_args(
                    nats_server, "test-deployer", "--canary", "1", "--batch-size", "1", "--max-failures", "1", "--json"
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            wait_for(lambda: hosts[0].standin.calls, what="the canary to start")
            hosts[1].stop()  # planned, then gone
            hosts[0].standin.release()
            out, err = cli.communicate(timeout=60)
        finally:
            helpers.stop_process(cli)
        assert cli.returncode == 1, err
        result = {h["hostname"]: h for h in json.loads(out)["hosts"]}
        assert {h: r["status"] for h, r in result.items()} == {"r1": "completed", "r2": "failed", "r3": "completed"}
        assert "did not answer within 2s: it left the fleet since the plan" in result["r2"]["message"]

    @pytest.mark.skipif(TGKILL is None, reason="tgkill's syscall number is known for x86_64 and aarch64 only")
    def test_sigterm_starts_nothing_new_and_reports_the_running_host(self, nats_server, start_listener, tmp_path):
        """SIGTERM to a thread other than the main one, while the first batch runs."""
        hosts = self.fleet(start_listener, "block", "succeed", "succeed")
        stderr = tmp_path / "cli.err"
        with open(stderr, "w") as err_file:
            cli = subprocess.Popen(
                [
                    *helpers.PROGRAM,
                    "deploy",
                    "deploy.test.all",
                    *deploy_args(nats_server, "test-deployer", "--batch-size", "1", "--json"),
                ],
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
                start_new_session=True,
            )
        try:
            wait_for(lambda: hosts[0].standin.calls, what="the first batch to start")
            sigterm_to_a_thread(cli.pid, 0)
            wait_for(lambda: "interrupted: starting no new batch" in stderr.read_text(), what="the CLI to notice")
            hosts[0].standin.release()
            out, _ = cli.communicate(timeout=60)
        finally:
            helpers.stop_process(cli)
        err = stderr.read_text()
        assert cli.returncode == 130, err
        assert {h["hostname"]: h["status"] for h in json.loads(out)["hosts"]} == {
            "r1": "completed",
            "r2": "skipped",
            "r3": "skipped",
        }
        assert "stopping the rollout: interrupted" in err
        assert [h.standin.calls for h in hosts[1:]] == [[], []]

    def test_plan_deploys_nothing(self, nats_server, start_listener):
        hosts = self.fleet(start_listener, "succeed", "succeed", "succeed")
        r = run_cli(
            "deploy",
            "deploy.test.all",
            *deploy_args(nats_server, "test-deployer", "--canary", "1", "--batch-size", "50%", "--plan"),
        )
        assert r.returncode == 0 and r.stdout == "canary: r1\nbatch 1: r2\nbatch 2: r3\n", r.stderr
        r = run_cli("deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer", "--plan", "--json"))
        assert json.loads(r.stdout)["batches"] == [{"name": "batch 1", "hosts": ["r1", "r2", "r3"]}]
        assert [h.standin.calls for h in hosts] == [[], [], []]

    def test_a_refused_host_subject_exits_3_naming_it(self, nats_server, start_listener):
        prod = start_listener("dns1", "prod", "dns")
        r = run_cli("deploy", "deploy.prod.all", *deploy_args(nats_server, "test-deployer", "--canary", "1"))
        assert r.returncode == 3 and "may not publish to 'deploy.prod.dns1'" in r.stderr, r.stderr
        assert prod.standin.calls == []

    def test_no_host_in_the_plan_exits_4(self, nats_server, start_listener):
        start_listener("testhost1", "test")
        r = run_cli("deploy", "deploy.test.role.nosuch", *deploy_args(nats_server, "test-deployer", "--canary", "1"))
        assert r.returncode == 4 and "no host answered discovery with deploy.test.role.nosuch" in r.stderr


# ---------------------------------------------------------------- duration flags of every client


# Every client duration flag, after what its command needs besides it.
@pytest.mark.integration
class TestStatus:
    """Deploy history (listener), status queries on deploy.status, and `homelab-deploy status` with drift."""

    def status(self, server, *flags: str) -> subprocess.CompletedProcess:
        return run_cli("status", *deploy_args(server, "test-deployer", "--answer-window", "3", *flags))

    def test_json_of_a_large_fleet_is_written_as_it_is_encoded(self, tmp_path, monkeypatch):
        """status --json of 500 hosts with full histories (survey() monkeypatched to their answers: 500 listeners
        are the benchmark's): memory peaks near the records, not at 8x the text as with one json.dumps."""
        import tracemalloc

        record = hd.DeployRecord(
            "0" * 16,
            hd.Action.SWITCH,
            "main",
            "a" * 40,
            hd.Status.COMPLETED,
            None,
            "2026-11-29T06:00:00Z",
            "2026-11-29T06:00:09Z",
            40,
            41,
            9.0,
        )
        hosts = [
            hd.HostStatus(
                f"host{i:03d}",
                "test",
                None,
                [f"deploy.test.host{i:03d}"],
                False,
                41,
                None,
                [record] * hd.HISTORY_LENGTH,
            )
            for i in range(500)
        ]
        monkeypatch.setattr(hd, "survey", lambda args, subject, parse, history: (hosts, hd.Registry({}, {})))
        out = tmp_path / "status.json"
        with open(out, "w") as stdout:
            monkeypatch.setattr(sys, "stdout", stdout)
            args = hd.build_parser().parse_args(
                ["status", "--json", "--nats-url", "nats://127.0.0.1:1", "--nkey-file", "unused"]
            )
            tracemalloc.start()
            try:
                assert hd.status_command(args) == 0
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert len(json.loads(out.read_text())) == 500
        assert [json.loads(line.rstrip(","))["hostname"] for line in out.read_text().splitlines()[1:-1]] == [
            h.hostname for h in hosts
        ]  # a host a line, for grep and for the C encoder
        assert peak < 4 * out.stat().st_size, (peak, out.stat().st_size)

    def test_history_records_each_deploy_with_commit_and_generations(self, nats_server, start_listener):
        host = start_listener("testhost1", "test")
        host.standin.set_revision(COMMIT_A)
        assert run_cli("deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer")).returncode == 0
        host.standin.set_mode("fail")
        assert (
            run_cli(
                "deploy",
                "deploy.test.testhost1",
                *deploy_args(nats_server, "test-deployer", "--branch", "v2", "--action", "boot"),
            ).returncode
            == 1
        )
        history = history_records(host.standin.dir / "state")
        assert oct((host.standin.dir / "state" / "history.json").stat().st_mode & 0o777) == "0o600"
        first, second = (hd.DeployRecord.parse(r) for r in history)
        assert (
            first.action,
            first.revision,
            first.commit,
            first.status,
            first.error,
            first.generation_before,
            first.generation_after,
        ) == (hd.Action.SWITCH, "master", COMMIT_A, hd.Status.COMPLETED, None, None, 1)
        assert (
            second.action,
            second.revision,
            second.commit,
            second.status,
            second.error,
            second.generation_before,
            second.generation_after,
        ) == (hd.Action.BOOT, "v2", None, hd.Status.FAILED, hd.ErrorCode.BUILD_FAILED, 1, 1)
        assert first.started <= first.finished <= second.started and first.duration_seconds >= 0

    def test_history_is_bounded_survives_a_restart_and_a_corrupt_file_is_replaced(
        self, nats_server, start_listener, bus_factory
    ):
        host = start_listener("testhost1", "test")
        bus = bus_factory(nats_server, "test-deployer")
        history_file, lines = host.standin.dir / "state" / "history.json", []
        for i in range(hd.HISTORY_LENGTH + 2):
            hd.deploy_hosts(bus, "deploy.test.testhost1", hd.Action.TEST, f"r{i}", 30)
            lines.append(len(history_file.read_text().split("\n")))
            assert [r["revision"] for r in history_records(history_file.parent)][-1] == f"r{i}"
        # appended a line a deploy, rewritten with the last 20 when 20 were appended: bounded, no file replaced
        assert lines == [1, *range(2, hd.HISTORY_LENGTH + 2), 1]
        host.stop()
        with history_file.open("a") as f:
            f.write('\n{"request": "a crash tore this line')
        host.log.write_text("")  # start() waits for a new " ready " line
        host.start()
        [status] = hd.discover_hosts(bus, hd.STATUS_SUBJECT, parse=hd.HostStatus.parse)
        assert [r.revision for r in status.history] == [f"r{i}" for i in range(2, hd.HISTORY_LENGTH + 2)]
        assert "unreadable deploy history" not in host.log_text()  # a torn last line is left out, not fatal
        host.stop()
        (host.standin.dir / "state" / "history.json").write_text('[{"request": 1}')
        host.log.write_text("")
        host.start()
        assert "unreadable deploy history" in host.log_text()
        [status] = hd.discover_hosts(bus, hd.STATUS_SUBJECT, parse=hd.HostStatus.parse)
        assert status.history == []
        assert json.loads((host.standin.dir / "state" / "history.json").read_text()) == []

    def test_status_cli_rows_subject_history_and_json(self, nats_server, start_listener):
        start_listener("testhost1", "test").standin.set_revision(COMMIT_A)
        start_listener("testhost2", "test", "web")
        start_listener("dns1", "prod", "dns")
        assert run_cli("deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer")).returncode == 0
        r = self.status(nats_server)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
        assert rows["testhost1"][:7] == ["testhost1", "test", "-", "idle,unsigned", "1", COMMIT_A[:12], "switch"]
        assert rows["testhost2"][4:9] == ["1", "-", "switch", "master", "completed"]
        assert rows["dns1"][4:] == ["-", "-", "-"]
        r = self.status(nats_server, "deploy.test.role.web", "--history", "1")
        header, row, deploy = r.stdout.splitlines()
        assert row.split()[0] == "testhost2"
        assert (
            deploy.split(maxsplit=2)[2]
            == "switch master -> completed generation None -> 1 commit - " + deploy.rsplit(" ", 1)[1]
        )
        doc = json.loads(self.status(nats_server, "--tier", "test", "--json").stdout)
        assert [(h["hostname"], h["generation"], h["commit"], h["drift"]) for h in doc] == [
            ("testhost1", 1, COMMIT_A, []),
            ("testhost2", 1, None, []),
        ]
        assert doc[0]["history"][0]["commit"] == COMMIT_A

    def test_expect_and_drift(self, nats_server, start_listener):
        one = start_listener("testhost1", "test")
        one.standin.set_revision(COMMIT_A)
        two = start_listener("testhost2", "test", "web")
        two.standin.set_revision(COMMIT_A)
        assert run_cli("deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer")).returncode == 0
        r = self.status(nats_server, "--tier", "test", "--expect", COMMIT_A)
        assert r.returncode == 0 and "DRIFT" not in r.stdout, r.stdout + r.stderr
        assert self.status(nats_server, "--tier", "test", "--expect", COMMIT_A[:7]).returncode == 0  # a prefix
        # someone runs nixos-rebuild by hand on testhost2: a generation no deploy left
        two.standin.set_revision(COMMIT_B)
        subprocess.run(
            [str(two.standin.dir / "bin" / "nixos-rebuild"), "switch"], env=two.env, check=True, capture_output=True
        )
        r = self.status(nats_server, "--tier", "test", "--expect", COMMIT_A)
        assert r.returncode == 1
        assert r.stdout.count("DRIFT") == 1
        assert "DRIFT: generation 2 was made outside homelab-deploy (its last deploy left 1)" in r.stdout
        assert COMMIT_B[:12] in r.stdout.splitlines()[2]
        r = self.status(nats_server, "--tier", "test", "--expect", COMMIT_B[:12], "--json")
        assert r.returncode == 1
        assert [h["drift"][-1] for h in json.loads(r.stdout)] == [
            f"last switch was master ({COMMIT_A}), expected {COMMIT_B[:12]}"
        ] * 2
        assert self.status(nats_server, "--tier", "test").returncode == 0  # drift is shown, fails only with --expect

    def test_listener_on_a_config_without_status_permission_still_deploys(self, tmp_path):
        listener = helpers.listener_permissions("testhost1", "test", None)
        server = helpers.NatsServer(
            tmp_path,
            {
                "testhost1": {**listener, "subscribe": [s for s in listener["subscribe"] if s != hd.STATUS_SUBJECT]},
                "test-deployer": helpers.FLEET["test-deployer"],
            },
        )
        host = None
        try:
            server.start()
            host = helpers.Listener(server, "testhost1", "test", None, tmp_path).start()
            assert "status queries not answered" in host.log_text() and "homelab-deploy nats-config" in host.log_text()
            assert run_cli("deploy", "deploy.test.testhost1", *deploy_args(server, "test-deployer")).returncode == 0
            r = self.status(server)
            assert r.returncode == 4 and "must allow subscribing to deploy.status" in r.stderr
        finally:
            if host:
                host.stop()
            server.stop()

    def test_a_status_query_gets_the_last_deploys_and_those_drift_needs(self, nats_server, start_listener, bus_factory):
        """`history` in a status query: the last N deploys, after the older ones drift compares with (the last
        completed switch here), so `status` needs no whole history; a bad value gets no answer."""
        host = start_listener("testhost1", "test")
        host.standin.set_revision(COMMIT_A)
        bus = bus_factory(nats_server, "test-deployer")
        hd.deploy_hosts(bus, "deploy.test.testhost1", hd.Action.SWITCH, "main", 30)
        for i in range(4):
            hd.deploy_hosts(bus, "deploy.test.testhost1", hd.Action.TEST, f"r{i}", 30)

        def revisions(history: int | None) -> list[str]:
            [status] = hd.discover_hosts(bus, hd.STATUS_SUBJECT, parse=hd.HostStatus.parse, history=history)
            return [r.revision for r in status.history]

        assert revisions(None) == ["main", "r0", "r1", "r2", "r3"]  # a client from before the field
        assert revisions(hd.HISTORY_LENGTH) == revisions(None)
        assert revisions(2) == ["main", "r2", "r3"]
        assert revisions(1) == revisions(0) == ["main", "r3"]  # r3 left the last generation
        r = self.status(nats_server, "--expect", COMMIT_A, "--json")  # the switch is older than the last deploy
        assert r.returncode == 0, r.stdout + r.stderr
        [doc] = json.loads(r.stdout)
        assert ([h["revision"] for h in doc["history"]], doc["drift"]) == (["r3"], [])
        assert [
            h["revision"] for h in json.loads(self.status(nats_server, "--json", "--history", "3").stdout)[0]["history"]
        ] == ["r1", "r2", "r3"]
        for bad in (hd.HISTORY_LENGTH + 1, -1, True, "3", 1.0):
            assert hd.discover_hosts(bus, hd.STATUS_SUBJECT, 1, parse=hd.HostStatus.parse, history=bad) == []
        helpers.wait_for(lambda: host.log_text().count("status request ignored: history must be a whole number") == 5)

    def test_a_status_query_that_runs_nixos_version_leaves_the_event_loop_free(
        self, nats_server, start_listener, bus_factory
    ):
        """Queries are answered on the listener's event loop, but not one that must run nixos-version (a new
        generation's commit, not known yet): it could take its 10 s there. Discovery is answered meanwhile."""
        host = start_listener("testhost1", "test")
        bus = bus_factory(nats_server, "test-deployer")
        release, started = host.standin.dir / "release-version", host.standin.dir / "version-started"
        version = host.standin.dir / "profiles" / "system-2-link" / "sw" / "bin" / "nixos-version"
        version.parent.mkdir(parents=True)
        version.write_text(
            f"#!/bin/sh\ntouch {started}\nwhile [ ! -e {release} ]; do sleep 0.05; done\n"
            f'echo \'{{"configurationRevision": "{COMMIT_B}"}}\'\n'
        )
        version.chmod(0o755)
        host.standin.set_generation(2)  # switched by hand: its commit is unknown until nixos-version answers
        statuses: list = []
        asking = threading.Thread(
            target=lambda: statuses.extend(hd.discover_hosts(bus, hd.STATUS_SUBJECT, 30, parse=hd.HostStatus.parse))
        )
        asking.start()
        try:
            wait_for(started.exists, what="nixos-version to run")
            [answer] = hd.discover_hosts(bus, window=5)  # the loop is free: nixos-version still waits
            assert answer.hostname == "testhost1" and not release.exists()
        finally:
            release.write_text("")
            asking.join(60)
        assert [(h.generation, h.commit) for h in statuses] == [(2, COMMIT_B)]

    def test_status_query_history_selection(self):
        def record(revision: str, action: hd.Action, status: hd.Status, after: int | None) -> hd.DeployRecord:
            return hd.DeployRecord(
                "0" * 16,
                action,
                revision,
                None,
                status,
                None,
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:00:01Z",
                1,
                after,
                1.0,
            )

        history = [
            record("s1", hd.Action.SWITCH, hd.Status.COMPLETED, 2),
            record("s2", hd.Action.SWITCH, hd.Status.COMPLETED, 3),
            record("b1", hd.Action.BOOT, hd.Status.FAILED, 3),
            record("t1", hd.Action.TEST, hd.Status.FAILED, None),
            record("t2", hd.Action.TEST, hd.Status.COMPLETED, None),
        ]
        pick = lambda n: [r.revision for r in hd.StatusQuery("deploy.responses.k.t", n).answer_history(history)]  # noqa: E731
        assert pick(0) == ["s2", "b1"] and pick(1) == ["s2", "b1", "t2"] and pick(3) == ["s2", "b1", "t1", "t2"]
        assert pick(4) == pick(3) and pick(5) == pick(20) == ["s1", "s2", "b1", "t1", "t2"]
        assert pick(2) == ["s2", "b1", "t1", "t2"]
        assert hd.StatusQuery("deploy.responses.k.t", 1).answer_history([]) == []

    def test_malformed_status_answers_are_refused(self):
        good = {"hostname": "h1", "tier": "test", "deploy_subjects": [], "history": []}
        assert hd.HostStatus.parse(json.dumps(good).encode()).history == []
        record = {
            "request": "r1",
            "action": "switch",
            "revision": "main",
            "status": "completed",
            "started": "2026-01-01T00:00:00Z",
            "finished": "2026-01-01T00:00:01Z",
            "duration_seconds": 1,
        }
        for bad in (
            [record] * (hd.HISTORY_LENGTH + 1),
            [{**record, "commit": "x; rm"}],
            [{**record, "status": "accepted"}],
            [{**record, "finished": "yesterday"}],
            ["main"],
            {"a": 1},
        ):
            with pytest.raises(hd.ProtocolError):
                hd.HostStatus.parse(json.dumps({**good, "history": bad}).encode())


@pytest.mark.integration
class TestPin:
    """`deploy --pin`: one commit for every host, resolved with git ls-remote before anything is sent; and the
    summary that names hosts left on different commits."""

    def test_pin_sends_the_branch_commit_to_every_host(self, nats_server, start_listener, git_repo):
        url, git = git_repo
        hosts = [start_listener("testhost1", "test"), start_listener("testhost2", "test", "web")]
        commit = git("rev-parse", "main")
        r = run_cli(
            "deploy",
            "deploy.test.all",
            "--pin",
            "--flake-url",
            url,
            "--branch",
            "main",
            "--json",
            *deploy_args(nats_server, "test-deployer"),
        )
        assert r.returncode == 0, r.stderr
        assert (
            f"pinned main -> {commit}" in r.stderr
            and f"2/2 hosts completed (2 completed); main -> {commit}" in r.stderr
        )
        doc = json.loads(r.stdout)
        assert (doc["revision"], doc["pin"]) == (commit, f"main -> {commit}")
        for host in hosts:
            assert host.standin.calls == [
                ["switch", "--refresh", "--flake", f"git+https://git.example.com/cfg.git?rev={commit}#{host.hostname}"]
            ]
        # an annotated tag pins to its commit, not the tag object; the environment variables do the same
        r = run_cli(
            "deploy",
            "deploy.test.testhost1",
            "--branch",
            "v1",
            *deploy_args(nats_server, "test-deployer"),
            env={"HOMELAB_DEPLOY_PIN": "1", "HOMELAB_DEPLOY_FLAKE_URL": url},
        )
        assert r.returncode == 0 and f"pinned v1 -> {git('rev-parse', 'v1^{commit}')}" in r.stderr, r.stderr
        assert hosts[0].standin.calls[-1][3].endswith(f"?rev={git('rev-parse', 'v1^{commit}')}#testhost1")
        # a rollout sends the pinned commit to every batch
        r = run_cli(
            "deploy",
            "deploy.test.all",
            "--pin",
            "--flake-url",
            url,
            "--branch",
            "main",
            "--batch-size",
            "1",
            *deploy_args(nats_server, "test-deployer"),
        )
        assert r.returncode == 0 and f"in 2 batches; main -> {commit}" in r.stderr, r.stderr
        assert [h.standin.calls[-1][3] for h in hosts] == [
            f"git+https://git.example.com/cfg.git?rev={commit}#{h.hostname}" for h in hosts
        ]
        # a commit is sent as is, without asking git
        r = run_cli(
            "deploy", "deploy.test.testhost1", "--pin", "--branch", COMMIT_A, *deploy_args(nats_server, "test-deployer")
        )
        assert r.returncode == 0 and f"pinned {COMMIT_A} -> {COMMIT_A}" in r.stderr, r.stderr

    def test_what_cannot_be_pinned_exits_2_and_sends_nothing(self, nats_server, start_listener, git_repo):
        url, _ = git_repo
        host = start_listener("testhost1", "test")
        deploy = ["deploy", "deploy.test.testhost1", "--pin", *deploy_args(nats_server, "test-deployer")]
        for flags, said in [
            (["--flake-url", url, "--branch", "nope"], "'nope' is neither a branch nor a tag of file://"),
            (["--branch", "main"], "--pin needs the fleet's git flake URL"),
            (["--flake-url", "github:example/cfg", "--branch", "main"], "must start with git+https://"),
            (["--flake-url", "git+file:///nonexistent/repo", "--branch", "main"], "git ls-remote file:///nonexistent"),
        ]:
            r = run_cli(*deploy, *flags)
            assert r.returncode == 2 and said in r.stderr, (flags, r.stderr)
        assert host.standin.calls == []
        assert "nothing was sent" in run_cli(*deploy, "--flake-url", url, "--branch", "nope").stderr

    def test_hosts_on_different_commits_are_named(self, nats_server, start_listener):
        start_listener("testhost1", "test").standin.set_revision(COMMIT_A)
        start_listener("testhost2", "test", "web").standin.set_revision(COMMIT_B)
        r = run_cli(
            "deploy", "deploy.test.all", "--branch", "main", "--json", *deploy_args(nats_server, "test-deployer")
        )
        assert r.returncode == 0, r.stderr
        assert (
            f"warning: the hosts of this deploy now run 2 different commits: {COMMIT_A[:12]} on testhost1; "
            f"{COMMIT_B[:12]} on testhost2. main moved while they fetched it; deploy with --pin"
        ) in r.stderr
        assert [(h["hostname"], h["commit"]) for h in json.loads(r.stdout)["hosts"]] == [
            ("testhost1", COMMIT_A),
            ("testhost2", COMMIT_B),
        ]
        r = run_cli("deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer"))
        assert r.returncode == 0 and "different commits" not in r.stderr


DURATION_FLAGS = [
    (cmd, flag)
    for cmd, flags in [
        (["deploy", "deploy.test.all"], ["--timeout", "--answer-window", "--straggler-window"]),
        (["list-hosts"], ["--answer-window", "--straggler-window"]),
        (["build", "fleet"], ["--timeout", "--answer-window"]),
        (["mcp"], ["--timeout", "--build-timeout", "--answer-window", "--straggler-window"]),
    ]
    for flag in flags
]
BAD_DURATIONS = ["nan", "NaN", "inf", "-inf", "0", "-0", "-5", "1e400", "soon", ""]
DURATION_RULE = "is not a duration: give a finite number of seconds greater than 0"


class TestDurationFlags:
    """Issue 13: `nan` removed a client's deadline; 0 or less sent the request, gave up at once (exit 4) and the
    deploy ran anyway. Every client duration flag and env var is refused before anything is sent."""

    @pytest.mark.parametrize("command,flag", DURATION_FLAGS, ids=[f"{c[0]} {f}" for c, f in DURATION_FLAGS])
    def test_flag_refuses_nan_inf_zero_and_negative(self, command, flag, capsys):
        def parse(value: str):
            return hd.build_parser().parse_args(
                [*command, "--nats-url", "nats://127.0.0.1:1", "--nkey-file", "k", f"{flag}={value}"]
            )

        for value in BAD_DURATIONS:
            with pytest.raises(SystemExit) as exit:
                parse(value)
            assert exit.value.code == 2
            assert f"argument {flag}: {value!r} {DURATION_RULE}" in capsys.readouterr().err
        assert getattr(parse("0.25"), flag[2:].replace("-", "_")) == 0.25

    @pytest.mark.parametrize("var", ["HOMELAB_DEPLOY_TIMEOUT", "HOMELAB_DEPLOY_BUILD_TIMEOUT"])
    def test_env_var_refuses_the_same(self, var, monkeypatch, capsys):
        for value in BAD_DURATIONS[:-1]:  # an empty variable means unset
            monkeypatch.setenv(var, value)
            with pytest.raises(SystemExit) as exit:
                hd.build_parser()
            assert exit.value.code == 2
            assert f"error: ${var}: {value!r} {DURATION_RULE}" in capsys.readouterr().err
        monkeypatch.setenv(var, "0.25")
        args = hd.build_parser().parse_args(["mcp", "--nats-url", "nats://127.0.0.1:1", "--nkey-file", "k"])
        assert (args.timeout if var == "HOMELAB_DEPLOY_TIMEOUT" else args.build_timeout) == 0.25

    def test_deploy_default_covers_a_switch_its_confirmation_and_a_rollback(self, monkeypatch):
        """Issue 18: after a switch (bounded by the listener's --timeout) the module waits up to 120 s for the new
        system to confirm over NATS, then a rollback (bounded by --timeout again) decides the final status."""
        monkeypatch.delenv("HOMELAB_DEPLOY_TIMEOUT", raising=False)
        parser, nats = hd.build_parser(), ["--nats-url", "nats://127.0.0.1:1", "--nkey-file", "k"]
        listener = parser.parse_args(["listener", *nats, "--hostname", "h", "--tier", "test", "--flake-url", "u"])
        assert parser.parse_args(["deploy", "deploy.test.all", *nats]).timeout > 2 * listener.timeout + 120

    @pytest.mark.integration
    def test_nothing_is_sent(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        seen: list[str] = []
        admin, builder = bus_factory(nats_server, "admin"), bus_factory(nats_server, "builder")
        admin.subscribe("deploy.>", lambda subject, data, received: seen.append(subject))
        builder.subscribe("build.fleet.*", lambda subject, data, received: seen.append(subject))
        deployer, build_client = deploy_args(nats_server, "test-deployer"), deploy_args(nats_server, "build-client")
        deploy = ["deploy", "deploy.test.testhost1", *deployer]
        runs = [([*deploy, "--timeout", value], {}, "--timeout") for value in ("0", "-5", "nan", "inf")] + [
            ([*deploy, "--answer-window", "0"], {}, "--answer-window"),
            ([*deploy, "--straggler-window", "nan"], {}, "--straggler-window"),
            (deploy, {"HOMELAB_DEPLOY_TIMEOUT": "nan"}, "$HOMELAB_DEPLOY_TIMEOUT"),
            (["list-hosts", *deployer, "--answer-window", "-1"], {}, "--answer-window"),
            (["build", "fleet", *build_client, "--timeout", "nan"], {}, "--timeout"),
            (["build", "fleet", *build_client], {"HOMELAB_DEPLOY_BUILD_TIMEOUT": "0"}, "$HOMELAB_DEPLOY_BUILD_TIMEOUT"),
            (["mcp", *deployer, "--build-timeout", "inf"], {}, "--build-timeout"),
            (["mcp", *deployer], {"HOMELAB_DEPLOY_TIMEOUT": "-5"}, "$HOMELAB_DEPLOY_TIMEOUT"),
        ]
        for args, env, named in runs:
            r = run_cli(*args, env=env)
            assert r.returncode == 2 and named in r.stderr and DURATION_RULE in r.stderr, (args, env, r.stderr)
        # Published after every run: once the spies have these, they would have had anything a run sent.
        admin.publish("deploy.test.marker", b"{}", confirm=True)
        bus_factory(nats_server, "build-client").publish("build.fleet.marker", b"{}", confirm=True)
        wait_for(lambda: len(seen) >= 2, what="the spies to see the markers")
        assert sorted(seen) == ["build.fleet.marker", "deploy.test.marker"]
        assert host.standin.calls == []


# ---------------------------------------------------------------- what an install carries

LISTENER_DEPENDENCIES = ("nats-py", "nkeys", "pyyaml", "prometheus-client")


def link_distributions(names, into: Path) -> None:
    """Symlink the installed distributions `names` and all they require (this platform, no extras) into `into`:
    an import path with those and nothing else."""
    todo, seen = list(names), set()
    while todo:
        dist = metadata.distribution(todo.pop())
        if canonicalize_name(dist.metadata["Name"]) in seen:
            continue
        seen.add(canonicalize_name(dist.metadata["Name"]))
        for entry in {Path(f).parts[0] for f in dist.files} - {"..", "__pycache__"}:
            (into / entry).symlink_to(dist.locate_file(entry))
        todo += [
            r.name for r in map(Requirement, dist.requires or []) if not r.marker or r.marker.evaluate({"extra": ""})
        ]


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> Path:
    """The bin directory of a venv with `pip install homelab-deploy` (no extras) from a wheel of this tree, made
    offline: the only other distributions pip can find are the listener's dependencies, linked from this one."""
    work = tmp_path_factory.mktemp("plain-install")
    src = shutil.copytree(
        REPO, work / "src", ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__")
    )
    # No pip configuration: a configured index or --find-links would supply what the wheel must not need.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-w", work / "wheel", src],
        env=env,
        check=True,
        timeout=300,
    )  # pytest shows pip's stderr on failure
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", work / "venv"], check=True, timeout=120)
    (work / "deps").mkdir()
    link_distributions(LISTENER_DEPENDENCIES, work / "deps")
    site = subprocess.run(
        [work / "venv/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "listener-deps.pth").write_text(f"{work / 'deps'}\n")
    r = subprocess.run(
        [*pip, "--python", work / "venv/bin/python", "install", "-q", "--no-index", *(work / "wheel").glob("*.whl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr  # before the [mcp] extra: "No matching distribution found for mcp>=2.0"
    return work / "venv/bin"


@pytest.fixture(scope="module")
def dropin(tmp_path_factory) -> list[str]:
    """homelab_deploy.py copied into an empty directory beside only the listener's dependencies, run with -E -S:
    no site-packages and no PYTHONPATH, so nothing else is importable."""
    directory = tmp_path_factory.mktemp("dropin")
    shutil.copy(REPO / "homelab_deploy.py", directory)
    link_distributions(LISTENER_DEPENDENCIES, directory)
    return [sys.executable, "-E", "-S", str(directory / "homelab_deploy.py")]


@pytest.mark.integration
class TestInstall:
    """`pip install homelab-deploy` carries the listener's four dependencies and no MCP SDK; without the [mcp]
    extra, the MCP commands name the fix."""

    def test_plain_install_has_no_mcp_sdk(self, plain_install):
        code = "import importlib.util as u; print([m for m in ('mcp', 'pydantic', 'anyio') if u.find_spec(m)])"
        r = subprocess.run([plain_install / "python", "-c", code], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout) == (0, "[]\n"), r.stderr

    @pytest.mark.parametrize("program", ["plain install", "drop-in file"])
    def test_listener_deploys(self, request, program, nats_server, start_listener, monkeypatch):
        argv = (
            request.getfixturevalue("dropin")
            if program == "drop-in file"
            else [str(request.getfixturevalue("plain_install") / "homelab-deploy")]
        )
        monkeypatch.setattr(helpers, "PROGRAM", argv)  # the listener and the deploy client both run it
        host = start_listener("testhost1", "test")
        r = run_cli("deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer"))
        assert r.returncode == 0, r.stderr
        assert host.standin.calls == [
            ["switch", "--refresh", "--flake", "git+https://git.example.com/cfg.git?ref=master#testhost1"]
        ]

    @pytest.mark.parametrize("command", ["homelab-deploy mcp", "homelab-deploy-mcp", "homelab_deploy.py mcp"])
    def test_mcp_without_the_extra_names_the_fix(self, request, command):
        program, *rest = command.split()
        argv = (
            [*request.getfixturevalue("dropin"), *rest]
            if program == "homelab_deploy.py"
            else [str(request.getfixturevalue("plain_install") / program), *rest]
        )
        r = subprocess.run(
            [*argv, "--nats-url", "nats://127.0.0.1:4222", "--nkey-file", "/nonexistent"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert (r.returncode, r.stdout, len(r.stderr.splitlines())) == (2, "", 1), r.stderr
        assert r.stderr.startswith("error: this install has no MCP server (No module named ")
        assert "pip install 'homelab-deploy[mcp]', or with Nix use the flake's packages.<system>.mcp" in r.stderr
