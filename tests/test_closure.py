"""Build once, deploy exactly that closure (issue 29).

A real nats-server with JetStream and exactly `nats-config`'s users, the builds bucket made by the operator, a
builder on the real nix with a private store that signs and copies each system to a `file://` cache, and real
listeners that activate the built store path with nix-store, nix-env and its own `bin/switch-to-configuration`
(a tiny derivation that records its argv to $SWITCH_LOG), never the stand-in nixos-rebuild.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import homelab_deploy as hd
from tests.helpers import MCP_SCRIPT, REPO, Listener, NatsServer, commit_flake, flake_text, needs_nix, run_cli, text

pytestmark = needs_nix

# The system a host builds: bin/switch-to-configuration, which appends its arguments to $SWITCH_LOG.
SYSTEM = (
    'mkdir -p $out/bin; printf \'#!/bin/sh\\necho "$*" >> "$SWITCH_LOG"\\n\' > $out/bin/switch-to-configuration; '
    "chmod +x $out/bin/switch-to-configuration"
)
USERS = ("testhost1", "testhost2", "admin", "builder", "bclient", "mcp", "mcpadmin", "ops")


def nix(env: dict, *args: str, input: str | None = None) -> str:
    return subprocess.run(
        ["nix", *args], env=env, input=input, check=True, capture_output=True, text=True, timeout=120
    ).stdout


@pytest.fixture
def fleet(tmp_path, nix_store):
    """The server (with `ops`, every right, who made the builds bucket), a flake of testhost1 and testhost2, a
    signing key and its public half; stopped after the test."""
    server = NatsServer(tmp_path, {name: {} for name in USERS})
    pub = server.public
    credentials = hd.fleet_credentials(
        {
            "hosts": [{"hostname": h, "tier": "test", "nkey": pub[h]} for h in ("testhost1", "testhost2")],
            "deployers": [{"name": "admin", "access": "admin", "nkey": pub["admin"]}],
            "builders": [{"name": "builder", "repos": ["fleet"], "nkey": pub["builder"]}],
            "build_clients": [{"name": "bclient", "repos": ["fleet"], "nkey": pub["bclient"]}],
            "mcp": [{"name": "mcp", "nkey": pub["mcp"], "admin_nkey": pub["mcpadmin"]}],
        }
    )
    config = hd.authorization_config(credentials).replace(
        "  users = [\n",
        f'  users = [\n    {{ nkey: "{pub["ops"]}", permissions: {{ publish: [">"], subscribe: [">"] }} }}\n',
    )
    server.config.write_text(f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n' + config)
    server.start()
    ops = hd.Bus(server.url, str(server.seeds["ops"]), "ops")
    try:
        ops.create_bucket(hd.BUILDS_BUCKET_CONFIG)
        server.ops, server.nix_env = ops, nix_store
        server.url_of_flake = commit_flake(
            tmp_path / "repos" / "fleet", flake_text({"testhost1": SYSTEM, "testhost2": SYSTEM})
        )
        server.secret_key = tmp_path / "cache-key.sec"
        server.secret_key.write_text(nix(nix_store, "key", "generate-secret", "--key-name", "fleet-cache-1"))
        yield server
    finally:
        ops.close()
        server.stop()


@pytest.fixture
def builder(fleet, nix_store, tmp_path):
    """builder(cache, key) -> a started builder of repo `fleet` copying to `cache`; stopped after the test."""
    from tests.helpers import BuilderProcess

    started: list[BuilderProcess] = []

    def start(cache: str, key: str | None = None) -> BuilderProcess:
        repo = {"url": fleet.url_of_flake, "default_branch": "main", "cache": cache}
        if key:
            repo["cache_secret_key"] = key
        started.append(
            BuilderProcess(fleet, tmp_path / f"builder{len(started)}", {"repos": {"fleet": repo}}, nix_store)
        )
        return started[-1].start()

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def host(fleet, nix_store, tmp_path):
    """host(name) -> a started listener on the private store whose switch-to-configuration writes to
    <its dir>/switch.log; stopped after the test."""
    started: list[Listener] = []

    def start(name: str, *extra: str, env: dict | None = None) -> Listener:
        listener = Listener(fleet, name, "test", None, tmp_path, *extra)
        listener.standin.profile.parent.mkdir(parents=True)
        listener.switch_log = listener.standin.dir / "switch.log"
        listener.env.update({k: v for k, v in nix_store.items() if k != "PATH"}, SWITCH_LOG=str(listener.switch_log))
        listener.env.update(env or {})
        started.append(listener)
        return listener.start()

    yield start
    for listener in started:
        listener.stop()


def build(fleet, bus_factory, target: str = "all") -> tuple[dict, list[dict]]:
    events: list[dict] = []
    final = hd.build_repo(bus_factory(fleet, "bclient"), "fleet", target, None, 300, 5, events.append)
    assert final is not None
    return final, events


def head(fleet) -> str:
    repo = fleet.url_of_flake.removeprefix("git+file://")
    return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def deploy(fleet, target: str, *flags: str) -> subprocess.CompletedProcess:
    """The CLI on the admin credential, with the private store's NIX_STORE_DIR (the paths it reads are of it)."""
    args = ["deploy", target, "--nats-url", fleet.url, "--nkey-file", str(fleet.seeds["admin"])]
    return run_cli(*args, "--answer-window", "2", "--json", *flags, env=fleet.nix_env)


