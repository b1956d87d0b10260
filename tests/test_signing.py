"""Signed requests (issue 19): a listener or builder with trusted keys acts only on requests signed by one of them,
for the subject they arrived on, recently, once. Real nats-server, real listener and builder processes; every
rejected request is checked to have run nothing (the stand-in's argv log).
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import homelab_deploy as hd
from tests import helpers
from tests.helpers import GOOD, BuilderProcess, collect, has_final, needs_nix, run_cli, trusted, wait_for


def signed(bus: hd.Bus, subject: str, body: dict, signed_for: str | None = None, **change) -> tuple[bytes, str]:
    """A deploy request of `body` signed by `bus`'s key for `signed_for` (default: subject), then `change`d
    (None removes a field); and its reply subject."""
    reply_to = hd.new_reply_subject("deploy", bus.public_key)
    obj = json.loads(bus.sign(signed_for or subject, json.dumps({**body, "reply_to": reply_to}).encode()))
    for key, value in change.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return json.dumps(obj).encode(), reply_to


def send(bus: hd.Bus, subject: str, payload: bytes, reply_to: str) -> list[dict]:
    """Publish a prepared request and return its statuses up to the final one."""
    q = bus.inbox(hd.answer_subject(reply_to, "*"))
    bus.publish(subject, payload, confirm=True)
    return collect(q, has_final, 60, f"a final status for {subject}")


def resign(bus: hd.Bus, subject: str, obj: dict) -> dict:
    """obj with a fresh signature by bus's key over its current fields (to forge a field the signature covers)."""
    obj = {k: v for k, v in obj.items() if k != "signature"}
    return {**obj, "signature": base64.b64encode(bus.signing_key.sign(hd.signing_input(subject, obj))).decode()}


