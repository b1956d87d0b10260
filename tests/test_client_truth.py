"""Issue 26, the client side: rollouts, status, pinning and Ctrl-C tell the truth when a host lies or the user
interrupts. Real nats-server (this module's: the spec's fleet plus a custom discovery subject), real listener
processes with the nixos-rebuild stand-in, real git repositories, a real MCP client."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

import homelab_deploy as hd
from tests import helpers
from tests.helpers import GOOD, PROGRAM, deploy_args, needs_nix, run_cli, text, wait_for

CUSTOM_DISCOVER = "fleet.discover"  # a discovery subject outside the default, as module.nix's discoverSubject


@pytest.fixture
def nats_server(tmp_path):
    """The spec's fleet, where listeners may also subscribe, and deployers publish, to CUSTOM_DISCOVER."""
    users = {
        name: {**perms, "subscribe": [*perms["subscribe"], CUSTOM_DISCOVER]}
        if name in ("testhost1", "testhost2", "dns1")
        else {**perms, "publish": [*perms["publish"], CUSTOM_DISCOVER]}
        if name in ("test-deployer", "admin")
        else perms
        for name, perms in helpers.FLEET.items()
    }
    server = helpers.NatsServer(tmp_path, users)
    server.start()
    yield server
    server.stop()


def discovery_answer(hostname: str, tier: str, *subjects: str) -> bytes:
    return json.dumps(
        {
            "hostname": hostname,
            "tier": tier,
            "role": None,
            "deploy_subjects": list(subjects),
            "version": "rogue",
            "deploying": False,
        }
    ).encode()


def cli_process(args: list[str], stderr_path) -> subprocess.Popen:
    with open(stderr_path, "w") as err:
        return subprocess.Popen(
            [*PROGRAM, *args], stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )


# ---------------------------------------------------------------- 1. a host's self-reported tier


def test_a_host_claiming_prod_is_left_out_of_a_test_rollout(nats_server, start_listener, rogue):
    """testhost2's credential answers discovery as a prod host listening on deploy.test.all: before, the test
    rollout published on deploy.prod.testhost2, was refused and aborted (exit 3) with testhost1 half done."""
    host = start_listener("testhost1", "test")
    rogue("testhost2", "deploy.discover").load(
        [discovery_answer("testhost2", "prod", "deploy.test.all", "deploy.prod.testhost2")]
    )
    r = run_cli("deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer", "--batch-size", "1"))
    assert r.returncode == 0, r.stderr
    assert "deploy.test.all: 1/1 hosts completed (1 completed) in 1 batches" in r.stderr
    assert "host=testhost2 left out of the rollout on deploy.test.all: it answers discovery as tier prod" in r.stderr
    assert len(host.standin.calls) == 1


def test_a_prod_rollout_plans_only_prod_hosts_that_listen_on_their_own_subject(nats_server, start_listener, rogue):
    """A test host listing deploy.prod.all would be a prod canary, deployed on deploy.test.testhost2 by the admin
    credential; a host claiming prod without deploy.prod.<itself> used to stop every rollout (exit 2)."""
    start_listener("dns1", "prod", "dns")
    rogue("testhost2", "deploy.discover").load(
        [discovery_answer("testhost2", "test", "deploy.prod.all", "deploy.test.testhost2")]
    )
    rogue("testhost1", "deploy.discover").load([discovery_answer("testhost1", "prod", "deploy.prod.all")])
    r = run_cli("deploy", "deploy.prod.all", *deploy_args(nats_server, "admin", "--canary", "2", "--plan"))
    assert r.returncode == 0 and r.stdout == "canary: dns1\n", r.stdout + r.stderr
    assert "host=testhost2 left out of the rollout on deploy.prod.all: it answers discovery as tier test" in r.stderr
    assert "host=testhost1 left out of the rollout on deploy.prod.all: it answers discovery as tier prod" in r.stderr


@pytest.mark.anyio
async def test_mcp_rollout_leaves_out_a_host_claiming_another_tier(mcp_server, start_listener, rogue):
    start_listener("testhost1", "test")
    rogue("testhost2", "deploy.discover").load(
        [discovery_answer("testhost2", "prod", "deploy.test.all", "deploy.prod.testhost2")]
    )
    async with mcp_server() as client:
        result = await client.call_tool("deploy", {"all": True, "batch_size": "1"})
    assert not result.is_error, text(result)
    assert text(result).splitlines()[0] == "1/1 hosts completed on deploy.test.all (switch of master) in 1 batches"
    assert "host=testhost2 left out of the rollout" in mcp_server.errlog.read_text()


# ---------------------------------------------------------------- 2. an impossible date in one answer

IMPOSSIBLE = "2026-13-45T99:99:99Z"  # the shape of a time, no real one


