"""Key generation, the fleet file -> nats-server authorization block, the permission matrix it enforces on a
real nats-server, the demo sandbox, and the first real setup of docs/setup.md."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import nkeys
import pytest
import yaml

import homelab_deploy as hd
from tests.helpers import (
    GOOD,
    PROGRAM,
    REPO,
    Listener,
    NatsServer,
    StandIn,
    commit_flake,
    flake_text,
    fleet_doc,
    gone,
    make_user_key,
    needs_nix,
    nix_env,
    run_cli,
    stop_process,
    wait_for,
)

# ---------------------------------------------------------------- keygen


class TestKeygen:
    def test_new_seed_loads_and_matches_public_key(self, tmp_path):
        out = tmp_path / "k.seed"
        r = run_cli("keygen", "--out", str(out))
        assert r.returncode == 0, r.stderr
        public = r.stdout.strip()
        assert public.startswith("U") and len(public) == 56
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        seed = out.read_bytes().strip()
        assert seed.startswith(b"SU")
        assert nkeys.from_seed(bytearray(seed)).public_key.decode() == public
        assert seed.decode() not in r.stdout + r.stderr
        r = run_cli("keygen", "--pubout", "--in", str(out))
        assert (r.returncode, r.stdout.strip()) == (0, public)

    def test_refuses_to_overwrite(self, tmp_path):
        out = tmp_path / "k.seed"
        out.write_text("precious")
        r = run_cli("keygen", "--out", str(out))
        assert r.returncode == 2 and "refusing to overwrite" in r.stderr
        assert out.read_text() == "precious"

    def test_bad_input(self, tmp_path):
        (tmp_path / "junk").write_text("hello")
        r = run_cli("keygen", "--pubout", "--in", str(tmp_path / "junk"))
        assert r.returncode == 2 and "valid NKey user seed" in r.stderr
        assert run_cli("keygen").returncode == 2

    def test_creates_a_missing_directory(self, tmp_path):
        """`keygen --out keys/x.seed` before keys/ exists printed a raw errno message; it creates keys/, mode 0700."""
        r = run_cli("keygen", "--out", str(tmp_path / "keys" / "x.seed"))
        assert r.returncode == 0, r.stderr
        assert oct((tmp_path / "keys").stat().st_mode & 0o777) == "0o700"
        assert oct((tmp_path / "keys" / "x.seed").stat().st_mode & 0o777) == "0o600"
        (tmp_path / "file").write_text("")
        r = run_cli("keygen", "--out", str(tmp_path / "file" / "x.seed"))
        assert r.returncode == 2 and "Errno" not in r.stderr, r.stderr
        assert (
            f"error: cannot write {tmp_path / 'file'}: File exists; give --out a path in a writable directory"
            in r.stderr
        )

    def test_missing_input_names_the_flag(self, tmp_path):
        r = run_cli("keygen", "--pubout", "--in", str(tmp_path / "nope.seed"))
        assert r.returncode == 2 and "No such file or directory; pass --in the path of an NKey seed file" in r.stderr
        assert "--nkey-file" not in r.stderr

    @pytest.mark.parametrize(
        "key,ok", [(None, True), ("U" + "A" * 55, False), ("N" + "A" * 55, False), ("", False), (42, False)]
    )
    def test_public_key_check(self, tmp_path, key, ok):
        if key is None:
            _, key = make_user_key(tmp_path, "x")
        assert hd.is_user_public_key(key) is ok


# ---------------------------------------------------------------- fleet file


class TestFleetConfig:
    def test_generated_config_passes_nats_server_check(self, tmp_path):
        doc, _ = fleet_doc(tmp_path)
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
        r = run_cli("nats-config", str(tmp_path / "fleet.yaml"))
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("nkey:") == 9 and "# listener p1 (tier prod, role dns)" in r.stdout
        (tmp_path / "nats.conf").write_text("listen: 127.0.0.1:-1\n" + r.stdout)
        check = subprocess.run(["nats-server", "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr + check.stdout

    @pytest.mark.parametrize(
        "mutate,message",
        [
            (lambda d: d["hosts"][0].update(tier="staging"), "hosts[0] (t1): tier 'staging'"),
            (
                lambda d: d["hosts"].append({"hostname": "t1", "tier": "test", "seed": "x.seed"}),
                "duplicate hostname 't1'",
            ),
            (lambda d: d["hosts"][0].update(nkey="UNOTAKEY"), "hosts[0] (t1): nkey 'UNOTAKEY' is not an NKey"),
            (lambda d: d["hosts"][0].update(hostname="t1.evil"), "hostname 't1.evil' must be one NATS subject token"),
            (lambda d: d["hosts"][1].update(role="*"), "hosts[1] (t2): role '*'"),
            (lambda d: d["hosts"][0].update(colour="red"), "hosts[0] (t1): unknown key(s) colour"),
            (lambda d: d["hosts"][0].update(seed="t1.seed"), "exactly one of nkey"),
            (lambda d: d["hosts"][1].update(seed="missing.seed"), "hosts[1] (t2): cannot read NKey seed file"),
            (lambda d: d["builders"][0].update(repos=["ok", "bad>"]), "builders[0] (builder): repos must be"),
            (lambda d: d["build_clients"][0].update(repos=[]), "build_clients[0] (bclient): repos must be a non-empty"),
            (lambda d: d["deployers"][0].update(access="root"), "deployers[0] (tdep): access 'root'"),
            (lambda d: d["deployers"][1].update(nkey=d["deployers"][0]["nkey"]), "is also used by deployers[0] (tdep)"),
            (lambda d: d.update(extra=1), "unknown top-level key(s) extra"),
            (lambda d: d.update(hosts={"t1": {}}), "hosts must be a list"),
            (lambda d: d["hosts"][0].update(site="home"), "hosts[0] (t1): site 'home' is not in sites; add it there"),
            (
                lambda d: d.update(sites=[{"name": "home", "hub": "nats-leaf://hub:7422", "seed": "s.seed"}]),
                "sites[0] (home): no host is at site 'home'; add `site: home` to its hosts",
            ),
            (
                lambda d: (
                    d["hosts"][0].update(site="home"),
                    d.update(sites=[{"name": "home", "hub": "http://hub:7422", "seed": "s.seed"}]),
                ),
                "sites[0] (home): hub 'http://hub:7422' must be the hub's leaf-node URL",
            ),
        ],
    )
    def test_invalid_fleet_names_the_entry(self, tmp_path, mutate, message):
        doc, _ = fleet_doc(tmp_path)
        mutate(doc)
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
        r = run_cli("nats-config", str(tmp_path / "fleet.yaml"))
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert r.stdout == ""

    def test_missing_seed_says_which_entry_and_how_to_create_it(self, tmp_path):
        """A seed file that does not exist yet suggested `pass --nkey-file`, which nats-config does not have."""
        doc, _ = fleet_doc(tmp_path)
        doc["hosts"][1]["seed"] = "keys/new.seed"
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
        r = run_cli("nats-config", str(tmp_path / "fleet.yaml"))
        seed = tmp_path / "keys" / "new.seed"
        assert r.returncode == 2 and "--nkey-file" not in r.stderr, r.stderr
        assert (
            f"hosts[1] (t2): cannot read NKey seed file {seed}: No such file or directory; create it with "
            f"`homelab-deploy keygen --out {seed}` (`seed: keys/new.seed` is relative to the fleet file), or "
            "give the public key as `nkey: U...` instead"
        ) in r.stderr
        assert run_cli("keygen", "--out", str(seed)).returncode == 0  # the advice, followed, works
        assert run_cli("nats-config", str(tmp_path / "fleet.yaml")).returncode == 0

    def test_trusted_keys_follow_the_permissions(self, tmp_path):
        doc, seeds = fleet_doc(tmp_path)
        doc["builders"][0]["repos"] = doc["mcp"][0]["build_repos"] = ["r1", "r2"]  # bclient may build r1 only
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
        r = run_cli("nats-config", str(tmp_path / "fleet.yaml"), "--trusted-keys-dir", str(tmp_path / "keys"))
        assert r.returncode == 0, r.stderr
        keys = {n: hd.public_key_of(str(seed)) for n, seed in seeds.items()}
        expected = {
            "t1": ["tdep", "admin", "mcp", "mcpadmin"],
            "t2": ["tdep", "admin", "mcp", "mcpadmin"],
            "p1": ["admin", "mcpadmin"],
            "builder-builder": ["bclient", "mcp"],
        }
        per_repo = {
            "builder-builder repos.r1.trusted_keys": ["bclient", "mcp"],  # a builder trusts per repo
            "builder-builder repos.r2.trusted_keys": ["mcp"],
        }
        for daemon, names in {**expected, **per_repo}.items():
            want = [f"{keys[n]}={n if n != 'mcpadmin' else 'mcp-admin'}" for n in names]
            assert (f"#   {daemon}: {' '.join(want)}" in r.stdout) is (daemon != "builder-builder"), r.stdout
        for daemon, names in expected.items():  # the builder's file: the keys of all its repos
            want = [f"{keys[n]}={n if n != 'mcpadmin' else 'mcp-admin'}" for n in names]
            signers = hd.TrustedSigners.load([], [str(tmp_path / "keys" / f"{daemon}.keys")])
            assert signers.keys == dict(w.split("=") for w in want)
        assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
            "builder-builder.keys",
            "p1.keys",
            "t1.keys",
            "t2.keys",
        ]

    def test_help_points_to_doc_sections_that_exist(self):
        """`nats-config --help` pointed to a README section "Fleet file" that does not exist."""
        commands = next(a.choices for a in hd.build_parser()._actions if isinstance(a.choices, dict))
        cited = {
            name: re.findall(r"(docs/[\w-]+\.md), '([^']+)'", " ".join(sub.format_help().split()))
            for name, sub in commands.items()
        }
        assert cited["nats-config"] == [
            ("docs/security.md", "Keys and NATS permissions"),
            ("docs/security.md", "Topology"),
        ]
        assert cited["listener"] == [("docs/operations.md", "Automatic rollback")]
        missing = [
            (page, section)
            for sections in cited.values()
            for page, section in sections
            if section not in re.findall(r"^#+ (.+)$", (REPO / page).read_text(), re.M)
        ]
        assert not missing, missing

    def test_site_config_needs_a_known_site_with_its_seed(self, tmp_path):
        doc, _ = fleet_doc(tmp_path)
        doc["hosts"][0]["site"] = "home"
        doc["sites"] = [{"name": "home", "hub": "nats-leaf://hub:7422", "nkey": make_user_key(tmp_path, "home")[1]}]
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
        r = run_cli("nats-config", "--site", "away", str(tmp_path / "fleet.yaml"))
        assert r.returncode == 2 and "--site away: no such site; sites: home" in r.stderr, r.stderr
        r = run_cli("nats-config", "--site", "home", str(tmp_path / "fleet.yaml"))
        assert r.returncode == 2 and "the site has `nkey:`" in r.stderr and "give `seed:` instead" in r.stderr
        r = run_cli("nats-config", str(tmp_path / "fleet.yaml"))  # the hub's: the site's user, not its host
        assert r.returncode == 0 and "# leaf node of site home (hosts t1)" in r.stdout
        assert "# listener t1" not in r.stdout and "# listener t2" in r.stdout

    def test_topology_configs_pass_nats_server_check(self, tmp_path):
        body = (REPO / "docs" / "security.md").read_text().split("\n## Topology\n", 1)[1].split("\n## ", 1)[0]
        configs = re.findall(r"^```conf\n(.*?)^```$", body, re.S | re.M)
        assert len(configs) == 2 and "leafnodes {" in configs[1] and "# leaf node of site home" in configs[0]
        for config in configs:
            (tmp_path / "nats.conf").write_text("listen: 127.0.0.1:-1\n" + config)
            check = subprocess.run(
                ["nats-server", "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, text=True
            )
            assert check.returncode == 0, check.stderr + check.stdout

    def test_not_yaml_or_missing(self, tmp_path):
        (tmp_path / "f.yaml").write_text("hosts: [\n")
        r = run_cli("nats-config", str(tmp_path / "f.yaml"))
        assert r.returncode == 2 and "not valid YAML" in r.stderr
        r = run_cli("nats-config", str(tmp_path / "nope.yaml"))
        assert r.returncode == 2 and "cannot read fleet file" in r.stderr


# ---------------------------------------------------------------- permission matrix on a real server

SUBJECTS = {
    "own host": "deploy.test.t1",
    "other host": "deploy.test.t2",
    "other tier host": "deploy.prod.p1",
    "own role": "deploy.test.role.web",
    "other role": "deploy.test.role.db",
    "prod role": "deploy.prod.role.dns",
    "tier all": "deploy.test.all",
    "prod all": "deploy.prod.all",
    "discovery": "deploy.discover",
    "status": "deploy.status",
    "t1 logs": "deploy.logs.test.t1",
    "p1 logs": "deploy.logs.prod.p1",
    # answers: deploy.responses.<requester's key>.<token>.<host>, build.responses.<requester's key>.<token>.<repo>
    "t1 answers tdep": "deploy.responses.{tdep}.r.t1",
    "t1 answers admin": "deploy.responses.{admin}.r.t1",
    "p1 answers admin": "deploy.responses.{admin}.r.p1",
    "t2 answers mcp": "deploy.responses.{mcp}.r.t2",
    "build own repo": "build.r1.all",
    "build other repo": "build.r2.all",
    "r1 answers bclient": "build.responses.{bclient}.r.r1",
    "r2 answers bclient": "build.responses.{bclient}.r.r2",
    "r1 answers mcp": "build.responses.{mcp}.r.r1",
    "t1 events": "deploy.events.test.t1",
    "p1 events": "deploy.events.prod.p1",
    "r1 events": "build.events.r1",
    "r2 events": "build.events.r2",
}
# Allowed (publish, subscribe) subject classes per credential: the spec's Key Permission Patterns, with replies
# readable only by their requester and answers publishable only by the host (or builder) they name.
TEST_DEPLOY_PUB = {"own host", "other host", "own role", "other role", "tier all", "discovery", "status", "t1 logs"}
DEPLOY_ALL = {c for c, s in SUBJECTS.items() if s.startswith("deploy.")}
MATRIX = {
    "t1": (
        {"t1 answers tdep", "t1 answers admin", "t1 events"},
        {"own host", "tier all", "discovery", "status", "t1 logs"},
    ),
    "t2": ({"t2 answers mcp"}, {"other host", "own role", "tier all", "discovery", "status"}),
    "p1": (
        {"p1 answers admin", "p1 events"},
        {"other tier host", "prod role", "prod all", "discovery", "status", "p1 logs"},
    ),
    "tdep": (TEST_DEPLOY_PUB, {"t1 answers tdep", "discovery", "t1 events"}),
    "admin": (DEPLOY_ALL, DEPLOY_ALL | {"r1 events", "r2 events"}),
    "builder": ({"r1 answers bclient", "r1 answers mcp", "r1 events"}, {"build own repo"}),
    "bclient": ({"build own repo"}, {"r1 answers bclient", "r2 answers bclient", "r1 events"}),
    "mcp": (
        TEST_DEPLOY_PUB | {"build own repo"},
        {"t2 answers mcp", "discovery", "r1 answers mcp", "t1 events", "r1 events"},
    ),
    "mcpadmin": (DEPLOY_ALL, DEPLOY_ALL | {"r1 events", "r2 events"}),
}


def test_permission_matrix(tmp_path):
    doc, seeds = fleet_doc(tmp_path)
    config = hd.authorization_config(hd.fleet_credentials(doc, str(tmp_path)))
    super_seed, super_pub = make_user_key(tmp_path, "observer")  # sees everything, to prove what got through
    config = config.replace(
        "  users = [\n",
        f'  users = [\n    {{ nkey: "{super_pub}", permissions: {{ publish: [">"], subscribe: [">"] }} }}\n',
    )
    (tmp_path / "nats.conf").write_text("listen: 127.0.0.1:-1\n" + config)
    log = tmp_path / "nats.log"
    server = subprocess.Popen(
        ["nats-server", "-c", str(tmp_path / "nats.conf"), "-l", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    buses = []
    try:
        port = wait_for(
            lambda: log.exists() and re.search(r"client connections on 127\.0\.0\.1:(\d+)", log.read_text()),
            what="nats-server",
        ).group(1)
        url = f"nats://127.0.0.1:{port}"
        observer = hd.Bus(url, str(super_seed), "observer")
        buses.append(observer)
        seen = observer.inbox(">")
        seen_payloads: set[bytes] = set()

        def observed(payload: bytes) -> bool:
            while not seen.empty():
                seen_payloads.add(seen.get_nowait()[1])
            return payload in seen_payloads

        got: dict[str, tuple[set, set]] = {}
        keys = {name: hd.public_key_of(str(seed)) for name, seed in seeds.items()}
        for name, seed in seeds.items():
            bus = hd.Bus(url, str(seed), name)
            buses.append(bus)
            published, subscribed = set(), set()
            for cls, template in SUBJECTS.items():
                subject = template.format(**keys)
                payload = f"{name}:{cls}".encode()
                bus.publish(subject, payload)
                if wait_for(lambda: observed(payload) or bus.denied(subject), what=f"{name} publish {subject}") is True:
                    published.add(cls)
                try:
                    q = bus.inbox(subject)
                except hd.NatsError:
                    continue
                probe = f"probe {name}:{cls}".encode()
                observer.publish(subject, probe)
                received = wait_for(
                    lambda: (not q.empty() and q.get_nowait()[1] == probe) or bus.denied(subject, "subscription"),
                    what=f"{name} subscribe {subject}",
                )
                if received is True:
                    subscribed.add(cls)
            got[name] = (published, subscribed)
        assert got == {name: (set(p), set(s)) for name, (p, s) in MATRIX.items()}
    finally:
        for bus in buses:
            bus.close()
        stop_process(server)


# ---------------------------------------------------------------- demo

# ---------------------------------------------------------------- forged answers, on nats-config's permissions


@pytest.fixture
def least_privilege(tmp_path):
    """A real nats-server whose users are exactly what `nats-config` grants: test hosts testhost1, testhost2
    (role web), prod host dns1, a test deployer and an admin deployer."""
    server = NatsServer(tmp_path, {name: {} for name in ("testhost1", "testhost2", "dns1", "test-deployer", "admin")})
    doc = {
        "hosts": [
            {"hostname": "testhost1", "tier": "test", "nkey": server.public["testhost1"]},
            {"hostname": "testhost2", "tier": "test", "role": "web", "nkey": server.public["testhost2"]},
            {"hostname": "dns1", "tier": "prod", "role": "dns", "nkey": server.public["dns1"]},
        ],
        "deployers": [
            {"name": "test-deployer", "access": "test", "nkey": server.public["test-deployer"]},
            {"name": "admin", "access": "admin", "nkey": server.public["admin"]},
        ],
    }
    server.config.write_text("listen: 127.0.0.1:-1\n" + hd.authorization_config(hd.fleet_credentials(doc)))
    server.start()
    yield server
    server.stop()


class TestForgedAnswers:
    def test_a_host_cannot_answer_for_another(self, least_privilege, tmp_path, bus_factory):
        """testhost1's key answers `testhost2 completed` to a deploy.test.all request while testhost2 fails:
        on testhost2's answer subject the server refuses it; on its own or the bare reply subject the client
        drops or never sees it. The deploy reports testhost2's real failure and exits 1."""
        hosts = [
            Listener(least_privilege, name, "test", role, tmp_path)
            for name, role in (("testhost1", None), ("testhost2", "web"))
        ]
        forger = bus_factory(least_privilege, "testhost1")
        forged_on: list[str] = []

        def forge(subject: str, data: bytes, received: float) -> None:
            reply_to = json.loads(data)["reply_to"]
            lie = json.dumps(
                {
                    "hostname": "testhost2",
                    "status": "completed",
                    "error": None,
                    "message": "Successfully switched to generation 7",
                }
            ).encode()
            for target in (
                hd.answer_subject(reply_to, "testhost2"),
                hd.answer_subject(reply_to, "testhost1"),
                reply_to,
            ):
                forger.publish(target, lie)
                forged_on.append(target)

        try:
            for host in hosts:
                host.start()
            hosts[1].standin.set_mode("fail")
            forger.subscribe("deploy.test.all", forge)
            r = run_cli(
                "deploy",
                "deploy.test.all",
                "--branch",
                "main",
                "--json",
                "--nats-url",
                least_privilege.url,
                "--nkey-file",
                str(least_privilege.seeds["test-deployer"]),
            )
        finally:
            for host in hosts:
                host.stop()
        assert len(forged_on) == 3
        assert forger.denied(forged_on[0])  # the server refused testhost1 on testhost2's answer subject
        assert r.returncode == 1, r.stderr
        assert {h["hostname"]: h["status"] for h in json.loads(r.stdout)["hosts"]} == {
            "testhost1": "completed",
            "testhost2": "failed",
        }
        assert "1/2 hosts completed" in r.stderr and "claims to come from 'testhost2'" in r.stderr

    def test_a_test_credential_cannot_read_or_inject_into_prod_replies(self, least_privilege, tmp_path, bus_factory):
        """The test deployer may read only its own replies, so it never learns a prod deploy's reply subject to
        inject a `rejected` into through a test host; the prod deploy completes untouched."""
        prod = Listener(least_privilege, "dns1", "prod", "dns", tmp_path)
        test_host = Listener(least_privilege, "testhost1", "test", None, tmp_path)
        spy = bus_factory(least_privilege, "test-deployer")
        for subject in ("deploy.responses.>", f"deploy.responses.{least_privilege.public['admin']}.>"):
            with pytest.raises(hd.NatsError, match="permission denied"):
                spy.inbox(subject)
        own = spy.inbox(f"deploy.responses.{least_privilege.public['test-deployer']}.>")
        try:
            prod.start()
            test_host.start()
            r = run_cli(
                "deploy",
                "deploy.prod.all",
                "--branch",
                "main",
                "--json",
                "--nats-url",
                least_privilege.url,
                "--nkey-file",
                str(least_privilege.seeds["admin"]),
            )
        finally:
            prod.stop()
            test_host.stop()
        assert r.returncode == 0 and [h["hostname"] for h in json.loads(r.stdout)["hosts"]] == ["dns1"], r.stderr
        assert own.empty() and test_host.standin.calls == []