class TestSignedDeploys:
    def test_a_signed_deploy_runs_and_names_its_signer(self, nats_server, start_listener):
        host = start_listener("testhost1", "test", None, *trusted(nats_server, "test-deployer"))
        assert "acting only on requests signed by test-deployer" in host.log_text()
        r = run_cli(
            "deploy",
            "deploy.test.testhost1",
            "--nats-url",
            nats_server.url,
            "--nkey-file",
            str(nats_server.seeds["test-deployer"]),
        )
        assert r.returncode == 0, r.stderr
        assert "testhost1: accepted - switch of master accepted (signed by test-deployer)" in r.stderr
        assert "accepted switch of master (signed by test-deployer)" in host.log_text()
        assert len(host.standin.calls) == 1
        r = run_cli(
            "status", "--json", "--nats-url", nats_server.url, "--nkey-file", str(nats_server.seeds["test-deployer"])
        )
        assert json.loads(r.stdout)[0]["history"][0]["signer"] == "test-deployer"
        nonces = host.standin.dir / "state" / "nonces.json"
        first, *appended = nonces.read_text().splitlines()
        assert oct(nonces.stat().st_mode & 0o777) == "0o600" and json.loads(first) == {"nonces": {}}
        assert [len(json.loads(line)) for line in appended] == [2]  # one ["nonce", expiry]

    def test_without_trusted_keys_a_warning_and_todays_behaviour(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test")
        assert (
            "WARNING host=testhost1 unsigned: no trusted keys, so any credential NATS lets publish on its subjects "
            "can deploy it" in host.log_text()
        )
        bus = bus_factory(nats_server, "test-deployer")
        answers = send(
            bus,
            "deploy.test.testhost1",
            *signed(bus, "deploy.test.testhost1", {"action": "test", "revision": "main"}, signature=None, signer=None),
        )
        assert answers[-1]["status"] == "completed" and len(host.standin.calls) == 1
        status = ["status", "--nats-url", nats_server.url, "--nkey-file", str(nats_server.seeds["test-deployer"])]
        assert json.loads(run_cli(*status, "--json").stdout)[0]["unsigned"] is True
        assert run_cli(*status).stdout.splitlines()[1].split()[:4] == ["testhost1", "test", "-", "idle,unsigned"]

    def test_require_signed_without_trusted_keys_rejects_deploys_naming_the_option(self, nats_server, start_listener):
        host = start_listener("testhost1", "test", None, "--require-signed")
        assert (
            "WARNING host=testhost1 --require-signed without trusted keys: every deploy is rejected" in host.log_text()
        )
        flags = ["--nats-url", nats_server.url, "--nkey-file", str(nats_server.seeds["test-deployer"])]
        r = run_cli("deploy", "deploy.test.testhost1", *flags)
        assert r.returncode == 1 and "testhost1: rejected [unauthorized]" in r.stderr, r.stderr
        assert "(module option requireSigned" in r.stderr and "trustedKeys" in r.stderr
        assert "or set requireSigned = false" in r.stderr and host.standin.calls == []
        assert json.loads(run_cli("status", "--json", *flags).stdout)[0]["unsigned"] is False

    def test_forged_stale_replayed_unknown_and_readdressed_requests_run_nothing(
        self, nats_server, start_listener, bus_factory
    ):
        host = start_listener("testhost1", "test", None, *trusted(nats_server, "test-deployer"))
        bus, admin = bus_factory(nats_server, "test-deployer"), bus_factory(nats_server, "admin")
        subject, body = "deploy.test.testhost1", {"action": "switch", "revision": "main"}
        good, good_reply = signed(bus, subject, body)
        assert send(bus, subject, good, good_reply)[-1]["status"] == "completed"
        stale = resign(bus, subject, {**json.loads(signed(bus, subject, body)[0]), "signed_at": int(time.time()) - 120})
        huge = resign(bus, subject, {**json.loads(signed(bus, subject, body)[0]), "signed_at": 10**400})
        cases = {
            "unsigned": (*signed(bus, subject, body, signer=None, signature=None), "the request is not signed"),
            "altered": (*signed(bus, subject, body, revision="evil"), "does not match this request on"),
            "another subject": (
                *signed(bus, subject, body, signed_for="deploy.test.all"),
                "signed for another subject",
            ),
            "unknown signer": (*signed(admin, subject, body), "which is not a trusted key here"),
            "stale": (json.dumps(stale).encode(), stale["reply_to"], "ago, more than 60s off"),
            "replayed": (good, good_reply, "was used before: a replay"),
            "garbled signature": (*signed(bus, subject, body, signature="!!"), "does not match"),
            "bad nonce": (*signed(bus, subject, body, nonce="x"), "malformed signature fields"),
            "huge signed_at": (json.dumps(huge).encode(), huge["reply_to"], "malformed signature fields"),
        }
        answered = {b: b.inbox(f"deploy.responses.{b.public_key}.>") for b in (bus, admin)}
        for name, (payload, _reply_to, _why) in cases.items():
            (admin if name == "unknown signer" else bus).publish(subject, payload, confirm=True)
        # answers must go to the signer: a request whose reply_to names another key is refused (seen in the log)
        payload, _ = signed(bus, subject, body)
        obj = json.loads(payload)
        bus.publish(
            subject,
            json.dumps(
                resign(bus, subject, {**obj, "reply_to": hd.new_reply_subject("deploy", admin.public_key)})
            ).encode(),
            confirm=True,
        )
        wait_for(
            lambda: host.log_text().count("rejected: unauthorized: ") == len(cases) + 1,
            what="every forged request to be refused",
        )
        assert all(why in host.log_text() for *_, why in cases.values()) and "not to the signer" in host.log_text()
        # none is answered (a forged request could aim a `rejected` at someone's deploy): the listener's answers
        # leave in order, so any answer to them is in before the final status of a genuine request sent now
        last, last_reply = signed(bus, subject, body)
        bus.publish(subject, last, confirm=True)
        got = []
        while not got or got[-1] != (last_reply.rsplit(".", 1)[1], "completed"):
            answered_on, data = answered[bus].get(timeout=60)
            got.append((answered_on.split(".")[3], json.loads(data)["status"]))
        assert {token for token, _ in got} == {last_reply.rsplit(".", 1)[1]}, got
        assert answered[admin].empty()
        assert "nothing was run" in host.log_text() and len(host.standin.calls) == 2

    def test_a_restart_does_not_reopen_the_replay_window(self, nats_server, start_listener, bus_factory):
        host = start_listener("testhost1", "test", None, *trusted(nats_server, "test-deployer"))
        bus = bus_factory(nats_server, "test-deployer")
        payload, reply_to = signed(bus, "deploy.test.testhost1", {"action": "test", "revision": "main"})
        assert send(bus, "deploy.test.testhost1", payload, reply_to)[-1]["status"] == "completed"
        host.stop()
        host.log.write_text("")
        host.start()
        bus.publish("deploy.test.testhost1", payload, confirm=True)  # refused without an answer
        wait_for(lambda: "used before" in host.log_text(), what="the replay to be refused")
        assert len(host.standin.calls) == 1

    @pytest.mark.parametrize(
        "damage", ["", "{not json", '{"nonces": {}}\n[oops\n["a", 1]'], ids=["emptied", "garbled", "garbled inside"]
    )
    def test_a_lost_replay_cache_fails_closed(self, nats_server, start_listener, bus_factory, damage):
        """The nonces file is emptied or garbled: after the restart a request captured before it is not run."""
        host = start_listener("testhost1", "test", None, *trusted(nats_server, "test-deployer"))
        bus = bus_factory(nats_server, "test-deployer")
        payload, reply_to = signed(bus, "deploy.test.testhost1", {"action": "test", "revision": "main"})
        assert send(bus, "deploy.test.testhost1", payload, reply_to)[-1]["status"] == "completed"
        host.stop()
        (host.standin.dir / "state" / "nonces.json").write_text(damage)
        host.log.write_text("")
        host.start()
        restarted = time.time()
        replay_answers = bus.inbox(hd.answer_subject(reply_to, "*"))
        bus.publish("deploy.test.testhost1", payload, confirm=True)  # refused without an answer (logged)
        wait_for(
            lambda: "signed before this host lost its replay cache" in host.log_text(), what="the replay to be refused"
        )
        assert f"replay cache {host.standin.dir / 'state' / 'nonces.json'} lost (" in host.log_text()
        wait_for(lambda: int(time.time()) > restarted, what="the clock to pass the second of the restart")
        fresh, fresh_reply = signed(bus, "deploy.test.testhost1", {"action": "test", "revision": "main"})
        assert send(bus, "deploy.test.testhost1", fresh, fresh_reply)[-1]["status"] == "completed"  # signed after it
        assert len(host.standin.calls) == 2 and replay_answers.empty()  # answers leave in order: none came for it

    def test_a_trusted_keys_flood_does_not_drop_another_keys_deploy(self, nats_server, start_listener, bus_factory):
        """One trusted key floods (signed requests, each verified, none meant to run: expires_in is spent on
        arrival); another trusted key sends 20 deploys in the middle of it. Each of them is answered (one runs, the
        others may find it running), none is dropped. Past SIGNER_BURST the flood is refused by the per-key rate;
        what its own lane cannot hold is dropped there."""
        host = start_listener("testhost1", "test", None, *trusted(nats_server, "test-deployer", "admin"))
        flooder, admin = bus_factory(nats_server, "test-deployer"), bus_factory(nats_server, "admin")
        subject = "deploy.test.testhost1"

        def flood(count: int) -> None:
            for _ in range(count):
                flooder.publish(
                    subject, signed(flooder, subject, {"action": "switch", "revision": "main", "expires_in": 1e-9})[0]
                )

        inboxes = []
        for _ in range(20):
            flood(150)
            deploy, reply_to = signed(admin, subject, {"action": "switch", "revision": "main"})
            inboxes.append(admin.inbox(hd.answer_subject(reply_to, "*")))
            admin.publish(subject, deploy)
        flood(1000)
        finals = [collect(q, has_final, 120, f"an answer to the admin's deploy {i}")[-1] for i, q in enumerate(inboxes)]
        assert "completed" in [f["status"] for f in finals], finals
        assert all(f["status"] == "completed" or f["error"] == "already_running" for f in finals), finals
        assert len(host.standin.calls) == [f["status"] for f in finals].count("completed")
        assert "lane=deploy-admin" not in host.log_text()
        assert "sent more than 30 requests at once" in host.log_text()

    def test_a_permissive_server_still_cannot_make_a_prod_host_deploy(self, tmp_path):
        users = {
            **helpers.FLEET,
            "test-deployer": {**helpers.FLEET["test-deployer"], "publish": ["deploy.>"]},
        }  # the mistake: test may reach prod
        server = helpers.NatsServer(tmp_path, users)
        host = None
        try:
            server.start()
            host = helpers.Listener(server, "dns1", "prod", "dns", tmp_path, *trusted(server, "admin")).start()
            deploy = ["deploy", "deploy.prod.dns1", "--nats-url", server.url, "--nkey-file"]
            r = run_cli(*deploy, str(server.seeds["test-deployer"]))
            assert r.returncode == 4 and "not a trusted key" in host.log_text()  # refused without an answer
            assert "a host never answers a request whose signature it refuses" in r.stderr
            assert host.standin.calls == []
            r = run_cli(*deploy, str(server.seeds["admin"]))
            assert r.returncode == 0 and "(signed by admin)" in r.stderr, r.stderr
            assert len(host.standin.calls) == 1
        finally:
            if host:
                host.stop()
            server.stop()

    def test_bad_trusted_keys_stop_the_listener_at_start(self, nats_server, start_listener, tmp_path):
        keys = tmp_path / "trusted.keys"
        keys.write_text(f"# deployers\n{nats_server.public['admin']}=admin\n\nUNOTAKEY=bob\n")
        host = start_listener("testhost1", "test", None, "--trusted-keys-file", str(keys), expect_ready=False)
        assert f"error: {keys} line 4: 'UNOTAKEY=bob' is not PUBKEY[=NAME]" in host.log_text()
        host = start_listener(
            "testhost2", "test", None, "--trusted-key", f"{nats_server.public['admin']}=a b", expect_ready=False
        )
        assert "error: --trusted-key: " in host.log_text()
        keys.write_text(f"# deployers\n{nats_server.public['admin']}=admin\n{nats_server.public['test-deployer']}\n")
        host = start_listener("dns1", "prod", None, "--trusted-keys-file", str(keys))
        assert f"acting only on requests signed by {nats_server.public['test-deployer']}, admin" in host.log_text()


class TestSignatureProperties:
    """No change to a signed request, its subject or its signature verifies."""

    @pytest.fixture(scope="class")
    def key(self, tmp_path_factory):
        """What Bus.sign needs of a connection: its public key and key pair."""
        import types

        import nkeys

        path = tmp_path_factory.mktemp("key") / "k.seed"
        public = hd.new_user_seed(str(path))
        return types.SimpleNamespace(
            public_key=public, signing_key=nkeys.from_seed(bytearray(path.read_bytes().strip()))
        )

    def test_nonce_file_appends_compacts_and_keeps_what_precedes_a_torn_line(self, key, tmp_path, monkeypatch):
        monkeypatch.setattr(hd, "NONCE_COMPACT_EVERY", 3)
        subject, path = "deploy.test.testhost1", tmp_path / "nonces.json"
        signers = hd.TrustedSigners({key.public_key: "k"}, str(path))
        sent = []
        for i in range(5):
            reply_to = f"deploy.responses.{key.public_key}.r{i}"
            sent.append(
                (
                    hd.Bus.sign(
                        key, subject, json.dumps({"action": "test", "revision": "main", "reply_to": reply_to}).encode()
                    ),
                    reply_to,
                )
            )
            assert signers.verify(subject, sent[-1][0], reply_to, hd.ErrorCode.UNAUTHORIZED) == "k"
        first, *appended = path.read_text().split("\n")
        assert len(json.loads(first)["nonces"]) == 4 and len(appended) == 1  # compacted at the 4th, then appended
        path.write_text(path.read_text() + '\n["0123')  # a crash in the middle of the next append
        again = hd.TrustedSigners({key.public_key: "k"}, str(path))
        assert again.not_before == 0 and set(again.seen) == {json.loads(data)["nonce"] for data, _ in sent}
        with pytest.raises(hd.ProtocolError, match="was used before"):
            again.verify(subject, sent[0][0], sent[0][1], hd.ErrorCode.UNAUTHORIZED)

    @given(
        field=st.sampled_from(
            [
                "action",
                "revision",
                "reply_to",
                "expires_in",
                "signer",
                "signed_at",
                "nonce",
                "signature",
                "extra",
                "subject",
            ]
        ),
        value=st.one_of(st.text(max_size=60), st.integers(), st.floats(allow_nan=False), st.none(), st.booleans()),
        remove=st.booleans(),
    )
    @settings(max_examples=1000, deadline=None)
    def test_no_mutation_verifies(self, key, field, value, remove):
        subject = "deploy.test.testhost1"
        reply_to = f"deploy.responses.{key.public_key}.r1"
        obj = json.loads(
            hd.Bus.sign(
                key,
                subject,
                json.dumps({"action": "switch", "revision": "main", "reply_to": reply_to, "expires_in": 1.0}).encode(),
            )
        )
        signers = hd.TrustedSigners({key.public_key: "k"})
        mutated, on = dict(obj), subject
        if field == "subject":
            on = str(value) if value is not None and str(value) != subject else "deploy.prod.testhost1"
        elif remove and field in mutated:
            del mutated[field]
        elif mutated.get(field, object()) == value and type(mutated.get(field)) is type(value):
            mutated[field] = f"{value}x"  # not a change: make it one
        else:
            mutated[field] = value
        with pytest.raises(hd.ProtocolError) as refused:
            signers.verify(on, json.dumps(mutated).encode(), reply_to, hd.ErrorCode.UNAUTHORIZED)
        assert refused.value.code is hd.ErrorCode.UNAUTHORIZED
        assert signers.verify(subject, json.dumps(obj).encode(), reply_to, hd.ErrorCode.UNAUTHORIZED) == "k"


# ---------------------------------------------------------------- audit events


@pytest.fixture
def follow(tmp_path):
    """Start `homelab-deploy events` (stopped after the test); returns a reader of its stdout lines."""
    started: list[subprocess.Popen] = []

    def start(server, user: str, *flags: str, ready: str = "following") -> tuple[subprocess.Popen, Path, Path]:
        out, err = tmp_path / f"events{len(started)}.out", tmp_path / f"events{len(started)}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                [*helpers.PROGRAM, "events", "--nats-url", server.url, "--nkey-file", str(server.seeds[user]), *flags],
                stdout=o,
                stderr=e,
                start_new_session=True,
            )
        started.append(proc)
        wait_for(lambda: ready in err.read_text() or proc.poll() is not None, what="events to follow")
        return proc, out, err

    yield start
    for proc in started:
        helpers.stop_process(proc)


