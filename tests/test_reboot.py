"""Reboots (issue 31): whether a host needs one (its booted system against its system profile), the `reboot`
command rolled through the fleet and completed by the listener that starts after it, --only-if-needed, and
maintenance windows. Real nats-server, real listener processes; a test-controlled script stands for the reboot
command, and the test restarts the listener as the host would after a reboot."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest

import homelab_deploy as hd
from tests.helpers import (
    PROGRAM,
    boot_again,
    deploy_args,
    fake_system,
    ran,
    run_cli,
    start_deploy,
    stop_process,
    trusted,
    wait_for,
)


@pytest.fixture
def reboot_cli(nats_server):
    """reboot_cli(*args) -> a running `homelab-deploy reboot ... --json` as test-deployer, stopped after the test."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        argv = [*PROGRAM, "reboot", *args, *deploy_args(nats_server, "test-deployer", "--json")]
        started.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        )
        return started[-1]

    yield start
    for proc in started:
        stop_process(proc)


def finished(proc: subprocess.Popen) -> tuple[int, dict]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, json.loads(out) if out else {"stderr": err}


def scrape(port: int, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def status_of(server, hostname: str) -> tuple[dict, str]:
    """(the host's status --json document, its row of the text table)."""
    args = deploy_args(server, "test-deployer", "--answer-window", "3")
    r = run_cli("status", *args, "--json")
    assert r.returncode == 0, r.stderr
    doc = next(h for h in json.loads(r.stdout) if h["hostname"] == hostname)
    r = run_cli("status", *args)
    return doc, next(line for line in r.stdout.splitlines() if line.startswith(hostname + " "))


class TestNeedsReboot:
    def test_status_metric_and_switch_answer_say_so_exactly_when_the_kernel_changed(
        self, nats_server, start_listener, tmp_path
    ):
        port = hd.free_port()
        booted = tmp_path / "testhost1" / "booted-system"
        host = start_listener(
            "testhost1",
            "test",
            None,
            "--booted-system",
            str(booted),
            "--metrics-enabled",
            "--metrics-addr",
            f"127.0.0.1:{port}",
        )
        generations = host.standin.profile.parent
        booted.symlink_to(fake_system(generations / "system-1-link"))
        host.standin.set_generation(1)
        fake_system(generations / "system-2-link", kernel="k2")  # what the next switch installs
        fake_system(generations / "system-3-link", kernel="k2")  # and the one after: the same kernel
        doc, row = status_of(nats_server, "testhost1")
        assert doc["needs_reboot"] is False and "needs-reboot" not in row
        assert scrape(port, "homelab_deploy_needs_reboot") == 0

        r = run_cli("deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer", "--json"))
        assert r.returncode == 0, r.stderr
        [answer] = json.loads(r.stdout)["hosts"]
        assert answer["needs_reboot"] is True and "take effect after a reboot" in answer["message"]
        doc, row = status_of(nats_server, "testhost1")
        assert doc["needs_reboot"] is True and "idle,unsigned,needs-reboot" in row.split()
        assert scrape(port, "homelab_deploy_needs_reboot") == 1

        booted.unlink()
        booted.symlink_to(generations / "system-2-link")  # rebooted into generation 2
        assert status_of(nats_server, "testhost1")[0]["needs_reboot"] is False
        assert scrape(port, "homelab_deploy_needs_reboot") == 0
        r = run_cli("deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer", "--json"))
        [answer] = json.loads(r.stdout)["hosts"]
        assert (answer["status"], answer["needs_reboot"]) == ("completed", False), answer
        assert "reboot" not in answer["message"]

    def test_a_switch_confirmed_over_nats_says_so_too(self, nats_server, start_listener, tmp_path):
        booted = tmp_path / "testhost1" / "booted-system"
        host = start_listener("testhost1", "test", None, "--booted-system", str(booted), "--rollback-timeout", "60")
        generations = host.standin.profile.parent
        booted.symlink_to(fake_system(generations / "system-1-link"))
        host.standin.set_generation(1)
        fake_system(generations / "system-2-link", initrd="i2")  # a new initrd alone
        r = run_cli("deploy", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer", "--json"))
        [answer] = json.loads(r.stdout)["hosts"]
        assert r.returncode == 0 and "confirmed over NATS" in answer["message"], answer
        assert answer["needs_reboot"] is True and "take effect after a reboot" in answer["message"]


class TestReboot:
    def test_the_listener_after_the_reboot_completes_it_and_nothing_runs_twice(
        self, nats_server, rebooting_host, reboot_cli
    ):
        host = rebooting_host("testhost1")
        cli = reboot_cli("deploy.test.testhost1", "--wait-timeout", "60")
        wait_for(lambda: ran(host) == 1, what="the reboot command")
        state = host.standin.dir / "state"
        assert len(list(state.glob("reboot-*.json"))) == 1  # recorded before it ran
        assert status_of(nats_server, "testhost1")[0]["needs_reboot"] is False  # the script booted generation 2
        boot_again(host)
        code, doc = finished(cli)
        assert code == 0, doc
        [answer] = doc["hosts"]
        assert (answer["hostname"], answer["status"], answer["needs_reboot"]) == ("testhost1", "completed", False)
        assert answer["message"].startswith("rebooted: back ") and "on a new boot of" in answer["message"]
        assert not list(state.glob("reboot-*.json")) and ran(host) == 1
        boot_again(host)  # another start: nothing left to report or run
        assert ran(host) == 1 and "reboot completed" not in host.log_text().rsplit(" ready ", 2)[-2]

    def test_signed_like_deploys_an_unsigned_or_forged_reboot_runs_nothing(
        self, nats_server, rebooting_host, reboot_cli, bus_factory
    ):
        host = rebooting_host("testhost1", *trusted(nats_server, "test-deployer"))
        admin = bus_factory(nats_server, "admin")  # may publish there, but is no trusted key of the host
        reply_to, replies = start_deploy(admin, "deploy.test.testhost1")
        for request in ({"reboot": True, "reply_to": reply_to}, {"reboot": True, "now": True, "reply_to": reply_to}):
            admin.publish("deploy.test.testhost1", json.dumps(request).encode(), confirm=True)
        wait_for(lambda: host.log_text().count("rejected: unauthorized") == 3, what="the unsigned requests' refusal")
        assert ran(host) == 0 and replies.empty() and not list((host.standin.dir / "state").glob("reboot-*"))
        cli = reboot_cli("deploy.test.testhost1", "--wait-timeout", "60")  # the CLI signs with its key
        wait_for(lambda: ran(host) == 1, what="the signed reboot")
        assert "accepted reboot" in host.log_text() and "(signed by test-deployer)" in host.log_text()
        boot_again(host)
        code, doc = finished(cli)
        assert code == 0 and doc["hosts"][0]["status"] == "completed", doc

    def test_a_host_not_back_within_the_wait_timeout_failed_timeout(self, nats_server, rebooting_host):
        host = rebooting_host("testhost1")
        r = run_cli(
            "reboot",
            "deploy.test.testhost1",
            *deploy_args(nats_server, "test-deployer", "--json", "--wait-timeout", "3"),
        )
        assert r.returncode == 1 and ran(host) == 1, r.stderr
        [answer] = json.loads(r.stdout)["hosts"]
        assert (answer["status"], answer["error"]) == ("failed", "timeout")
        assert "not back within --wait-timeout 3s" in answer["message"]

    def test_a_failing_reboot_command_is_reboot_failed(self, nats_server, start_listener):
        start_listener("testhost1", "test", None, "--reboot-command", "false")
        r = run_cli("reboot", "deploy.test.testhost1", *deploy_args(nats_server, "test-deployer", "--json"))
        assert r.returncode == 1, r.stderr
        [answer] = json.loads(r.stdout)["hosts"]
        assert (answer["status"], answer["error"]) == ("failed", "reboot_failed")
        assert "the reboot command `false` failed (exit code 1)" in answer["message"]

    def test_the_next_batch_starts_once_the_canary_is_back(self, nats_server, rebooting_host, reboot_cli):
        first, second = rebooting_host("testhost1"), rebooting_host("testhost2", role="web")
        cli = reboot_cli("deploy.test.all", "--canary", "1", "--wait-timeout", "60")
        wait_for(lambda: ran(first) == 1, what="the canary's reboot")
        assert ran(second) == 0  # its batch waits for the canary's `completed`, which needs its listener back
        boot_again(first)
        wait_for(lambda: ran(second) == 1, what="the second batch's reboot")
        boot_again(second)
        code, doc = finished(cli)
        assert code == 0, doc
        assert [(b["name"], [h["status"] for h in b["hosts"]]) for b in doc["batches"]] == [
            ("canary", ["completed"]),
            ("batch 1", ["completed"]),
        ]

    def test_only_if_needed_reboots_just_the_hosts_that_need_it(
        self, nats_server, rebooting_host, reboot_cli, bus_factory
    ):
        needs, fine = rebooting_host("testhost1"), rebooting_host("testhost2", needs=False, role="web")
        queries = []
        bus_factory(nats_server, "admin").subscribe(hd.STATUS_SUBJECT, lambda _s, data, _r: queries.append(data))
        plan = run_cli(
            "reboot", "deploy.test.all", "--only-if-needed", "--plan", *deploy_args(nats_server, "test-deployer")
        )
        assert plan.stdout.splitlines() == ["needs no reboot: testhost2", "batch 1: testhost1"], plan.stderr
        wait_for(lambda: queries, what="the plan's status query")
        assert [json.loads(q)["history"] for q in queries] == [0]  # it needs needs_reboot, not the deploys
        cli = reboot_cli("deploy.test.all", "--only-if-needed", "--wait-timeout", "60")
        wait_for(lambda: ran(needs) == 1, what="the reboot of the host that needs it")
        boot_again(needs)
        code, doc = finished(cli)
        assert code == 0, doc
        assert {h["hostname"]: h["status"] for h in doc["hosts"]} == {"testhost1": "completed", "testhost2": "skipped"}
        assert ran(fine) == 0 and "needs no reboot" in doc["hosts"][1]["message"]


def daily_window(start: float, end: float) -> str:
    """A daily maintenance window from `start` to `end` hours from now, host local time."""
    import datetime

    now = datetime.datetime.now()
    return "daily " + "-".join(f"{now + datetime.timedelta(hours=h):%H:%M}" for h in (start, end))


class TestMaintenanceWindows:
    def test_a_reboot_outside_every_window_is_held_across_a_restart_until_now_overrides_it(
        self, nats_server, rebooting_host, reboot_cli
    ):
        host = rebooting_host(
            "testhost1", "--maintenance-window", daily_window(2, 3), "--maintenance-window", daily_window(-3, -2)
        )
        r = run_cli(
            "reboot",
            "deploy.test.testhost1",
            *deploy_args(nats_server, "test-deployer", "--json", "--wait-timeout", "3"),
        )
        [answer] = json.loads(r.stdout)["hosts"]
        assert r.returncode == 1 and (answer["status"], answer["error"]) == ("failed", "timeout"), r.stderr
        assert "held: outside the maintenance windows" in answer["message"] and "host time" in answer["message"]
        assert "held: outside the maintenance windows" in r.stderr  # the progress line of its `accepted`
        state = host.standin.dir / "state"
        [record] = state.glob("reboot-*.json")
        boot_again(host)  # still held: its record is read again, not run
        assert ran(host) == 0 and record.exists()
        cli = reboot_cli("deploy.test.testhost1", "--now", "--wait-timeout", "60")
        wait_for(lambda: ran(host) == 1, what="the reboot sent with --now")
        boot_again(host)
        code, doc = finished(cli)
        assert code == 0 and doc["hosts"][0]["status"] == "completed", doc
        assert ran(host) == 1 and not list(state.glob("reboot-*.json"))  # the held one was served by that reboot
        assert host.log_text().count(" reboot completed: ") == 2  # the held request's requester is told too

    def test_a_reboot_inside_a_window_runs_at_once(self, nats_server, rebooting_host, reboot_cli):
        host = rebooting_host("testhost1", "--maintenance-window", daily_window(-1, 1))
        cli = reboot_cli("deploy.test.testhost1", "--wait-timeout", "60")
        wait_for(lambda: ran(host) == 1, what="the reboot inside the window")
        boot_again(host)
        code, doc = finished(cli)
        assert code == 0 and doc["hosts"][0]["status"] == "completed", doc
