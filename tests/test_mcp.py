"""Tests for the MCP server (homelab_deploy_mcp), driven by a real MCP client over stdio.

Every test starts the server as a subprocess through `mcp.Client` and `stdio_client` against the nats_server
nats-server (the spec's tiered NKey permissions) and real listener processes with a stand-in `nixos-rebuild`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import anyio
import anyio.to_thread
import pytest

import homelab_deploy as hd
from tests.helpers import (
    COMMIT_A,
    FLEET,
    MCP_SCRIPT,
    REPO,
    TGKILL,
    boot_again,
    needs_nix,
    ran,
    sigterm_to_a_thread,
    stop_process,
    text,
    wait_for,
)

CLI_MCP = [str(REPO / "homelab_deploy.py"), "mcp"]
pytestmark = pytest.mark.anyio


async def until(condition, what: str):
    """helpers.wait_for on a worker thread, so the client's event loop keeps reading the server."""
    return await anyio.to_thread.run_sync(lambda: wait_for(condition, what=what))


# ---------------------------------------------------------------- start-up and tool lists


def test_cli_never_imports_mcp():
    code = "import homelab_deploy, sys; homelab_deploy.build_parser(); assert 'mcp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_literals_match_the_protocol():
    """The tools' action and tier types, spelled out for mypy, offer exactly the protocol's values."""
    import typing

    import homelab_deploy_mcp as mcp_server

    assert typing.get_args(mcp_server.ActionName) == hd.REBUILD_ACTIONS  # a reboot is reboot_admin's
    assert typing.get_args(mcp_server.TierName) == hd.TIERS


