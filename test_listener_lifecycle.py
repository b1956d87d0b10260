"""The listener's life cycle: state directory, a crash mid-deploy reported after restart, SIGTERM with a grace
period, restart after a switch, and seed-file hygiene. Real nats-server, real listener processes."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import time

import pytest

from conftest import Listener, start_deploy, wait_for

pytestmark = pytest.mark.integration


def final_reply(replies: queue.Queue, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no final status"
        try:
            reply = json.loads(replies.get(timeout=remaining))
        except queue.Empty:
            continue
        if reply["status"] in ("completed", "failed", "rejected"):
            return reply


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class TestStateDirectory:
    def test_created_private(self, start_listener):
        host = start_listener("testhost1", "test")
        state = host.standin.dir / "state"
        assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700

    def test_killed_mid_deploy_is_reported_after_restart_and_not_rerun(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        host.standin.set_mode("block")
        bus = bus_factory(nats_server, "test-deployer")
        reply_to, replies = start_deploy(bus, "deploy.test.testhost1")
        wait_for(lambda: host.standin.pids, what="nixos-rebuild to run")
        record = json.loads((host.standin.dir / "state" / "inflight.json").read_text())
        assert record["reply_to"] == reply_to and record["action"] == "switch" and record["pid"]
        host.proc.send_signal(signal.SIGKILL)  # crash / OOM: no chance to report
        host.proc.wait(10)
        host.start()
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "interrupted")
        assert "stopped while nixos-rebuild switch of main was running" in reply["message"]
        assert "not re-run" in reply["message"]
        for pid in host.standin.pids:  # the orphaned nixos-rebuild and its child are stopped
            wait_for(lambda: gone(pid), what=f"orphan {pid} to be killed")
        assert len(host.standin.calls) == 1
        wait_for(lambda: not (host.standin.dir / "state" / "inflight.json").exists(), what="the record to be cleared")
        host.standin.set_mode("succeed")
        _, replies = start_deploy(bus, "deploy.test.testhost1")
        assert final_reply(replies)["status"] == "completed"  # and it works normally afterwards

    def test_garbage_record_is_discarded(self, start_listener, tmp_path):
        state = tmp_path / "testhost1" / "state"
        state.mkdir(parents=True)
        (state / "inflight.json").write_text('{"reply_to": "deploy.test.all", "action": "switch"}')
        host = start_listener("testhost1", "test")
        assert "unreadable in-flight record" in host.log_text()
        assert not (state / "inflight.json").exists()


class TestConnect:
    def test_waits_out_a_server_that_accepts_but_never_speaks(self, nats_server, bus_factory, tmp_path):
        """A port that takes the TCP connection but never sends NATS's INFO (a wedged or overloaded server):
        the listener gives up on each attempt by its own clock, logs it and retries, and serves once a real
        server answers there. It never exits."""
        nats_server.stop()
        silent = socket.socket()
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", nats_server.port))
        silent.listen(16)  # never accepted: the kernel completes the handshake, nothing is ever sent
        host = Listener(nats_server, "testhost1", "test", None, tmp_path)
        try:
            with open(host.log, "ab") as log:
                host.proc = subprocess.Popen(host.argv, env=host.env, stdout=log, stderr=log, start_new_session=True)
            wait_for(lambda: "retrying in" in host.log_text() or host.proc.poll() is not None, timeout=30,
                     what="the listener to give up on the silent server and retry")
            assert host.proc.poll() is None and "Traceback" not in host.log_text()
            assert f"cannot reach NATS at nats://127.0.0.1:{nats_server.port} within 5s" in host.log_text()
            silent.close()
            nats_server.start_again()
            wait_for(lambda: " ready " in host.log_text() or host.proc.poll() is not None, timeout=90,
                     what="the listener to connect to the real server")
            assert host.proc.poll() is None
            _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
            assert final_reply(replies)["status"] == "completed"
        finally:
            silent.close()
            host.stop()


class TestShutdown:
    def test_sigterm_when_idle_exits_zero(self, start_listener):
        host = start_listener("testhost1", "test")
        host.proc.send_signal(signal.SIGTERM)
        assert host.proc.wait(15) == 0
        assert "shutting down" in host.log_text()

    def test_sigterm_lets_running_deploy_finish(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        host.standin.set_mode("block")
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        wait_for(lambda: host.standin.pids, what="nixos-rebuild to run")
        host.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "waiting up to" in host.log_text(), what="the listener to wait for the deploy")
        assert host.proc.poll() is None
        host.standin.release()
        assert final_reply(replies)["status"] == "completed"
        assert host.proc.wait(15) == 0

    def test_sigterm_kills_deploy_after_grace(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--shutdown-grace", "1")
        host.standin.set_mode("block")
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        wait_for(lambda: host.standin.pids, what="nixos-rebuild to run")
        host.proc.send_signal(signal.SIGTERM)
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "interrupted")
        assert "shutdown grace period" in reply["message"]
        assert host.proc.wait(30) == 0
        for pid in host.standin.pids:
            wait_for(lambda: gone(pid), what=f"pid {pid} killed")


class TestRestartAfterSwitch:
    def test_exits_after_successful_switch_only(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--restart-after-switch")
        bus = bus_factory(nats_server, "test-deployer")
        for action in ("boot", "test"):
            _, replies = start_deploy(bus, "deploy.test.testhost1", action)
            assert final_reply(replies)["status"] == "completed"
        host.standin.set_mode("fail")
        _, replies = start_deploy(bus, "deploy.test.testhost1", "switch")
        assert final_reply(replies)["status"] == "failed"
        assert host.proc.poll() is None
        host.standin.set_mode("succeed")
        _, replies = start_deploy(bus, "deploy.test.testhost1", "switch")
        assert final_reply(replies)["status"] == "completed"
        assert host.proc.wait(15) == 0
        assert "restarting so the service manager starts the switched-to version" in host.log_text()


class TestSecrets:
    def test_world_readable_seed_warns_and_seed_never_logged(self, nats_server, start_listener):
        seed = nats_server.seeds["testhost1"]
        seed.chmod(0o644)
        host = start_listener("testhost1", "test", None, "--debug")
        log = host.log_text()
        assert "readable by group or others (mode 644)" in log and f"chmod 600 {seed}" in log
        assert seed.read_text().strip() not in log

    def test_seed_given_as_path_and_url_password_never_logged(self, nats_server, start_listener):
        seed = nats_server.seeds["testhost1"].read_text().strip()
        refused = start_listener("testhost1", "test", None, "--nkey-file", seed, expect_ready=False)
        assert refused.proc.returncode == 1
        assert "cannot read NKey seed file <an NKey seed, redacted>: No such file" in refused.log_text()
        assert seed not in refused.log_text()
        password_url = nats_server.url.replace("nats://", "nats://deploy:s3cret@")
        host = start_listener("testhost2", "test", "web", "--nats-url", password_url, "--debug")
        assert f"connected to NATS at deploy:***@127.0.0.1:{nats_server.port}" in host.log_text()
        nats_server.restart()
        wait_for(lambda: f"reconnected to NATS at deploy:***@127.0.0.1:{nats_server.port}" in host.log_text(),
                 what="the listener to reconnect")
        assert "s3cret" not in host.log_text()