# ---------------------------------------------------------------- store paths: strictly one top-level path


@pytest.mark.parametrize(
    "path",
    [
        "/nix/store/short-x",
        "/nix/store/../etc/passwd",
        f"/nix/store/{'a' * 32}-../x",
        f"/nix/store/{'a' * 32}-x/../../etc",
        f"/nix/store/{'a' * 32}-a b",
        f"/nix/store/{'a' * 32}-x\n",
        f"/tmp/{'a' * 32}-x",
        f"/nix/store/{'a' * 33}-x",
        f"/nix/store/{'e' * 32}-x",  # not nix base32: e, o, u, t are left out
        f"/nix/store/{'a' * 32}-.hidden",
        f"/nix/store/{'a' * 32}-{'x' * 212}",
        f"/nix/store/{'a' * 32}-x/bin",
        f"/nix/store/{'a' * 32}-",
        f"//nix/store/{'a' * 32}-x",
        "nix/store/" + "a" * 32 + "-x",
        42,
        ["/nix/store/x"],
    ],
)
def test_malformed_store_paths_are_refused(path, monkeypatch):
    monkeypatch.delenv("NIX_STORE_DIR", raising=False)
    request = {"action": "switch", "revision": "main", "reply_to": "deploy.responses.me.abc", "store_path": path}
    with pytest.raises(hd.ProtocolError) as e:
        hd.DeployRequest.parse(json.dumps(request).encode())
    assert e.value.code is hd.ErrorCode.INVALID_STORE_PATH and e.value.reply_to == "deploy.responses.me.abc"


def test_store_paths_that_nix_makes_pass(monkeypatch):
    monkeypatch.delenv("NIX_STORE_DIR", raising=False)
    for name in ("nixos-system-web1-25.05.20250101.abcdef0", "a+b._?=-c", "x" * 211):
        path = f"/nix/store/0aj67sizhlyv8icwqf7y85nmbrcmxi60-{name}"
        request = hd.DeployRequest(hd.Action.SWITCH, "0" * 40, "deploy.responses.me.abc", 1.0, store_path=path)
        assert hd.DeployRequest.parse(request.to_json()) == request


def test_a_closure_deploy_runs_three_commands_and_a_test_two():
    path = f"/nix/store/{'a' * 32}-nixos-system-web1"
    request = hd.DeployRequest(hd.Action.SWITCH, "0" * 40, "deploy.responses.me.abc", None, store_path=path)
    assert hd.deploy_argvs(request, "git+https://g.example/c.git", "web1", "/nix/var/nix/profiles/system") == [
        ["nix-store", "--realise", path],
        ["nix-env", "--profile", "/nix/var/nix/profiles/system", "--set", path],
        [f"{path}/bin/switch-to-configuration", "switch"],
    ]
    test = hd.deploy_argvs(request._replace(action=hd.Action.TEST), "u", "web1", "/p")
    assert test == [["nix-store", "--realise", path], [f"{path}/bin/switch-to-configuration", "test"]]
    assert hd.deploy_argvs(request._replace(store_path=None), "git+https://g.example/c.git", "web1", "/p") == [
        hd.rebuild_argv(hd.Action.SWITCH, "git+https://g.example/c.git", "0" * 40, "web1")
    ]