@pytest.mark.parametrize("program", [MCP_SCRIPT, CLI_MCP], ids=["homelab_deploy_mcp.py", "homelab_deploy.py mcp"])
def test_running_a_file_as_a_script_loads_each_module_once(tmp_path, program):
    """The script is __main__; the other module's `import` of it must find that one, not load the file again."""
    r = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            *program,
            "--nats-url",
            "nats://127.0.0.1:1",
            "--nkey-file",
            str(tmp_path / "missing.seed"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2 and "cannot read NKey seed file" in r.stderr, r.stderr
    loaded = [line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    script = "homelab_deploy_mcp" if program == MCP_SCRIPT else "homelab_deploy"
    assert script not in loaded and {"homelab_deploy", "homelab_deploy_mcp"} - {script} <= set(loaded)


@pytest.mark.parametrize("program", [MCP_SCRIPT, CLI_MCP], ids=["homelab-deploy-mcp", "homelab-deploy mcp"])
@pytest.mark.parametrize("env", [{}, {"HOMELAB_DEPLOY_ENABLE_ADMIN": "yes"}], ids=["flag", "env"])
def test_enable_admin_without_key_is_a_startup_error(nats_server, program, env):
    flags = [] if env else ["--enable-admin"]
    r = subprocess.run(
        [
            sys.executable,
            *program,
            "--nats-url",
            nats_server.url,
            "--nkey-file",
            str(nats_server.seeds["test-deployer"]),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2, r.stderr
    assert "--enable-admin needs --admin-nkey-file" in r.stderr and r.stdout == ""


def test_flags_from_env_vars(monkeypatch, capsys):
    for name, value in [
        ("NATS_URL", "nats://nats.example:4222"),
        ("NKEY_FILE", "/run/mcp.seed"),
        ("ENABLE_ADMIN", "true"),
        ("ADMIN_NKEY_FILE", "/run/admin.seed"),
        ("ENABLE_BUILDS", "1"),
        ("TIMEOUT", "60"),
        ("BUILD_TIMEOUT", "120"),
    ]:
        monkeypatch.setenv(f"HOMELAB_DEPLOY_{name}", value)
    args = hd.build_parser().parse_args(["mcp"])
    assert (
        args.nats_url,
        args.nkey_file,
        args.enable_admin,
        args.admin_nkey_file,
        args.enable_builds,
        args.timeout,
        args.build_timeout,
    ) == ("nats://nats.example:4222", "/run/mcp.seed", True, "/run/admin.seed", True, 60, 120)
    monkeypatch.setenv("HOMELAB_DEPLOY_ENABLE_ADMIN", "no")
    assert hd.build_parser().parse_args(["mcp"]).enable_admin is False
    monkeypatch.setenv("HOMELAB_DEPLOY_ENABLE_BUILDS", "maybe")
    with pytest.raises(SystemExit) as exit:
        hd.build_parser()
    assert exit.value.code == 2  # like any invalid argument
    assert (
        "$HOMELAB_DEPLOY_ENABLE_BUILDS: 'maybe' is not a boolean: give 1, true, yes, 0, false or no"
        in capsys.readouterr().err
    )


@pytest.mark.skipif(TGKILL is None, reason="tgkill's syscall number is known for x86_64 and aarch64 only")
def test_sigterm_to_any_thread_stops_the_server(nats_server, tmp_path):
    """10 SIGTERMs, each sent to another thread than the main one: every one closes NATS and exits 0."""
    exits = []
    for run in range(10):
        err = tmp_path / f"stderr{run}"
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    *MCP_SCRIPT,
                    "--nats-url",
                    nats_server.url,
                    "--nkey-file",
                    str(nats_server.seeds["test-deployer"]),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            wait_for(
                lambda: "MCP server on stdio" in err.read_text() and len(os.listdir(f"/proc/{proc.pid}/task")) > 1,
                what="the MCP server to serve",
            )
            sigterm_to_a_thread(proc.pid, run)
            exits.append(proc.wait(30))
        finally:
            stop_process(proc)
            proc.stdin.close()
        assert "SIGTERM: closing the NATS connections and exiting" in err.read_text()
    assert exits == [0] * 10


def test_unreadable_key_is_a_startup_error(nats_server, tmp_path):
    r = subprocess.run(
        [sys.executable, *MCP_SCRIPT, "--nats-url", nats_server.url, "--nkey-file", str(tmp_path / "missing.seed")],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2 and "cannot read NKey seed file" in r.stderr


async def test_secrets_never_reach_stderr_or_tool_errors(mcp_server, nats_server):
    seed = nats_server.seeds["test-deployer"].read_text().strip()
    r = subprocess.run(
        [sys.executable, *MCP_SCRIPT, "--nats-url", nats_server.url, "--nkey-file", seed],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2 and "cannot read NKey seed file <an NKey seed, redacted>" in r.stderr, r.stderr
    assert seed not in r.stderr
    password_url = nats_server.url.replace("nats://", "nats://deploy:s3cret@")
    for url, message in (
        (password_url, "no host answered discovery"),
        ("nats://deploy:s3cret@127.0.0.1:1", "cannot reach NATS at nats://deploy:***@127.0.0.1:1"),
    ):
        async with mcp_server("--nats-url", url) as client:
            result = await client.call_tool("list_hosts", {})
            assert result.is_error and message in text(result) and "s3cret" not in text(result), text(result)
    stderr = mcp_server.errlog.read_text()
    assert f"NATS nats://deploy:***@127.0.0.1:{nats_server.port} (connects on first use)" in stderr
    assert f"connected to NATS at deploy:***@127.0.0.1:{nats_server.port}" in stderr and "s3cret" not in stderr


@pytest.mark.parametrize(
    "flags,tools",
    [
        ([], {"deploy", "list_hosts", "fleet_status", "deploy_logs"}),
        (["--enable-builds"], {"deploy", "list_hosts", "fleet_status", "deploy_logs", "build"}),
        (
            ["--enable-admin", "--admin-nkey-file", "ADMIN"],
            {"deploy", "deploy_admin", "reboot_admin", "list_hosts", "fleet_status", "deploy_logs"},
        ),
        (
            ["--enable-admin", "--admin-nkey-file", "ADMIN", "--enable-builds"],
            {"deploy", "deploy_admin", "reboot_admin", "list_hosts", "fleet_status", "deploy_logs", "build"},
        ),
    ],
)
async def test_tool_lists(mcp_server, nats_server, flags, tools):
    flags = [str(nats_server.seeds["admin"]) if f == "ADMIN" else f for f in flags]
    async with mcp_server(*flags) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
    assert set(listed) == tools
    deploy = listed["deploy"].input_schema
    assert set(deploy["properties"]) == {
        "hostname",
        "all",
        "role",
        "branch",
        "action",
        "pin",  # no tier to choose
        "canary",
        "batch_size",
        "max_failures",
        "from_build",
        "queue",
    }
    assert deploy["properties"]["branch"]["default"] == "master"
    assert deploy["properties"]["action"]["enum"] == ["switch", "boot", "test", "dry-activate"]
    assert deploy["properties"]["action"]["default"] == "switch"
    assert deploy["properties"]["all"] == {**deploy["properties"]["all"], "type": "boolean", "default": False}
    assert all(p.get("description") for p in deploy["properties"].values())
    assert "TEST-tier" in listed["deploy"].description and "cannot be reached" in listed["deploy"].description
    assert set(listed["deploy"].output_schema["properties"]) == {"summary", "success", "target", "hosts"}
    assert listed["list_hosts"].annotations.read_only_hint is True
    assert listed["fleet_status"].annotations.read_only_hint is True
    assert listed["deploy_logs"].annotations.read_only_hint is True
    assert listed["deploy_logs"].input_schema["required"] == ["hostname"]
    assert set(listed["deploy_logs"].input_schema["properties"]) == {"hostname", "request", "tail"}  # no tier
    assert listed["list_hosts"].input_schema.get("required", []) == []
    if "deploy_admin" in tools:
        admin = listed["deploy_admin"].input_schema
        assert admin["required"] == ["tier"]
        assert admin["properties"]["tier"]["enum"] == ["test", "prod"]
        assert {"canary", "batch_size", "max_failures"} <= set(admin["properties"])
        assert "PRODUCTION" in listed["deploy_admin"].description
        reboot = listed["reboot_admin"].input_schema
        assert reboot["required"] == ["tier"] and {"only_if_needed", "now", "canary"} <= set(reboot["properties"])
        assert not {"branch", "action", "pin"} & set(reboot["properties"])
        assert listed["reboot_admin"].annotations.destructive_hint is True
    if "build" in tools:
        assert listed["build"].input_schema["required"] == ["repo"]
        assert set(listed["build"].input_schema["properties"]) == {"repo", "target", "all", "branch"}


async def test_same_tools_through_the_cli(mcp_server):
    async with mcp_server("--enable-builds", program=CLI_MCP) as client:
        assert {t.name for t in (await client.list_tools()).tools} == {
            "deploy",
            "list_hosts",
            "fleet_status",
            "deploy_logs",
            "build",
        }


# ---------------------------------------------------------------- list_hosts and deploy (test tier)


async def test_list_hosts_and_tier_filter(mcp_server, start_listener):
    start_listener("testhost1", "test")
    start_listener("testhost2", "test", "web")
    start_listener("dns1", "prod", "dns")
    async with mcp_server() as client:
        result = await client.call_tool("list_hosts", {})
        assert not result.is_error, text(result)
        lines = text(result).splitlines()
        assert lines[0] == "3 hosts: 2 test, 1 prod"
        assert [line.split(":")[0] for line in lines[1:]] == ["dns1", "testhost1", "testhost2"]
        assert "tier prod, role dns, idle, UNSIGNED" in lines[1] and "deploy.prod.role.dns" in lines[1]
        assert all(h["unsigned"] for h in result.structured_content["hosts"])  # none has trusted keys
        assert [(h["hostname"], h["tier"], h["role"]) for h in result.structured_content["hosts"]] == [
            ("dns1", "prod", "dns"),
            ("testhost1", "test", None),
            ("testhost2", "test", "web"),
        ]
        result = await client.call_tool("list_hosts", {"tier": "prod"})
        assert [h["hostname"] for h in result.structured_content["hosts"]] == ["dns1"]
        result = await client.call_tool("list_hosts", {"tier": "staging"})
        assert result.is_error and "staging" in text(result)


async def test_list_hosts_nobody_answers_is_a_tool_error(mcp_server):
    async with mcp_server() as client:
        result = await client.call_tool("list_hosts", {})
    assert result.is_error and "no host answered discovery" in text(result)


async def test_fleet_status_reports_commits_history_and_drift(mcp_server, start_listener):
    one, two = start_listener("testhost1", "test"), start_listener("dns1", "prod", "dns")
    one.standin.set_revision(COMMIT_A)
    async with mcp_server() as client:
        assert not (await client.call_tool("deploy", {"hostname": "testhost1"})).is_error
        result = await client.call_tool("fleet_status", {})
        assert not result.is_error, text(result)
        lines = text(result).splitlines()
        assert lines[0] == "2 hosts, 0 drifted"
        assert lines[1].startswith("dns1: tier prod, role dns, idle, generation None, commit unknown, last deploy -")
        assert lines[2].startswith(
            f"testhost1: tier test, role -, idle, generation 1, commit {COMMIT_A}, last "
            "deploy switch master completed 0m ago"
        )
        [host] = [h for h in result.structured_content["hosts"] if h["hostname"] == "testhost1"]
        assert (host["generation"], host["commit"], host["drift"]) == (1, COMMIT_A, [])
        assert [(r["action"], r["revision"], r["status"]) for r in host["history"]] == [
            ("switch", "master", "completed")
        ]
        # someone switches testhost1 by hand: drift, and an error result so an assistant does not read it as fine
        subprocess.run(
            [str(one.standin.dir / "bin" / "nixos-rebuild"), "switch"], env=one.env, check=True, capture_output=True
        )
        result = await client.call_tool("fleet_status", {"tier": "test", "expect": "bbbbbbb"})
        assert result.is_error
        assert text(result).splitlines()[0] == "1 host, 1 drifted"
        assert result.structured_content["hosts"][0]["drift"] == [
            "generation 2 was made outside homelab-deploy (its last deploy left 1)",
            "last switch was master (" + COMMIT_A + "), expected bbbbbbb",
        ]
        result = await client.call_tool("fleet_status", {"expect": "x; rm -rf /"})
        assert result.is_error and "invalid expect" in text(result)
    assert len(two.standin.calls) == 0


async def test_deploy_with_pin_sends_one_commit(mcp_server, start_listener, git_repo):
    url, git = git_repo
    host = start_listener("testhost1", "test")
    async with mcp_server() as client:  # no --flake-url: pin cannot work, and nothing is sent
        result = await client.call_tool("deploy", {"hostname": "testhost1", "branch": "main", "pin": True})
        assert result.is_error and "cannot pin 'main'" in text(result) and "ask the operator" in text(result)
    assert host.standin.calls == []
    async with mcp_server("--flake-url", url) as client:
        result = await client.call_tool("deploy", {"hostname": "testhost1", "branch": "main", "pin": True})
        assert not result.is_error, text(result)
        commit = git("rev-parse", "main")
        assert (
            text(result).splitlines()[0] == f"1/1 hosts completed on deploy.test.testhost1 (switch of main -> {commit})"
        )
        result = await client.call_tool("deploy", {"hostname": "testhost1", "branch": "gone", "pin": True})
        assert result.is_error and "'gone' is neither a branch nor a tag" in text(result)
    assert [call[3] for call in host.standin.calls] == [f"git+https://git.example.com/cfg.git?rev={commit}#testhost1"]


async def test_deploy_to_a_test_host_completes_with_progress(mcp_server, start_listener):
    host = start_listener("testhost1", "test")
    progress: list[tuple[float, str]] = []

    async def on_progress(value, total, message):
        progress.append((value, message))

    async with mcp_server() as client:
        result = await client.call_tool(
            "deploy",
            {"hostname": "testhost1", "branch": "release/1.2", "action": "boot"},
            progress_callback=on_progress,
        )
    assert not result.is_error, text(result)
    summary, line = text(result).splitlines()
    assert summary == "1/1 hosts completed on deploy.test.testhost1 (boot of release/1.2)"
    assert line.startswith(
        'testhost1: completed - "Successfully set generation 1 as the boot default'
    ) and line.endswith("s)")
    doc = result.structured_content
    assert doc["success"] is True and doc["summary"] == summary and doc["target"] == "deploy.test.testhost1"
    assert [(h["hostname"], h["status"], h["error"]) for h in doc["hosts"]] == [("testhost1", "completed", None)]
    assert doc["hosts"][0]["duration_seconds"] > 0
    assert host.standin.calls == [
        ["boot", "--refresh", "--flake", "git+https://git.example.com/cfg.git?ref=release/1.2#testhost1"]
    ]
    assert [m.split()[1] for _, m in progress] == ["accepted", "started", "completed"]
    assert [v for v, _ in progress] == [1, 2, 3]


async def test_deploys_are_signed_with_the_servers_key(mcp_server, nats_server, start_listener):
    host = start_listener("testhost1", "test", None, "--trusted-key", f"{nats_server.public['test-deployer']}=mcp")
    other = start_listener("testhost2", "test", "web", "--trusted-key", f"{nats_server.public['admin']}=admin")
    async with mcp_server() as client:
        result = await client.call_tool("deploy", {"all": True})
    hosts = {h["hostname"]: h for h in result.structured_content["hosts"]}
    assert hosts["testhost1"]["status"] == "completed" and "(signed by mcp)" in host.log_text()
    assert "testhost2" not in hosts  # refused, never answered:
    await until(lambda: "not a trusted key here" in other.log_text(), "testhost2 to refuse the request")
    assert len(host.standin.calls) == 1 and other.standin.calls == []


async def test_deploy_all_and_role_stay_in_the_test_tier(mcp_server, start_listener):
    hosts = {
        name: start_listener(name, tier, role)
        for name, tier, role in [("testhost1", "test", None), ("testhost2", "test", "web"), ("dns1", "prod", "dns")]
    }
    async with mcp_server() as client:
        result = await client.call_tool("deploy", {"all": True})
        assert not result.is_error, text(result)
        assert text(result).splitlines()[0].startswith("2/2 hosts completed on deploy.test.all")
        result = await client.call_tool("deploy", {"role": "web", "action": "dry-activate"})
        assert [h["hostname"] for h in result.structured_content["hosts"]] == ["testhost2"]
    assert [len(h.standin.calls) for h in hosts.values()] == [1, 2, 0]


async def test_failed_host_is_an_error_result_with_every_host(mcp_server, start_listener):
    start_listener("testhost1", "test")
    start_listener("testhost2", "test", "web").standin.set_mode("fail")
    async with mcp_server() as client:
        result = await client.call_tool("deploy", {"all": True})
    assert result.is_error
    lines = text(result).splitlines()
    assert lines[0].startswith("1/2 hosts completed on deploy.test.all")
    assert lines[1].startswith("testhost1: completed")
    assert lines[2].startswith('testhost2: failed [build_failed] - "nixos-rebuild switch failed (exit code 1)')
    assert any(line.startswith('    output: "error: builder for') for line in lines[3:])  # the output's last lines
    assert result.structured_content["success"] is False
    assert "building the system configuration..." in result.structured_content["hosts"][1]["output"]


async def test_a_malformed_answer_does_not_hide_the_other_hosts(mcp_server, start_listener, rogue):
    """A listener's credential may publish to any deploy reply subject: one answer with a duration of "soon", ahead
    of the genuine ones, is logged and skipped, and the tool reports both hosts."""
    hosts = [start_listener("testhost1", "test"), start_listener("testhost2", "test", "web")]
    rogue("testhost1", "deploy.test.all", *hosts).load(
        [
            json.dumps(
                {
                    "hostname": "testhost1",
                    "status": "accepted",
                    "error": None,
                    "message": "",
                    "duration_seconds": "soon",
                }
            ).encode()
        ]
    )
    async with mcp_server() as client:
        result = await client.call_tool("deploy", {"all": True})
    assert not result.is_error, text(result)
    assert [(h["hostname"], h["status"]) for h in result.structured_content["hosts"]] == [
        ("testhost1", "completed"),
        ("testhost2", "completed"),
    ]
    assert "malformed deploy answer: duration_seconds is 'soon'" in mcp_server.errlog.read_text()


async def test_rollout_stops_at_a_failed_canary_then_runs_in_batches(mcp_server, nats_server, start_listener):
    """canary, batch_size and max_failures make deploy and deploy_admin roll out (docs/cli.md, Rollouts)."""
    first = start_listener("testhost1", "test")
    second = start_listener("testhost2", "test", "web")
    prod = start_listener("dns1", "prod", "dns")
    first.standin.set_mode("fail")
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    async with mcp_server("--enable-admin", "--admin-nkey-file", str(nats_server.seeds["admin"])) as client:
        result = await client.call_tool(
            "deploy", {"all": True, "canary": 1, "max_failures": 5}, progress_callback=on_progress
        )
        assert result.is_error
        assert text(result).splitlines()[0] == (
            "0/2 hosts completed on deploy.test.all (switch of master) in 2 batches; 1 skipped: the rollout stopped"
        )
        assert [(h["hostname"], h["status"]) for h in result.structured_content["hosts"]] == [
            ("testhost1", "failed"),
            ("testhost2", "skipped"),
        ]
        assert "canary: deploying testhost1" in progress and "stopping the rollout: the canary failed" in progress
        assert second.standin.calls == []
        first.standin.set_mode("succeed")
        result = await client.call_tool("deploy", {"all": True, "batch_size": "1"})
        assert (
            not result.is_error
            and "2/2 hosts completed on deploy.test.all (switch of master) in 2 batches" == text(result).splitlines()[0]
        ), text(result)
        for arguments, message in [
            ({"batch_size": "0%"}, "invalid batch_size: '0%' is not a batch size"),
            ({"canary": -1}, "greater than or equal to 0"),
            ({"max_failures": -1}, "greater than or equal to 0"),
        ]:
            result = await client.call_tool("deploy", {"all": True, **arguments})
            assert result.is_error and message in text(result), (arguments, text(result))
        result = await client.call_tool("deploy_admin", {"tier": "prod", "all": True, "canary": 1})
        assert not result.is_error and "1/1 hosts completed on deploy.prod.all" in text(result), text(result)
    assert [len(h.standin.calls) for h in (first, second, prod)] == [2, 1, 1]


# The test credential and the deploy tool must not reach dns1 (prod) whatever the arguments.
CRAFTED_TARGETS = [
    ({"hostname": "../dns1"}, "invalid hostname"),
    ({"hostname": "dns1.x"}, "invalid hostname"),
    ({"hostname": "*"}, "invalid hostname"),
    ({"hostname": ">"}, "invalid hostname"),
    ({"hostname": "prod.dns1"}, "invalid hostname"),
    ({"hostname": "deploy.prod.dns1"}, "invalid hostname"),
    ({"hostname": "dns1 "}, "invalid hostname"),
    ({"hostname": ""}, "invalid hostname"),
    ({"role": "dns.>"}, "invalid role"),
    ({"role": "*"}, "invalid role"),
    ({"hostname": "dns1"}, "no host answered on deploy.test.dns1"),
    ({"role": "dns"}, "no host answered on deploy.test.role.dns"),
    ({"hostname": "dns1", "tier": "prod"}, "no host answered on deploy.test.dns1"),  # no tier to set: ignored
]


async def test_deploy_cannot_reach_prod(mcp_server, start_listener):
    prod = start_listener("dns1", "prod", "dns")
    test = start_listener("testhost1", "test")
    async with mcp_server() as client:
        for arguments, message in CRAFTED_TARGETS:
            result = await client.call_tool("deploy", arguments)
            assert result.is_error and message in text(result), (arguments, text(result))
        result = await client.call_tool("deploy", {"all": True})
        assert [h["hostname"] for h in result.structured_content["hosts"]] == ["testhost1"]
    assert prod.standin.calls == [] and len(test.standin.calls) == 1


INVALID_ARGUMENTS = [
    ({}, "give exactly one target"),
    ({"hostname": "testhost1", "all": True}, "got hostname and all"),
    ({"hostname": "testhost1", "role": "web"}, "got hostname and role"),
    ({"hostname": "testhost1", "branch": "main;id"}, "invalid branch"),
    ({"hostname": "testhost1", "branch": "--upgrade"}, "invalid branch"),
    ({"hostname": "testhost1", "branch": "main#evil"}, "invalid branch"),
    ({"hostname": "testhost1", "action": "reboot"}, "Input should be 'switch', 'boot', 'test' or 'dry-activate'"),
    ({"hostname": "testhost1", "action": "switch; id"}, "literal_error"),
    ({"hostname": ["testhost1"]}, "hostname"),
    ({"all": "yes please"}, "all"),
]


async def test_invalid_arguments_are_tool_errors_and_send_nothing(mcp_server, start_listener):
    host = start_listener("testhost1", "test")
    async with mcp_server() as client:
        for arguments, message in INVALID_ARGUMENTS:
            # The SDK checks the input schema inside the tool call: an isError result, not a JSON-RPC error.
            result = await client.call_tool("deploy", arguments)
            assert result.is_error and message in text(result), (arguments, text(result))
        assert not (await client.call_tool("list_hosts", {})).is_error  # the server is still serving
    assert host.standin.calls == []


async def test_timeout_is_an_error_result_and_the_server_stays_responsive(mcp_server, start_listener):
    host = start_listener("testhost1", "test", None, "--heartbeat-interval", "0.2")
    host.standin.set_mode("block")
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    async with mcp_server("--timeout", "30") as client:
        async with anyio.create_task_group() as tg:
            outcome = {}

            async def deploy():
                outcome["result"] = await client.call_tool(
                    "deploy", {"hostname": "testhost1"}, progress_callback=on_progress
                )

            tg.start_soon(deploy)
            await until(
                lambda: host.standin.pids and sum("still running" in m for m in progress) >= 2,
                "a running deploy with heartbeats as progress",
            )
            listed = await client.call_tool("list_hosts", {})  # answered while the deploy call is open
            assert "testhost1: tier test, role -, deploying" in text(listed)
            host.standin.release()
        assert not outcome["result"].is_error
    async with mcp_server("--timeout", "1") as client:
        host.standin.set_mode("block")
        (host.standin.dir / "release").unlink()
        result = await client.call_tool("deploy", {"hostname": "testhost1"})
        host.standin.release()
    assert result.is_error
    assert "no final status within 1s from testhost1" in text(result).splitlines()[0]
    assert text(result).splitlines()[1].startswith("testhost1: started")


async def test_nats_outages_are_tool_errors_and_nothing_is_sent_late(mcp_server, nats_server, start_listener):
    nats_server.stop()
    async with mcp_server() as client:
        assert {t.name for t in (await client.list_tools()).tools} == {
            "deploy",
            "list_hosts",
            "fleet_status",
            "deploy_logs",
        }  # started anyway
        result = await client.call_tool("list_hosts", {})
        assert result.is_error and "cannot reach NATS" in text(result)
        nats_server.start_again()
        host = start_listener("testhost1", "test")
        assert not (await client.call_tool("list_hosts", {})).is_error  # connected on this call
        nats_server.stop()
        result = await client.call_tool("deploy", {"hostname": "testhost1"})
        assert (
            result.is_error
            and "not connected to NATS (reconnecting" in text(result)
            and "nothing was sent" in text(result)
        )
        nats_server.start_again()
        await until(lambda: "reconnected to NATS" in mcp_server.errlog.read_text(), "the server to reconnect")
        result = await client.call_tool("deploy", {"hostname": "testhost1"})
        assert not result.is_error, text(result)
    assert len(host.standin.calls) == 1  # the deploy refused during the outage never arrived later


async def test_a_denial_counts_for_its_own_call_only(mcp_server, nats_server, start_listener):
    """The operator grants the permission and reloads nats-server: the same call on the same connection works."""
    host = start_listener("testhost1", "test")

    def reload_with(publish: list[str]) -> None:
        fleet = {**FLEET, "test-deployer": {**FLEET["test-deployer"], "publish": publish}}
        nats_server.write_config(
            [{"nkey": nats_server.public[name], "permissions": permissions} for name, permissions in fleet.items()],
            nats_server.port,
        )
        log = nats_server.workdir / "nats.log"
        reloads = log.read_text().count("Reloaded server configuration")
        nats_server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.read_text().count("Reloaded server configuration") > reloads, what="nats-server to reload")

    async with mcp_server() as client:
        reload_with(["deploy.discover"])
        result = await client.call_tool("deploy", {"hostname": "testhost1"})
        assert result.is_error and "permission denied" in text(result), text(result)
        assert host.standin.calls == []
        reload_with(FLEET["test-deployer"]["publish"])
        result = await client.call_tool("deploy", {"hostname": "testhost1"})
        assert not result.is_error, text(result)
        assert text(result).startswith("1/1 hosts completed on deploy.test.testhost1")
    assert len(host.standin.calls) == 1


async def test_stall_after_publishing_is_outcome_unknown(mcp_server, start_listener, stalling_proxy):
    """NATS took the request, then stopped answering: the result says the outcome is unknown and how to check,
    in the deploy's result shape, not a bare tool error an assistant would retry; the deploy did run."""
    host = start_listener("testhost1", "test")
    async with mcp_server("--nats-url", stalling_proxy.url) as client:
        result = await client.call_tool("deploy", {"hostname": "testhost1"})
    assert stalling_proxy.stalled.is_set()
    assert text(result).startswith(
        "OUTCOME UNKNOWN: the request on deploy.test.testhost1 went out but was not confirmed"
    ), text(result)
    assert "Do not retry blindly: call list_hosts to see which hosts are deploying now" in text(result)
    assert result.is_error and result.structured_content == {
        "summary": text(result),
        "success": False,
        "target": "deploy.test.testhost1",
        "hosts": [],
    }
    wait_for(lambda: "completed in" in host.log_text(), what="the deploy to end")
    assert len(host.standin.calls) == 1


# ---------------------------------------------------------------- deploy_admin


async def test_deploy_admin_reaches_prod_on_its_own_credential(mcp_server, nats_server, start_listener):
    prod = start_listener("dns1", "prod", "dns")
    async with mcp_server("--enable-admin", "--admin-nkey-file", str(nats_server.seeds["admin"])) as client:
        result = await client.call_tool("deploy_admin", {"tier": "prod", "hostname": "dns1"})
        assert not result.is_error, text(result)
        assert text(result).splitlines()[0] == "1/1 hosts completed on deploy.prod.dns1 (switch of master)"
        result = await client.call_tool("deploy_admin", {"tier": "prod", "role": "dns", "action": "test"})
        assert result.structured_content["target"] == "deploy.prod.role.dns" and not result.is_error
        result = await client.call_tool("deploy", {"hostname": "dns1"})  # still the test tier and credential
        assert result.is_error
        for arguments in (
            {"hostname": "dns1"},
            {"tier": "staging", "hostname": "dns1"},
            {"tier": "prod", "hostname": "dns1.>"},
        ):
            result = await client.call_tool("deploy_admin", arguments)
            assert result.is_error, arguments
    assert [call[0] for call in prod.standin.calls] == ["switch", "test"]


async def test_admin_tool_with_a_test_credential_is_permission_denied(mcp_server, nats_server, start_listener):
    prod = start_listener("dns1", "prod", "dns")
    async with mcp_server("--enable-admin", "--admin-nkey-file", str(nats_server.seeds["test-deployer"])) as client:
        result = await client.call_tool("deploy_admin", {"tier": "prod", "hostname": "dns1"})
        assert result.is_error and "permission denied" in text(result) and "deploy.prod.dns1" in text(result)
        assert not (await client.call_tool("list_hosts", {})).is_error
    assert prod.standin.calls == []


# ---------------------------------------------------------------- build


@needs_nix
async def test_build_reports_per_host_results(mcp_server, start_builder, flake):
    builder = start_builder({"fleet": flake()})  # good1, good2, broken, and "bad;name" which is never built
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    async with mcp_server("--enable-builds", user="build-client") as client:
        result = await client.call_tool("build", {"repo": "fleet"}, progress_callback=on_progress)
        assert result.is_error  # a host failed to build
        lines = text(result).splitlines()
        assert lines[0] == '2/3 hosts completed on build.fleet.all (branch main): "built 2/3 hosts; failed: broken"'
        assert lines[1].startswith("broken: failed [build_failed] - ") and "intentional build failure" in lines[1]
        assert [line.split(":")[0] for line in lines if not line.startswith(" ")][2:] == ["good1", "good2"]
        doc = result.structured_content
        assert doc["success"] is False and doc["target"] == "build.fleet.all"
        assert [(h["hostname"], h["status"]) for h in doc["hosts"]] == [
            ("broken", "failed"),
            ("good1", "completed"),
            ("good2", "completed"),
        ]
        assert all(h["duration_seconds"] > 0 for h in doc["hosts"])
        assert sorted(m.split()[0] for m in progress if m.startswith("[")) == ["[1/3]", "[2/3]", "[3/3]"]
        result = await client.call_tool("build", {"repo": "fleet", "target": "good1", "branch": "main"})
        assert not result.is_error, text(result)
        assert (
            text(result).splitlines()[0] == "1/1 hosts completed on build.fleet.good1 (branch main): "
            '"built 1/1 hosts successfully"'
        )
        for arguments, message in [
            ({"repo": "fleet", "target": "good1", "all": True}, "not both"),
            ({"repo": "fleet", "target": "bad;name"}, "invalid build request"),
            ({"repo": "fleet", "target": "web.example"}, "build hosts named with '.' with --all"),
            ({"repo": "fleet", "branch": "main;id"}, "invalid build request"),
            ({"repo": "a.b"}, "invalid build request"),
            ({"repo": "second"}, "permission denied"),
            ({"repo": "unknown"}, "no builder answered on build.unknown.all"),
            ({}, "repo"),
        ]:
            result = await client.call_tool("build", arguments)
            assert result.is_error and message in text(result), (arguments, text(result))
    assert len(builder.builds()) == 4
    assert not any("bad;name" in arg for call in builder.nix_calls for arg in call)


async def test_reboot_admin_reboots_the_hosts_fleet_status_says_need_it(mcp_server, nats_server, rebooting_host):
    needs = rebooting_host("dns1", role="dns", tier="prod")
    fine = rebooting_host("testhost1", needs=False)
    async with mcp_server("--enable-admin", "--admin-nkey-file", str(nats_server.seeds["admin"])) as client:
        result = await client.call_tool("fleet_status", {})
        assert text(result).splitlines()[0] == "2 hosts, 0 drifted, 1 need a reboot", text(result)
        assert "NEEDS REBOOT" in text(result).splitlines()[1] and "NEEDS REBOOT" not in text(result).splitlines()[2]
        assert [h["needs_reboot"] for h in result.structured_content["hosts"]] == [True, False]
        done = {}

        async def reboot(tier: str, host: str) -> None:
            arguments = {"tier": tier, "hostname": host, "only_if_needed": True}
            done[host] = await client.call_tool("reboot_admin", arguments)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(reboot, "prod", "dns1")
            await until(lambda: ran(needs) == 1, "dns1's reboot")
            await anyio.to_thread.run_sync(boot_again, needs)
        assert not done["dns1"].is_error, text(done["dns1"])
        assert text(done["dns1"]).splitlines()[0] == "1/1 hosts completed on deploy.prod.dns1 (reboot) in 1 batches"
        await reboot("test", "testhost1")  # needs none: skipped, and that is success
        assert not done["testhost1"].is_error and ran(fine) == 0, text(done["testhost1"])
        assert "1 need no reboot (skipped)" in text(done["testhost1"]).splitlines()[0]
        result = await client.call_tool("fleet_status", {})
        assert [h["needs_reboot"] for h in result.structured_content["hosts"]] == [False, False]


# ---------------------------------------------------------------- the host registry and queued deploys


class TestRegistry:
    """Issue 28: the tools with the registry, on registry_server (JetStream and `nats-config`'s users; the MCP
    server on its test key, mcp) and its fleet (web1, web2: test, role web)."""

    @pytest.fixture
    def nats_server(self, registry_server):
        return registry_server

    async def test_fleet_status_shows_offline_and_queued_hosts(self, mcp_server, registry_fleet):
        registry_fleet("web1")
        web2 = registry_fleet("web2")
        web2.stop()
        async with mcp_server(user="mcp") as client:
            deployed = await client.call_tool("deploy", {"role": "web", "branch": "main", "queue": True})
            status = await client.call_tool("fleet_status", {})
        assert not deployed.is_error, text(deployed)
        assert "1/2 hosts completed on deploy.test.role.web" in text(deployed)
        assert "1 offline and queued" in text(deployed)
        outcome = {h["hostname"]: h["status"] for h in deployed.structured_content["hosts"]}
        assert outcome == {"web1": "completed", "web2": "queued"} and web2.standin.calls == []
        lines = text(status).splitlines()
        assert "1 offline" in lines[0] and "1 with a queued deploy" in lines[0]
        assert any(line.startswith("web2: tier test, role web, OFFLINE (last seen ") for line in lines)
        assert any(line.startswith('    QUEUED: switch of "main", runs when the host is back') for line in lines)
        hosts = {h["hostname"]: h for h in status.structured_content["hosts"]}
        assert hosts["web2"]["online"] is False and hosts["web1"]["online"] is True
        assert hosts["web2"]["queued"]["action"] == "switch" and hosts["web1"]["queued"] is None

    async def test_deploy_without_queue_fails_an_offline_host(self, mcp_server, registry_fleet):
        registry_fleet("web1").stop()
        async with mcp_server(user="mcp") as client:
            result = await client.call_tool("deploy", {"hostname": "web1", "branch": "main"})
            refused = await client.call_tool("deploy", {"all": True, "queue": True, "canary": 1})
        assert result.is_error and "web1: failed - " in text(result) and "offline (last seen" in text(result)
        assert refused.is_error and "queue reaches the registry's offline hosts" in text(refused)
