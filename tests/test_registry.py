"""Issue 28, the registry side: `setup-jetstream`, the host registry and queued deploys on JetStream key-value
buckets, on a real nats-server with JetStream and exactly `nats-config`'s users (the registry_server fixture)."""

from __future__ import annotations

import json
import signal
import time

import pytest

import homelab_deploy as hd
from tests import helpers
from tests.helpers import Listener, NatsServer, run_cli, wait_for

DESIRED, REGISTRY = hd.DESIRED_BUCKET, hd.REGISTRY_BUCKET
FLAKE = "git+https://git.example.com/cfg.git"  # tests.helpers.Listener's


def cli(server, user: str, *args: str, timeout: float = 120):
    return run_cli(
        *args[:1], "--nats-url", server.url, "--nkey-file", str(server.seeds[user]), *args[1:], timeout=timeout
    )


def consumer_create(bus, bucket: str, key: str):
    """A named push consumer of one key, as a host watches its queued deploy (nats-py names it in the subject)."""
    name = "c" + hd.os.urandom(8).hex()
    config = {
        "name": name,
        "deliver_subject": hd.new_reply_subject("deploy", bus.public_key),
        "ack_policy": "none",
        "filter_subject": f"$KV.{bucket}.{key}",
        "deliver_policy": "last_per_subject",
    }
    subject = f"$JS.API.CONSUMER.CREATE.KV_{bucket}.{name}.$KV.{bucket}.{key}"
    return json.loads(bus.request(subject, json.dumps({"stream_name": f"KV_{bucket}", "config": config}).encode()).data)


class TestSetupJetStream:
    def test_creates_then_leaves_unchanged_then_updates_what_changed(self, registry_server):
        assert registry_server.setup_output.splitlines() == [
            "HOMELAB_DEPLOY_EVENTS: created",
            "KV_HOMELAB_DEPLOY_HOSTS: created",
            "KV_HOMELAB_DEPLOY_DESIRED: created",
        ]
        again = cli(registry_server, "ops", "setup-jetstream")
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines() == [
            "HOMELAB_DEPLOY_EVENTS: unchanged",
            "KV_HOMELAB_DEPLOY_HOSTS: unchanged",
            "KV_HOMELAB_DEPLOY_DESIRED: unchanged",
        ]
        # someone made the queue unbounded by hand: setup-jetstream bounds it again
        ops = hd.Bus(registry_server.url, str(registry_server.seeds["ops"]), "ops")
        try:
            config = {**hd.JETSTREAM_STREAMS[2], "max_bytes": -1}
            assert "error" not in json.loads(
                ops.request(f"$JS.API.STREAM.UPDATE.KV_{DESIRED}", json.dumps(config).encode()).data
            )
            fixed = cli(registry_server, "ops", "setup-jetstream")
            assert fixed.stdout.splitlines()[2] == "KV_HOMELAB_DEPLOY_DESIRED: updated", fixed.stderr
            info = json.loads(ops.request(f"$JS.API.STREAM.INFO.KV_{DESIRED}").data)
            assert info["config"]["max_bytes"] == 64 << 20
            assert info["config"]["max_msgs_per_subject"] == 1 and info["config"]["max_msg_size"] == 64 * 1024
        finally:
            ops.close()

    def test_only_a_setup_credential_may_and_it_may_not_deploy(self, registry_server):
        refused = cli(registry_server, "tdep", "setup-jetstream")
        assert refused.returncode == hd.Exit.NATS
        assert "permission denied" in refused.stderr and "access: setup" in refused.stderr
        setup = next(c for c in registry_server.credentials if c.name == "ops")
        assert setup.publish == ("$JS.API.>",) and setup.subscribe == (f"deploy.responses.{setup.public_key}.>",)
        assert all(setup.public_key not in keys for keys in hd.trusted_keys(registry_server.credentials).values())

    def test_without_jetstream_it_says_how_to_enable_it(self, tmp_path):
        server = NatsServer(tmp_path, {"ops": {"publish": [">"], "subscribe": [">"]}})
        server.start()
        try:
            result = cli(server, "ops", "setup-jetstream")
        finally:
            server.stop()
        assert result.returncode == hd.Exit.NATS
        assert "no JetStream" in result.stderr and "-js" in result.stderr, result.stderr