def load_status_with_impossible_date(rogue) -> None:
    record = {
        "request": "r1",
        "action": "switch",
        "revision": "main",
        "status": "completed",
        "started": "2026-01-01T00:00:00Z",
        "finished": IMPOSSIBLE,
        "duration_seconds": 1,
    }
    rogue("testhost2", "deploy.status").load(
        [
            json.dumps(
                {
                    "hostname": "testhost2",
                    "tier": "test",
                    "role": None,
                    "deploy_subjects": ["deploy.test.testhost2"],
                    "deploying": False,
                    "generation": 1,
                    "commit": None,
                    "history": [record],
                }
            ).encode()
        ]
    )


def test_status_skips_an_answer_with_an_impossible_date_and_shows_the_rest(nats_server, start_listener, rogue):
    start_listener("testhost1", "test")
    load_status_with_impossible_date(rogue)
    r = run_cli("status", *deploy_args(nats_server, "test-deployer"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["HOSTNAME", "testhost1"]
    assert f"malformed deploy record: finished is '{IMPOSSIBLE}', not a valid finished" in r.stderr


@pytest.mark.anyio
async def test_fleet_status_skips_an_answer_with_an_impossible_date(mcp_server, start_listener, rogue):
    start_listener("testhost1", "test")
    load_status_with_impossible_date(rogue)
    async with mcp_server() as client:
        result = await client.call_tool("fleet_status", {})
    assert not result.is_error, text(result)
    assert [h["hostname"] for h in result.structured_content["hosts"]] == ["testhost1"]
    assert f"finished is '{IMPOSSIBLE}'" in mcp_server.errlog.read_text()


# ---------------------------------------------------------------- 6. --pin: the ref policy and annotated tags


def test_pin_refuses_a_ref_outside_branches_and_tags(nats_server, start_listener, git_repo):
    url, git = git_repo
    git("update-ref", "refs/pull/1/head", "main")  # a pull request's head, which no maintainer merged
    host = start_listener("testhost1", "test")
    r = run_cli(
        "deploy",
        "deploy.test.testhost1",
        "--pin",
        "--flake-url",
        url,
        "--branch",
        "refs/pull/1/head",
        *deploy_args(nats_server, "test-deployer"),
    )
    assert r.returncode == 2, r.stderr
    assert "--pin resolves branches and tags only: 'refs/pull/1/head' is outside them" in r.stderr
    assert "nothing was sent" in r.stderr and host.standin.calls == []


def test_pin_of_an_annotated_tag_ref_sends_its_commit(nats_server, start_listener, git_repo):
    url, git = git_repo
    commit = git("rev-parse", "v1^{commit}")
    assert git("rev-parse", "refs/tags/v1") != commit  # an annotated tag: a tag object of its own
    host = start_listener("testhost1", "test")
    r = run_cli(
        "deploy",
        "deploy.test.testhost1",
        "--pin",
        "--flake-url",
        url,
        "--branch",
        "refs/tags/v1",
        *deploy_args(nats_server, "test-deployer"),
    )
    assert r.returncode == 0 and f"pinned refs/tags/v1 -> {commit}" in r.stderr, r.stderr
    assert host.standin.calls[-1][3] == f"git+https://git.example.com/cfg.git?rev={commit}#testhost1"


# ---------------------------------------------------------------- 7. a custom discovery subject


def test_rollout_discovers_on_the_given_subject(nats_server, start_listener):
    host = start_listener("testhost1", "test", None, "--discover-subject", CUSTOM_DISCOVER)
    deploy = ["deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer", "--batch-size", "1")]
    r = run_cli(*deploy, "--discover-subject", CUSTOM_DISCOVER)
    assert r.returncode == 0 and "1/1 hosts completed (1 completed) in 1 batches" in r.stderr, r.stderr
    assert len(host.standin.calls) == 1
    r = run_cli(*deploy, "--plan", env={"HOMELAB_DEPLOY_DISCOVER_SUBJECT": CUSTOM_DISCOVER})
    assert r.returncode == 0 and r.stdout == "batch 1: testhost1\n", r.stderr
    r = run_cli(*deploy, "--plan")  # deploy.discover: nobody listens there
    assert r.returncode == 4 and "no host answered discovery" in r.stderr
    r = run_cli(*deploy, "--discover-subject", "deploy.>")
    assert r.returncode == 2 and "argument --discover-subject: 'deploy.>' is not a NATS subject" in r.stderr
    assert len(host.standin.calls) == 1


@pytest.mark.anyio
async def test_mcp_rollout_discovers_on_its_discover_subject(mcp_server, start_listener):
    host = start_listener("testhost1", "test", None, "--discover-subject", CUSTOM_DISCOVER)
    async with mcp_server("--discover-subject", CUSTOM_DISCOVER) as client:
        result = await client.call_tool("deploy", {"all": True, "batch_size": "1"})
    assert not result.is_error, text(result)
    assert len(host.standin.calls) == 1


# ---------------------------------------------------------------- 8. status --expect compares commits


def test_expect_compares_commits(nats_server, start_listener, git_repo):
    url, git = git_repo
    first = git("rev-parse", "main")
    start_listener("testhost1", "test").standin.set_revision(first)
    assert (
        run_cli(
            "deploy", "deploy.test.testhost1", "--branch", "main", *deploy_args(nats_server, "test-deployer")
        ).returncode
        == 0
    )
    status = ["status", *deploy_args(nats_server, "test-deployer")]
    assert run_cli(*status, "--expect", "main", "--flake-url", url).returncode == 0
    r = run_cli(*status, "--expect", first[:7])  # as the COMMIT column shows it; no git needed
    assert r.returncode == 0 and "DRIFT" not in r.stdout, r.stdout + r.stderr
    git("commit", "-q", "--allow-empty", "-m", "third")  # main moves on: the host no longer runs it
    moved = git("rev-parse", "main")
    r = run_cli(*status, "--expect", "main", env={"HOMELAB_DEPLOY_FLAKE_URL": url})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"DRIFT: last switch was main ({first}), expected {moved}" in r.stdout
    r = run_cli(*status, "--expect", "v1", "--flake-url", url)  # an annotated tag: its commit
    assert r.returncode == 1 and f"expected {git('rev-parse', 'v1^{commit}')}" in r.stdout, r.stdout + r.stderr
    r = run_cli(*status, "--expect", "main")
    assert r.returncode == 2 and "--expect needs the fleet's git flake URL" in r.stderr
    r = run_cli(*status, "--expect=-x")
    assert r.returncode == 2 and "invalid --expect '-x'" in r.stderr


# ---------------------------------------------------------------- 12. Ctrl-C


def test_ctrl_c_on_deploy_exits_130_naming_the_running_host(nats_server, start_listener, tmp_path):
    host = start_listener("testhost1", "test")
    host.standin.set_mode("block")
    err = tmp_path / "cli.err"
    cli = cli_process(["deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer")], err)
    try:
        wait_for(lambda: "testhost1: started" in err.read_text(), what="the deploy to start")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(60) == 130, err.read_text()
    finally:
        helpers.stop_process(cli)
        host.standin.release()
    assert "Traceback" not in err.read_text()
    assert err.read_text().splitlines()[-1] == (
        "interrupted: testhost1 may still be deploying (accepted, no final status yet); `homelab-deploy status` "
        "shows the outcome"
    )
    wait_for(lambda: host.standin.spans, what="the deploy to go on and finish on the host")