@pytest.mark.parametrize(
    "repo, message",
    [
        ({"cache": "ftp://x"}, "must be a nix store URL"),
        ({"cache": "file:///a b"}, "without whitespace"),
        ({"cache": "file://"}, "must be a nix store URL"),
        ({"cache": ["file:///x"]}, "must be a nix store URL"),
        ({"cache": "file:///x", "cache_secret_key": "/nonexistent/key"}, "cannot be read (No such file"),
        ({"cache_secret_key": "/etc/hostname"}, "cache_secret_key needs a `cache`"),
    ],
)
def test_cache_settings_are_checked_at_load(tmp_path, repo, message):
    config = tmp_path / "builder.yaml"
    config.write_text(json.dumps({"repos": {"fleet": {"url": "git+https://g.example/c.git", **repo}}}))
    with pytest.raises(ValueError) as e:
        hd.Repo.parse_config(str(config))
    assert message in str(e.value)


# ---------------------------------------------------------------- the builder: store paths, cache, bucket


def test_builder_reports_store_paths_signs_and_fills_the_cache_and_the_bucket(fleet, builder, bus_factory, tmp_path):
    cache = tmp_path / "cache"
    builder(f"file://{cache}", str(fleet.secret_key))
    final, events = build(fleet, bus_factory)
    assert final["status"] == "completed" and final["commit"] == head(fleet), final
    paths = {r["host"]: r["store_path"] for r in final["results"]}
    progress = {e["host"]: e["store_path"] for e in events if e["status"] == "progress"}
    assert progress == paths and set(paths) == {"testhost1", "testhost2"}
    for name, path in paths.items():
        assert os.path.exists(f"{path}/bin/switch-to-configuration")
        narinfo = (cache / f"{os.path.basename(path)[:32]}.narinfo").read_text()
        assert f"StorePath: {path}\n" in narinfo and "Sig: fleet-cache-1:" in narinfo, narinfo
        record = hd.BuildRecord.parse(
            fleet.ops.last_stored(f"KV_{hd.BUILDS_BUCKET}", f"$KV.{hd.BUILDS_BUCKET}.fleet.{name}")
        )
        assert (record.commit, record.store_path) == (head(fleet), path)


def test_a_failing_copy_fails_the_host_with_nix_message(fleet, builder, bus_factory, tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    builder(f"file://{tmp_path / 'not-a-dir' / 'cache'}")
    final, events = build(fleet, bus_factory, "testhost1")
    assert final["status"] == "failed" and final["failed"] == 1, final
    error = final["results"][0]["error"]
    cache = f"file://{tmp_path / 'not-a-dir' / 'cache'}"
    assert error.startswith(f"built, but `nix copy --to {cache}` failed: error:") and "is not a directory" in error
    assert "store_path" not in final["results"][0]
    assert fleet.ops.last_stored(f"KV_{hd.BUILDS_BUCKET}", f"$KV.{hd.BUILDS_BUCKET}.fleet.testhost1") is None


# ---------------------------------------------------------------- deploy --from-build and the listener


def test_deploy_from_build_switches_the_profile_to_exactly_the_built_path(fleet, builder, host, bus_factory, tmp_path):
    builder(f"file://{tmp_path / 'cache'}")
    final, _ = build(fleet, bus_factory)
    path = next(r["store_path"] for r in final["results"] if r["host"] == "testhost1")
    one = host("testhost1")
    r = deploy(fleet, "deploy.test.testhost1", "--from-build", "fleet")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)["hosts"][0]
    assert answer["status"] == "completed" and answer["hostname"] == "testhost1", answer
    profile = one.standin.profile
    assert os.readlink(profile) == "system-1-link" and os.readlink(f"{profile}-1-link") == path
    assert one.switch_log.read_text() == "switch\n"
    assert one.standin.calls == []  # nixos-rebuild never ran
    r = deploy(fleet, "deploy.test.testhost1", "--from-build", "fleet", "--action", "test")
    assert r.returncode == 0, r.stderr
    assert one.switch_log.read_text() == "switch\ntest\n" and os.readlink(profile) == "system-1-link"
    assert one.standin.calls == []


def test_a_host_without_a_build_is_named_and_not_deployed(fleet, builder, host, bus_factory, tmp_path):
    builder(f"file://{tmp_path / 'cache'}")
    build(fleet, bus_factory, "testhost1")
    one, two = host("testhost1"), host("testhost2")
    r = deploy(fleet, "deploy.test.all", "--from-build", "fleet")
    assert r.returncode == hd.Exit.FAILED, r.stderr
    assert "not deployed: testhost2: no successful build of fleet yet" in r.stderr
    assert [h["hostname"] for h in json.loads(r.stdout)["hosts"]] == ["testhost1"]
    assert one.switch_log.read_text() == "switch\n" and not two.switch_log.exists()
    r = deploy(fleet, "deploy.test.testhost1", "--from-build", "fleet", "--branch", "1" * 40)
    assert r.returncode == hd.Exit.FAILED and f"is of {head(fleet)[:12]}, not 111111111111" in r.stderr, r.stderr
    assert one.switch_log.read_text() == "switch\n"