class TestBucketRights:
    """Each credential's rights on the buckets, as `nats-config` grants them, exercised on the server."""

    @pytest.fixture
    def buses(self, registry_server, bus_factory):
        return {user: bus_factory(registry_server, user) for user in ("web1", "web2", "tdep", "admin", "mcp")}

    def test_a_host_writes_its_own_registry_entry_and_no_other(self, buses):
        assert buses["web1"].kv_put(REGISTRY, "test.web1", b"{}") > 0
        for key in ("test.web2", "prod.web1", "test.web1x"):
            with pytest.raises(hd.NatsError, match="permission denied"):
                buses["web1"].kv_put(REGISTRY, key, b"{}")
        with pytest.raises(hd.NatsError, match="permission denied"):  # nor the queue, its own key included
            buses["web1"].kv_put(DESIRED, "test.web1", b"{}")
        assert set(buses["tdep"].kv_entries(REGISTRY)) == {"test.web1"}

    def test_a_test_deployer_queues_for_test_hosts_only_and_an_admin_for_any(self, buses):
        for user in ("tdep", "mcp"):
            assert buses[user].kv_put(DESIRED, "test.web2", b"{}") > 0
            with pytest.raises(hd.NatsError, match="permission denied"):
                buses[user].kv_put(DESIRED, "prod.p1", b"{}")
            with pytest.raises(hd.NatsError, match="permission denied"):  # a host's registry entry is its own
                buses[user].kv_put(REGISTRY, "test.web2", b"{}")
        assert buses["admin"].kv_put(DESIRED, "prod.p1", b"{}") > 0
        assert set(buses["tdep"].kv_entries(DESIRED)) == {"test.web2", "prod.p1"}

    def test_a_host_reads_its_own_queued_deploy_and_no_other(self, buses):
        buses["admin"].kv_put(DESIRED, "test.web1", b'{"mine": 1}')
        buses["admin"].kv_put(DESIRED, "test.web2", b'{"mine": 2}')
        web1 = buses["web1"]
        own = web1.request(f"$JS.API.DIRECT.GET.KV_{DESIRED}.$KV.{DESIRED}.test.web1")
        assert own.data == b'{"mine": 1}' and own.headers["Nats-Sequence"] == "1"
        assert "error" not in json.loads(web1.request(f"$JS.API.STREAM.INFO.KV_{DESIRED}").data)
        assert consumer_create(web1, DESIRED, "test.web1")["num_pending"] == 1
        with pytest.raises(hd.NatsError, match="permission denied"):
            web1.request(f"$JS.API.DIRECT.GET.KV_{DESIRED}.$KV.{DESIRED}.test.web2")
        with pytest.raises(hd.NatsError, match="permission denied"):
            consumer_create(web1, DESIRED, "test.web2")
        with pytest.raises(hd.NatsError, match="permission denied"):  # nor the whole queue, nor the registry
            web1.kv_entries(DESIRED)
        with pytest.raises(hd.NatsError, match="permission denied"):
            web1.request(f"$JS.API.STREAM.INFO.KV_{REGISTRY}")

    def test_no_test_credential_gets_a_right_on_the_events_stream(self, registry_server):
        for c in registry_server.credentials:
            if c.name in ("tdep", "mcp") or c.serves:
                assert not any(hd.EVENTS_STREAM in p for p in c.publish), c


def registry(server, bus_factory, user: str = "tdep") -> dict[str, hd.HostEntry]:
    bus = bus_factory(server, user)
    return {key: hd.HostEntry.parse(key, data) for key, (_, data) in bus.kv_entries(REGISTRY).items()}


