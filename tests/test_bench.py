"""The benchmark keeps working: a smoke run of bench/run with a tiny fleet produces every row.

It asserts the table's shape and that every figure is a positive measurement, never timings: speed goals
live in docs/benchmarks.md, not in tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, needs_nix

BENCH = REPO / "bench" / "run"
PROGRAM = os.path.join(os.path.dirname(sys.executable), "homelab-deploy")


def sandbox_processes(workdir: str) -> list[int]:
    """PIDs of processes whose command line names the sandbox directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if workdir.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not os.path.exists(PROGRAM), reason=f"the homelab-deploy entry point is not installed at {PROGRAM}")
def test_smoke_run_produces_every_row(tmp_path):
    out = tmp_path / "bench.json"
    # This environment already has homelab-deploy and nats-server: bench/run skips building its venv.
    # --real-hosts 2: the third host of the 3-host fleet is simulated by bench/fleet.py
    proc = subprocess.Popen(
        [
            "bash",
            str(BENCH),
            "--fleets",
            "2",
            "--hosts",
            "3",
            "--real-hosts",
            "2",
            "--runs",
            "2",
            "--requests",
            "5",
            "--json",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOMELAB_DEPLOY_BENCH_PYTHON": sys.executable},
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # SIGTERM lets the bench (bench/run execs it) stop its sandbox
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    workdir = re.search(r"sandbox in (\S+)", stderr).group(1)

    report = json.loads(out.read_text())
    measures = [row["measure"] for row in report["rows"]]
    expected = [
        "listener idle RSS",
        "listener idle threads",
        "listener idle RSS, metrics endpoint on",
        "listener CPU per deploy, nixos-rebuild stand-in included",
        "listener RSS after 5 deploys",
        "listener threads after 5 deploys",
        "listener RSS after 10 deploys",
        "listener threads after 10 deploys",
        "request to accepted p50",
        "request to accepted p99",
        "homelab-deploy --help",
        "deploy to one host, start to exit",
        *(
            f"{daemon} idle, SIGTERM to exit, NATS {state} (slowest run)"
            for daemon in ("listener", "builder")
            for state in ("up", "stopped first", "stopped at once")
        ),
    ]
    for n in (2, 3):
        expected += [
            f"deploy deploy.test.all, {n} hosts: command",
            f"deploy deploy.test.all, {n} hosts: publish to last final",
            f"deploy deploy.test.all, {n} hosts, stand-in of 1 s: exit after last final",
            f"deploy deploy.test.all, {n} hosts, instant stand-in: exit after last final",
            f"list-hosts, {n} hosts",
            f"status, {n} hosts",
            f"CLI peak RSS, deploy of {n} hosts",
            f"CLI peak RSS, status of {n} hosts",
            f"rollout, {n} hosts in batches of 10: command",
            f"rollout, {n} hosts in batches of 10: first publish to last final",
            f"rollout, {n} hosts in batches of 10: exit after last final",
        ]
    assert measures == expected
    for row in report["rows"]:
        assert row["ours"] > 0, row
        if row["floor"]:
            assert row["ratio"] == pytest.approx(row["ours"] / row["floor"]), row
        elif not row["measure"].startswith("listener CPU"):  # 10 bare requests may not take one clock tick
            assert row["floor"] is None and row["measure"].endswith(("exit after last final", "(slowest run)")), row
    assert {r["measure"] for r in report["rows"] if r["target"]} >= {
        "listener idle RSS",
        "request to accepted p50",
        "homelab-deploy --help",
        "deploy to one host, start to exit",
        "listener idle, SIGTERM to exit, NATS stopped at once (slowest run)",
        "builder idle, SIGTERM to exit, NATS stopped at once (slowest run)",
        "status, 3 hosts",
    }
    # The printed table has the same rows, and the bench left nothing running behind it.
    table_rows = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == len(expected) + 1
    assert report["machine"] in stdout and report["date"] in stdout
    assert sandbox_processes(workdir) == [] and not os.path.exists(workdir)


@pytest.mark.skipif(not os.path.exists(PROGRAM), reason=f"the homelab-deploy entry point is not installed at {PROGRAM}")
def test_sigterm_mid_run_stops_everything():
    proc = subprocess.Popen(
        ["bash", str(BENCH), "--fleets", "2", "--runs", "1000", "--requests", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOMELAB_DEPLOY_BENCH_PYTHON": sys.executable},
    )
    try:
        lines = []
        for line in proc.stderr:  # ends at EOF if the bench dies early
            lines.append(line)
            if "listener idle RSS" in line:  # the sandbox is up: server, listeners, floors, observer
                break
        workdir = re.search(r"sandbox in (\S+)", "".join(lines)).group(1)
        assert sandbox_processes(workdir), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; the sandbox's processes are stopped" in rest, rest
    assert sandbox_processes(workdir) == [] and not os.path.exists(workdir)


@needs_nix
def test_closure_bench_deploys_the_built_path_both_ways(tmp_path):
    """bench/closure.py: one change built once, then deployed from the build and by a rebuild; it fails unless
    the profile ends at the built path each time. Every figure is a positive measurement."""
    out = tmp_path / "closure.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "closure.py"), "--runs", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    medians = json.loads(out.read_text())["medians"]
    assert set(medians) == {"build", "closure", "closure_host", "rebuild", "rebuild_host"}
    assert all(value > 0 for value in medians.values()), medians
    assert "deploy --from-build, CLI start to exit" in r.stdout