def test_malformed_and_unknown_store_paths_run_nothing(fleet, host, bus_factory, nix_store):
    one = host("testhost1")
    store = nix_store["NIX_STORE_DIR"]
    bus = bus_factory(fleet, "admin")
    for path in (
        f"{store}/short-x",
        f"{store}/../etc",
        f"{store}/{'a' * 32}-a b",
        f"/nix/store/{'a' * 32}-x",  # not this host's store
        f"{store}/{'a' * 33}-x",
    ):
        builds = {"testhost1": hd.BuildRecord("0" * 40, path, "2026-01-01T00:00:00Z")}
        hosts, _ = hd.deploy_hosts(bus, ["deploy.test.testhost1"], hd.Action.SWITCH, "main", 60, 5, builds=builds)
        answer = hosts["testhost1"]
        assert (answer.status, answer.error) == (hd.Status.REJECTED, hd.ErrorCode.INVALID_STORE_PATH), answer
    unknown = f"{store}/{'a' * 32}-nixos-system-testhost1"
    builds = {"testhost1": hd.BuildRecord("0" * 40, unknown, "2026-01-01T00:00:00Z")}
    hosts, _ = hd.deploy_hosts(bus, ["deploy.test.testhost1"], hd.Action.SWITCH, "main", 60, 5, builds=builds)
    answer = hosts["testhost1"]
    assert (answer.status, answer.error) == (hd.Status.FAILED, hd.ErrorCode.BUILD_FAILED), answer
    assert answer.message.startswith("nix-store --realise failed (exit code 1): error: build of"), answer.message
    assert not one.switch_log.exists() and not one.standin.profile.exists() and one.standin.calls == []


def test_the_builds_bucket_is_written_by_builders_and_read_by_admins_only(fleet, bus_factory):
    record = hd.BuildRecord("0" * 40, "/nix/store/" + "a" * 32 + "-x", "2026-01-01T00:00:00Z").to_json()
    subject = f"$KV.{hd.BUILDS_BUCKET}.fleet.testhost1"
    for user in ("testhost1", "bclient", "admin"):
        bus = bus_factory(fleet, user)
        with pytest.raises(hd.NatsError):
            bus.publish(subject, record, confirm=True)
    bus_factory(fleet, "builder").publish(subject, record, confirm=True)
    admin = bus_factory(fleet, "admin")
    assert hd.BuildRecord.parse(admin.last_stored(f"KV_{hd.BUILDS_BUCKET}", subject)).commit == "0" * 40
    for user in ("testhost1", "bclient", "builder"):
        with pytest.raises(hd.NatsError, match="may not"):
            bus_factory(fleet, user).last_stored(f"KV_{hd.BUILDS_BUCKET}", subject)


@pytest.mark.anyio
async def test_mcp_deploy_admin_from_build(fleet, builder, host, bus_factory, tmp_path):
    """deploy_admin with from_build switches the host to its build; the test-tier deploy may not read the builds."""
    import anyio.to_thread
    from mcp import Client, StdioServerParameters, stdio_client

    builder(f"file://{tmp_path / 'cache'}")
    final, _ = await anyio.to_thread.run_sync(lambda: build(fleet, bus_factory, "testhost1"))
    path = final["results"][0]["store_path"]
    one = await anyio.to_thread.run_sync(lambda: host("testhost1"))
    args = [*MCP_SCRIPT, "--nats-url", fleet.url, "--nkey-file", str(fleet.seeds["mcp"]), "--answer-window", "2"]
    args += ["--enable-admin", "--admin-nkey-file", str(fleet.seeds["mcpadmin"])]
    with open(tmp_path / "mcp-stderr.log", "a") as err:
        params = StdioServerParameters(command=sys.executable, args=args, cwd=str(REPO))
        async with Client(stdio_client(params, errlog=err)) as client:
            refused = await client.call_tool("deploy", {"hostname": "testhost1", "from_build": "fleet"})
            result = await client.call_tool(
                "deploy_admin", {"tier": "test", "hostname": "testhost1", "from_build": "fleet"}
            )
    assert refused.is_error and "may not (an admin credential may)" in text(refused), text(refused)
    assert not result.is_error and result.structured_content["success"] is True, text(result)
    assert os.readlink(f"{one.standin.profile}-1-link") == path and one.switch_log.read_text() == "switch\n"
    assert one.standin.calls == []
    assert "Traceback" not in (tmp_path / "mcp-stderr.log").read_text()