def events_of(out: Path, request: str | None = None) -> list[dict]:
    return [e for e in map(json.loads, out.read_text().splitlines()) if request is None or e["id"] == request]


EVENTS_STREAM_JSON = re.search(
    r"```json\n(\{\n  \"name\": \"HOMELAB_DEPLOY_EVENTS\".*?)```",
    (helpers.REPO / "docs" / "security.md").read_text(),
    re.S,
)


class TestAuditEvents:
    def test_every_state_change_is_published_in_order(self, nats_server, start_listener, bus_factory, follow):
        host = start_listener("testhost1", "test", None, *trusted(nats_server, "test-deployer"))
        proc, out, _ = follow(nats_server, "test-deployer", "--tier", "test", "--json")
        bus = bus_factory(nats_server, "test-deployer")
        payload, reply_to = signed(bus, "deploy.test.testhost1", {"action": "boot", "revision": "v1"})
        assert send(bus, "deploy.test.testhost1", payload, reply_to)[-1]["status"] == "completed"
        rid = hd.request_id(reply_to)
        wait_for(lambda: len(events_of(out, rid)) == 3, what="three events of the deploy")
        assert [
            (e["status"], e["host"], e["tier"], e["signer"], e["action"], e["revision"], e["error"])
            for e in events_of(out, rid)
        ] == [
            (status, "testhost1", "test", "test-deployer", "boot", "v1", None)
            for status in ("accepted", "started", "completed")
        ]
        assert reply_to.rsplit(".", 1)[1] not in out.read_text() and "request" not in events_of(out)[0]
        bus.publish("deploy.test.testhost1", payload, confirm=True)  # a replay: no answer, no event of its own
        wait_for(lambda: "used before" in host.log_text(), what="the replay to be refused")
        host.stop()  # closes the rejection window: its summary counts the replay
        wait_for(lambda: len(events_of(out)) == 4, what="the summary of the rejections")
        summary = events_of(out)[-1]
        assert (summary["status"], summary["id"], summary["suppressed"]) == ("rejected", None, 1)
        assert "1 failed authentication" in summary["reason"]
        assert len(host.standin.calls) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

    def test_a_test_credential_cannot_follow_prod_and_is_told_how(self, nats_server, follow):
        proc, _, err = follow(nats_server, "test-deployer", ready="error")
        assert proc.wait(30) == 3
        assert "may not subscribe to 'deploy.events.>'" in err.read_text() and "add --tier test" in err.read_text()

    def test_the_stream_replays_what_happened_before_the_cli_started(self, tmp_path, follow):
        assert EVENTS_STREAM_JSON and json.loads(EVENTS_STREAM_JSON[1]) == hd.EVENTS_STREAM_CONFIG, (
            "docs/security.md shows the stream definition the code uses (EVENTS_STREAM_CONFIG)"
        )
        server = helpers.NatsServer(tmp_path, {**helpers.FLEET, "ops": {"publish": [">"], "subscribe": [">"]}})
        server.config.write_text(server.config.read_text() + f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n')
        host = None
        try:
            server.start()
            _, _, err = follow(server, "admin", "--since", "1h", ready="error")
            assert "has no JetStream stream HOMELAB_DEPLOY_EVENTS" in err.read_text()
            ops = hd.Bus(server.url, str(server.seeds["ops"]), "ops")
            try:
                from nats.js.api import StreamConfig

                config = StreamConfig.from_response(dict(hd.EVENTS_STREAM_CONFIG))
                assert config.max_age == 90 * 86400 and config.max_msgs and config.max_bytes  # bounded
                ops._call(ops.nc.jetstream().add_stream(config))
            finally:
                ops.close()
            host = helpers.Listener(server, "testhost1", "test", None, tmp_path).start()
            deploy = [
                "deploy",
                "deploy.test.testhost1",
                "--json",
                "--nats-url",
                server.url,
                "--nkey-file",
                str(server.seeds["admin"]),
            ]
            assert run_cli(*deploy).returncode == 0
            proc, _, err = follow(server, "test-deployer", "--tier", "test", "--since", "1h", ready="error")
            assert proc.wait(30) == 3 and err.read_text().splitlines() == [
                (
                    "error: replay (--since) needs an admin credential: "
                    f"this one ({server.seeds['test-deployer']}) may not read the JetStream stream "
                    "HOMELAB_DEPLOY_EVENTS; follow live events without --since"
                )
            ]
            _, out, _ = follow(server, "admin", "--tier", "test", "--since", "1h", "--json")
            wait_for(
                lambda: [e["status"] for e in events_of(out)] == ["accepted", "started", "completed"],
                what="the stored events",
            )
            assert run_cli(*deploy, "--branch", "v2").returncode == 0  # then live ones, from the same consumer
            wait_for(lambda: len(events_of(out)) == 6, what="the live events")
            assert [e["revision"] for e in events_of(out)] == ["master"] * 3 + ["v2"] * 3
        finally:
            if host:
                host.stop()
            server.stop()


@needs_nix
class TestSignedBuilds:
    def test_the_builder_acts_only_on_signed_requests_and_publishes_events(
        self, nats_server, nix_store, flake, tmp_path, bus_factory
    ):
        config = {
            "repos": {"fleet": {"url": flake({"good1": GOOD}), "default_branch": "main"}},
            "trusted_keys": [f"{nats_server.public['build-client']}=ci"],
        }
        builder = BuilderProcess(nats_server, tmp_path / "builder", config, nix_store).start()
        try:
            assert "no trusted_keys" not in builder.log_text()
            events = bus_factory(nats_server, "admin").inbox("build.events.>")
            client = bus_factory(nats_server, "build-client")
            reply_to = hd.new_reply_subject("build", client.public_key)
            q = client.inbox(hd.answer_subject(reply_to, "*"))
            client.publish(
                "build.fleet.all",
                json.dumps({"repo": "fleet", "target": "all", "reply_to": reply_to}).encode(),
                confirm=True,
            )
            wait_for(lambda: "the request is not signed" in builder.log_text(), what="the unsigned build refused")
            assert builder.nix_calls == []
            r = run_cli(
                "build", "fleet", "--nats-url", nats_server.url, "--nkey-file", str(nats_server.seeds["build-client"])
            )
            assert r.returncode == 0, r.stderr
        finally:
            builder.stop()  # ends the rejection window: its summary counts the unsigned request
        seen = collect(events, lambda got: len(got) >= 3, 60, "the build events")
        assert [(e["status"], e["repo"], e["host"], e["signer"], e["suppressed"]) for e in seen] == [
            ("started", "fleet", "all", "ci", None),
            ("completed", "fleet", "all", "ci", None),
            ("rejected", "fleet", None, None, 1),
        ]
        assert q.empty()  # the unsigned request got no answer
