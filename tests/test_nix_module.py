"""Tests of the Nix side: module.nix, default.nix and flake.nix.

Every .nix file must parse, and module.nix is evaluated by a real
`nix-instantiate` (Debian's nix-bin is enough) through the module system:
each test writes a small host configuration, evaluates it and looks at the
generated systemd units, users and firewall ports, or at the error a wrong
configuration gives.

There is no nixpkgs on the test machines (and no network to fetch one), so
tests/nixlib holds stand-ins: a small `lib` with its own evalModules
(tests/nixlib/default.nix), the NixOS options the module touches
(nixos-stub.nix) and a fake `pkgs` (pkgs.nix).  Set NIXPKGS_LIB to the `lib`
directory of a nixpkgs checkout to evaluate with the real lib instead.

Evaluation uses `--store dummy://`: nothing is built or written to a Nix
store, and no nix daemon, /nix directory or nixbld users are needed.  The
tests are skipped when nix-instantiate is not installed.
"""

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import REPO

NIX_INSTANTIATE = shutil.which("nix-instantiate")

pytestmark = pytest.mark.skipif(
    NIX_INSTANTIATE is None,
    reason="nix-instantiate not found (Debian: apt-get install nix-bin)",
)

NIXLIB = REPO / "tests" / "nixlib"
NIXPKGS_LIB = os.environ.get("NIXPKGS_LIB", "")

EXE_SUFFIX = "-homelab-deploy-0.1.0/bin/homelab-deploy"
LISTENER = "homelab-deploy-listener"
BUILDER = "homelab-deploy-builder"


# --------------------------------------------------------------- plumbing


class Nix:
    """A Nix expression given verbatim, for values the converter can't express."""

    def __init__(self, text):
        self.text = text


def to_nix(value):
    """Python data -> Nix expression (dicts become attribute sets)."""
    if isinstance(value, Nix):
        return value.text
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return f"({value})"
    if isinstance(value, str):
        escaped = (
            value.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("${", "\\${")
            .replace("\n", "\\n")
            .replace("\t", "\\t")
        )
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[ " + " ".join(to_nix(v) for v in value) + " ]"
    if isinstance(value, dict):
        return "{ " + " ".join(f"{to_nix(k)} = {to_nix(v)};" for k, v in value.items()) + " }"
    raise TypeError(f"cannot express {value!r} in Nix")


@pytest.fixture(scope="session")
def nix(tmp_path_factory):
    """Runs nix-instantiate in an isolated environment; see NixRunner."""
    return NixRunner(tmp_path_factory.mktemp("nix-home"))


