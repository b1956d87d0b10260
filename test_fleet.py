"""Key generation, the fleet file -> nats-server authorization block, the permission matrix it enforces on a
real nats-server, and the demo sandbox."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import nkeys
import pytest
import yaml

import homelab_deploy as hd
from conftest import PROGRAM, Listener, NatsServer, make_user_key, run_cli, stop_process, wait_for


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

    @pytest.mark.parametrize("key,ok", [(None, True), ("U" + "A" * 55, False), ("N" + "A" * 55, False), ("", False),
                                        (42, False)])
    def test_public_key_check(self, tmp_path, key, ok):
        if key is None:
            _, key = make_user_key(tmp_path, "x")
        assert hd.is_user_public_key(key) is ok


# ---------------------------------------------------------------- fleet file

def fleet_doc(tmp_path: Path) -> tuple[dict, dict[str, Path]]:
    """A fleet with one credential of every kind; returns the document and each credential's seed."""
    names = ["t1", "t2", "p1", "tdep", "admin", "builder", "bclient", "mcp", "mcpadmin"]
    seeds = {n: make_user_key(tmp_path, n)[0] for n in names}
    pub = lambda n: nkeys.from_seed(bytearray(seeds[n].read_bytes().strip())).public_key.decode()  # noqa: E731
    doc = {
        "hosts": [{"hostname": "t1", "tier": "test", "nkey": pub("t1")},
                  {"hostname": "t2", "tier": "test", "role": "web", "seed": "t2.seed"},
                  {"hostname": "p1", "tier": "prod", "role": "dns", "nkey": pub("p1")}],
        "deployers": [{"name": "tdep", "access": "test", "nkey": pub("tdep")},
                      {"name": "admin", "access": "admin", "nkey": pub("admin")}],
        "builders": [{"name": "builder", "repos": ["r1"], "nkey": pub("builder")}],
        "build_clients": [{"name": "bclient", "repos": ["r1"], "nkey": pub("bclient")}],
        "mcp": [{"name": "mcp", "nkey": pub("mcp"), "admin_seed": "mcpadmin.seed", "build_repos": ["r1"]}],
    }
    return doc, seeds


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

    @pytest.mark.parametrize("mutate,message", [
        (lambda d: d["hosts"][0].update(tier="staging"), "hosts[0] (t1): tier 'staging'"),
        (lambda d: d["hosts"].append({"hostname": "t1", "tier": "test", "seed": "x.seed"}), "duplicate hostname 't1'"),
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
    ])
    def test_invalid_fleet_names_the_entry(self, tmp_path, mutate, message):
        doc, _ = fleet_doc(tmp_path)
        mutate(doc)
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
        r = run_cli("nats-config", str(tmp_path / "fleet.yaml"))
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert r.stdout == ""

    def test_not_yaml_or_missing(self, tmp_path):
        (tmp_path / "f.yaml").write_text("hosts: [\n")
        r = run_cli("nats-config", str(tmp_path / "f.yaml"))
        assert r.returncode == 2 and "not valid YAML" in r.stderr
        r = run_cli("nats-config", str(tmp_path / "nope.yaml"))
        assert r.returncode == 2 and "cannot read fleet file" in r.stderr


# ---------------------------------------------------------------- permission matrix on a real server

