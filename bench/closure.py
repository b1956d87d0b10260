#!/usr/bin/env python3
"""Deploy a built closure against a rebuild: same host, same change (docs/benchmarks.md, issue 29).

On one machine, with the real nix on a private store and a real nats-server with JetStream: a git flake whose
host's system is a tiny derivation with `bin/switch-to-configuration`; a builder that builds it, signs it and
copies it to a `file://` cache; one listener. Each run commits a change, builds it once, then deploys it twice to
the same host: with `deploy --from-build` (nix-store --realise, nix-env --set, switch-to-configuration) and with
`deploy --pin` through a `nixos-rebuild` that does what the real one does on a flake (fetch and evaluate the
flake, build the system, which the shared store already has, then the same nix-env and switch-to-configuration).
It is a lower bound for the rebuild: a real NixOS configuration takes seconds to minutes and up to gigabytes to
evaluate, this one milliseconds. Prints the medians; `--json FILE` keeps them. Needs nix, git and nats-server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import homelab_deploy as hd  # noqa: E402

PROGRAM = [sys.executable, hd.__file__]
SYSTEM = (
    'builtins.derivation {{ name = "nixos-system-bench1"; system = "{system}"; builder = "/bin/sh"; '
    'args = [ "-c" "mkdir -p $out/bin; printf \'#!/bin/sh\\\\nexit 0\\\\n\' > $out/bin/switch-to-configuration; '
    'chmod +x $out/bin/switch-to-configuration" ]; PATH = "/usr/bin:/bin"; change = "{change}"; }}'
)
FLAKE = "{{ outputs = {{ self }}: {{ nixosConfigurations.bench1.config.system.build.toplevel = {system}; }}; }}\n"
# What nixos-rebuild <action> --refresh --flake <ref>#<host> does on a flake, with this store's nix.
REBUILD = """#!{python}
import json, os, subprocess, sys
action, ref = sys.argv[1], sys.argv[4]
flake, host = ref.split("#")
out = subprocess.run(["nix", "build", "--no-link", "--json", "--refresh",
                      f"{{flake}}#nixosConfigurations.{{host}}.config.system.build.toplevel"],
                     check=True, capture_output=True, text=True).stdout
path = json.loads(out)[0]["outputs"]["out"]
if action in ("switch", "boot"):
    subprocess.run(["nix-env", "--profile", os.environ["BENCH_PROFILE"], "--set", path], check=True)
