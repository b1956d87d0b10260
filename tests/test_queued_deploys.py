"""Issue 28, the listener's half of queued deploys: the signed request a deployer left in the desired-state bucket
is applied once when the host comes (back), never twice, never after its expiry, never unsigned by a trusted key.
Real nats-server with JetStream, real listeners, the real bucket."""

from __future__ import annotations

import base64
import datetime
import json
import os
import time

import pytest
from nats.js.api import KeyValueConfig

import homelab_deploy as hd
from tests.helpers import Listener, NatsServer, wait_for

KEY = "test.t1"
FLAKE = "git+https://git.example.com/cfg.git"  # tests.helpers.Listener's


@pytest.fixture
def queue_server(tmp_path):
    """A nats-server with JetStream and the desired-state bucket; `ops` (every right) writes the bucket."""
    server = NatsServer(tmp_path, {name: {} for name in ("t1", "admin", "ops")})
    server.config.write_text(server.config.read_text() + f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n')
    server.start()
    ops = hd.Bus(server.url, str(server.seeds["ops"]), "ops")
    try:
        server.kv = ops._call(ops.nc.jetstream().create_key_value(KeyValueConfig(bucket=hd.DESIRED_BUCKET, history=1)))
        server.ops = ops
        yield server
    finally:
        ops.close()
        server.stop()


def queued_request(bus: hd.Bus, ttl: int = 3600, revision: str = "main", age: int = 0) -> bytes:
    """What `deploy --queue` leaves for t1: a switch signed by `bus` for deploy.test.t1 `age` seconds ago (as
    Bus.sign does, at another time), queued until `ttl` seconds after that."""
    signed_at = int(time.time()) - age
    request = hd.DeployRequest(
        hd.Action.SWITCH, revision, hd.new_reply_subject("deploy", bus.public_key), queue_until=signed_at + ttl
    )
    obj = {**json.loads(request.to_json()), "signer": bus.public_key, "signed_at": signed_at}
    obj["nonce"] = os.urandom(16).hex()
    signature = bus.signing_key.sign(hd.signing_input("deploy.test.t1", obj))
    return json.dumps({**obj, "signature": base64.b64encode(signature).decode()}).encode()


def queue(server, data: bytes) -> int:
    return server.ops._call(server.kv.put(KEY, data))


def t1_listener(server, tmp_path) -> Listener:
    return Listener(server, "t1", "test", None, tmp_path, "--trusted-key", f"{server.public['admin']}=admin")


def seen_again(listener: Listener, revision: int) -> bool:
    return f"queued deploy revision {revision} was applied or refused before" in listener.log_text()


class TestQueuedDeploys:
    def test_a_deploy_queued_while_the_host_was_away_runs_once_and_not_after_a_restart(
        self, queue_server, tmp_path, bus_factory
    ):
        admin = bus_factory(queue_server, "admin")  # signed an hour ago: older than any live request may be
        revision = queue(queue_server, queued_request(admin, ttl=7200, revision="release-1", age=3600))
        t1 = t1_listener(queue_server, tmp_path).start()
        try:
            wait_for(lambda: len(t1.standin.calls) == 1 and "completed" in t1.log_text(), what="the queued switch")
            assert t1.standin.calls == [hd.rebuild_argv(hd.Action.SWITCH, FLAKE, "release-1", "t1")[1:]]
            assert "(signed by admin)" in t1.log_text()
            t1.stop()
            t1.start()
            wait_for(lambda: seen_again(t1, revision), what="the restarted listener to see the queued deploy again")
        finally:
            t1.stop()
        assert len(t1.standin.calls) == 1

    def test_a_deploy_queued_while_the_host_runs_is_applied_at_once(self, queue_server, tmp_path, bus_factory):
        t1 = t1_listener(queue_server, tmp_path).start()
        try:
            wait_for(lambda: "following its queued deploys" in t1.log_text(), what="t1 to follow its key")
            queue(queue_server, queued_request(bus_factory(queue_server, "admin")))
            wait_for(lambda: len(t1.standin.calls) == 1, what="the queued switch")
        finally:
            t1.stop()

    def test_after_a_reconnect_the_listener_follows_its_key_anew(self, queue_server, tmp_path, bus_factory):
        """The server restarts (its JetStream kept on disk): the listener makes its consumer again, and a deploy
        queued then is applied."""
        t1 = t1_listener(queue_server, tmp_path).start()
        try:
            wait_for(lambda: "following its queued deploys" in t1.log_text(), what="t1 to follow its key")
            queue_server.restart()
            wait_for(lambda: t1.log_text().count("following its queued deploys") == 2, what="t1 to follow it anew")
            admin = bus_factory(queue_server, "admin")
            wait_for(lambda: queue_server.ops.connected, what="ops to reconnect")
            queue(queue_server, queued_request(admin))
            wait_for(lambda: len(t1.standin.calls) == 1, what="the queued switch")
        finally:
            t1.stop()

    def test_an_expired_queued_deploy_is_never_applied(self, queue_server, tmp_path, bus_factory):
        revision = queue(queue_server, queued_request(bus_factory(queue_server, "admin"), ttl=60, age=120))
        t1 = t1_listener(queue_server, tmp_path).start()
        try:
            wait_for(lambda: "before the host took it" in t1.log_text(), what="t1 to refuse the expired deploy")
            t1.stop()
            t1.start()
            wait_for(lambda: seen_again(t1, revision), what="the restarted listener to see it again")
        finally:
            t1.stop()
        assert t1.standin.calls == []
        assert json.loads((t1.standin.dir / "state" / "queue.json").read_text()) == {"applied": revision}

    def test_a_queued_deploy_is_checked_like_any_request(self, queue_server, tmp_path, bus_factory):
        """Signed by a key t1 does not trust, queued for longer than 30 days, a hostile revision: none runs; and
        the old signature a queued deploy may carry is refused when the same kind of request comes live."""
        admin = bus_factory(queue_server, "admin")
        t1 = t1_listener(queue_server, tmp_path).start()
        try:
            wait_for(lambda: "following its queued deploys" in t1.log_text(), what="t1 to follow its key")
            queue(queue_server, queued_request(queue_server.ops))  # ops: a key t1 does not trust
            wait_for(lambda: "which is not a trusted key here" in t1.log_text(), what="the stranger's refusal")
            queue(queue_server, queued_request(admin, ttl=hd.MAX_QUEUE_TTL + 3600, age=3600))
            wait_for(lambda: "s ago, more than 60s off" in t1.log_text(), what="the over-long queue's refusal")
            hostile = {"action": "switch", "revision": "main;rm -rf /", "reply_to": "deploy.responses.x.y"}
            queue(queue_server, json.dumps(hostile).encode())
            wait_for(lambda: "invalid revision" in t1.log_text(), what="the hostile revision's refusal")
            # valid in the bucket (signed an hour ago, queued for two), a replay when published live
            admin.publish("deploy.test.t1", queued_request(admin, ttl=7200, age=3600), confirm=True)
            wait_for(lambda: t1.log_text().count("s ago, more than 60s off") == 2, what="the live replay's refusal")
        finally:
            t1.stop()
        assert t1.standin.calls == []


def daily_window(start_hours: float, end_hours: float) -> str:
    """A --maintenance-window opening `start_hours` from now and closing `end_hours` from now, local time."""
    now = datetime.datetime.now()
    start, end = (now + datetime.timedelta(hours=h) for h in (start_hours, end_hours))
    return f"daily {start:%H:%M}-{end:%H:%M}"


def test_a_queued_deploy_waits_for_a_maintenance_window(queue_server, tmp_path, bus_factory):
    """Outside every window the queued deploy is held (not run, not recorded), also across a restart; a listener
    whose window is open runs it."""
    revision = queue(queue_server, queued_request(bus_factory(queue_server, "admin")))
    trusted = ("--trusted-key", f"{queue_server.public['admin']}=admin")
    t1 = Listener(queue_server, "t1", "test", None, tmp_path, *trusted, "--maintenance-window", daily_window(2, 3))
    t1.start()
    try:
        wait_for(lambda: f"queued deploy revision {revision} held" in t1.log_text(), what="t1 to hold it")
        t1.stop()
        assert t1.standin.calls == [] and not (t1.standin.dir / "state" / "queue.json").exists()
        t1.argv[-1] = daily_window(-1, 1)  # the same host, restarted inside a window
        t1.start()
        wait_for(lambda: len(t1.standin.calls) == 1, what="t1 to run it inside the window")
    finally:
        t1.stop()
