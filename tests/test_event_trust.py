"""Issue 25, trust boundaries round two: the events stream (JetStream rights), reply subjects, event floods, event
identity and discovery rights. Real nats-server (with JetStream) on `nats-config`'s output, real listeners."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import time

import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

import homelab_deploy as hd
from tests import helpers
from tests.helpers import Listener, NatsServer, stop_process, trusted, wait_for

CREDENTIALS = ("t1", "t2", "p1", "home", "tdep", "admin", "builder", "bclient", "mcp", "mcpadmin")
ADMINS = ("admin", "mcpadmin")
STREAM = hd.EVENTS_STREAM


@pytest.fixture
def fleet_server(tmp_path):
    """A nats-server with JetStream, the documented events stream, and exactly `nats-config`'s users for a fleet
    with a credential of every kind (t1 behind site `home`'s leaf user), plus `ops`, the operator with every
    right, who made the stream and observes."""
    server = NatsServer(tmp_path, {name: {} for name in (*CREDENTIALS, "ops")})
    pub = server.public
    doc = {
        "hosts": [
            {"hostname": "t1", "tier": "test", "nkey": pub["t1"], "site": "home"},
            {"hostname": "t2", "tier": "test", "role": "web", "nkey": pub["t2"]},
            {"hostname": "p1", "tier": "prod", "role": "dns", "nkey": pub["p1"]},
        ],
        "sites": [{"name": "home", "hub": "nats-leaf://hub.example.com:7422", "nkey": pub["home"]}],
        "deployers": [
            {"name": "tdep", "access": "test", "nkey": pub["tdep"]},
            {"name": "admin", "access": "admin", "nkey": pub["admin"]},
        ],
        "builders": [{"name": "builder", "repos": ["r1"], "nkey": pub["builder"]}],
        "build_clients": [{"name": "bclient", "repos": ["r1"], "nkey": pub["bclient"]}],
        "mcp": [{"name": "mcp", "nkey": pub["mcp"], "admin_nkey": pub["mcpadmin"], "build_repos": ["r1"]}],
    }
    credentials = hd.fleet_credentials(doc)
    hub = [c for c in credentials if not c.site]  # what the hub's nats-config prints: the site's user, not t1
    # t1 itself is a user of the site's leaf node, with the rights nats-config gives it there
    config = hd.authorization_config(hub + [c for c in credentials if c.site]).replace(
        "  users = [\n",
        f'  users = [\n    {{ nkey: "{pub["ops"]}", permissions: {{ publish: [">"], subscribe: [">"] }} }}\n',
    )
    server.config.write_text(f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n' + config)
    server.start()
    ops = hd.Bus(server.url, str(server.seeds["ops"]), "ops")
    try:
        ops._call(ops.nc.jetstream().add_stream(StreamConfig.from_response(dict(hd.EVENTS_STREAM_CONFIG))))
        server.ops = ops
        yield server
    finally:
        ops.close()
        server.stop()


def stored(server) -> int:
    return server.ops._call(server.ops.nc.jetstream().stream_info(STREAM)).state.messages


class TestEventsStream:
    def test_a_test_credential_cannot_make_a_prod_host_deploy_through_the_stream(
        self, fleet_server, tmp_path, bus_factory
    ):
        """The reproduction: a push consumer of the test deployer, filtered on t1's events, delivering to
        deploy.prod.p1, and a request-shaped event from t1. The server would deliver it to p1 (no trusted keys)
        with its own rights; the test deployer now may not create a consumer at all."""
        p1 = Listener(fleet_server, "p1", "prod", "dns", tmp_path).start()
        try:
            tdep, t1 = bus_factory(fleet_server, "tdep"), bus_factory(fleet_server, "t1")
            attack = ConsumerConfig(
                name="attack",
                deliver_subject="deploy.prod.p1",
                ack_policy=AckPolicy.NONE,
                filter_subject="deploy.events.test.t1",
            )
            try:
                tdep._call(tdep.nc.jetstream(timeout=5).add_consumer(STREAM, attack), 15)
                created = True
            except (hd.NatsError, nats.errors.TimeoutError):  # refused: no reply comes back, the -ERR is logged
                created = False
            t1.publish(
                "deploy.events.test.t1",
                json.dumps({"action": "switch", "revision": "main", "reply_to": "deploy.responses.x.y"}).encode(),
                confirm=True,
            )
            wait_for(lambda: stored(fleet_server) >= 1, what="the stream to store t1's event")
            if created:  # the hole: the stored event reaches p1 as a deploy request
                wait_for(lambda: p1.standin.calls, what="p1 to run the forged request")
        finally:
            p1.stop()
        assert not created and tdep.denied(f"$JS.API.CONSUMER.CREATE.{STREAM}.attack.deploy.events.test.t1")
        assert p1.standin.calls == []
        assert fleet_server.ops._call(fleet_server.ops.nc.jetstream().stream_info(STREAM)).state.consumer_count == 0

    def test_a_listener_drops_every_jetstream_delivery_aimed_at_its_subjects(self, fleet_server, tmp_path, bus_factory):
        """Defence in depth for whoever may read a stream or bucket (admins; deployers read the host registry): a
        push consumer, a pull consumer's next and a direct get, each aiming a stored request-shaped message at
        deploy.prod.p1 (no trusted keys), reach p1 and are dropped: p1 runs nothing."""
        ops, forged = fleet_server.ops, {"action": "switch", "revision": "main", "reply_to": "deploy.responses.x.y"}
        p1 = Listener(fleet_server, "p1", "prod", "dns", tmp_path).start()
        try:
            t1 = bus_factory(fleet_server, "t1")
            t1.publish("deploy.events.test.t1", json.dumps(forged).encode(), confirm=True)
            wait_for(lambda: stored(fleet_server) >= 1, what="the stream to store t1's event")
            js = ops.nc.jetstream(timeout=5)
            push = ConsumerConfig(name="push", deliver_subject="deploy.prod.p1", ack_policy=AckPolicy.NONE)
            ops._call(js.add_consumer(STREAM, push), 15)
            ops._call(js.add_consumer(STREAM, ConsumerConfig(name="pull", ack_policy=AckPolicy.NONE)), 15)
            ops._call(ops.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.pull", b'{"batch": 1}', "deploy.prod.p1"))
            kv = ops._call(js.create_key_value(bucket="TRAP", direct=True), 15)
            ops._call(kv.put("x", json.dumps(forged).encode()), 15)
            ops._call(ops.nc.publish("$JS.API.DIRECT.GET.KV_TRAP.$KV.TRAP.x", b"", "deploy.prod.p1"))
            wait_for(
                lambda: p1.log_text().count("(subscription deploy.prod.p1)") >= 3,
                what="p1 to drop the three deliveries",
            )
        finally:
            p1.stop()
        assert p1.standin.calls == []
        assert "rejected" not in p1.log_text()

    def test_no_credential_below_admin_reads_the_stream_and_hosts_send_no_requests(self, fleet_server, bus_factory):
        """Every JetStream API path that delivers stored messages (consumer creation in its three forms, direct
        get, message get, a pull consumer's next) is refused to every credential but the admins, who may only
        create consumers (delivering to their own replies, as `events --since` does). Hosts and the site's leaf
        user may publish no discovery or status request (item 9)."""
        reading = [
            f"$JS.API.CONSUMER.CREATE.{STREAM}.c.deploy.events.test.t1",
            f"$JS.API.CONSUMER.CREATE.{STREAM}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.c",
            f"$JS.API.DIRECT.GET.{STREAM}",
            f"$JS.API.DIRECT.GET.{STREAM}.deploy.events.test.t1",
            f"$JS.API.STREAM.MSG.GET.{STREAM}",
            f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.c",
        ]
        allowed = {}
        for name in CREDENTIALS:
            bus = bus_factory(fleet_server, name)
            requests = ["deploy.discover", "deploy.status"] if name in ("t1", "t2", "p1", "home") else []
            allowed[name] = []
            for subject in reading + requests:
                try:
                    bus.publish(subject, b"{}", confirm=True)
                    allowed[name].append(subject)
                except hd.NatsError as e:
                    assert "permission denied" in str(e), (name, subject, e)
        assert allowed == {name: [reading[0]] if name in ADMINS else [] for name in CREDENTIALS}
        admin = bus_factory(fleet_server, "admin")  # and an admin's replay works, to its own replies
        events = queue.Queue()
        bus_factory(fleet_server, "t2").publish("deploy.events.test.t2", b'{"stored": 1}', confirm=True)
        wait_for(lambda: stored(fleet_server) == 1, what="the stream to store t2's event")
        admin.replay(STREAM, "deploy.events.test.t2", time.time() - 3600, events)
        assert events.get(timeout=30) == ("deploy.events.test.t2", b'{"stored": 1}')


class TestEventFlood:
    def test_3000_junk_requests_yield_a_bounded_number_of_events(self, nats_server, start_listener, bus_factory):
        """Junk (not JSON), unsigned requests (failed authentication: no answer) and invalid actions (answered):
        per minute one event of its own and one summary with the count; every rejection is counted."""
        host = start_listener("testhost1", "test", None, *trusted(nats_server, "admin"))
        events = bus_factory(nats_server, "admin").inbox("deploy.events.>")
        sender = bus_factory(nats_server, "test-deployer")
        reply_to = hd.new_reply_subject("deploy", sender.public_key)
        kinds = [
            b"junk",
            json.dumps({"action": "switch", "revision": "main", "reply_to": reply_to}).encode(),
            json.dumps({"action": "reboot", "revision": "main", "reply_to": reply_to}).encode(),
        ]
        started = time.monotonic()
        for batch in range(6):  # 500 at a time, below a lane's depth, so none is dropped
            for i in range(500):
                sender.publish("deploy.test.testhost1", kinds[(batch * 500 + i) % 3])
            wait_for(
                lambda n=500 * (batch + 1): host.log_text().count(" rejected: ") == n,
                120,
                what=f"batch {batch} to be rejected",
            )
        host.stop()  # ends the window: its summary goes out
        elapsed = time.monotonic() - started
        got = []

        def accounted() -> bool:
            while not events.empty():
                got.append(json.loads(events.get_nowait()[1]))
            return sum(e["suppressed"] or 1 for e in got) == 3000

        wait_for(accounted, 60, what="every rejection to be accounted for in the events")
        windows = int(elapsed // hd.REJECTION_WINDOW) + 2  # a window opens on a rejection and lasts a minute
        assert 2 <= len(got) <= 2 * windows, got
        assert all(e["status"] == "rejected" for e in got) and host.standin.calls == []
        assert (
            sum(int(re.search(r"(\d+) failed authentication", e["reason"]).group(1)) for e in got if e["suppressed"])
            == 1000
        )  # the unsigned third: each counted, none answered
        print(
            f"\n[figures] 3,000 junk requests in {elapsed:.1f}s: {len(got)} events, "
            f"{sum(len(json.dumps(e)) for e in got)} bytes"
        )

    def test_the_summary_goes_out_when_the_window_ends(self, monkeypatch):
        monkeypatch.setattr(hd, "REJECTION_WINDOW", 2.0)
        got = []
        rejections = hd.Rejections(lambda count, reason: got.append((count, reason)), "listener")
        assert [rejections.admit(False), rejections.admit(False), rejections.admit(True)] == [True, False, False]
        wait_for(lambda: got, what="the summary at the window's end")
        assert got == [
            (
                2,
                "2 more request(s) rejected within 2s have no event of their own (1 failed authentication "
                "and were not answered); the listener's log has each",
            )
        ]
        assert [rejections.admit(True), rejections.admit(False)] == [False, True]  # a new window
        rejections.flush()  # as the daemon stops
        assert [count for count, _ in got] == [2, 1]


class TestEventIdentity:
    def test_host_tier_and_repo_come_from_the_subject(self, nats_server, bus_factory, tmp_path):
        """testhost1 claims to be prod's dns1, the builder of `fleet` claims repo `evalfail`: `events` shows who
        published (only that daemon may publish on its subject), whatever the payload says."""
        out = tmp_path / "events.out"
        with open(out, "wb") as o, open(tmp_path / "events.err", "wb") as e:
            proc = subprocess.Popen(
                [
                    *helpers.PROGRAM,
                    "events",
                    "--json",
                    "--nats-url",
                    nats_server.url,
                    "--nkey-file",
                    str(nats_server.seeds["admin"]),
                ],
                stdout=o,
                stderr=e,
                start_new_session=True,
            )
        try:
            wait_for(lambda: "following" in (tmp_path / "events.err").read_text(), what="events to follow")
            lie = {
                "time": "2026-01-01T00:00:00Z",
                "status": "completed",
                "host": "dns1",
                "tier": "prod",
                "repo": "evalfail",
                "reason": "lie",
            }
            bus_factory(nats_server, "testhost1").publish(
                "deploy.events.test.testhost1", json.dumps(lie).encode(), confirm=True
            )
            bus_factory(nats_server, "builder").publish("build.events.fleet", json.dumps(lie).encode(), confirm=True)
            wait_for(lambda: len(out.read_text().splitlines()) == 2, what="both events")
        finally:
            stop_process(proc)
        assert {(e["host"], e["tier"], e["repo"]) for e in map(json.loads, out.read_text().splitlines())} == {
            ("testhost1", "test", None),
            ("dns1", None, "fleet"),
        }


class TestReplies:
    def test_a_rejected_after_accepted_does_not_hide_the_completed_deploy(
        self, nats_server, start_listener, bus_factory, tmp_path
    ):
        """While testhost1 runs a deploy, a second request naming the same reply subject (here a copy, sent by
        a credential that saw it) gets `rejected`/already_running there; the client keeps the host's
        `accepted`... `completed` and exits 0."""
        host = start_listener("testhost1", "test")
        host.standin.set_mode("block")
        admin = bus_factory(nats_server, "admin")
        seen = admin.inbox("deploy.>")
        with open(tmp_path / "deploy.out", "wb") as o, open(tmp_path / "deploy.err", "wb") as e:
            deploy = subprocess.Popen(
                [
                    *helpers.PROGRAM,
                    "deploy",
                    "deploy.test.testhost1",
                    "--json",
                    "--timeout",
                    "120",
                    "--nats-url",
                    nats_server.url,
                    "--nkey-file",
                    str(nats_server.seeds["test-deployer"]),
                ],
                stdout=o,
                stderr=e,
                start_new_session=True,
            )
        try:
            request = statuses = None
            while statuses is None or statuses[-1] != "rejected":
                subject, data = seen.get(timeout=60)
                if subject == "deploy.test.testhost1":
                    request = data
                elif subject.startswith("deploy.responses."):
                    statuses = (statuses or []) + [json.loads(data)["status"]]
                    if statuses == ["accepted"]:
                        admin.publish("deploy.test.testhost1", request, confirm=True)  # the copy
            host.standin.release()
            assert deploy.wait(120) == 0, (tmp_path / "deploy.err").read_text()
        finally:
            stop_process(deploy)
        assert json.loads((tmp_path / "deploy.out").read_text())["hosts"][0]["status"] == "completed"
        assert "ignoring `rejected` from testhost1 after its `accepted`" in (tmp_path / "deploy.err").read_text()
        assert len(host.standin.calls) == 1