class TestListenerRegistration:
    def test_it_registers_at_start_refreshes_every_heartbeat_and_leaves_offline(
        self, registry_server, bus_factory, tmp_path
    ):
        reader = bus_factory(registry_server, "tdep")
        host = Listener(registry_server, "web1", "test", "web", tmp_path, "--heartbeat-interval", "0.5")
        try:
            host.start()
            first = wait_for(lambda: reader.kv_entries(REGISTRY).get("test.web1"), what="web1's entry")
            entry = hd.HostEntry.parse("test.web1", first[1])
            assert (entry.hostname, entry.tier, entry.role, entry.version) == ("web1", "test", "web", hd.__version__)
            assert entry.subjects == ["deploy.test.web1", "deploy.test.all", "deploy.test.role.web"]
            assert entry.online and entry.heartbeat == 0.5 and entry.online_at(time.time())
            assert entry.queue_applied is None
            wait_for(lambda: reader.kv_entries(REGISTRY)["test.web1"][0] > first[0], what="a heartbeat's write")
        finally:
            host.stop()
        assert host.proc.returncode == 0, host.log_text()
        left = hd.HostEntry.parse("test.web1", reader.kv_entries(REGISTRY)["test.web1"][1])
        assert not left.online and not left.online_at(time.time())
        assert "marking itself offline in the registry" in host.log_text()

    def test_sigterm_stops_a_registered_listener_following_its_queue_every_time(
        self, registry_server, registry_fleet, bus_factory
    ):
        """With JetStream, the heartbeat and the queue's consumer running (their own threads), SIGTERM ends the
        listener with exit 0 within its grace, each of 5 times, and it leaves its entry offline each time."""
        reader = bus_factory(registry_server, "tdep")
        web1 = registry_fleet("web1", "--trusted-key", f"{registry_server.public['tdep']}=tdep")
        for run in range(1, 6):
            wait_for(lambda: web1.log_text().count("following its queued deploys") == run, what="the queue's consumer")
            wait_for(lambda: hd.HostEntry.parse("test.web1", reader.kv_entries(REGISTRY)["test.web1"][1]).online,
                     what="web1 online", interval=0.1)  # fmt: skip
            web1.proc.send_signal(signal.SIGTERM)
            assert web1.proc.wait(30) == 0, web1.log_text()
            assert not hd.HostEntry.parse("test.web1", reader.kv_entries(REGISTRY)["test.web1"][1]).online
            if run < 5:
                web1.start()

    def test_without_jetstream_it_warns_once_and_deploys_as_before(self, tmp_path, bus_factory):
        perms = helpers.listener_permissions("testhost1", "test", None)
        perms = {"publish": [*perms["publish"], "$KV.>"], "subscribe": [*perms["subscribe"], "deploy.responses.>"]}
        server = NatsServer(tmp_path, {"testhost1": perms, "test-deployer": helpers.FLEET["test-deployer"]})
        server.start()
        host = Listener(server, "testhost1", "test", None, tmp_path, "--heartbeat-interval", "0.1")
        try:
            host.start()
            host.standin.set_mode("slow")  # a deploy of 0.3 s: three heartbeats at least
            result = cli(server, "test-deployer", "deploy", "deploy.test.testhost1")
            assert result.returncode == 0, result.stderr
        finally:
            host.stop()
            server.stop()
        assert host.log_text().count("not in the registry") == 1, host.log_text()
        assert "trying again every heartbeat" in host.log_text() and "Traceback" not in host.log_text()

    def test_entries_are_checked_against_their_key(self):
        good = {
            "hostname": "web1",
            "tier": "test",
            "role": "web",
            "subjects": ["deploy.test.web1"],
            "version": "1",
            "generation": 3,
            "commit": None,
            "last_seen": "2026-01-01T00:00:00Z",
            "heartbeat": 30,
            "online": True,
            "queue_applied": None,
        }
        assert hd.HostEntry.parse("test.web1", json.dumps(good).encode()).generation == 3
        for key, change, why in (
            ("test.web2", {}, "names test.web1"),
            ("prod.web1", {"tier": "prod"}, "not deploy.prod"),
            ("test.web1", {"role": "web\x1b[2J"}, "role"),
            ("test.web1", {"online": None}, "online is missing"),
        ):
            with pytest.raises(hd.ProtocolError, match=why):
                hd.HostEntry.parse(key, json.dumps({**good, **change}).encode())
        shown = hd.HostEntry.parse("test.web1", json.dumps({**good, "version": "1\x1b]0;x\x07"}).encode())
        assert shown.version == "1"


# Windows no command may wait out: a command returns before them only because every expected host answered.
HUGE = ("--answer-window", "100", "--straggler-window", "100")