subprocess.run([path + "/bin/switch-to-configuration", action], check=True)
"""


def run(argv: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="changes deployed both ways (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hd-closure-bench-") as tmp:
        return bench(tmp, args)


def bench(tmp: str, args: argparse.Namespace) -> int:
    store = os.path.join(tmp, "nix")
    env = {
        **os.environ,
        "NIX_STORE_DIR": f"{store}/store",
        "NIX_STATE_DIR": f"{store}/state",
        "NIX_LOG_DIR": f"{store}/log",
        "NIX_CONF_DIR": f"{store}/etc",
        "HOME": f"{tmp}/home",
        "XDG_CACHE_HOME": f"{tmp}/cache",
        "NIX_CONFIG": "\n".join(
            [
                "experimental-features = nix-command flakes",
                "sandbox = false",
                "build-users-group =",
                "substituters =",
                "flake-registry =",
                "tarball-ttl = 0",
            ]
        ),
    }
    for d in (f"{store}/etc", f"{tmp}/home", f"{tmp}/profiles", f"{tmp}/bin", f"{tmp}/repo"):
        os.makedirs(d)
    os.makedirs(f"{tmp}/state", 0o700)  # the listener refuses a state directory others may read
    names = ("bench1", "admin", "builder", "bclient", "ops")
    seeds = {n: os.path.join(tmp, f"{n}.nkey") for n in names}
    pub = {n: hd.new_user_seed(seeds[n]) for n in names}
    credentials = hd.fleet_credentials(
        {
            "hosts": [{"hostname": "bench1", "tier": "test", "nkey": pub["bench1"]}],
            "deployers": [{"name": "admin", "access": "admin", "nkey": pub["admin"]}],
            "builders": [{"name": "builder", "repos": ["fleet"], "nkey": pub["builder"]}],
            "build_clients": [{"name": "bclient", "repos": ["fleet"], "nkey": pub["bclient"]}],
        }
    )
    ops = f'    {{ nkey: "{pub["ops"]}", permissions: {{ publish: [">"], subscribe: [">"] }} }}\n'
    with open(f"{tmp}/nats.conf", "w") as f:
        f.write(
            f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{tmp}/js" }}\n'
            + hd.authorization_config(credentials).replace("  users = [\n", "  users = [\n" + ops)
        )
    git = ["git", "-C", f"{tmp}/repo", "-c", "user.name=b", "-c", "user.email=b@example.invalid"]
    run([*git, "init", "-q", "-b", "main"], env)
    rebuild = f"{tmp}/bin/nixos-rebuild"
    with open(rebuild, "w") as f:
        f.write(REBUILD.format(python=sys.executable))
    os.chmod(rebuild, 0o755)
    key = f"{tmp}/cache.sec"
    with open(key, "w") as f:
        f.write(run(["nix", "key", "generate-secret", "--key-name", "bench-1"], env, check=True).stdout)
    with open(f"{tmp}/builder.yaml", "w") as f:
        json.dump(
            {
                "repos": {
                    "fleet": {
                        "url": f"git+file://{tmp}/repo",
                        "default_branch": "main",
                        "cache": f"file://{tmp}/cache-dir",
                        "cache_secret_key": key,
                    }
                }
            },
            f,
        )
    procs: list[subprocess.Popen] = []
    try:
        log = f"{tmp}/nats.log"
        procs.append(subprocess.Popen(["nats-server", "-c", f"{tmp}/nats.conf", "-l", log]))
        url = wait(lambda: re.search(r"client connections on (127\.0\.0\.1:\d+)", read(log)), "nats-server")[1]
        url = f"nats://{url}"
        bus = hd.Bus(url, seeds["ops"], "bench-ops")
        bus.create_bucket(hd.BUILDS_BUCKET_CONFIG)
        bus.close()
        daemon_env = {**env, "PATH": f"{tmp}/bin:{env['PATH']}", "BENCH_PROFILE": f"{tmp}/profiles/system"}
        with open(f"{tmp}/builder.log", "w") as out:
            procs.append(
                subprocess.Popen(
                    [
                        *PROGRAM,
                        "builder",
                        "--nats-url",
                        url,
                        "--nkey-file",
                        seeds["builder"],
                        "--config",
                        f"{tmp}/builder.yaml",
                    ],
                    env=daemon_env,
                    stderr=out,
                )
            )
        with open(f"{tmp}/listener.log", "w") as out:
            procs.append(
                subprocess.Popen(
                    [
                        *PROGRAM,
                        "listener",
                        "--hostname",
                        "bench1",
                        "--tier",
                        "test",
                        "--nats-url",
                        url,
                        "--nkey-file",
                        seeds["bench1"],
                        "--flake-url",
                        f"git+file://{tmp}/repo",
                        "--system-profile",
                        f"{tmp}/profiles/system",
                        "--state-dir",
                        f"{tmp}/state",
                    ],
                    env=daemon_env,
                    stderr=out,
                )
            )
        wait(lambda: "builder ready" in read(f"{tmp}/builder.log"), "the builder", f"{tmp}/builder.log")
        wait(lambda: " ready " in read(f"{tmp}/listener.log"), "the listener", f"{tmp}/listener.log")
        system = {"x86_64": "x86_64-linux", "aarch64": "aarch64-linux"}.get(os.uname().machine, "x86_64-linux")
        deploy = [
            *PROGRAM,
            "deploy",
            "deploy.test.bench1",
            "--nats-url",
            url,
            "--nkey-file",
            seeds["admin"],
            "--json",
            "--answer-window",
            "2",
            "--straggler-window",
            "0.2",
        ]
        figures: dict[str, list[float]] = {
            "build": [],
            "closure": [],
            "closure_host": [],
            "rebuild": [],
            "rebuild_host": [],
        }
        for i in range(args.runs):
            with open(f"{tmp}/repo/flake.nix", "w") as f:
                f.write(FLAKE.format(system=SYSTEM.format(system=system, change=f"{i}-{time.time()}")))
            run([*git, "add", "flake.nix"], env, check=True)
            run([*git, "commit", "-q", "-m", f"change {i}"], env, check=True)
            started = time.monotonic()
            built = run(
                [
                    *PROGRAM,
                    "build",
                    "fleet",
                    "--all",
                    "--json",
                    "--nats-url",
                    url,
                    "--nkey-file",
                    seeds["bclient"],
                    "--answer-window",
                    "2",
                ],
                env,
            )
            figures["build"].append(time.monotonic() - started)
            assert built.returncode == 0, built.stderr
            path = json.loads(built.stdout)["results"][0]["store_path"]
            for row, flags in (
                ("closure", ["--from-build", "fleet"]),
                ("rebuild", ["--branch", "main", "--pin", "--flake-url", f"git+file://{tmp}/repo"]),
            ):
                started = time.monotonic()
                done = run([*deploy, *flags], env)
                figures[row].append(time.monotonic() - started)
                assert done.returncode == 0, done.stderr
                figures[f"{row}_host"].append(json.loads(done.stdout)["hosts"][0]["duration_seconds"])
                assert os.path.realpath(f"{tmp}/profiles/system") == path, (row, path)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(60)
    medians = {row: round(statistics.median(values), 3) for row, values in figures.items()}
    print(f"{'median of ' + str(args.runs) + ' changes':<52} seconds")
    for row, what in (
        ("build", "build + sign + copy to the cache (builder, once)"),
        ("closure", "deploy --from-build, CLI start to exit"),
        ("closure_host", "  on the host: realise, nix-env --set, activate"),
        ("rebuild", "deploy --pin (nixos-rebuild), CLI start to exit"),
        ("rebuild_host", "  on the host: fetch, evaluate, build, activate"),
    ):
        print(f"{what:<52} {medians[row]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "medians": medians, "all": figures}, f, indent=2)
    return 0


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait(condition, what: str, log: str = "", timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start within {timeout:g}s; its log:\n{read(log)[-2000:]}")
        time.sleep(0.05)
    return found


if __name__ == "__main__":
    sys.exit(main())
