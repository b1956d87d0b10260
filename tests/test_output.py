"""Issue 30, a deploy's output: `deploy --follow` prints nixos-rebuild's lines while it runs; `logs` prints the whole
output of one of a host's last deploys; the MCP tool deploy_logs. Real nats-server, real listener processes with the
nixos-rebuild stand-in, the CLI as a real process, a real MCP client."""

from __future__ import annotations

import json
import subprocess

import pytest

import homelab_deploy as hd
from tests.helpers import (
    PROGRAM,
    collect,
    deploy_args,
    has_final,
    run_cli,
    start_deploy,
    stop_process,
    text,
    trusted,
    wait_for,
)

LONG_FAILURE = [
    "building the system configuration...",
    *(f"line {i} of 300" for i in range(1, 150)),
    "line 150 of 300: fetching git+https://alice:***@git.example.com/c.git",
    *(f"line {i} of 300" for i in range(151, 301)),
]


def cli_process(args: list[str], tmp_path) -> subprocess.Popen:
    """The CLI with its stdout and stderr in files (cli.out, cli.err) the test can read while it runs."""
    with open(tmp_path / "cli.out", "w") as out, open(tmp_path / "cli.err", "w") as err:
        return subprocess.Popen([*PROGRAM, *args], stdout=out, stderr=err, start_new_session=True)


# ---------------------------------------------------------------- deploy --follow


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_follow_prints_output_lines_before_the_deploy_ends(nats_server, start_listener, tmp_path, as_json):
    host = start_listener("testhost1", "test")
    host.standin.set_mode("block")
    flags = ["--follow", *(["--json"] if as_json else [])]
    cli = cli_process(["deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer", *flags)], tmp_path)
    out = tmp_path / "cli.out"
    first = (
        json.dumps({"hostname": "testhost1", "log": "building the system configuration..."})
        if as_json
        else "testhost1 | building the system configuration..."
    )
    try:
        wait_for(lambda: first in out.read_text(), what="the first output line while nixos-rebuild runs")
        assert cli.poll() is None and host.standin.spans == []  # nixos-rebuild still blocks: the deploy runs
        host.standin.release()
        assert cli.wait(60) == 0, (tmp_path / "cli.err").read_text()
    finally:
        host.standin.release()
        stop_process(cli)
    lines = out.read_text().splitlines()
    if not as_json:
        assert lines == [first, "testhost1 | activating the configuration..."]
        return
    objects = [json.loads(line) for line in lines]  # NDJSON: every line one object, the final document last
    assert objects[:-1] == [json.loads(first), {"hostname": "testhost1", "log": "activating the configuration..."}]
    assert objects[-1]["success"] is True and objects[-1]["hosts"][0]["status"] == "completed"