class NixRunner:
    def __init__(self, home):
        # A throw-away HOME and config dirs: the user's and the machine's
        # nix.conf, caches and NIX_PATH must not change the results.
        (home / "conf").mkdir()
        (home / "conf" / "nix.conf").write_text("")
        self.env = dict(os.environ)
        self.env.update(
            HOME=str(home),
            XDG_CACHE_HOME=str(home / "cache"),
            XDG_CONFIG_HOME=str(home / "config"),
            XDG_CONFIG_DIRS=str(home / "config"),
            XDG_STATE_HOME=str(home / "state"),
            XDG_DATA_HOME=str(home / "data"),
            NIX_CONF_DIR=str(home / "conf"),
            NIX_PATH="",
        )
        for var in ("NIX_CONFIG", "NIX_REMOTE", "NIX_USER_CONF_FILES"):
            self.env.pop(var, None)
        self.store_args = self._find_store_args()

    def run(self, *args):
        return subprocess.run(
            [NIX_INSTANTIATE, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def _find_store_args(self):
        # `dummy://` is a store that holds nothing and needs nothing (nix 2.8
        # and later); --readonly-mode is the fallback for an older nix with
        # an existing /nix/store.
        errors = []
        for args in (["--store", "dummy://"], ["--readonly-mode"]):
            proc = self.run(*args, "--eval", "-E", 'builtins.toFile "probe" "x"')
            if proc.returncode == 0:
                return args
            errors.append(f"{' '.join(args)}: {proc.stderr.strip()}")
        pytest.fail("nix-instantiate cannot evaluate here:\n" + "\n".join(errors))

    def eval(self, expr):
        """Evaluate `expr` (a function of nixlib, nixpkgsLib) to JSON."""
        proc = self._eval(expr)
        if proc.returncode != 0:
            pytest.fail(f"evaluation failed:\n{proc.stderr}\nexpression:\n{expr}")
        return json.loads(proc.stdout)

    def eval_error(self, expr):
        """Evaluate `expr`, which must fail; returns the error output."""
        proc = self._eval(expr)
        assert proc.returncode != 0, f"evaluation should have failed but gave {proc.stdout}"
        assert "error" in proc.stderr
        return proc.stderr

    def _eval(self, expr):
        return self.run(
            *self.store_args,
            "--eval",
            "--strict",
            "--json",
            "--argstr",
            "nixlib",
            str(NIXLIB),
            "--argstr",
            "nixpkgsLib",
            NIXPKGS_LIB,
            "-E",
            "{ nixlib, nixpkgsLib }: " + expr,
        )

    # -- the module under test ------------------------------------------

    def host_expr(self, host, select, modules_prefix="", with_module=True):
        return f"""
          let
            h = import (nixlib + "/eval.nix") {{
              inherit nixpkgsLib;
              withModule = {to_nix(with_module)};
              modules = [ {modules_prefix} ({{ lib, ... }}: {to_nix(host)}) ];
            }};
            cfg = h.config;
            lib = h.lib;
            svc = cfg.systemd.services;
          in {select}
        """

    def host(self, host, select, **kw):
        """Evaluate `select` (Nix, with cfg/svc/lib in scope) for a host config."""
        return self.eval(self.host_expr(host, select, **kw))

    def host_error(self, host, select="map (n: svc.${n}.serviceConfig.ExecStart) (builtins.attrNames svc)", **kw):
        return self.eval_error(self.host_expr(host, select, **kw))


SYSTEMD_WORD = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|([^\s"]+))(?=\s|$)')


def systemd_split(line):
    """Split an ExecStart= line the way systemd does, for the two forms
    module.nix produces: bare words and double-quoted C-style strings, with
    %% and $$ for literal % and $ (other % specifiers are kept as is)."""
    words, pos = [], 0
    line = line.rstrip()
    while pos < len(line):
        m = SYSTEMD_WORD.match(line, pos)
        assert m, f"cannot split ExecStart at {line[pos:]!r}"
        quoted, bare = m.groups()
        word = json.loads(f'"{quoted}"') if quoted is not None else bare
        words.append(word.replace("%%", "%").replace("$$", "$"))
        pos = m.end()
    return words


def listener_config(**overrides):
    cfg = {
        "enable": True,
        "tier": "prod",
        "natsUrl": "nats://nats.example.com:4222",
        "nkeyFile": "/run/secrets/homelab-deploy-nkey",
        "flakeUrl": "git+https://git.example.com/user/nixos-configs.git",
    }
    cfg.update(overrides)
    return cfg


def builder_config(**overrides):
    cfg = {
        "enable": True,
        "natsUrl": "nats://nats.example.com:4222",
        "nkeyFile": "/run/secrets/homelab-deploy-builder-nkey",
    }
    cfg.update(overrides)
    return cfg


def host(hostname="web1", listener=None, builder=None, **extra):
    services = {}
    if listener is not None:
        services["listener"] = listener
    if builder is not None:
        services["builder"] = builder
    cfg = {"networking": {"hostName": hostname}, "services": {"homelab-deploy": services}}
    cfg.update(extra)
    return cfg


def listener_argv(nix, host_cfg):
    line = nix.host(host_cfg, f"svc.{LISTENER}.serviceConfig.ExecStart")
    return systemd_split(line)


def builder_argv(nix, host_cfg):
    line = nix.host(host_cfg, f"svc.{BUILDER}.serviceConfig.ExecStart")
    return systemd_split(line)


DEFAULT_SUBJECT_ARGS = [
    "--deploy-subject",
    "deploy.<tier>.<hostname>",
    "--deploy-subject",
    "deploy.<tier>.all",
    "--deploy-subject",
    "deploy.<tier>.role.<role>",
]


# ----------------------------------------------------------------- parsing


NIX_FILES = sorted(
    p.relative_to(REPO).as_posix() for p in REPO.rglob("*.nix") if ".git" not in p.relative_to(REPO).parts
)


def test_nix_files_are_found():
    for name in (
        "default.nix",
        "module.nix",
        "flake.nix",
        "tests/nixlib/default.nix",
        "tests/nixlib/nixos-stub.nix",
        "tests/nixlib/pkgs.nix",
        "tests/nixlib/eval.nix",
    ):
        assert name in NIX_FILES


@pytest.mark.parametrize("path", NIX_FILES)
def test_nix_file_parses(nix, path):
    proc = nix.run(*nix.store_args, "--parse", str(REPO / path))
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- listener


def test_listener_minimal_exec_start(nix):
    argv = listener_argv(nix, host(listener=listener_config()))
    assert argv[0].startswith("/nix/store/") and argv[0].endswith(EXE_SUFFIX)
    assert argv[1:] == [
        "listener",
        "--hostname",
        "web1",
        "--tier",
        "prod",
        "--nats-url",
        "nats://nats.example.com:4222",
        "--nkey-file",
        "/run/secrets/homelab-deploy-nkey",
        "--flake-url",
        "git+https://git.example.com/user/nixos-configs.git",
        "--timeout",
        "600",
        "--rollback-timeout",
        "120",
        *DEFAULT_SUBJECT_ARGS,
        "--discover-subject",
        "deploy.discover",
        "--restart-after-switch",
        "--require-signed",
        "--failed-units-check",
        "on",
    ]


def test_listener_unit(nix):
    unit = nix.host(
        host(listener=listener_config()),
        f"""{{
          inherit (svc.{LISTENER}) wantedBy wants after path restartIfChanged stopIfChanged;
          inherit (svc.{LISTENER}.serviceConfig) Restart RestartSec StateDirectory StateDirectoryMode TimeoutStopSec
            LimitNOFILE;
          user = svc.{LISTENER}.serviceConfig.User or null;
          services = builtins.attrNames svc;
          users = builtins.attrNames cfg.users.users;
          ports = cfg.networking.firewall.allowedTCPPorts;
        }}""",
    )
    assert unit["wantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["wants"]
    assert "network-online.target" in unit["after"]
    # nixos-rebuild switch must not restart the listener that runs it.
    assert unit["restartIfChanged"] is False
    assert unit["stopIfChanged"] is False
    assert unit["Restart"] == "always"
    assert unit["RestartSec"] == 5
    assert (unit["StateDirectory"], unit["StateDirectoryMode"]) == ("homelab-deploy", "0700")
    assert unit["TimeoutStopSec"] > 60  # longer than the listener's --shutdown-grace
    assert unit["LimitNOFILE"] == 65536  # not systemd's 1,024: nixos-rebuild and nix inherit it
    assert unit["user"] is None  # root: nixos-rebuild switch needs it
    tools = [p.split("-", 1)[1] for p in unit["path"]]
    assert tools == ["nix-2.28", "git-2.49", "nixos-rebuild-ng", "systemd-257"]  # systemd-run: rollback watchdog
    assert unit["services"] == [LISTENER]
    assert unit["users"] == []
    assert unit["ports"] == []


def test_listener_uses_pkgs_nixos_rebuild_without_system_build(nix):
    cfg = host(listener=listener_config())
    cfg["system"] = {"build": Nix("lib.mkForce { }")}
    path = nix.host(cfg, f"svc.{LISTENER}.path")
    assert path[2].endswith("-nixos-rebuild")


def test_listener_hostname_defaults_to_networking_hostname(nix):
    argv = listener_argv(nix, host(hostname="dns1", listener=listener_config()))
    assert argv[argv.index("--hostname") + 1] == "dns1"
    argv = listener_argv(nix, host(hostname="dns1", listener=listener_config(hostname="dns-a")))
    assert argv[argv.index("--hostname") + 1] == "dns-a"


def test_listener_role(nix):
    argv = listener_argv(nix, host(listener=listener_config(role="dns", tier="test")))
    assert argv[argv.index("--tier") + 1] == "test"
    assert argv[argv.index("--role") + 1] == "dns"
    assert argv.count("--role") == 1


def test_listener_metrics(nix):
    cfg = host(listener=listener_config(metrics={"enable": True}))
    argv = listener_argv(nix, cfg)
    assert argv[-3:] == ["--metrics-enabled", "--metrics-addr", ":9972"]
    assert nix.host(cfg, "cfg.networking.firewall.allowedTCPPorts") == []

    cfg = host(listener=listener_config(metrics={"enable": True, "address": "127.0.0.1:9100", "openFirewall": True}))
    argv = listener_argv(nix, cfg)
    assert argv[-3:] == ["--metrics-enabled", "--metrics-addr", "127.0.0.1:9100"]
    assert nix.host(cfg, "cfg.networking.firewall.allowedTCPPorts") == [9100]


def test_listener_open_firewall_without_metrics_opens_nothing(nix):
    cfg = host(listener=listener_config(metrics={"openFirewall": True}))
    assert "--metrics-enabled" not in listener_argv(nix, cfg)
    assert nix.host(cfg, "cfg.networking.firewall.allowedTCPPorts") == []


def test_listener_custom_subjects_timeout_and_extra_args(nix):
    extra = [
        "--debug",
        "with space",
        "100% $HOME ${USER} ;",
        'quote " and \\ backslash',
        "",
        "50%off",
        "$HOME",
        'a"b',
        "back\\slash",
        "tab\there",
        "--opt=x;y",
    ]
    cfg = host(
        listener=listener_config(
            timeout=1200,
            deploySubjects=["deploy.<tier>.<hostname>", "deploy.lab.special"],
            discoverSubject="lab.discover",
            extraArgs=extra,
        )
    )
    line = nix.host(cfg, f"svc.{LISTENER}.serviceConfig.ExecStart")
    # No bare % or $ reaches systemd: it would expand them.
    assert re.search(r"(?<![%$])[%$](?![%$])", line.replace("%%", "").replace("$$", "")) is None
    argv = systemd_split(line)
    assert argv[argv.index("--timeout") + 1] == "1200"
    subjects = [argv[i + 1] for i, a in enumerate(argv) if a == "--deploy-subject"]
    assert subjects == ["deploy.<tier>.<hostname>", "deploy.lab.special"]
    assert argv[argv.index("--discover-subject") + 1] == "lab.discover"
    assert argv[-len(extra) :] == extra


def test_listener_rollback_timeout(nix):
    argv = listener_argv(nix, host(listener=listener_config(rollbackTimeout=0)))
    assert argv[argv.index("--rollback-timeout") + 1] == "0"  # off
    argv = listener_argv(nix, host(listener=listener_config(rollbackTimeout=300)))
    assert argv.count("--rollback-timeout") == 1 and argv[argv.index("--rollback-timeout") + 1] == "300"
    err = nix.host_error(host(listener=listener_config(rollbackTimeout=-1)))
    assert "services.homelab-deploy.listener.rollbackTimeout" in err and "is not of type" in err


def test_listener_health_checks(nix):
    assert "--health-check" not in listener_argv(nix, host(listener=listener_config()))
    checks = ["curl -fsS 'http://127.0.0.1:8080/health?full=1'", "systemctl is-active nginx.service"]
    argv = listener_argv(nix, host(listener=listener_config(healthChecks=checks)))
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--health-check"] == checks
    err = nix.host_error(host(listener=listener_config(healthChecks=checks, rollbackTimeout=0)))
    assert "services.homelab-deploy.listener.healthChecks needs the rollback watchdog" in err


def test_listener_failed_units_check(nix):
    argv = listener_argv(nix, host(listener=listener_config()))
    assert argv.count("--failed-units-check") == 1 and argv[argv.index("--failed-units-check") + 1] == "on"
    argv = listener_argv(nix, host(listener=listener_config(healthCheckFailedUnits=False)))
    assert argv[argv.index("--failed-units-check") + 1] == "off"


def test_listener_maintenance_windows_and_reboot_command(nix):
    argv = listener_argv(nix, host(listener=listener_config()))
    assert "--maintenance-window" not in argv and "--reboot-command" not in argv  # the listener's defaults
    windows = ["Sat 02:00-05:00", "daily 03:00-04:00"]
    argv = listener_argv(
        nix, host(listener=listener_config(maintenanceWindows=windows, rebootCommand="systemctl kexec"))
    )
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--maintenance-window"] == windows
    assert argv[argv.index("--reboot-command") + 1] == "systemctl kexec"


def test_trusted_keys(nix):
    key = "UAOSFNKWGLYFMICPCOXKPHA6AJTQMNMKSJ7JZG655Q7OMOEDJDPFL7B5"
    argv = listener_argv(
        nix,
        host(
            listener=listener_config(
                trustedKeys=[f"{key}=alice", key], trustedKeysFile="/etc/homelab-deploy/trusted.keys"
            )
        ),
    )
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--trusted-key"] == [f"{key}=alice", key]
    assert argv[argv.index("--trusted-keys-file") + 1] == "/etc/homelab-deploy/trusted.keys"
    argv = listener_argv(nix, host(listener=listener_config()))
    assert "--trusted-key" not in argv and "--trusted-keys-file" not in argv


def test_require_signed_is_the_default_and_can_be_turned_off(nix):
    assert listener_argv(nix, host(listener=listener_config())).count("--require-signed") == 1
    assert "--require-signed" not in listener_argv(nix, host(listener=listener_config(requireSigned=False)))


def test_reload_sends_sighup_to_reread_trusted_keys(nix):
    """`systemctl reload` of either daemon: SIGHUP, on which it reads its trusted keys anew (issue 25)."""
    cfg = host(
        listener=listener_config(trustedKeysFile="/etc/homelab-deploy/trusted.keys"),
        builder=builder_config(settings={"repos": {"fleet": {"url": "git+https://g.example/f.git"}}}),
    )
    for unit in (LISTENER, BUILDER):
        reload = nix.host(cfg, f"svc.{unit}.serviceConfig.ExecReload")
        assert re.fullmatch(r"/nix/store/[^ ]+-coreutils-9\.5/bin/kill -HUP \$MAINPID", reload), (unit, reload)


def test_builder_trusted_keys_reach_its_generated_config(nix):
    key = "UAOSFNKWGLYFMICPCOXKPHA6AJTQMNMKSJ7JZG655Q7OMOEDJDPFL7B5=ci"
    own = "UDVRWFORRSGNSBF354R4CMAMEGYAXK27DSM5MQHSY6WNGTUP3KMVCLYW=ops"  # trusted for `other` only
    repos = {
        "fleet": {"url": "git+https://git.example.com/fleet.git"},
        "other": {"url": "git+https://git.example.com/other.git", "trusted_keys": [own]},
    }
    expected = json.dumps(
        {
            "repos": {
                "fleet": {"url": "git+https://git.example.com/fleet.git", "default_branch": "master"},
                "other": {
                    "url": "git+https://git.example.com/other.git",
                    "default_branch": "master",
                    "trusted_keys": [own],
                },
            },
            "trusted_keys": [key],
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    result = nix.host(
        host(builder=builder_config(settings={"repos": repos, "trusted_keys": [key]})),
        f"""{{
          exec = svc.{BUILDER}.serviceConfig.ExecStart;
          expected = builtins.toFile "homelab-deploy-builder.yaml" {to_nix(expected)};
        }}""",
    )
    argv = systemd_split(result["exec"])
    assert argv[argv.index("--config") + 1] == result["expected"], f"generated config differs from {expected}"


def test_builder_cache_options_reach_its_generated_config(nix):
    key = "/var/lib/homelab-deploy-builder/cache-key.sec"
    repos = {
        "fleet": {"url": "git+https://git.example.com/fleet.git", "cache": "file:///srv/cache", "cacheSecretKey": key},
        "other": {"url": "git+https://git.example.com/other.git"},
    }
    expected = json.dumps(
        {
            "repos": {
                "fleet": {
                    "url": "git+https://git.example.com/fleet.git",
                    "default_branch": "master",
                    "cache": "file:///srv/cache",
                    "cache_secret_key": key,
                },
                "other": {"url": "git+https://git.example.com/other.git", "default_branch": "master"},
            },
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    result = nix.host(
        host(builder=builder_config(settings={"repos": repos})),
        f"""{{
          exec = svc.{BUILDER}.serviceConfig.ExecStart;
          expected = builtins.toFile "homelab-deploy-builder.yaml" {to_nix(expected)};
        }}""",
    )
    argv = systemd_split(result["exec"])
    assert argv[argv.index("--config") + 1] == result["expected"], f"generated config differs from {expected}"


def test_allow_any_ref(nix):
    cfg = host(
        listener=listener_config(allowAnyRef=True), builder=builder_config(configFile="/etc/hd.yaml", allowAnyRef=True)
    )
    assert listener_argv(nix, cfg).count("--allow-any-ref") == 1
    assert builder_argv(nix, cfg).count("--allow-any-ref") == 1
    cfg = host(listener=listener_config(), builder=builder_config(configFile="/etc/hd.yaml"))
    assert "--allow-any-ref" not in listener_argv(nix, cfg) + builder_argv(nix, cfg)


def test_listener_environment(nix):
    env = nix.host(
        host(listener=listener_config(environment={"HTTPS_PROXY": "http://proxy:3128"})),
        f"svc.{LISTENER}.environment",
    )
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert "flakes" in env["NIX_CONFIG"]

    env = nix.host(
        host(listener=listener_config(environment={"NIX_CONFIG": "show-trace = true"})),
        f"svc.{LISTENER}.environment",
    )
    assert env["NIX_CONFIG"] == "show-trace = true"


# ------------------------------------------------------------------ builder


def test_builder_with_config_file(nix):
    cfg = host(builder=builder_config(configFile="/etc/homelab-deploy/builder.yaml"))
    argv = builder_argv(nix, cfg)
    assert argv[0].endswith(EXE_SUFFIX)
    assert argv[1:] == [
        "builder",
        "--nats-url",
        "nats://nats.example.com:4222",
        # The seed is handed over as a systemd credential (%d is the
        # credentials directory), so it can stay readable by root only.
        "--nkey-file",
        "%d/nkey",
        "--config",
        "/etc/homelab-deploy/builder.yaml",
        "--timeout",
        "1800",
    ]
    creds = nix.host(cfg, f"svc.{BUILDER}.serviceConfig.LoadCredential")
    assert creds == ["nkey:/run/secrets/homelab-deploy-builder-nkey"]


def test_builder_with_settings_repos(nix):
    repos = {
        "nixos-servers": {"url": "git+https://git.example.com/org/nixos-servers.git"},
        "homelab": {"url": "git+ssh://git@github.com/user/homelab.git", "default_branch": "main"},
    }
    expected = {
        "repos": {
            "nixos-servers": {
                "url": "git+https://git.example.com/org/nixos-servers.git",
                "default_branch": "master",
            },
            "homelab": {"url": "git+ssh://git@github.com/user/homelab.git", "default_branch": "main"},
        }
    }
    expected_text = json.dumps(expected, sort_keys=True, separators=(",", ":"))
    # pkgs.writeText is builtins.toFile in the stand-in pkgs, whose store
    # path is a hash of name and content: equal paths mean equal files.
    result = nix.host(
        host(builder=builder_config(settings={"repos": repos}, timeout=3600)),
        f"""{{
          exec = svc.{BUILDER}.serviceConfig.ExecStart;
          expected = builtins.toFile "homelab-deploy-builder.yaml" {to_nix(expected_text)};
        }}""",
    )
    argv = systemd_split(result["exec"])
    config_path = argv[argv.index("--config") + 1]
    assert config_path.endswith("-homelab-deploy-builder.yaml")
    assert config_path == result["expected"], f"generated config differs from {expected_text}"
    assert argv[argv.index("--timeout") + 1] == "3600"


def test_builder_metrics_and_extra_args(nix):
    cfg = host(
        builder=builder_config(
            configFile="/etc/hd.yaml",
            metrics={"enable": True, "openFirewall": True},
            extraArgs=["--verbose"],
        )
    )
    argv = builder_argv(nix, cfg)
    assert argv[-4:] == ["--metrics-enabled", "--metrics-addr", ":9973", "--verbose"]
    assert nix.host(cfg, "cfg.networking.firewall.allowedTCPPorts") == [9973]


def test_builder_user_and_hardening(nix):
    unit = nix.host(
        host(builder=builder_config(configFile="/etc/hd.yaml", environment={"FOO": "bar"})),
        f"""{{
          sc = svc.{BUILDER}.serviceConfig;
          inherit (svc.{BUILDER}) wantedBy after path environment;
          user = {{ inherit (cfg.users.users.{BUILDER}) isSystemUser group home; }};
          groups = builtins.attrNames cfg.users.groups;
          ports = cfg.networking.firewall.allowedTCPPorts;
        }}""",
    )
    sc = unit["sc"]
    assert sc["User"] == sc["Group"] == BUILDER
    assert unit["user"] == {
        "isSystemUser": True,
        "group": BUILDER,
        "home": "/var/lib/homelab-deploy-builder",
    }
    assert unit["groups"] == [BUILDER]
    assert sc["StateDirectory"] == BUILDER
    assert sc["Restart"] == "always"
    for key, value in {
        "NoNewPrivileges": True,
        "ProtectSystem": "strict",
        "ProtectHome": True,
        "PrivateTmp": True,
        "ProtectKernelTunables": True,
        "ProtectKernelModules": True,
        "ProtectControlGroups": True,
        "RestrictSUIDSGID": True,
        "LockPersonality": True,
        "RestrictRealtime": True,
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": 65536,  # not systemd's 1,024: nix evaluations inherit it
    }.items():
        assert sc[key] == value, key
    assert unit["wantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["after"]
    assert [p.split("-", 1)[1] for p in unit["path"]] == ["nix-2.28", "git-2.49"]
    assert unit["environment"]["FOO"] == "bar"
    assert unit["ports"] == []


def test_listener_and_builder_together(nix):
    cfg = host(
        listener=listener_config(metrics={"enable": True, "openFirewall": True}),
        builder=builder_config(
            configFile="/etc/hd.yaml",
            metrics={"enable": True, "address": "[::]:9200", "openFirewall": True},
        ),
    )
    result = nix.host(
        cfg,
        "{ ports = cfg.networking.firewall.allowedTCPPorts; services = builtins.attrNames svc; }",
    )
    assert sorted(result["ports"]) == [9200, 9972]
    assert result["services"] == [BUILDER, LISTENER]


def test_nothing_enabled_means_nothing_configured(nix):
    result = nix.host(
        {"services": {"homelab-deploy": {"listener": {"tier": "prod"}}}},
        """{
          services = builtins.attrNames svc;
          users = builtins.attrNames cfg.users.users;
          ports = cfg.networking.firewall.allowedTCPPorts;
          assertions = cfg.assertions;
        }""",
    )
    assert result == {"services": [], "users": [], "ports": [], "assertions": []}


# ------------------------------------------------------- wrong configurations


def test_tier_must_be_test_or_prod(nix):
    err = nix.host_error(host(listener=listener_config(tier="staging")))
    assert "services.homelab-deploy.listener.tier" in err
    assert "is not of type" in err


@pytest.mark.parametrize(
    "service, config",
    [
        ("listener", listener_config(timeout=-1)),
        ("builder", builder_config(configFile="/etc/hd.yaml", timeout=0)),
    ],
)
def test_timeout_must_be_positive(nix, service, config):
    err = nix.host_error(host(**{service: config}))
    assert f"services.homelab-deploy.{service}.timeout" in err
    assert "is not of type" in err


def test_builder_needs_config_file_or_repos_not_both(nix):
    both = builder_config(
        configFile="/etc/hd.yaml",
        settings={"repos": {"r": {"url": "git+https://example.com/r.git"}}},
    )
    err = nix.host_error(host(builder=both))
    assert "Failed assertions" in err
    assert "exactly one of configFile and settings.repos (both are set)" in err

    err = nix.host_error(host(builder=builder_config()))
    assert "exactly one of configFile and settings.repos (neither is set)" in err


def test_required_options(nix):
    listener = listener_config()
    del listener["natsUrl"]
    err = nix.host_error(host(listener=listener))
    assert "services.homelab-deploy.listener.natsUrl" in err
    assert re.search(r"used but not defined|no value defined", err)

    listener = listener_config()
    del listener["tier"]
    err = nix.host_error(host(listener=listener))
    assert "services.homelab-deploy.listener.tier" in err


def test_unknown_option_is_an_error(nix):
    err = nix.host_error(host(listener=listener_config(tiers="prod")))
    assert "services.homelab-deploy.listener.tiers" in err
    assert "does not exist" in err


@pytest.mark.parametrize(
    "config, message",
    [
        (host(listener=listener_config(hostname="web1.example.com")), "listener.hostname"),
        (host(listener=listener_config(role="dns.*")), "listener.role"),
        (host(listener=listener_config(deploySubjects=[])), "deploySubjects must not be empty"),
        (
            host(listener=listener_config(metrics={"enable": True, "address": "localhost"})),
            "listener.metrics.address",
        ),
        (
            host(builder=builder_config(settings={"repos": {"a.b": {"url": "git+https://e/x"}}})),
            "every repository name must be one NATS subject token",
        ),
        (
            host(builder=builder_config(configFile="/x", metrics={"enable": True, "address": ":70000"})),
            "builder.metrics.address",
        ),
    ],
)
def test_invalid_values_fail_assertions(nix, config, message):
    err = nix.host_error(config)
    assert "Failed assertions" in err
    assert message in err


# ------------------------------------------------------- package and flake


def flake_expr(select):
    return f"""
      let
        f = import (nixlib + "/eval-flake.nix") {{ inherit nixpkgsLib; }};
        out = f.outputs;
      in {select}
    """


LISTENER_DEPS = ["nats-py", "nkeys", "pyyaml", "prometheus-client"]


def test_package(nix):
    pkg = nix.eval(
        flake_expr("""
          let p = out.packages.x86_64-linux.default; in {
            inherit (p) pname version pyproject checkPhase pythonImportsCheck pythonRelaxDeps postInstall;
            buildInputs = map (d: d.name) p.nativeBuildInputs;
            mainProgram = p.meta.mainProgram;
            license = p.meta.license.spdxId;
            deps = map (d: d.pname) p.dependencies;
            buildSystem = map (d: d.pname) p.build-system;
            checkInputs = map (d: d.pname) p.nativeCheckInputs;
            same = p.outPath == out.packages.x86_64-linux.homelab-deploy.outPath;
          }
        """)
    )
    assert pkg["pname"] == "homelab-deploy"
    assert pkg["version"] == "0.1.0"
    assert pkg["pyproject"] is True
    assert pkg["mainProgram"] == "homelab-deploy"
    assert pkg["license"] == "MIT"
    assert sorted(pkg["deps"]) == sorted(LISTENER_DEPS)
    assert pkg["buildSystem"] == ["setuptools"]
    assert "pytest" in pkg["checkInputs"]
    assert 'pytest -m "not integration" test_homelab_deploy.py' in pkg["checkPhase"]
    assert pkg["pythonImportsCheck"] == ["homelab_deploy"]
    assert pkg["pythonRelaxDeps"] is True
    assert pkg["same"] is True
    assert "installManPage homelab-deploy.1" in pkg["postInstall"] and pkg["buildInputs"] == ["install-shell-files"]


def test_flake_outputs(nix):
    result = nix.eval(
        flake_expr("""{
          inputs = builtins.attrNames f.flake.inputs;
          nixpkgsUrl = f.flake.inputs.nixpkgs.url;
          systems = builtins.attrNames out.packages;
          modules = builtins.attrNames out.nixosModules;
          shell = map (p: p.name) out.devShells.x86_64-linux.default.packages;
          shellPython = map (p: p.pname) (builtins.head out.devShells.x86_64-linux.default.packages).packages;
          overlay = (out.overlays.default (f.pkgsFor "x86_64-linux") { }).homelab-deploy.pname;
        }""")
    )
    assert result["inputs"] == ["nixpkgs"]
    assert result["nixpkgsUrl"] == "github:NixOS/nixpkgs/nixos-unstable"
    assert {"x86_64-linux", "aarch64-linux"} <= set(result["systems"])
    assert "default" in result["modules"]
    assert "nats-server" in result["shell"]
    assert {"nats-py", "nkeys", "pyyaml", "prometheus-client", "mcp", "pytest"} <= set(result["shellPython"])
    assert result["overlay"] == "homelab-deploy"


def test_flake_module_defaults_to_the_flakes_package(nix):
    prefix = '(import (nixlib + "/eval-flake.nix") { inherit nixpkgsLib; }).outputs.nixosModules.default'
    select = f"""{{
      exe = builtins.head (lib.splitString " " svc.{LISTENER}.serviceConfig.ExecStart);
      builderPackage = cfg.services.homelab-deploy.builder.package.outPath;
      flakePackage =
        (import (nixlib + "/eval-flake.nix") {{ inherit nixpkgsLib; }}).outputs.packages.x86_64-linux.default.outPath;
      hostPackage = (h.pkgs.callPackage (nixlib + "/../../default.nix") {{ }}).outPath;
    }}"""
    result = nix.host(host(listener=listener_config()), select, modules_prefix=prefix, with_module=False)
    assert result["flakePackage"] != result["hostPackage"]
    assert result["exe"] == result["flakePackage"] + "/bin/homelab-deploy"
    assert result["builderPackage"] == result["flakePackage"]

    # module.nix on its own builds the package with the host's pkgs.
    exe = nix.host(
        host(listener=listener_config()),
        f'builtins.head (lib.splitString " " svc.{LISTENER}.serviceConfig.ExecStart)',
    )
    assert exe == result["hostPackage"] + "/bin/homelab-deploy"

    # An explicit package wins over the flake's default.
    custom = listener_config(
        package=Nix(
            '{ type = "derivation"; name = "custom"; outPath = "/nix/store/cccccccccccccccccccccccccccccccc-custom"; '
            'meta.mainProgram = "homelab-deploy"; }'
        )
    )
    exe = nix.host(
        host(listener=custom),
        f'builtins.head (lib.splitString " " svc.{LISTENER}.serviceConfig.ExecStart)',
        modules_prefix=prefix,
        with_module=False,
    )
    assert exe == "/nix/store/cccccccccccccccccccccccccccccccc-custom/bin/homelab-deploy"


class TestMcpOnlyInTheMcpPackage:
    """The package hosts run has no MCP SDK in its closure; packages.<system>.mcp, for MCP clients, has it."""

    def test_flake_packages(self, nix):
        pkgs = nix.eval(
            flake_expr("""
          builtins.mapAttrs (_: p: { deps = map (d: d.pname) p.dependencies; imports = p.pythonImportsCheck; })
            { inherit (out.packages.x86_64-linux) default mcp; }
        """)
        )
        assert sorted(pkgs["default"]["deps"]) == sorted(LISTENER_DEPS)
        assert sorted(pkgs["mcp"]["deps"]) == sorted([*LISTENER_DEPS, "mcp"])
        assert pkgs["mcp"]["imports"] == ["homelab_deploy", "homelab_deploy_mcp"]

    @pytest.mark.parametrize("through_flake", [True, False], ids=["flake module", "module.nix"])
    def test_listener_and_builder_run_the_package_without_mcp(self, nix, through_flake):
        flake = '(import (nixlib + "/eval-flake.nix") { inherit nixpkgsLib; }).outputs'
        select = f"""let
          packages = if {to_nix(through_flake)} then {flake}.packages.x86_64-linux else {{
            default = h.pkgs.callPackage (nixlib + "/../../default.nix") {{ }};
            mcp = h.pkgs.callPackage (nixlib + "/../../default.nix") {{ withMcp = true; }};
          }};
        in {{
          exes = map (n: builtins.head (lib.splitString " " svc.${{n}}.serviceConfig.ExecStart))
            [ "{LISTENER}" "{BUILDER}" ];
          deps = map (r: map (d: d.pname) cfg.services.homelab-deploy.${{r}}.package.dependencies)
            [ "listener" "builder" ];
          lean = packages.default.outPath;
          mcp = packages.mcp.outPath;
        }}"""
        cfg = host(listener=listener_config(), builder=builder_config(configFile="/etc/hd.yaml"))
        result = nix.host(
            cfg,
            select,
            **({"modules_prefix": f"{flake}.nixosModules.default", "with_module": False} if through_flake else {}),
        )
        assert result["exes"] == [result["lean"] + "/bin/homelab-deploy"] * 2
        assert result["lean"] != result["mcp"]
        assert result["deps"] == [LISTENER_DEPS, LISTENER_DEPS]