def test_a_closure_switch_arms_the_rollback_watchdog_and_is_confirmed(fleet, builder, host, bus_factory, tmp_path):
    """As any switch: the watchdog is armed before it, and the round trip through NATS confirms it."""
    builder(f"file://{tmp_path / 'cache'}")
    final, _ = build(fleet, bus_factory, "testhost1")
    one = host("testhost1", "--rollback-timeout", "120")
    r = deploy(fleet, "deploy.test.testhost1", "--from-build", "fleet")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)["hosts"][0]
    assert answer["status"] == "completed" and "confirmed over NATS" in answer["message"], answer
    assert os.readlink(f"{one.standin.profile}-1-link") == final["results"][0]["store_path"]
    assert "rollback watchdog armed" in one.log_text() and one.standin.calls == []
    assert not [name for name in os.listdir(one.standin.dir / "state") if name.startswith(("pending-", "switched-"))]


@pytest.mark.parametrize("trusted", [True, False])
def test_the_host_fetches_from_the_cache_only_what_its_trusted_keys_signed(
    fleet, builder, host, bus_factory, nix_store, tmp_path, trusted
):
    """A host with a store of its own (NIX_REMOTE, a chroot store with the same store directory) whose
    substituters name the builder's signed cache: with the cache's public key among its trusted-public-keys it
    fetches and switches; with another key nix refuses the path and nothing is activated."""
    cache = tmp_path / "cache"
    builder(f"file://{cache}", str(fleet.secret_key))
    final, _ = build(fleet, bus_factory, "testhost1")
    path = final["results"][0]["store_path"]
    key = nix(nix_store, "key", "convert-secret-to-public", input=fleet.secret_key.read_text()).strip()
    other = nix(
        nix_store, "key", "convert-secret-to-public", input=nix(nix_store, "key", "generate-secret", "--key-name", "x")
    )
    own = {**nix_store, "NIX_REMOTE": f"local?root={tmp_path / 'host-store'}"}
    config = (
        f"{nix_store['NIX_CONFIG']}substituters = file://{cache}\ntrusted-public-keys = {key if trusted else other}"
    )
    one = host("testhost1", env={"NIX_REMOTE": own["NIX_REMOTE"], "NIX_CONFIG": config})
    r = deploy(fleet, "deploy.test.testhost1", "--from-build", "fleet")
    answer = json.loads(r.stdout)["hosts"][0]
    valid = subprocess.run(["nix-store", "--check-validity", path], env=own, capture_output=True).returncode == 0
    if trusted:
        assert r.returncode == 0 and answer["status"] == "completed", r.stderr
        assert valid and os.readlink(f"{one.standin.profile}-1-link") == path
        assert one.switch_log.read_text() == "switch\n"
    else:
        assert r.returncode == 1 and (answer["status"], answer["error"]) == ("failed", "build_failed"), answer
        assert answer["message"].startswith("nix-store --realise failed (exit code 1): error: build of"), answer
        assert any("is not signed by any of the keys in 'trusted-public-keys'" in line for line in answer["output"])
        assert not valid and not one.switch_log.exists() and not one.standin.profile.exists()


def test_without_the_bucket_builds_work_and_from_build_names_what_is_missing(
    fleet, builder, host, bus_factory, tmp_path
):
    fleet.ops._call(fleet.ops.client.jetstream().delete_key_value(hd.BUILDS_BUCKET))
    builder(f"file://{tmp_path / 'cache'}")
    final, _ = build(fleet, bus_factory, "testhost1")
    assert final["status"] == "completed" and final["results"][0]["store_path"], final  # the lost write is quiet
    one = host("testhost1")
    r = deploy(fleet, "deploy.test.testhost1", "--from-build", "fleet")
    assert r.returncode == hd.Exit.NATS, r.stderr
    assert f"from the JetStream stream KV_{hd.BUILDS_BUCKET}: it is missing or JetStream is off" in r.stderr
    assert not one.switch_log.exists() and one.standin.calls == []
