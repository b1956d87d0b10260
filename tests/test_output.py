"""Issue 30, a deploy's output: `deploy --follow` prints nixos-rebuild's lines while it runs. Real nats-server,
real listener processes with the nixos-rebuild stand-in, the CLI as a real process."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PROGRAM, deploy_args, stop_process, wait_for


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