SUBJECTS = {
    "own host": "deploy.test.t1", "other host": "deploy.test.t2", "other tier host": "deploy.prod.p1",
    "own role": "deploy.test.role.web", "other role": "deploy.test.role.db", "prod role": "deploy.prod.role.dns",
    "tier all": "deploy.test.all", "prod all": "deploy.prod.all", "discovery": "deploy.discover",
    # answers: deploy.responses.<requester's key>.<token>.<host>, build.responses.<requester's key>.<token>.<repo>
    "t1 answers tdep": "deploy.responses.{tdep}.r.t1", "t1 answers admin": "deploy.responses.{admin}.r.t1",
    "p1 answers admin": "deploy.responses.{admin}.r.p1", "t2 answers mcp": "deploy.responses.{mcp}.r.t2",
    "build own repo": "build.r1.all", "build other repo": "build.r2.all",
    "r1 answers bclient": "build.responses.{bclient}.r.r1", "r2 answers bclient": "build.responses.{bclient}.r.r2",
    "r1 answers mcp": "build.responses.{mcp}.r.r1",
}
# Allowed (publish, subscribe) subject classes per credential: the spec's Key Permission Patterns, with replies
# readable only by their requester and answers publishable only by the host (or builder) they name.
TEST_DEPLOY_PUB = {"own host", "other host", "own role", "other role", "tier all", "discovery"}
DEPLOY_ALL = {c for c, s in SUBJECTS.items() if s.startswith("deploy.")}
MATRIX = {
    "t1": ({"t1 answers tdep", "t1 answers admin", "discovery"}, {"own host", "tier all", "discovery"}),
    "t2": ({"t2 answers mcp", "discovery"}, {"other host", "own role", "tier all", "discovery"}),
    "p1": ({"p1 answers admin", "discovery"}, {"other tier host", "prod role", "prod all", "discovery"}),
    "tdep": (TEST_DEPLOY_PUB, {"t1 answers tdep", "discovery"}),
    "admin": (DEPLOY_ALL, DEPLOY_ALL),
    "builder": ({"r1 answers bclient", "r1 answers mcp"}, {"build own repo"}),
    "bclient": ({"build own repo"}, {"r1 answers bclient", "r2 answers bclient"}),
    "mcp": (TEST_DEPLOY_PUB | {"build own repo"}, {"t2 answers mcp", "discovery", "r1 answers mcp"}),
    "mcpadmin": (DEPLOY_ALL, DEPLOY_ALL),
}


