"""Trust boundaries, round two (issue 25, items 3, 6, 7, 8, 10, 11): secrets never leave a daemon, host text
reaches terminals and the AI clean, builder trust per repo, one namespace of signer names, trusted keys reloaded
on SIGHUP. Real nats-server, real listener and builder processes, real nix.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import yaml

import homelab_deploy as hd
from tests.helpers import GOOD, BuilderProcess, collect, fleet_doc, has_final, needs_nix, run_cli, text, wait_for

TOKEN = "tok3nSECRET42"
SECRET_URL = f"git+https://ci:{TOKEN}@git.example.com/cfg.git?access_token={TOKEN}"
# A nixos-rebuild that fails naming the flake it was given, as one that cannot fetch it does.
ECHOING_REBUILD = "#!/bin/sh\necho \"error: unable to download '$4'\" >&2\nexit 1\n"


class TestSecretsStayHome:
    def test_listener_answers_events_and_log_carry_no_token(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--flake-url", SECRET_URL, "--debug")
        (host.standin.dir / "bin" / "nixos-rebuild").write_text(ECHOING_REBUILD)
        events = bus_factory(nats_server, "admin").inbox("deploy.events.>")
        r = run_cli(
            "deploy",
            "deploy.test.testhost1",
            "--json",
            "--nats-url",
            nats_server.url,
            "--nkey-file",
            str(nats_server.seeds["test-deployer"]),
        )
        assert r.returncode == 1, r.stderr
        seen = collect(events, has_final, 60, "the deploy's events")
        answers = r.stdout + r.stderr
        assert "git+https://ci:***@git.example.com/cfg.git?access_token=***" in answers, answers  # output, started
        for where, shown in (("answers", answers), ("events", json.dumps(seen)), ("log", host.log_text())):
            assert TOKEN not in shown, where
        assert "unable to download 'git+https://ci:***@" in host.log_text()

    @needs_nix
    def test_builder_answers_events_and_log_carry_no_token(self, nats_server, nix_store, flake, tmp_path, bus_factory):
        leaky = f"echo 'fatal: cannot fetch {SECRET_URL}' >&2; exit 1"
        config = {
            "repos": {
                "fleet": {"url": flake({"leaky": leaky}), "default_branch": "main"},
                "evalfail": {"url": SECRET_URL.replace("git.example.com", "127.0.0.1:1"), "default_branch": "main"},
            }
        }
        builder = BuilderProcess(nats_server, tmp_path / "builder", config, nix_store, "--debug").start()
        try:
            events = bus_factory(nats_server, "admin").inbox("build.events.>")
            client = bus_factory(nats_server, "build-client")
            got = []
            for repo in ("fleet", "evalfail"):
                reply_to = hd.new_reply_subject("build", client.public_key)
                q = client.inbox(hd.answer_subject(reply_to, "*"))
                client.publish(
                    f"build.{repo}.all",
                    json.dumps({"repo": repo, "target": "all", "reply_to": reply_to}).encode(),
                    confirm=True,
                )
                got += collect(q, has_final, 120, f"the build of {repo}")
            got += collect(events, lambda e: sum(has_final([x]) for x in e) >= 2, 60, "the build events")
            assert got[-1]["status"] == "failed" and "fatal: cannot fetch git+https://ci:***@" in json.dumps(got)
            assert TOKEN not in json.dumps(got)
            assert "fleet=git+file://" in builder.log_text() and "ci:***@127.0.0.1:1" in builder.log_text()
            assert TOKEN not in builder.log_text()
        finally:
            builder.stop()


class TestRedact:
    @pytest.mark.parametrize(
        "text,shown",
        [
            ("git+ssh://git@h/c.git", "git+ssh://***@h/c.git"),
            (
                "https://ghp_x1@github.com/o/r?dir=a&access_token=z9&ref=main",
                "https://***@github.com/o/r?dir=a&access_token=***&ref=main",
            ),
            ("x?private_token=abc;password=p", "x?private_token=***;password=***"),
            ("signed by alice@laptop", "signed by alice@laptop"),  # a signer's name is no secret
            ('{"m": "at git+https://u:t@h/c", "s": "bob@x"}', '{"m": "at git+https://u:***@h/c", "s": "bob@x"}'),
        ],
    )
    def test_redact_urls_and_query_tokens_and_keeps_json_whole(self, text, shown):
        assert hd.redact(text) == shown


# Escape sequences (clear screen, set the title, colour by C1 CSI), backspace, carriage return, a bidi override, DEL.
NASTY = "\x1b[2J\x1b]0;pwned\x07ok\r\x08\x9b31m\u202eevil\x7f"
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e]")


def rogue_answers(rogue) -> None:
    """A host that answers a deploy and discovery with control characters in every free-text field."""
    rogue("testhost1", "deploy.test.testhost1").load(
        [
            json.dumps(
                {
                    "hostname": "testhost1",
                    "status": "failed",
                    "error": "build_failed",
                    "message": "boom " + NASTY,
                    "output": [NASTY, "line 2" + NASTY],
                }
            ).encode()
        ]
    )
    rogue("testhost1", "deploy.discover").load(
        [
            json.dumps(
                {
                    "hostname": "testhost1",
                    "tier": "test",
                    "deploy_subjects": ["deploy.test.testhost1" + NASTY],
                    "version": "1.0" + NASTY,
                    "deploying": False,
                }
            ).encode()
        ]
    )


class TestHostTextIsClean:
    def test_the_cli_prints_no_control_characters(self, nats_server, rogue):
        rogue_answers(rogue)
        flags = ["--nats-url", nats_server.url, "--nkey-file", str(nats_server.seeds["test-deployer"])]
        for argv in (
            ["deploy", "deploy.test.testhost1"],
            ["deploy", "deploy.test.testhost1", "--json"],
            ["list-hosts"],
            ["list-hosts", "--json"],
        ):
            r = run_cli(*argv, *flags, "--answer-window", "1")
            assert "testhost1" in r.stdout + r.stderr, (argv, r.stdout, r.stderr)
            assert not CONTROL.search(r.stdout + r.stderr) and "\\u001b" not in r.stdout, (argv, r.stdout, r.stderr)
            assert "ok31mevil" in r.stdout + r.stderr, argv  # the printable rest is kept

    @pytest.mark.anyio
    async def test_the_mcp_result_holds_no_control_characters_and_quotes_host_text(self, mcp_server, rogue):
        rogue_answers(rogue)
        async with mcp_server() as client:
            deploy = await client.call_tool("deploy", {"hostname": "testhost1"})
            listed = await client.call_tool("list_hosts", {})
        for result in (deploy, listed):
            shown = text(result) + json.dumps(result.structured_content, ensure_ascii=False)
            assert not CONTROL.search(shown) and "\\u001b" not in shown, shown
        assert 'testhost1: failed [build_failed] - "boom ok31mevil"' in text(deploy), text(deploy)
        assert '    output: "line 2ok31mevil"' in text(deploy)
        assert 'version "1.0ok31mevil"' in text(listed), text(listed)


@needs_nix
class TestBuilderTrustPerRepo:
    def test_a_key_trusted_for_one_repo_cannot_build_another(self, nats_server, nix_store, flake, tmp_path):
        url = flake({"good1": GOOD})
        config = {
            "repos": {
                "fleet": {
                    "url": url,
                    "default_branch": "main",
                    "trusted_keys": [f"{nats_server.public['build-client']}=ci"],
                },
                "evalfail": {
                    "url": url,
                    "default_branch": "main",
                    "trusted_keys": [f"{nats_server.public['admin']}=ops"],
                },
            }
        }
        builder = BuilderProcess(nats_server, tmp_path / "builder", config, nix_store).start()
        try:
            assert "no trusted_keys" not in builder.log_text()
            ci = ["--nats-url", nats_server.url, "--nkey-file", str(nats_server.seeds["build-client"])]
            r = run_cli("build", "evalfail", *ci)  # NATS lets ci publish there; the builder does not trust it for it
            assert r.returncode == 4, r.stderr  # a request failing the signature checks is never answered
            wait_for(lambda: "not a trusted key here" in builder.log_text(), what="the builder logging the refusal")
            assert builder.nix_calls == []
            r = run_cli("build", "fleet", *ci)
            assert r.returncode == 0, r.stderr
            assert builder.builds() == ['nixosConfigurations."good1".config.system.build.toplevel']
        finally:
            builder.stop()


class TestOneNamePerSigner:
    def test_two_keys_with_one_name_are_refused_at_load(self, nats_server, start_listener, tmp_path):
        a, b = nats_server.public["admin"], nats_server.public["test-deployer"]
        with pytest.raises(ValueError, match="the name 'ops' is already that of another key"):
            hd.TrustedSigners.load([f"{a}=ops", f"{b}=ops"], [])
        assert hd.TrustedSigners.load([f"{a}=ops", f"{a}=ops"], []).keys == {a: "ops"}  # the same key twice is fine
        keys = tmp_path / "trusted.keys"
        keys.write_text(f"{b}=ops\n")
        host = start_listener(
            "testhost1", "test", None, "--trusted-key", f"{a}=ops", "--trusted-keys-file", str(keys), expect_ready=False
        )
        assert f"{keys} line 1: the name 'ops' is already that of another key ({a}, --trusted-key)" in host.log_text()
        (tmp_path / "builder.yaml").write_text(
            f"trusted_keys: ['{a}=ops']\nrepos:\n  r: {{url: 'git+file:///x', trusted_keys: ['{b}=ops']}}\n"
        )
        with pytest.raises(ValueError, match="the name 'ops' is already that of another key"):
            hd.Repo.parse_config(str(tmp_path / "builder.yaml"))

    def test_nats_config_refuses_a_signer_name_used_twice(self, tmp_path):
        doc, _ = fleet_doc(tmp_path)
        doc["deployers"][0]["name"] = "mcp-admin"  # the MCP server `mcp` has an admin key: it signs as mcp-admin
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
        r = run_cli("nats-config", str(tmp_path / "fleet.yaml"))
        assert r.returncode == 2 and "would both sign as 'mcp-admin'" in r.stderr, r.stderr
        doc["deployers"][0]["name"] = "bclient"  # a deployer and a build client
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
        r = run_cli("nats-config", str(tmp_path / "fleet.yaml"))
        assert r.returncode == 2 and "would both sign as 'bclient'" in r.stderr, r.stderr


class TestReloadOnSighup:
    def test_a_key_added_to_the_file_is_trusted_after_sighup_and_sigterm_still_stops(
        self, nats_server, start_listener, tmp_path
    ):
        keys = tmp_path / "trusted.keys"
        keys.write_text(f"{nats_server.public['admin']}=admin\n")
        host = start_listener("testhost1", "test", None, "--trusted-keys-file", str(keys))
        deploy = [
            "deploy",
            "deploy.test.testhost1",
            "--nats-url",
            nats_server.url,
            "--nkey-file",
            str(nats_server.seeds["test-deployer"]),
        ]
        r = run_cli(*deploy)
        assert r.returncode != 0 and host.standin.calls == []
        assert "not a trusted key here" in host.log_text() and "reload the daemon (SIGHUP" in host.log_text()
        keys.write_text(f"{nats_server.public['admin']}=admin\n{nats_server.public['test-deployer']}=tdep\n")
        os.kill(host.proc.pid, signal.SIGHUP)
        wait_for(
            lambda: "SIGHUP: trusted keys reloaded: added tdep; removed none" in host.log_text(), what="the reload"
        )
        r = run_cli(*deploy)
        assert r.returncode == 0 and "(signed by tdep)" in r.stderr, r.stderr
        keys.write_text("UNOTAKEY=bob\n")  # a bad file: the old keys stay
        os.kill(host.proc.pid, signal.SIGHUP)
        wait_for(lambda: "SIGHUP: trusted keys not reloaded, the old ones stay" in host.log_text(), what="the refusal")
        keys.write_text("# nobody\n")  # an empty set would turn signing off: the old keys stay
        os.kill(host.proc.pid, signal.SIGHUP)
        wait_for(
            lambda: "SIGHUP: trusted keys not reloaded: the new set is empty" in host.log_text(),
            what="the refusal of an empty set",
        )
        assert run_cli(*deploy).returncode == 0 and len(host.standin.calls) == 2
        assert host.proc.poll() is None  # SIGHUP never ends the listener
        os.kill(host.proc.pid, signal.SIGTERM)
        wait_for(lambda: host.proc.poll() is not None, what="the listener to stop on SIGTERM")
        assert host.proc.returncode == 0 and "shutting down" in host.log_text()

    @needs_nix
    def test_the_builder_reloads_its_repos_trusted_keys(self, nats_server, nix_store, flake, tmp_path):
        config = {
            "repos": {
                "fleet": {
                    "url": flake({"good1": GOOD}),
                    "default_branch": "main",
                    "trusted_keys": [f"{nats_server.public['admin']}=ops"],
                }
            }
        }
        builder = BuilderProcess(nats_server, tmp_path / "builder", config, nix_store).start()
        try:
            ci = [
                "build",
                "fleet",
                "--nats-url",
                nats_server.url,
                "--nkey-file",
                str(nats_server.seeds["build-client"]),
            ]
            assert run_cli(*ci).returncode != 0 and builder.nix_calls == []
            config["repos"]["fleet"]["trusted_keys"].append(f"{nats_server.public['build-client']}=ci")
            builder.config.write_text(yaml.safe_dump(config))
            os.kill(builder.proc.pid, signal.SIGHUP)
            wait_for(
                lambda: "repo=fleet SIGHUP: trusted keys reloaded: added ci" in builder.log_text(), what="the reload"
            )
            r = run_cli(*ci)
            assert r.returncode == 0, r.stderr
            assert builder.proc.poll() is None
        finally:
            builder.stop()