class TestClientsReadTheRegistry:
    def test_a_stopped_host_is_listed_offline_and_the_others_end_the_wait(self, registry_server, registry_fleet):
        registry_fleet("web1")
        registry_fleet("web2").stop()
        for command in ("list-hosts", "status"):
            result = cli(registry_server, "tdep", command, "--json", *HUGE, timeout=60)
            assert result.returncode == 0, result.stderr
            hosts = {h["hostname"]: h for h in json.loads(result.stdout)}
            assert set(hosts) == {"web1", "web2"}
            assert hosts["web1"]["online"] is True and hosts["web2"]["online"] is False
            assert all(hd.is_iso_time(h["last_seen"]) for h in hosts.values())
            assert hosts["web2"]["deploy_subjects"] == ["deploy.test.web2", "deploy.test.all", "deploy.test.role.web"]
            text = cli(registry_server, "tdep", command, *HUGE, timeout=60)
            line = next(row for row in text.stdout.splitlines() if row.startswith("web2 "))
            assert " offline " in line, text.stdout
            assert " offline " not in next(row for row in text.stdout.splitlines() if row.startswith("web1 "))
        status = {h["hostname"]: h for h in json.loads(cli(registry_server, "tdep", "status", "--json").stdout)}
        assert status["web1"]["queued"] is None and status["web2"]["history"] == []

    def test_a_bad_entry_is_skipped_and_hides_no_other(self, registry_server, registry_fleet, bus_factory):
        registry_fleet("web1")
        # web2's own credential writes an entry that claims a prod subject: it cannot make itself expected there
        web2 = bus_factory(registry_server, "web2")
        web2.kv_put(
            REGISTRY,
            "test.web2",
            json.dumps(
                {
                    "hostname": "web2",
                    "tier": "test",
                    "subjects": ["deploy.prod.all"],
                    "last_seen": "2026-01-01T00:00:00Z",
                    "heartbeat": 30,
                    "online": True,
                }
            ).encode(),
        )
        result = cli(registry_server, "tdep", "list-hosts", "--json", *HUGE, timeout=60)
        assert [h["hostname"] for h in json.loads(result.stdout)] == ["web1"], result.stderr
        assert "skipping registry entry test.web2" in result.stderr

    def test_without_jetstream_it_works_as_before_and_says_why_in_one_line(self, nats_server, start_listener):
        start_listener("testhost1", "test")
        for command in ("list-hosts", "status"):
            result = run_cli(command, *helpers.deploy_args(nats_server, "test-deployer"), "--answer-window", "1")
            assert result.returncode == 0 and "testhost1" in result.stdout, result.stderr
            notes = [line for line in result.stderr.splitlines() if "offline cannot be shown" in line]
            assert len(notes) == 1 and "registry" in notes[0], result.stderr


