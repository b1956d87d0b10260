"""Reboots (issue 31): whether a host needs one (its booted system against its system profile), the `reboot`
command rolled through the fleet and completed by the listener that starts after it, --only-if-needed, and
maintenance windows. Real nats-server, real listener processes; a test-controlled script stands for the reboot
command, and the test restarts the listener as the host would after a reboot."""

from __future__ import annotations

import json
import urllib.request

import homelab_deploy as hd
from tests.helpers import deploy_args, fake_system, run_cli


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