def demo_processes(workdir: str) -> list[int]:
    """PIDs of live processes whose command line names the demo's sandbox directory."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
                state = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if workdir in cmdline and state != "Z":
                pids.append(int(entry))
    return pids


class TestDemo:
    def test_demo_runs_and_cleans_up(self):
        r = subprocess.run([*PROGRAM, "demo"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        workdir = re.search(r"sandbox in (\S+)", r.stdout).group(1)
        summary = r.stdout.split("== summary")[1]
        for host, status in [
            ("test-web1", "completed"),
            ("test-db1", "completed"),
            ("prod-dns1", "completed"),
            ("prod-dns2", "completed"),
            ("prod-web1", "failed"),
        ]:
            assert re.search(rf"{host}\s+{status}", summary), host
        assert "permission denied" in r.stdout and "homelab_deploy_deployments_total" in r.stdout
        # Step 7 drifts prod-dns2 by hand; status --expect <main's commit> marks it and the failed prod-web1 only
        status = r.stdout.split("== 8. fleet status")[1].split("== summary")[0]
        main = re.search(r"status --expect ([0-9a-f]{12}) ", status).group(1)
        assert re.findall(r"^  (\S+) .*\n    DRIFT: (.+)$", status, re.M) == [
            ("prod-dns2", "generation 43 was made outside homelab-deploy (its last deploy left 42)"),
            ("prod-web1", f"no successful switch recorded, expected {main}"),
        ]
        assert status.count("DRIFT:") == 2 and "-> exit 1 (as expected)" in status
        # Each simulated generation reports its flake's commit: one for main, another for the hand-made one
        commits = dict(re.findall(r"^  (\S+) .* commit (\S+) ", status, re.M))
        assert re.fullmatch(r"[0-9a-f]{12}", commits["prod-dns1"]) and commits["prod-web1"] == "-"
        assert {commits[h] for h in ("test-web1", "test-db1", "prod-dns1")} == {main}
        assert commits["prod-dns2"] not in ("-", commits["prod-dns1"])
        assert "8/8 steps behaved as expected" in r.stdout
        prod_rollout = r.stdout.split("== 5.")[1].split("== 6.")[0]
        assert "--canary 1 --batch-size 1" in prod_rollout and "canary: deploying prod-dns1" in prod_rollout
        assert "batch 2: deploying prod-web1" in prod_rollout and "prod-web1: failed" in prod_rollout
        assert "stopping the rollout: 1 host failed" in prod_rollout
        assert demo_processes(workdir) == [] and not os.path.exists(workdir)

    def test_keep_until_ctrl_c(self, tmp_path):
        out = tmp_path / "demo.out"
        with open(out, "wb") as f:
            proc = subprocess.Popen(
                [*PROGRAM, "demo", "--keep"], stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for(
                lambda: "Sandbox running until Ctrl-C" in out.read_text() or proc.poll() is not None,
                timeout=120,
                what="the sandbox to be kept running",
            )
            text = out.read_text()
            workdir = re.search(r"sandbox in (\S+)", text).group(1)
            url = re.search(r"NATS:\s+(nats://127\.0\.0\.1:\d+)", text).group(1)
            admin_seed = os.path.join(workdir, "keys", "admin.seed")
            r = run_cli("list-hosts", "--nats-url", url, "--nkey-file", admin_seed, "--json")
            assert r.returncode == 0 and len(json.loads(r.stdout)) == 5  # the printed instructions work
            # Each step prints the command it runs, so it can be pasted: run step 1's as printed.
            printed = re.search(r"^== 1\. list hosts.*\n\$ (.+)$", text, re.M).group(1)
            r = subprocess.run(shlex.split(printed), capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, printed + r.stderr
            assert sorted(h["hostname"] for h in json.loads(r.stdout)) == sorted(h[0] for h in hd.DEMO_HOSTS)
            assert len(demo_processes(workdir)) >= 6
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(60) == 130
            assert demo_processes(workdir) == [] and not os.path.exists(workdir)
        finally:
            stop_process(proc)


# ---------------------------------------------------------------- the first real setup (docs/setup.md)

CONFIGS_URL = (
    "https://git.example.com/you/nixos-configs.git"  # the walkthrough's flake; git fetches it from a local repo
)


def setup_blocks(section: str) -> list[str]:
    """The ```bash blocks of a section of docs/setup.md, in order, byte for byte."""
    body = (REPO / "docs" / "setup.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```bash\n(.*?)^```$", body, re.S | re.M)


class Shell:
    """One bash that runs blocks in turn, as a reader pasting them does: exports and background jobs carry over,
    and `set -e -o pipefail` ends it at the first failing command."""

    def __init__(self, cwd: Path, env: dict, blocks_dir: Path):
        self.blocks_dir = blocks_dir
        self.proc = subprocess.Popen(
            ["bash"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [*map(self.lines.put, self.proc.stdout), self.lines.put(None)], daemon=True
        ).start()
        self.send("set -e -o pipefail")

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def run(self, block: str, timeout: float = 180) -> str:
        """Run `block` (from a file, stdin closed, as pasted) and return its output."""
        script = self.blocks_dir / f"{len(os.listdir(self.blocks_dir))}.sh"
        script.write_text(block)
        self.send(f"source {shlex.quote(str(script))} </dev/null; echo __block_done__")
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"block still running after {timeout}s:\n{block}\noutput:\n{''.join(out)}"
                ) from None
            assert line is not None, f"the shell ended (a command failed) in:\n{block}\noutput:\n{''.join(out)}"
            if line == "__block_done__\n":
                return "".join(out)
            out.append(line)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc.stdin.close()


def log_says(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@needs_nix
@pytest.mark.skipif(shutil.which("npx") is None, reason="npx not found: the MCP step needs Node.js 20 or newer")
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not found (Debian: apt-get install curl)")
class TestFirstRealSetup:
    def test_every_block_of_the_readme_works(self, tmp_path):
        """docs/setup.md's walkthrough, block by block, in one bash in an empty directory, with real nats-server,
        listener, builder, nix and MCP Inspector. The machine provides what a fleet would: a `nixos-rebuild`
        (the stand-in) on PATH, and the git server (git's url.insteadOf points the page's URL at a local
        repository with host web1); nix.conf holds this machine's settings, the page's NIX_CONFIG adds flakes."""
        busy = [port for port in (4222, 9972, 9973) if port_in_use(port)]
        assert not busy, f"the walkthrough uses 127.0.0.1 ports 4222, 9972 and 9973; in use: {busy}"
        blocks = setup_blocks("First real setup")
        assert len(blocks) == 10, blocks
        standin = StandIn(tmp_path / "machine")
        (standin.dir / "bin" / "homelab-deploy").write_text(f'#!/bin/sh\nexec {shlex.join(PROGRAM)} "$@"\n')
        (standin.dir / "bin" / "homelab-deploy").chmod(0o755)
        remote = commit_flake(tmp_path / "remote" / "nixos-configs", flake_text({"web1": GOOD}))
        env = {k: v for k, v in nix_env(tmp_path / "nix").items() if not k.startswith("HOMELAB_DEPLOY_")}
        (tmp_path / "nix" / "etc" / "nix.conf").write_text(
            env.pop("NIX_CONFIG").replace("experimental-features = nix-command flakes\n", "")
        )
        env.update(
            PATH=f"{standin.dir / 'bin'}:{env['PATH']}",
            STANDIN_DIR=str(standin.dir),
            GIT_CONFIG_COUNT="2",
            GIT_CONFIG_KEY_1=f"url.{remote.removeprefix('git+')}.insteadOf",
            GIT_CONFIG_VALUE_1=CONFIGS_URL,
            npm_config_cache=os.environ.get("npm_config_cache", os.path.expanduser("~/.npm")),
        )
        setup = tmp_path / "setup"
        setup.mkdir()
        (tmp_path / "blocks").mkdir()
        shell = Shell(setup, env, tmp_path / "blocks")
        try:
            out = shell.run(blocks[0])  # keys
            assert len(re.findall(r"^U[A-Z2-7]{55}$", out, re.M)) == 5, out
            assert oct((setup / "keys").stat().st_mode & 0o777) == "0o700"
            shell.run(blocks[1])  # fleet file
            shell.run(blocks[2])  # nats-server
            wait_for(lambda: log_says(setup / "nats.log", "Server is ready"), what="nats-server")
            shell.run(blocks[3])  # listener
            wait_for(lambda: log_says(setup / "web1.log", " ready ("), what="the listener")
            assert log_says(setup / "web1.log", "acting only on requests signed by assistant, ops")
            out = shell.run(blocks[4])  # list-hosts, deploy
            assert re.search(r"^web1\s+test\s+web\s+idle\s+deploy\.test\.web1", out, re.M), out
            assert "deploy.test.web1: 1/1 hosts completed" in out and "(signed by ops)" in out, out
            assert standin.calls == [["switch", "--refresh", "--flake", f"git+{CONFIGS_URL}?ref=main#web1"]]
            shell.run(blocks[5])  # builder
            wait_for(lambda: log_says(setup / "builder.log", "builder ready"), what="the builder")
            assert not log_says(setup / "builder.log", "no trusted_keys")  # it trusts ci and assistant
            out = shell.run(blocks[6])  # build
            assert "nixos-configs: built 1/1 hosts successfully" in out and "[1/1] web1 ok" in out, out
            out = shell.run(blocks[7])  # metrics
            assert 'homelab_deploy_deployments_total{action="switch",error_code="",status="completed"} 1.0' in out
            assert 'homelab_deploy_builds_total{repo="nixos-configs",status="success"} 1.0' in out, out
            out = shell.run(blocks[8])  # MCP: .mcp.json, tools/list, tools/call list_hosts
            assert json.loads((setup / ".mcp.json").read_text())["mcpServers"]["homelab-deploy"]["args"][-1] == str(
                setup / "keys" / "assistant.seed"
            )
            assert '"name": "deploy"' in out and '"name": "list_hosts"' in out, out
            assert "web1: tier test, role web, idle" in out and '"isError": true' not in out, out
            shell.send("jobs -p > daemons.pid")
            shell.run("true")
            daemons = [int(pid) for pid in (setup / "daemons.pid").read_text().split()]
            assert len(daemons) == 3
            shell.run(blocks[9])  # stop
            wait_for(lambda: all(map(gone, daemons)), what="nats-server, listener and builder to exit")
        finally:
            shell.stop()