class TestDeployWithTheRegistry:
    def test_a_stopped_host_named_by_the_target_fails_as_offline(self, registry_server, registry_fleet):
        registry_fleet("web1")
        web2 = registry_fleet("web2")
        web2.stop()
        result = cli(registry_server, "tdep", "deploy", "deploy.test.role.web", "--branch", "main", *HUGE, timeout=60)
        assert result.returncode == hd.Exit.FAILED, result.stderr
        assert "web1: completed" in result.stderr
        assert "web2: failed - offline (last seen " in result.stderr and "--queue" in result.stderr
        assert "deploy.test.role.web: 1/2 hosts completed" in result.stderr
        assert web2.standin.calls == []

    def test_a_fan_out_exits_at_the_last_final_status(self, registry_server, registry_fleet):
        """Windows of 100 s that the command never waits out: it returns once web1 and web2 (the registered
        hosts of deploy.test.all) sent their final status; p1 is prod and not expected."""
        hosts = [registry_fleet("web1"), registry_fleet("web2"), registry_fleet("p1")]
        result = cli(
            registry_server, "tdep", "deploy", "deploy.test.all", "--branch", "main", "--json", *HUGE, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert [(h["hostname"], h["status"]) for h in json.loads(result.stdout)["hosts"]] == [
            ("web1", "completed"),
            ("web2", "completed"),
        ]
        assert [len(h.standin.calls) for h in hosts] == [1, 1, 0]

    def test_queue_writes_the_signed_request_for_the_offline_host_and_runs_the_online_one(
        self, registry_server, registry_fleet, bus_factory
    ):
        """... and web2, back with nats-config's rights, runs it once: not again after another restart."""
        web1 = registry_fleet("web1")
        web2 = registry_fleet("web2", "--trusted-key", f"{registry_server.public['tdep']}=tdep")
        web2.stop()
        before = int(time.time())
        result = cli(
            registry_server, "tdep", "deploy", "deploy.test.role.web", "--branch", "main", "--queue",
            "--queue-ttl", "2h", *HUGE, timeout=60,
        )  # fmt: skip
        after = int(time.time())
        assert result.returncode == hd.Exit.QUEUED, result.stderr
        assert "web2: queued - offline (last seen " in result.stderr and len(web1.standin.calls) == 1
        revision, data = bus_factory(registry_server, "tdep").kv_entries(DESIRED)["test.web2"]
        request = hd.DeployRequest.parse(data)
        assert (request.action, request.revision) == (hd.Action.SWITCH, "main")
        assert before + 7200 <= request.queue_until <= after + 7200
        signers = hd.TrustedSigners({registry_server.public["tdep"]: "tdep"})
        assert signers.verify("deploy.test.web2", data, request.reply_to, None) == "tdep"
        with pytest.raises(hd.ProtocolError, match="does not match"):  # signed for web2's subject only
            signers.verify("deploy.test.web1", data, request.reply_to, None)
        tampered = json.loads(data) | {"queue_until": request.queue_until + 86400}
        with pytest.raises(hd.ProtocolError, match="does not match"):  # the signature covers queue_until
            hd.TrustedSigners({registry_server.public["tdep"]: "tdep"}).verify(
                "deploy.test.web2", json.dumps(tampered).encode(), request.reply_to, None
            )
        status = {h["hostname"]: h for h in json.loads(cli(registry_server, "tdep", "status", "--json").stdout)}
        assert status["web2"]["queued"] == {
            "action": "switch",
            "revision": "main",
            "queue_until": request.queue_until,
            "queued_at": status["web2"]["queued"]["queued_at"],
        }
        assert hd.is_iso_time(status["web2"]["queued"]["queued_at"]) and status["web1"]["queued"] is None
        assert revision > 0
        web2.start()
        tdep = bus_factory(registry_server, "tdep")
        entry = lambda: hd.HostEntry.parse("test.web2", tdep.kv_entries(REGISTRY)["test.web2"][1])  # noqa: E731
        wait_for(lambda: entry().queue_applied == revision, what="web2 to run its queued deploy", interval=0.2)
        assert web2.standin.calls == [hd.rebuild_argv(hd.Action.SWITCH, FLAKE, "main", "web2")[1:]]
        assert "(signed by tdep)" in web2.log_text()
        status = {h["hostname"]: h for h in json.loads(cli(registry_server, "tdep", "status", "--json").stdout)}
        assert status["web2"]["queued"] is None and status["web2"]["history"][-1]["status"] == "completed"
        web2.stop()
        web2.start()
        wait_for(lambda: "was applied or refused before; not again" in web2.log_text(), what="web2 to see it again")
        assert len(web2.standin.calls) == 1

    def test_queue_flags_are_checked_before_anything_is_sent(self, registry_server):
        for flags, why in (
            (("--queue", "--queue-ttl", "31d"), "longer than 30d"),
            (("--queue", "--queue-ttl", "soon"), "not a duration"),
            (("--queue", "--canary", "1"), "--queue reaches the registry's offline hosts"),
        ):
            result = cli(registry_server, "tdep", "deploy", "deploy.test.all", *flags)
            assert result.returncode == hd.Exit.USAGE and why in result.stderr, result.stderr


class TestDeployByHostname:
    def test_a_registered_hostname_deploys_that_host_on_its_own_subject(self, registry_server, registry_fleet):
        web1, web2 = registry_fleet("web1"), registry_fleet("web2")
        result = cli(registry_server, "tdep", "deploy", "web1", "--branch", "main", "--json", *HUGE, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["subject"] == "deploy.test.web1"
        assert (len(web1.standin.calls), len(web2.standin.calls)) == (1, 0)

    def test_an_unknown_hostname_exits_2_naming_the_closest_registered_hosts(self, registry_server, registry_fleet):
        registry_fleet("web1")
        registry_fleet("web2")
        result = cli(registry_server, "tdep", "deploy", "web3")
        assert result.returncode == hd.Exit.USAGE
        closest = result.stderr.split("the closest registered: ")[1].split(";")[0]
        assert "'web3' is not a registered host" in result.stderr and sorted(closest.split(", ")) == ["web1", "web2"]
        assert "HOMELAB_DEPLOY_ALIAS_WEB3" in result.stderr

    def test_without_the_registry_it_says_why(self, nats_server):
        result = run_cli("deploy", "web1", *helpers.deploy_args(nats_server, "test-deployer"))
        assert result.returncode == hd.Exit.USAGE
        assert "the registry is unreadable" in result.stderr and "HOMELAB_DEPLOY_ALIAS_WEB1" in result.stderr


def test_queue_until_is_a_whole_number_of_unix_seconds_and_round_trips():
    request = hd.DeployRequest(hd.Action.BOOT, "main", "deploy.responses.U1.t", queue_until=1_900_000_000)
    assert hd.DeployRequest.parse(request.to_json()) == request
    assert "queue_until" not in json.loads(request._replace(queue_until=None).to_json())
    for bad in ("1900000000", 0, -5, 2**40, 1.5, True):
        data = json.dumps({**json.loads(request.to_json()), "queue_until": bad}).encode()
        with pytest.raises(hd.ProtocolError, match="invalid queue_until"):
            hd.DeployRequest.parse(data)


def test_a_site_leaf_user_gets_its_hosts_bucket_rights_and_no_more(tmp_path):
    """JetStream stays on the hub: a site's leaf user carries its hosts' rights there, the union, nothing else."""
    pub = {name: helpers.make_user_key(tmp_path, name)[1] for name in ("t1", "t2", "home")}
    credentials = hd.fleet_credentials(
        {
            "hosts": [
                {"hostname": "t1", "tier": "test", "nkey": pub["t1"], "site": "home"},
                {"hostname": "t2", "tier": "test", "nkey": pub["t2"]},
            ],
            "sites": [{"name": "home", "hub": "nats-leaf://hub.example.com:7422", "nkey": pub["home"]}],
        }
    )
    site = next(c for c in credentials if c.description.startswith("leaf node of site home"))
    t1 = next(c for c in credentials if c.name == "t1")
    assert set(site.publish) == set(t1.publish) and f"$KV.{REGISTRY}.test.t1" in site.publish
    assert not any("t2" in p for p in site.publish)


class TestQueuedInStatus:
    def test_only_a_live_entry_newer_than_what_the_host_applied_is_pending(self, registry_server, bus_factory):
        admin, web1 = bus_factory(registry_server, "admin"), bus_factory(registry_server, "web1")

        def queue_for(host: str, until: int) -> int:
            request = hd.DeployRequest(hd.Action.SWITCH, "main", hd.new_reply_subject("deploy", admin.public_key))
            data = admin.sign(f"deploy.test.{host}", request._replace(queue_until=until).to_json())
            return admin.kv_put(DESIRED, f"test.{host}", data)

        def register(host: str, applied: int | None) -> None:
            entry = hd.HostEntry(host, "test", "web", [f"deploy.test.{host}"], "1", None, None,
                                 time.strftime(hd.ISO_TIME_FORMAT, time.gmtime()), 30.0, False, applied)  # fmt: skip
            bus = web1 if host == "web1" else bus_factory(registry_server, host)
            bus.kv_put(REGISTRY, f"test.{host}", json.dumps(entry._asdict()).encode())

        applied = queue_for("web1", int(time.time()) + 3600)
        register("web1", applied)  # web1 applied it: nothing pending
        queue_for("web2", int(time.time()) - 1)  # expired
        register("web2", None)
        status = {h["hostname"]: h for h in json.loads(cli(registry_server, "tdep", "status", "--json").stdout)}
        assert status["web1"]["queued"] is None and status["web2"]["queued"] is None
        assert (status["web1"]["online"], status["web2"]["online"]) == (False, False)
        newer = queue_for("web1", int(time.time()) + 3600)
        assert newer > applied
        status = {h["hostname"]: h for h in json.loads(cli(registry_server, "tdep", "status", "--json").stdout)}
        assert status["web1"]["queued"]["action"] == "switch"