@pytest.mark.integration
def test_permission_matrix(tmp_path):
    doc, seeds = fleet_doc(tmp_path)
    config = hd.authorization_config(hd.fleet_credentials(doc, str(tmp_path)))
    super_seed, super_pub = make_user_key(tmp_path, "observer")  # sees everything, to prove what got through
    config = config.replace("  users = [\n", f'  users = [\n    {{ nkey: "{super_pub}", permissions: '
                                              '{ publish: [">"], subscribe: [">"] } }\n')
    (tmp_path / "nats.conf").write_text("listen: 127.0.0.1:-1\n" + config)
    log = tmp_path / "nats.log"
    server = subprocess.Popen(["nats-server", "-c", str(tmp_path / "nats.conf"), "-l", str(log)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    buses = []
    try:
        port = wait_for(lambda: log.exists() and re.search(r"client connections on 127\.0\.0\.1:(\d+)",
                                                           log.read_text()), what="nats-server").group(1)
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
                received = wait_for(lambda: (not q.empty() and q.get_nowait()[1] == probe) or
                                    bus.denied(subject, "subscription"),
                                    what=f"{name} subscribe {subject}")
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
    doc = {"hosts": [{"hostname": "testhost1", "tier": "test", "nkey": server.public["testhost1"]},
                     {"hostname": "testhost2", "tier": "test", "role": "web", "nkey": server.public["testhost2"]},
                     {"hostname": "dns1", "tier": "prod", "role": "dns", "nkey": server.public["dns1"]}],
           "deployers": [{"name": "test-deployer", "access": "test", "nkey": server.public["test-deployer"]},
                         {"name": "admin", "access": "admin", "nkey": server.public["admin"]}]}
    server.config.write_text("listen: 127.0.0.1:-1\n" + hd.authorization_config(hd.fleet_credentials(doc)))
    server.start()
    yield server
    server.stop()


@pytest.mark.integration
class TestForgedAnswers:
    def test_a_host_cannot_answer_for_another(self, least_privilege, tmp_path, bus_factory):
        """testhost1's key answers `testhost2 completed` to a deploy.test.all request while testhost2 fails:
        on testhost2's answer subject the server refuses it; on its own or the bare reply subject the client
        drops or never sees it. The deploy reports testhost2's real failure and exits 1."""
        hosts = [Listener(least_privilege, name, "test", role, tmp_path) for name, role in
                 (("testhost1", None), ("testhost2", "web"))]
        forger = bus_factory(least_privilege, "testhost1")
        forged_on: list[str] = []

        def forge(subject: str, data: bytes, received: float) -> None:
            reply_to = json.loads(data)["reply_to"]
            lie = json.dumps({"hostname": "testhost2", "status": "completed", "error": None,
                              "message": "Successfully switched to generation 7"}).encode()
            for target in (hd.answer_subject(reply_to, "testhost2"), hd.answer_subject(reply_to, "testhost1"),
                           reply_to):
                forger.publish(target, lie)
                forged_on.append(target)

        try:
            for host in hosts:
                host.start()
            hosts[1].standin.set_mode("fail")
            forger.subscribe("deploy.test.all", forge)
            r = run_cli("deploy", "deploy.test.all", "--branch", "main", "--json", "--nats-url", least_privilege.url,
                        "--nkey-file", str(least_privilege.seeds["test-deployer"]))
        finally:
            for host in hosts:
                host.stop()
        assert len(forged_on) == 3
        assert forger.denied(forged_on[0])  # the server refused testhost1 on testhost2's answer subject
        assert r.returncode == 1, r.stderr
        assert {h["hostname"]: h["status"] for h in json.loads(r.stdout)["hosts"]} == {
            "testhost1": "completed", "testhost2": "failed"}
        assert "1/2 hosts completed" in r.stderr and "claims to come from 'testhost2'" in r.stderr

    def test_a_test_credential_cannot_read_or_inject_into_prod_replies(self, least_privilege, tmp_path,
                                                                       bus_factory):
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
            r = run_cli("deploy", "deploy.prod.all", "--branch", "main", "--json", "--nats-url", least_privilege.url,
                        "--nkey-file", str(least_privilege.seeds["admin"]))
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


@pytest.mark.integration
class TestDemo:
    def test_demo_runs_and_cleans_up(self):
        r = subprocess.run([*PROGRAM, "demo"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        workdir = re.search(r"sandbox in (\S+)", r.stdout).group(1)
        summary = r.stdout.split("== summary")[1]
        for host, status in [("test-web1", "completed"), ("test-db1", "completed"), ("prod-dns1", "completed"),
                             ("prod-dns2", "completed"), ("prod-web1", "failed")]:
            assert re.search(rf"{host}\s+{status}", summary), host
        assert "permission denied" in r.stdout and "homelab_deploy_deployments_total" in r.stdout
        assert "6/6 steps behaved as expected" in r.stdout
        assert demo_processes(workdir) == [] and not os.path.exists(workdir)

    def test_keep_until_ctrl_c(self, tmp_path):
        out = tmp_path / "demo.out"
        with open(out, "wb") as f:
            proc = subprocess.Popen([*PROGRAM, "demo", "--keep"], stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_for(lambda: "Sandbox running until Ctrl-C" in out.read_text() or proc.poll() is not None,
                     timeout=120, what="the sandbox to be kept running")
            text = out.read_text()
            workdir = re.search(r"sandbox in (\S+)", text).group(1)
            url = re.search(r"NATS:\s+(nats://127\.0\.0\.1:\d+)", text).group(1)
            admin_seed = os.path.join(workdir, "keys", "admin.seed")
            r = run_cli("list-hosts", "--nats-url", url, "--nkey-file", admin_seed, "--json")
            assert r.returncode == 0 and len(json.loads(r.stdout)) == 5  # the printed instructions work
            assert len(demo_processes(workdir)) >= 6
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(60) == 130
            assert demo_processes(workdir) == [] and not os.path.exists(workdir)
        finally:
            stop_process(proc)