def test_without_follow_no_output_lines_are_sent(nats_server, start_listener, bus_factory):
    """The request carries no `follow`: the host sends no `log` answers, and the CLI's stdout is as before."""
    start_listener("testhost1", "test")
    r = subprocess.run(
        [*PROGRAM, "deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert "testhost1 | " not in r.stderr


def test_follow_is_bounded_redacted_and_says_what_it_dropped(nats_server, start_listener, tmp_path):
    """300 lines at once: at most 19 a batch reach the CLI, the rest are counted in a note; a URL's password is
    redacted; every line the host read is either printed or counted."""
    host = start_listener("testhost1", "test")
    host.standin.set_mode("fail-long")
    r = subprocess.run(
        [*PROGRAM, "deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer", "--follow")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    lines = [line.removeprefix("testhost1 | ") for line in r.stdout.splitlines()]
    notes = [line for line in lines if line.startswith("[")]
    dropped = sum(int(note[1:].split()[0]) for note in notes)
    assert notes and all(" line(s) not sent: more than 95 a second; " in note for note in notes)
    assert len(lines) - len(notes) + dropped == 301  # "building the system configuration..." and 300 lines
    assert "hunter2" not in r.stdout + r.stderr
    assert all(line.startswith("testhost1 | ") for line in r.stdout.splitlines())


def test_follow_in_a_rollout_prints_each_hosts_lines(nats_server, start_listener):
    start_listener("testhost1", "test")
    start_listener("testhost2", "test", "web")
    r = run_cli(
        "deploy", "deploy.test.all", *deploy_args(nats_server, "test-deployer", "--batch-size", "1", "--follow")
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"{host} | {line}"
        for host in ("testhost1", "testhost2")
        for line in ("building the system configuration...", "activating the configuration...")
    ]


# ---------------------------------------------------------------- logs


def deploy(nats_server, bus_factory, host, mode: str = "succeed") -> str:
    """One unsigned deploy of `host` in stand-in `mode`, to its final status; returns its request id."""
    host.standin.set_mode(mode)
    reply_to, replies = start_deploy(bus_factory(nats_server, "admin"), f"deploy.test.{host.hostname}")
    collect(replies, has_final, 60, "the final status")
    return hd.request_id(reply_to)


def test_logs_prints_every_line_of_a_long_failure(nats_server, start_listener):
    """300 lines, of which the failure report shows the last 20: `logs` prints them all, redacted, from a host that
    acts only on signed requests (the CLI signs the logs request as it signs deploys)."""
    host = start_listener("testhost1", "test", None, *trusted(nats_server, "test-deployer"))
    host.standin.set_mode("fail-long")
    r = run_cli("deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer"))
    assert r.returncode == 1 and "[build_failed]" in r.stderr, r.stderr
    r = run_cli("logs", "testhost1", *deploy_args(nats_server, "test-deployer"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == LONG_FAILURE
    assert "hunter2" not in r.stdout + r.stderr + host.log_text()
    [record] = (host.standin.dir / "state").glob("log-*.json")
    assert record.stat().st_mode & 0o777 == 0o600 and "hunter2" not in record.read_text()
    rid = record.name.removeprefix("log-").removesuffix(".json")
    assert r.stderr.startswith(f"testhost1: output of request {rid} (switch of master, finished ")
    assert r.stderr.rstrip().endswith("), 301 lines")
    r = run_cli("logs", "testhost1", "--tier", "test", *deploy_args(nats_server, "admin"))  # not a trusted key
    assert r.returncode == 4 and "testhost1 did not answer on deploy.logs.test.testhost1 within" in r.stderr
    wait_for(lambda: "logs request refused: unauthorized: signed by" in host.log_text(), what="the refusal logged")
    r = run_cli(
        "logs",
        "testhost1",
        "--request",
        rid[:8],
        "--tier",
        "test",
        "--json",
        *deploy_args(nats_server, "test-deployer"),
    )
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert (answer["hostname"], answer["request"], answer["lines"]) == ("testhost1", rid, LONG_FAILURE)


def test_a_host_keeps_the_output_of_its_last_five_deploys(nats_server, start_listener, bus_factory):
    host = start_listener("testhost1", "test")
    rids = [deploy(nats_server, bus_factory, host) for _ in range(3)]
    host.stop()  # the next listener finds the logs kept by the one before it
    host.log.write_text("")  # start() waits for a new " ready " line
    host.start()
    rids += [deploy(nats_server, bus_factory, host) for _ in range(3)]
    kept = sorted(p.name for p in (host.standin.dir / "state").glob("log-*.json"))
    assert kept == sorted(f"log-{rid}.json" for rid in rids[1:])
    r = run_cli("logs", "testhost1", "--request", rids[0], *deploy_args(nats_server, "test-deployer"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(
        f"error: testhost1 keeps no log of request {rids[0]}: it keeps the output of its last 5 deploys ("
    )
    assert all(rid in r.stderr for rid in rids[1:]) and "`homelab-deploy status --history 5` shows" in r.stderr
    r = run_cli("logs", "testhost1", "--request", rids[-1], *deploy_args(nats_server, "test-deployer"))
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "building the system configuration...",
        "activating the configuration...",
    ]


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (["--request", "zz12"], 2, "error: invalid --request 'zz12': give a request id as `events` (id=)"),
        (["--request", "0123abcd"], 1, "error: testhost1 keeps no deploy output yet\n"),
        (["--tier", "prod"], 3, "may not publish to 'deploy.logs.prod.testhost1'"),
    ],
)
def test_logs_errors_name_the_problem(nats_server, start_listener, args, code, error):
    start_listener("testhost1", "test")
    r = run_cli("logs", "testhost1", *args, *deploy_args(nats_server, "test-deployer"))
    assert r.returncode == code and error in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_test_deployer_cannot_fetch_a_prod_hosts_logs(nats_server, start_listener, bus_factory):
    """dns1 answers discovery as a prod host; its logs subject is for admins: the test deployer is refused by NATS
    (exit 3) and dns1 never sees the request, while an admin gets its log."""
    host = start_listener("dns1", "prod", "dns")
    host.standin.set_mode("fail")
    reply_to, replies = start_deploy(bus_factory(nats_server, "admin"), "deploy.prod.dns1")
    collect(replies, has_final, 60, "the final status")
    r = run_cli("logs", "dns1", *deploy_args(nats_server, "test-deployer"))
    assert r.returncode == 3 and r.stdout == "", r.stderr
    assert "permission denied" in r.stderr and "may not publish to 'deploy.logs.prod.dns1'" in r.stderr
    assert "a host's logs are for the deployers of its tier (prod)" in r.stderr
    assert "logs request" not in host.log_text()
    r = run_cli("logs", "dns1", *deploy_args(nats_server, "admin"))
    assert r.returncode == 0 and r.stdout.splitlines()[-1].startswith("error: builder for"), r.stderr
    assert f"request={hd.request_id(reply_to)} logs request answered: 2 lines in 1 part(s)" in host.log_text()


def test_a_log_larger_than_max_payload_comes_in_parts(nats_server, listener_in_process, bus_factory):
    """2 MiB of output in answers of at most the server's max_payload (1 MiB here): numbered, and joined in order."""
    listener, _ = listener_in_process()
    request = hd.DeployRequest(hd.Action.SWITCH, "main", "deploy.responses.x.y")
    lines = [f"{i:05d} " + "z" * 200 for i in range(10000)]  # 2 MiB
    listener.state.logs.save("0123456789abcdef0123456789abcdef", request, lines)
    bus = bus_factory(nats_server, "test-deployer")
    sent = bus.inbox("deploy.responses.>")  # every part as NATS delivers it
    answer = hd.fetch_log(bus, "testhost1", "test", "0123456789abcdef", 30, 5)
    assert answer.lines == tuple(lines) and answer.parts >= 3
    wait_for(lambda: sent.qsize() >= answer.parts, what="every part on the observing subscription")
    sizes = [len(sent.get_nowait()[1]) for _ in range(answer.parts)]
    assert max(sizes) <= bus.max_payload and sum(sizes) > 2 * 1024 * 1024


# ---------------------------------------------------------------- MCP


@pytest.mark.anyio
async def test_deploy_logs_tool_reads_a_test_hosts_log_and_no_prod_host(mcp_server, nats_server, start_listener):
    test_host, prod_host = start_listener("testhost1", "test"), start_listener("dns1", "prod", "dns")
    for host, subject in ((test_host, "deploy.test.testhost1"), (prod_host, "deploy.prod.dns1")):
        host.standin.set_mode("fail-long")
        assert run_cli("deploy", subject, *deploy_args(nats_server, "admin")).returncode == 1
    async with mcp_server() as client:
        result = await client.call_tool("deploy_logs", {"hostname": "testhost1", "tail": 0})
        assert not result.is_error, text(result)
        assert result.structured_content["lines"] == LONG_FAILURE
        assert text(result).splitlines()[1:] == [json.dumps(line) for line in LONG_FAILURE]
        result = await client.call_tool("deploy_logs", {"hostname": "testhost1"})
        assert result.structured_content["lines"] == LONG_FAILURE[-200:]
        assert text(result).splitlines()[0].endswith(": 301 lines, the last 200 shown")
        result = await client.call_tool("deploy_logs", {"hostname": "dns1"})
        assert result.is_error and "dns1 did not answer on deploy.logs.test.dns1" in text(result)
    assert "logs request" not in prod_host.log_text()