def test_a_second_ctrl_c_leaves_a_rollout_at_once(nats_server, start_listener, tmp_path):
    first = start_listener("testhost1", "test")
    first.standin.set_mode("block")
    second = start_listener("testhost2", "test", "web")
    err = tmp_path / "cli.err"
    cli = cli_process(
        ["deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer", "--batch-size", "1")], err
    )
    try:
        wait_for(lambda: "testhost1: started" in err.read_text(), what="the first batch to start")
        cli.send_signal(signal.SIGINT)
        wait_for(lambda: "interrupted: starting no new batch" in err.read_text(), what="the CLI to notice")
        cli.send_signal(signal.SIGINT)
        code = wait_for(cli.poll, what="the CLI to leave after the second Ctrl-C")  # 130 is truthy
    finally:
        helpers.stop_process(cli)
        first.standin.release()
    assert code == 130 and "Traceback" not in err.read_text(), err.read_text()
    assert err.read_text().splitlines()[-1].startswith("interrupted: testhost1 may still be deploying")
    assert second.standin.calls == []


@needs_nix
def test_ctrl_c_on_build_exits_130_saying_the_build_goes_on(nats_server, start_builder, flake, tmp_path):
    marker, release = tmp_path / "started", tmp_path / "release"
    start_builder(
        {"fleet": flake({"blocker": f"touch {marker}; while [ ! -e {release} ]; do sleep 0.05; done; {GOOD}"})}
    )
    err = tmp_path / "cli.err"
    cli = cli_process(["build", "fleet", *deploy_args(nats_server, "build-client")], err)
    try:
        wait_for(marker.exists, timeout=120, what="the build to run")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(60) == 130, err.read_text()
    finally:
        helpers.stop_process(cli)
        release.touch()
    assert "Traceback" not in err.read_text()
    assert err.read_text().splitlines()[-1] == (
        "interrupted: the builder may still be building all of fleet; its "
        "log and `homelab-deploy events` show the outcome"
    )


# ---------------------------------------------------------------- 13. events --since without JetStream


def test_events_since_on_a_server_without_jetstream_exits_3(nats_server):
    r = run_cli("events", "--since", "1h", *deploy_args(nats_server, "admin"), timeout=60)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [
        "error: this NATS server has no JetStream stream HOMELAB_DEPLOY_EVENTS (or no JetStream: nats-server -js): "
        "create it as docs/security.md shows ('Signed requests and audit'), e.g. `nats stream add --config` of "
        f"{json.dumps(hd.EVENTS_STREAM_CONFIG)}, or follow live events without --since"
    ]
