"""The listener's life cycle: state directory, a crash mid-deploy reported after restart, SIGTERM with a grace
period, restart after a switch, and seed-file hygiene. Real nats-server, real listener processes."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import homelab_deploy as hd
from tests.helpers import (
    PROGRAM,
    TGKILL,
    Listener,
    gone,
    history_records,
    run_cli,
    sigterm_to_a_thread,
    start_deploy,
    stop_process,
    wait_for,
)


def final_reply(replies: queue.Queue, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no final status"
        try:
            reply = json.loads(replies.get(timeout=remaining)[1])
        except queue.Empty:
            continue
        if reply["status"] in ("completed", "failed", "rejected"):
            return reply


class TestStateDirectory:
    def test_created_private(self, start_listener):
        host = start_listener("testhost1", "test")
        state = host.standin.dir / "state"
        assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700

    @pytest.mark.parametrize("mode", [0o770, 0o707], ids=["group", "others"])
    def test_loose_permissions_are_refused(self, start_listener, tmp_path, mode):
        state = tmp_path / "testhost1" / "state"
        state.mkdir(parents=True)
        state.chmod(mode)
        host = start_listener("testhost1", "test", expect_ready=False)
        assert host.proc.returncode == 1
        assert (
            f"error: state directory {state} is open to group or others or not owned by this user; run "
            f"`chown {os.geteuid()} {state} && chmod 700 {state}`"
        ) in host.log_text()
        assert "Traceback" not in host.log_text() and not (state / "lock").exists()

    def test_temp_files_do_not_follow_planted_links(self, tmp_path):
        outside = tmp_path / "outside"
        outside.write_text("keep")
        (tmp_path / "history.json.tmp").symlink_to(outside)
        hd.save_state(str(tmp_path / "history.json"), [1])
        assert outside.read_text() == "keep"
        assert not (tmp_path / "history.json").is_symlink() and json.loads((tmp_path / "history.json").read_text()) == [
            1
        ]

    def test_killed_mid_deploy_is_reported_after_restart_and_not_rerun(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        host.standin.set_mode("block")
        bus = bus_factory(nats_server, "test-deployer")
        reply_to, replies = start_deploy(bus, "deploy.test.testhost1")
        wait_for(lambda: host.standin.pids, what="nixos-rebuild to run")
        record = json.loads((host.standin.dir / "state" / "inflight.json").read_text())
        assert record["reply_to"] == reply_to and record["action"] == "switch"
        pid_link = host.standin.dir / "state" / "inflight.pid"  # the pid beside it: no file rewritten per deploy
        wait_for(lambda: os.path.lexists(pid_link), what="the pid link")
        assert os.readlink(pid_link) == f"{hd.request_id(reply_to)}:{host.standin.pids[0]}"
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
        assert not os.path.lexists(pid_link)
        host.standin.set_mode("succeed")
        _, replies = start_deploy(bus, "deploy.test.testhost1")
        assert final_reply(replies)["status"] == "completed"  # and it works normally afterwards

    def test_garbage_record_is_discarded(self, start_listener, tmp_path):
        state = tmp_path / "testhost1" / "state"
        state.mkdir(parents=True, mode=0o700)
        (state / "inflight.json").write_text('{"reply_to": "deploy.test.all", "action": "switch"}')
        host = start_listener("testhost1", "test")
        assert "unreadable in-flight record" in host.log_text()
        assert not (state / "inflight.json").exists()

    def test_garbage_pending_final_status_is_discarded(self, start_listener, tmp_path):
        state = tmp_path / "testhost1" / "state"
        state.mkdir(parents=True, mode=0o700)
        garbage = {
            "resend-a.json": "{not json",
            "resend-b.json": json.dumps(
                {
                    "reply_to": "deploy.test.all",
                    "response": {"hostname": "testhost1", "status": "completed"},
                    "schedule": [1e12],
                }
            ),
        }
        for name, text in garbage.items():
            (state / name).write_text(text)
        host = start_listener("testhost1", "test")
        for name in garbage:
            assert f"unreadable pending final status {state / name}" in host.log_text()
            assert not (state / name).exists()
        assert "Traceback" not in host.log_text()


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
            wait_for(
                lambda: "retrying in" in host.log_text() or host.proc.poll() is not None,
                timeout=30,
                what="the listener to give up on the silent server and retry",
            )
            assert host.proc.poll() is None and "Traceback" not in host.log_text()
            assert f"cannot reach NATS at nats://127.0.0.1:{nats_server.port} within 5s" in host.log_text()
            silent.close()
            nats_server.start_again()
            wait_for(
                lambda: " ready " in host.log_text() or host.proc.poll() is not None,
                timeout=90,
                what="the listener to connect to the real server",
            )
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

    def test_request_just_before_the_exit_is_refused(self, nats_server, bus_factory, listener_in_process, monkeypatch):
        """A request that arrives after a successful switch freed the deploy slot, but before the listener exits
        (a hook sends it exactly then), is answered `rejected` and never run."""
        listener, standin = listener_in_process(restart_after_switch=True)
        bus = bus_factory(nats_server, "test-deployer")
        deliver_final, second = hd.ListenerState.deliver_final, []

        def send_second_request_first(self, *args, **kwargs):
            if not second:  # the switch's final status: `busy` is free and the listener has not stopped yet
                second.append(start_deploy(bus, "deploy.test.testhost1"))
                wait_for(listener.busy.locked, what="the second request to take the free deploy slot")
            deliver_final(self, *args, **kwargs)

        monkeypatch.setattr(hd.ListenerState, "deliver_final", send_second_request_first)
        _, replies = start_deploy(bus, "deploy.test.testhost1")
        assert final_reply(replies)["status"] == "completed"
        reply = final_reply(second[0][1])
        assert (reply["status"], reply["error"]) == ("rejected", "already_running")
        assert reply["message"] == "the listener on testhost1 is restarting after a switch; retry in a few seconds"
        assert len(standin.calls) == 1 and listener.stop.is_set() and not listener.busy.locked()

    def test_request_during_shutdown_is_refused(self, nats_server, bus_factory, listener_in_process):
        listener, standin = listener_in_process()
        listener.stop.set()  # SIGTERM: the main thread is closing the connection
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("rejected", "already_running")
        assert reply["message"] == "the listener on testhost1 is shutting down; retry when it is back"
        assert standin.calls == [] and not listener.busy.locked()


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
        wait_for(
            lambda: f"reconnected to NATS at deploy:***@127.0.0.1:{nats_server.port}" in host.log_text(),
            what="the listener to reconnect",
        )
        assert "s3cret" not in host.log_text()


@pytest.mark.slow
@pytest.mark.skipif(TGKILL is None, reason="tgkill's syscall number is known for x86_64 and aarch64 only")
class TestSignalsAlwaysActedOn:
    RUNS = 20

    def test_sigterm_during_deploy_every_time(self, nats_server, bus_factory, tmp_path):
        bus = bus_factory(nats_server, "test-deployer")
        exits = []
        for run in range(self.RUNS):
            host = Listener(nats_server, "testhost1", "test", None, tmp_path / f"run{run}", "--shutdown-grace", "1")
            host.standin.set_mode("block")
            try:
                host.start()
                _, replies = start_deploy(bus, "deploy.test.testhost1")
                wait_for(lambda: host.standin.pids, what="nixos-rebuild to run")
                sigterm_to_a_thread(host.proc.pid, run)
                reply = final_reply(replies)
                assert (reply["status"], reply["error"]) == ("failed", "interrupted"), reply
                exits.append(host.proc.wait(1 + 20))  # the grace period, then the kill and the report
            finally:
                host.stop()
        assert exits == [0] * self.RUNS


class TestFinalStatusWhateverFails:
    def test_state_dir_replaced_by_a_file(self, nats_server, start_listener, tmp_path):
        """An in-flight record that cannot be written: `failed`/internal_error naming the path, nothing run, the
        deploy command exits 1 at once (not after --timeout); the next deploy works once the directory is back."""
        host = start_listener("testhost1", "test")
        state = host.standin.dir / "state"
        state.rename(tmp_path / "moved")
        state.write_text("not a directory")
        cli = [
            "deploy",
            "deploy.test.testhost1",
            "--branch",
            "main",
            "--json",
            "--timeout",
            "600",
            "--nats-url",
            nats_server.url,
            "--nkey-file",
            str(nats_server.seeds["test-deployer"]),
        ]
        r = run_cli(*cli)
        assert r.returncode == 1, r.stderr
        answer = json.loads(r.stdout)["hosts"][0]
        assert (answer["status"], answer["error"]) == ("failed", "internal_error")
        assert f"cannot write its in-flight record {state}/inflight.json.tmp (Not a directory)" in answer["message"]
        assert "nothing was run" in answer["message"] and "--state-dir" in answer["message"]
        assert host.standin.calls == [] and host.proc.poll() is None
        state.unlink()
        (tmp_path / "moved").rename(state)
        r = run_cli(*cli)
        assert r.returncode == 0 and json.loads(r.stdout)["hosts"][0]["status"] == "completed", r.stderr
        assert len(host.standin.calls) == 1

    def test_unexpected_error_after_accepted(self, nats_server, bus_factory, listener_in_process, monkeypatch):
        """A bug inside the deploy (injected in an in-process listener on a real NATS connection) answers
        `failed`/internal_error; the listener then serves the next request normally."""
        listener, standin = listener_in_process()
        bus = bus_factory(nats_server, "test-deployer")

        def broken(self, request, rid, signer):
            raise RuntimeError("injected fault")

        monkeypatch.setattr(hd.Listener, "deploy", broken)
        _, replies = start_deploy(bus, "deploy.test.testhost1")
        answers = [json.loads(replies.get(timeout=30)[1])["status"]]
        reply = final_reply(replies)
        assert answers == ["accepted"] and (reply["status"], reply["error"]) == ("failed", "internal_error")
        assert "failed unexpectedly (RuntimeError: injected fault)" in reply["message"]
        assert not listener.busy.locked() and not os.path.exists(listener.state.inflight_file)
        with pytest.raises(queue.Empty):
            replies.get(timeout=0.5)  # exactly one final status: nothing follows it
        monkeypatch.undo()
        monkeypatch.setenv("PATH", f"{standin.dir / 'bin'}:{os.environ['PATH']}")
        monkeypatch.setenv("STANDIN_DIR", str(standin.dir))
        _, replies = start_deploy(bus, "deploy.test.testhost1")
        assert final_reply(replies)["status"] == "completed"
        assert len(standin.calls) == 1


class TestStateDirectoryLock:
    def test_second_listener_on_the_same_directory_exits(self, nats_server, start_listener, tmp_path):
        first = start_listener("testhost1", "test")
        state = first.standin.dir / "state"
        second = Listener(nats_server, "testhost2", "test", "web", tmp_path)
        second.argv[second.argv.index("--state-dir") + 1] = str(state)
        r = subprocess.run(second.argv, env=second.env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert (
            f"state directory {state} is in use by another listener (pid {first.proc.pid}); give each listener "
            "its own --state-dir"
        ) in r.stderr
        assert "Traceback" not in r.stderr and first.proc.poll() is None
        first.stop()
        try:
            second.start()  # the lock goes with the process
        finally:
            second.stop()


@pytest.fixture
def watchdogs(tmp_path):
    """Kills, after the test, every rollback watchdog its listeners armed: they run in sessions of their own."""
    yield
    for log in tmp_path.glob("*.log"):
        for pid in map(int, re.findall(r"rollback watchdog armed \(pid (\d+)\)", log.read_text())):
            with contextlib.suppress(OSError):
                if b"rollback-watchdog" in open(f"/proc/{pid}/cmdline", "rb").read():
                    os.kill(pid, signal.SIGKILL)


def rollbacks(host: Listener) -> list[list[str]]:
    return [call for call in host.standin.calls if "--rollback" in call]


def start_unreachable(host: Listener) -> None:
    """Start `host` on a NATS URL where nothing listens: the new system cannot reach the bus."""
    argv = list(host.argv)
    argv[argv.index("--nats-url") + 1] = f"nats://127.0.0.1:{hd.free_port()}"
    with open(host.log, "ab") as log:
        host.proc = subprocess.Popen(argv, env=host.env, stdout=log, stderr=log, start_new_session=True)
    wait_for(lambda: "cannot reach NATS" in host.log_text(), what="the listener to fail to reach NATS")


@pytest.mark.usefixtures("watchdogs")
class TestAutomaticRollback:
    """--rollback-timeout: a switch is confirmed by a round trip through NATS from the new system, or a watchdog in
    its own session rolls it back and the next listener that reaches NATS reports it. Outside systemd."""

    def test_good_switch_is_confirmed_and_nothing_rolled_back(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--restart-after-switch", "--rollback-timeout", "30")
        host.standin.set_generation(1)
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        assert host.proc.wait(30) == 0  # switched; the final status is left to the listener that starts next
        host.start()
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("completed", None)
        assert "switch of main confirmed over NATS" in reply["message"] and "generation 2" in reply["message"]
        wait_for(lambda: "the rollback watchdog exits" in host.log_text(), what="the watchdog to stand down")
        assert rollbacks(host) == [] and host.standin.generation == 2
        assert not [p for p in (host.standin.dir / "state").iterdir() if p.name.split("-")[0] in hd.ROLLBACK_STATES]

    def test_switch_confirmed_at_once_without_restart(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--rollback-timeout", "30")
        host.standin.set_generation(1)
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        messages = []
        while not messages or messages[-1]["status"] not in ("completed", "failed"):
            messages.append(json.loads(replies.get(timeout=30)[1]))
        assert messages[-1]["status"] == "completed" and "confirmed over NATS" in messages[-1]["message"]
        assert any(
            m["message"].startswith("switched; waiting for the new system to confirm over NATS")
            for m in messages
            if m["status"] == "started"
        )
        wait_for(lambda: "the rollback watchdog exits" in host.log_text(), what="the watchdog to stand down")
        assert rollbacks(host) == [] and host.proc.poll() is None

    def test_unreachable_new_system_is_rolled_back_and_reported(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--restart-after-switch", "--rollback-timeout", "2")
        host.standin.set_generation(1)
        reply_to, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        assert host.proc.wait(30) == 0
        start_unreachable(host)
        wait_for(lambda: rollbacks(host), timeout=60, what="the watchdog to roll back")
        assert rollbacks(host) == [["switch", "--rollback"]] and host.standin.generation == 1
        host.stop()
        host.start()  # the right URL again: it reaches NATS and tells the original requester
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "rolled_back")
        assert "did not confirm over NATS within 2s after the switch of main" in reply["message"]
        assert "rolled back with `nixos-rebuild switch --rollback`" in reply["message"]
        history = history_records(host.standin.dir / "state")
        assert [
            (r["request"], r["status"], r["error"], r["generation_before"], r["generation_after"]) for r in history
        ] == [(hd.request_id(reply_to), "failed", "rolled_back", 1, 1)]

    def test_watchdog_survives_sigkill_of_the_listener(self, nats_server, start_listener, bus_factory):
        """The switch cuts the host off NATS (the server stops), the listener waiting to confirm is SIGKILLed with
        its process group: the watchdog, in its own session, still rolls back."""
        host = start_listener("testhost1", "test", None, "--rollback-timeout", "2")
        host.standin.set_generation(1)
        host.standin.set_mode("block")
        bus = bus_factory(nats_server, "test-deployer")
        _, replies = start_deploy(bus, "deploy.test.testhost1")
        wait_for(lambda: host.standin.pids, what="nixos-rebuild to run")
        nats_server.stop()
        host.standin.release()
        wait_for(lambda: "no round trip through NATS yet" in host.log_text(), what="the confirmation to fail")
        os.killpg(host.proc.pid, signal.SIGKILL)
        host.proc.wait(10)
        wait_for(lambda: rollbacks(host), timeout=60, what="the watchdog to roll back")
        assert host.standin.generation == 1
        nats_server.start_again()
        wait_for(lambda: bus.nc.is_connected, what="the deployer to reconnect")
        host.start()
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "rolled_back")

    def test_two_watchdogs_roll_back_once(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--restart-after-switch", "--rollback-timeout", "2")
        host.standin.set_generation(1)
        reply_to, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        assert host.proc.wait(30) == 0
        first = int(re.search(r"rollback watchdog armed \(pid (\d+)\)", host.log_text())[1])
        with open(host.log, "ab") as log:
            second = subprocess.Popen(
                [
                    *PROGRAM,
                    "rollback-watchdog",
                    "--state-dir",
                    str(host.standin.dir / "state"),
                    "--request",
                    hd.request_id(reply_to),
                    "--rollback-timeout",
                    "1",
                    "--profile",
                    str(host.standin.profile),
                    "--timeout",
                    "10",
                ],
                env=host.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            assert second.wait(60) == 0
            wait_for(lambda: gone(first), timeout=60, what="the first watchdog to finish")
        finally:
            stop_process(second)
        assert rollbacks(host) == [["switch", "--rollback"]] and host.standin.generation == 1
        host.start()
        assert final_reply(replies)["error"] == "rolled_back"

    def test_failed_rollback_is_reported_with_its_output(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--restart-after-switch", "--rollback-timeout", "1")
        host.standin.set_generation(1)
        (host.standin.dir / "rollback-fails").write_text("")
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        assert host.proc.wait(30) == 0
        wait_for(lambda: "rollback outcome" in host.log_text(), timeout=60, what="the watchdog to try the rollback")
        host.start()
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "rollback_failed")
        assert "the rollback `nixos-rebuild switch --rollback` failed (exit code 1)" in reply["message"]
        assert "error: cannot roll back: no generation before" in reply["output"]

    @pytest.mark.parametrize("rollback_timeout", ["30", "0"])
    def test_failed_activation_is_rolled_back_at_once(self, nats_server, start_listener, bus_factory, rollback_timeout):
        """nixos-rebuild installs the generation, then units fail (exit 4): rolled back at once, watchdog or not."""
        host = start_listener("testhost1", "test", None, "--rollback-timeout", rollback_timeout)
        host.standin.set_generation(1)
        host.standin.set_mode("activation-fails")
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "rolled_back")
        assert reply["message"] == (
            "nixos-rebuild switch failed (exit code 4): warning: the following units failed: network-setup.service; "
            "it had installed generation 2, so it was rolled back at once with `nixos-rebuild switch --rollback`; "
            "the system profile is at generation 1"
        )
        assert "warning: the following units failed: network-setup.service" in reply["output"]
        assert rollbacks(host) == [["switch", "--rollback"]] and host.standin.generation == 1
        assert not [p for p in (host.standin.dir / "state").iterdir() if p.name.split("-")[0] in hd.ROLLBACK_STATES]
        if rollback_timeout != "0":
            wait_for(lambda: "the rollback watchdog exits" in host.log_text(), what="the watchdog to stand down")
        assert len(rollbacks(host)) == 1

    def test_failed_activation_whose_rollback_fails(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, "--rollback-timeout", "30")
        host.standin.set_generation(1)
        host.standin.set_mode("activation-fails")
        (host.standin.dir / "rollback-fails").write_text("")
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "rollback_failed")
        assert (
            "so it was the rollback `nixos-rebuild switch --rollback` failed (exit code 1): error: cannot roll "
            "back: no generation before; the host needs a person at its console"
        ) in reply["message"]
        assert reply["output"][-1] == "error: cannot roll back: no generation before" and host.standin.generation == 2

    def test_watchdog_follows_the_rebuild_of_a_killed_listener(self, nats_server, start_listener, bus_factory):
        """The listener dies mid-switch and nothing restarts it: the rollback comes --rollback-timeout after
        nixos-rebuild exits, not after the listener's --timeout (600 s)."""
        host = start_listener("testhost1", "test", None, "--timeout", "600", "--rollback-timeout", "2")
        host.standin.set_generation(1)
        host.standin.set_mode("block")
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        wait_for(lambda: host.standin.pids, what="nixos-rebuild to run")
        os.killpg(host.proc.pid, signal.SIGKILL)  # the listener's group; nixos-rebuild and the watchdog run on
        host.proc.wait(10)
        host.standin.release()
        wait_for(lambda: host.standin.generation == 2, what="nixos-rebuild to install generation 2")
        wait_for(lambda: rollbacks(host), timeout=120, what="the watchdog to roll back")
        assert rollbacks(host) == [["switch", "--rollback"]]
        wait_for(lambda: "rollback outcome: exit code 0" in host.log_text(), what="the rollback's outcome")
        assert host.standin.generation == 1
        host.log.write_text("")
        host.start()  # much later: it reports the rollback, not an interrupted deploy
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "rolled_back"), reply
        assert "rolled back with `nixos-rebuild switch --rollback`" in reply["message"]

    def test_reply_token_with_a_leading_dash_runs_nothing(self, nats_server, start_listener, bus_factory):
        """A token reaches the watchdog's argv: one that reads as a flag is refused by the protocol."""
        host = start_listener("testhost1", "test", None, "--rollback-timeout", "30")
        bus = bus_factory(nats_server, "test-deployer")
        reply_to = f"deploy.responses.{bus.public_key}.-x"
        with pytest.raises(hd.ProtocolError, match="not starting with '-'"):
            hd.parse_reply_to({"reply_to": reply_to}, "deploy")
        bus.publish(
            "deploy.test.testhost1",
            json.dumps({"action": "switch", "revision": "main", "reply_to": reply_to}).encode(),
            confirm=True,
        )
        wait_for(lambda: "not starting with '-'" in host.log_text(), what="the request to be refused")
        assert host.standin.calls == [] and "armed" not in host.log_text()

    def test_failing_health_check_rolls_back_at_once(self, nats_server, start_listener, bus_factory, tmp_path):
        check = tmp_path / "check-nginx"
        check.write_text("#!/bin/sh\necho checking nginx\necho 'nginx: 502 Bad Gateway' >&2\nexit 3\n")
        check.chmod(0o755)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        metrics = ("--metrics-enabled", "--metrics-addr", f"127.0.0.1:{port}")
        host = start_listener(
            "testhost1", "test", None, "--rollback-timeout", "300", "--health-check", str(check), *metrics
        )
        host.standin.set_generation(1)
        bus = bus_factory(nats_server, "test-deployer")
        _, replies = start_deploy(bus, "deploy.test.testhost1")
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "health_check_failed")
        assert reply["message"] == (
            f"the new system failed its health check `{check}` (exit code 3): checking nginx | nginx: 502 Bad Gateway; "
            "it had installed generation 2, so it was rolled back at once with `nixos-rebuild switch --rollback`; "
            "the system profile is at generation 1"
        )
        assert "nginx: 502 Bad Gateway" in reply["output"]
        assert rollbacks(host) == [["switch", "--rollback"]] and host.standin.generation == 1
        wait_for(lambda: "the rollback watchdog exits" in host.log_text(), what="the watchdog to stand down")
        assert len(rollbacks(host)) == 1
        [status] = hd.discover_hosts(bus, hd.STATUS_SUBJECT, parse=hd.HostStatus.parse)
        assert [(r.status, r.error) for r in status.history] == [(hd.Status.FAILED, hd.ErrorCode.HEALTH_CHECK_FAILED)]
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        counted = (
            'homelab_deploy_deployments_total{action="switch",error_code="health_check_failed",status="failed"} 1.0'
        )
        assert counted in scraped.splitlines()

    def test_failing_health_check_after_a_test_activates_the_generation_before(
        self, nats_server, start_listener, bus_factory
    ):
        host = start_listener("testhost1", "test", None, "--rollback-timeout", "300", "--health-check", "false")
        host.standin.set_generation(1)
        activate = host.standin.profile.parent / "system-1-link" / "bin" / "switch-to-configuration"
        activate.parent.mkdir(parents=True)
        activate.write_text(f'#!/bin/sh\necho "$@" >> {activate}.calls\n')
        activate.chmod(0o755)
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1", "test")
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "health_check_failed")
        assert f"; it had activated it, so it was rolled back at once with `{activate} test`;" in reply["message"]
        assert Path(f"{activate}.calls").read_text() == "test\n" and rollbacks(host) == []

    def test_listener_started_after_a_switch_runs_the_checks(self, nats_server, start_listener, bus_factory):
        """--restart-after-switch (the NixOS module's way): the listener on the new system checks, then confirms."""
        flags = ("--restart-after-switch", "--rollback-timeout", "300", "--health-check", "false")
        host = start_listener("testhost1", "test", None, *flags)
        host.standin.set_generation(1)
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        assert host.proc.wait(30) == 0 and rollbacks(host) == []  # switched; the checks are left to the next start
        host.start()
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "health_check_failed")
        assert reply["message"].startswith("the new system failed its health check `false` (exit code 1): no output;")
        assert rollbacks(host) == [["switch", "--rollback"]] and host.standin.generation == 1

    def test_passing_health_checks_run_on_the_new_system_then_complete(
        self, nats_server, start_listener, bus_factory, tmp_path
    ):
        seen, profile = tmp_path / "seen", tmp_path / "testhost1" / "profiles" / "system"  # the stand-in's profile
        checks = ["--health-check", f"sh -c 'readlink {profile} >> {seen}'", "--health-check", "true"]
        host = start_listener("testhost1", "test", None, "--rollback-timeout", "300", *checks)
        host.standin.set_generation(1)
        for action, generation in (("switch", 2), ("test", 3)):  # the stand-in adds a generation for a test too
            _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1", action)
            reply = final_reply(replies)
            assert (reply["status"], reply["error"]) == ("completed", None), reply
            assert seen.read_text().splitlines()[-1] == f"system-{generation}-link"
        assert rollbacks(host) == [] and len(seen.read_text().splitlines()) == 2

    @pytest.mark.parametrize("check", ["on", "off"])
    def test_failed_systemd_units_fail_the_health_check(self, nats_server, start_listener, bus_factory, check):
        """A stand-in `systemctl` on PATH lists failed units: with the check on, the switch is rolled back naming
        them, and `status` counts it failed; off, it completes."""
        host = start_listener("testhost1", "test", None, "--rollback-timeout", "300", "--failed-units-check", check)
        host.standin.set_generation(1)
        systemctl = host.standin.dir / "bin" / "systemctl"
        systemctl.write_text(
            f'#!/bin/sh\necho "$@" >> {systemctl}.calls\n'
            "echo 'nginx.service loaded failed failed nginx'\necho 'acme-web.service loaded failed failed ACME'\n"
        )
        systemctl.chmod(0o755)
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        reply = final_reply(replies)
        if check == "off":
            assert (reply["status"], reply["error"]) == ("completed", None), reply
            assert rollbacks(host) == [] and not Path(f"{systemctl}.calls").exists()
            return
        assert (reply["status"], reply["error"]) == ("failed", "health_check_failed"), reply
        assert reply["message"].startswith(
            "the new system failed its health check `failed units: nginx.service, acme-web.service` "
            "(`systemctl --failed --no-legend --plain` lists them;"
        )
        assert Path(f"{systemctl}.calls").read_text() == "--failed --no-legend --plain\n"
        assert rollbacks(host) == [["switch", "--rollback"]] and host.standin.generation == 1
        [status] = hd.discover_hosts(bus_factory(nats_server, "admin"), hd.STATUS_SUBJECT, parse=hd.HostStatus.parse)
        assert [(r.status, r.error) for r in status.history] == [(hd.Status.FAILED, hd.ErrorCode.HEALTH_CHECK_FAILED)]

    def test_hanging_health_check_is_killed_and_rolls_back(self, nats_server, start_listener, bus_factory, tmp_path):
        pid_file = tmp_path / "check.pid"
        check = f"sh -c 'echo $$ > {pid_file}; exec sleep 3600'"
        host = start_listener(
            "testhost1", "test", None, "--rollback-timeout", "300", "--health-check", check, "--health-timeout", "1"
        )
        host.standin.set_generation(1)
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "health_check_failed")
        assert reply["message"].startswith(f"the new system failed its health check `{check}` (killed after 1s)")
        assert rollbacks(host) == [["switch", "--rollback"]] and host.standin.generation == 1
        assert gone(int(pid_file.read_text()))

    @pytest.mark.parametrize(
        ("flags", "error"),
        [
            *(
                (
                    ["--rollback-timeout", value],
                    "--rollback-timeout a finite number of seconds (0 turns automatic rollback off)",
                )
                for value in ("inf", "nan", "-1")
            ),
            (
                ["--health-check", "true", "--rollback-timeout", "0"],
                "--health-check needs the rollback watchdog, which undoes a switch or test "
                "whose check fails: give --rollback-timeout S (e.g. 120), or drop --health-check",
            ),
            (
                ["--rollback-timeout", "30", "--health-check", "curl 'http://x"],
                '--health-check "curl \'http://x" must be a command line',
            ),
            (["--rollback-timeout", "30", "--health-timeout", "0"], "--health-timeout 0 must be a positive number"),
        ],
    )
    def test_rollback_and_health_check_settings_refused_at_start(self, tmp_path, flags, error):
        r = run_cli(
            "listener",
            "--hostname",
            "h1",
            "--tier",
            "test",
            "--flake-url",
            "git+https://g.example/c.git",
            "--state-dir",
            str(tmp_path / "state"),
            "--nats-url",
            "nats://127.0.0.1:1",
            "--nkey-file",
            str(tmp_path / "k.seed"),
            *flags,
            timeout=30,
        )
        assert r.returncode == 1 and error in r.stderr, r.stderr

    def test_a_watchdog_that_does_not_arm_runs_nothing(
        self, listener_in_process, bus_factory, nats_server, monkeypatch
    ):
        listener, standin = listener_in_process(rollback_timeout=30)
        monkeypatch.setattr(sys, "executable", "/bin/false")  # the watchdog's interpreter: it exits at once
        _, replies = start_deploy(bus_factory(nats_server, "test-deployer"), "deploy.test.testhost1")
        reply = final_reply(replies)
        assert (reply["status"], reply["error"]) == ("failed", "internal_error")
        assert "nothing was run" in reply["message"] and "did not report itself armed" in reply["message"]
        assert "it exited with 1" in reply["message"] and standin.calls == []
        assert os.listdir(listener.config.state_dir) == ["history.json"]

    def test_profile_comes_from_the_command_line_not_the_record(self, tmp_path):
        state, rid = tmp_path / "state", "r1"
        state.mkdir(mode=0o700)
        ran = {}
        for name, profile in (("real", tmp_path / "profiles" / "system"), ("planted", tmp_path / "evil" / "system")):
            script = Path(f"{profile}-1-link/bin/switch-to-configuration")
            script.parent.mkdir(parents=True)
            script.write_text(f"#!/bin/sh\ntouch {tmp_path / name}\n")
            script.chmod(0o755)
            ran[name] = tmp_path / name
        (state / f"pending-{rid}.json").write_text(
            json.dumps(
                {
                    "request": {"action": "test", "revision": "main", "reply_to": f"deploy.responses.U.{rid}"},
                    "generation_before": 1,
                    "profile": str(tmp_path / "evil" / "system"),
                    "armed_at": time.time(),
                    "rollback_timeout": 1,
                    "signer": None,
                }
            )
        )
        watchdog = subprocess.Popen(
            [
                *PROGRAM,
                "rollback-watchdog",
                f"--state-dir={state}",
                f"--request={rid}",
                f"--profile={tmp_path / 'profiles' / 'system'}",
                "--rollback-timeout=1",
                "--timeout=1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert watchdog.wait(60) == 0, watchdog.stdout.read()
        finally:
            stop_process(watchdog)
        assert ran["real"].exists() and not ran["planted"].exists()

    def test_rollback_argv(self):
        assert hd.rollback_argv(hd.Action.SWITCH, "/nix/var/nix/profiles/system", 41) == [
            "nixos-rebuild",
            "switch",
            "--rollback",
        ]
        assert hd.rollback_argv(hd.Action.TEST, "/nix/var/nix/profiles/system", 41) == [
            "/nix/var/nix/profiles/system-41-link/bin/switch-to-configuration",
            "test",
        ]

    def test_deploy_cli_shows_the_confirmation_wait(self, nats_server, start_listener):
        """The deploy CLI prints the `started` "switched; waiting ..." line, then the restarted listener's
        confirmation, and exits 0."""
        host = start_listener("testhost1", "test", None, "--restart-after-switch", "--rollback-timeout", "30")
        host.standin.set_generation(1)
        cli = subprocess.Popen(
            [
                *PROGRAM,
                "deploy",
                "deploy.test.testhost1",
                "--branch",
                "main",
                "--nats-url",
                nats_server.url,
                "--nkey-file",
                str(nats_server.seeds["test-deployer"]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert host.proc.wait(30) == 0
            host.start()
            _, err = cli.communicate(timeout=60)
        finally:
            stop_process(cli)
        assert cli.returncode == 0, err
        assert "testhost1: started - switched; waiting for the new system to confirm over NATS" in err
        assert "testhost1: completed - switch of main confirmed over NATS" in err
