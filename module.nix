# NixOS module for homelab-deploy.
#
#   services.homelab-deploy.listener  runs on every NixOS host: it listens on
#     NATS for deployment requests and runs `nixos-rebuild` for this host.
#   services.homelab-deploy.builder   runs on one build host: it listens on
#     NATS for build requests and runs `nix build` for the configured repos.
#
# Where the package comes from: this file is an ordinary NixOS module, so it
# also works without flakes (`imports = [ "${homelab-deploy-src}/module.nix" ];`).
# Used that way, both `package` options default to
# `pkgs.callPackage ./default.nix { }`, i.e. this source tree built with the
# host's own nixpkgs.  The flake's `nixosModules.default` imports this file
# and sets both `package` options with `lib.mkDefault` to the flake's own
# `packages.<system>.default` (the spec's "default: from flake").  Setting
# `package` in a host configuration overrides either.
{ config, lib, pkgs, ... }:

let
  inherit (lib) literalExpression mkEnableOption mkIf mkMerge mkOption types;

  lcfg = config.services.homelab-deploy.listener;
  bcfg = config.services.homelab-deploy.builder;

  builderUser = "homelab-deploy-builder";
  builderStateDir = "/var/lib/${builderUser}";

  # Quote one argument for a systemd ExecStart= line.  Words made of plain
  # characters are left bare.  Anything else becomes a double-quoted string:
  # builtins.toJSON escapes `"`, `\` and control characters in a form that
  # systemd's own unquoting understands, and "%" and "$" are doubled so that
  # systemd expands neither unit specifiers nor environment variables in
  # them.  (POSIX shell quoting, as lib.escapeShellArgs does it, is not
  # enough for systemd: it leaves `%` and `$` alone.)
  systemdArg = arg:
    let s = toString arg; in
    if builtins.match "[A-Za-z0-9_./:@,+=-]+" s != null then s
    else builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
  systemdCommand = args: lib.concatStringsSep " " (map systemdArg args);

  # The TCP port of a listen address such as ":9972", "127.0.0.1:9972" or
  # "[::]:9972" (whatever follows the last ":"), or null if there is none.
  portOf = address:
    let m = builtins.match ".*:(0|[1-9][0-9]{0,4})" address; in
    if m == null then null else builtins.fromJSON (builtins.head m);
  validPort = address:
    let p = portOf address; in p != null && p >= 1 && p <= 65535;

  # One NATS subject token: no ".", no wildcards, no whitespace.
  isSubjectToken = s: builtins.match "[^.*>[:space:]]+" s != null;

  # Both services call `nix` with flake references; make sure the two
  # experimental features they need are on even if the host's nix.conf does
  # not enable them (nixos-rebuild passes them itself, nix build does not).
  # A NIX_CONFIG in the `environment` option replaces this.
  nixEnvironment = { NIX_CONFIG = "extra-experimental-features = nix-command flakes"; };

  packageOption = role: mkOption {
    type = types.package;
    default = pkgs.callPackage ./default.nix { };
    defaultText = lib.literalMD ''
      `homelab-deploy.packages.<system>.default` when imported through the
      flake's `nixosModules.default`, else `pkgs.callPackage ./default.nix { }`
    '';
    description = "The homelab-deploy package the ${role} runs.";
  };

  metricsOptions = what: defaultAddress: {
    enable = mkEnableOption "the Prometheus metrics endpoint (`/metrics` and `/health`) of the ${what}";
    address = mkOption {
      type = types.str;
      default = defaultAddress;
      example = "127.0.0.1${defaultAddress}";
      description = ''
        Address the metrics HTTP server listens on, as `[host]:port`;
        `${defaultAddress}` means the port on all addresses.
      '';
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether to open the metrics port (the part of `address` after the
        last `:`) in the firewall.  Only has an effect when `enable` is set.
      '';
    };
  };

  environmentOption = what: mkOption {
    type = types.attrsOf types.str;
    default = { };
    example = { HTTPS_PROXY = "http://proxy.example.com:3128"; };
    description = "Additional environment variables for the ${what} service.";
  };

  allowAnyRefOption = what: verb: mkOption {
    type = types.bool;
    default = false;
    description = ''
      Whether the ${what} may ${verb} any git ref a request names, such as
      `refs/pull/1/head` (a pull request nobody merged).  By default only
      branches (a plain name or `refs/heads/...`), tags (`refs/tags/...`)
      and 40-hex commits are accepted.
    '';
  };

  extraArgsOption = what: mkOption {
    type = types.listOf types.str;
    default = [ ];
    example = [ "--debug" ];
    description = "Extra command-line arguments appended to `homelab-deploy ${what}`.";
  };

  nkeyFileOption = what: mkOption {
    type = types.path;
    example = "/run/secrets/homelab-deploy-${what}-nkey";
    description = ''
      Path to the NKey seed file (a line starting with `SU`) the ${what} uses
      to authenticate to NATS.  Give it as a string, such as the path a
      secrets manager (sops-nix, agenix) puts the file at: a Nix path literal
      would put the secret into the world-readable Nix store.
    '';
  };

  listenerCommand = systemdCommand (
    [
      (lib.getExe lcfg.package)
      "listener"
      "--hostname" lcfg.hostname
      "--tier" lcfg.tier
      "--nats-url" lcfg.natsUrl
      "--nkey-file" (toString lcfg.nkeyFile)
      "--flake-url" lcfg.flakeUrl
      "--timeout" (toString lcfg.timeout)
      "--rollback-timeout" (toString lcfg.rollbackTimeout)
    ]
    ++ lib.optionals (lcfg.role != null) [ "--role" lcfg.role ]
    ++ lib.concatMap (subject: [ "--deploy-subject" subject ]) lcfg.deploySubjects
    ++ [ "--discover-subject" lcfg.discoverSubject ]
    # Exit after reporting a successful switch; Restart=always starts the new unit (see restartIfChanged).
    ++ [ "--restart-after-switch" ]
    ++ lib.optionals lcfg.requireSigned [ "--require-signed" ]
    ++ lib.optionals lcfg.allowAnyRef [ "--allow-any-ref" ]
    ++ lib.concatMap (key: [ "--trusted-key" key ]) lcfg.trustedKeys
    ++ lib.optionals (lcfg.trustedKeysFile != null) [ "--trusted-keys-file" (toString lcfg.trustedKeysFile) ]
    ++ lib.concatMap (check: [ "--health-check" check ]) lcfg.healthChecks
    ++ [ "--failed-units-check" (if lcfg.healthCheckFailedUnits then "on" else "off") ]
    ++ lib.concatMap (window: [ "--maintenance-window" window ]) lcfg.maintenanceWindows
    ++ lib.optionals (lcfg.rebootCommand != null) [ "--reboot-command" lcfg.rebootCommand ]
    ++ lib.optionals lcfg.metrics.enable [ "--metrics-enabled" "--metrics-addr" lcfg.metrics.address ]
    ++ lcfg.extraArgs
  );

  # The repos of `settings` as the builder's configuration file.  JSON is
  # valid YAML, so builtins.toJSON writes it.  Only the known fields are
  # taken: submodule values can carry internal attributes (`_module`).
  generatedBuilderConfig = pkgs.writeText "homelab-deploy-builder.yaml" (builtins.toJSON ({
    repos = lib.mapAttrs (_: repo: { inherit (repo) url default_branch; }
      // (if repo.trusted_keys != [ ] then { inherit (repo) trusted_keys; } else { })
      // (if repo.cache != null then { inherit (repo) cache; } else { })
      // (if repo.cacheSecretKey != null then { cache_secret_key = repo.cacheSecretKey; } else { })) bcfg.settings.repos;
  } // (if bcfg.settings.trusted_keys != [ ] then { inherit (bcfg.settings) trusted_keys; } else { })));

  builderConfigFile =
    if bcfg.configFile != null then "${bcfg.configFile}" else generatedBuilderConfig;

  # The NKey seed reaches the (unprivileged) builder as a systemd credential:
  # systemd reads `nkeyFile` as root and hands the service a private copy in
  # $CREDENTIALS_DIRECTORY, `%d` in ExecStart, so the secret can stay
  # root-only.  `%d/nkey` is added unquoted so that systemd expands it.
  builderCommand = lib.concatStringsSep " " [
    (systemdCommand [ (lib.getExe bcfg.package) "builder" "--nats-url" bcfg.natsUrl "--nkey-file" ])
    "%d/nkey"
    (systemdCommand (
      [ "--config" builderConfigFile "--timeout" (toString bcfg.timeout) ]
      ++ lib.optionals bcfg.allowAnyRef [ "--allow-any-ref" ]
      ++ lib.optionals bcfg.metrics.enable [ "--metrics-enabled" "--metrics-addr" bcfg.metrics.address ]
      ++ bcfg.extraArgs
    ))
  ];

  repoModule = { name, ... }: {
    options = {
      url = mkOption {
        type = types.str;
        example = "git+https://git.example.com/org/nixos-servers.git";
        description = "Flake URL of the repository `${name}` (without `?ref=`; the branch is added per request).";
      };
      default_branch = mkOption {
        type = types.str;
        default = "master";
        example = "main";
        description = "Branch built when a build request names none.";
      };
      trusted_keys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "UAOS...=ci" ];
        description = ''
          NKey user public keys (`PUBKEY[=NAME]`) trusted to build `${name}`
          only, on top of `settings.trusted_keys` (trusted for every repo).
        '';
      };
      cache = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "file:///var/cache/nix-fleet";
        description = ''
          Nix store URL (file://, s3://, ssh://, ssh-ng://, http(s)://) each
          host's built system of `${name}` is copied to with `nix copy --to`;
          a failed copy fails that host.  Hosts deployed with
          `deploy --from-build` fetch it from there: list it in their
          `nix.settings.substituters` and its public key in
          `nix.settings.trusted-public-keys`.
        '';
      };
      cacheSecretKey = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/homelab-deploy-builder/cache-key.sec";
        description = ''
          Path (a string, so the secret never enters the store) of a key file
          made by `nix key generate-secret --key-name NAME`, readable by the
          builder's user; each built system is signed with it
          (`nix store sign`) before the copy.  Needs `cache`.
        '';
      };
    };
  };
in
{
  options.services.homelab-deploy.listener = {
    enable = mkEnableOption "the homelab-deploy listener, which runs `nixos-rebuild` on this host when a deployment request arrives over NATS";

    package = packageOption "listener";

    hostname = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = ''
        Name of this host: substituted for `<hostname>` in the subject
        templates, reported in responses, and used as the attribute of
        `nixosConfigurations` that `nixos-rebuild` builds from `flakeUrl`.
      '';
    };

    tier = mkOption {
      type = types.enum [ "test" "prod" ];
      example = "prod";
      description = "Deployment tier of this host, substituted for `<tier>` in the subject templates.";
    };

    role = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "dns";
      description = ''
        Role of this host for role-based targeting, substituted for `<role>`
        in the subject templates.  With no role, subjects that contain
        `<role>` are not subscribed to.
      '';
    };

    natsUrl = mkOption {
      type = types.str;
      example = "nats://nats.example.com:4222";
      description = "URL of the NATS server.";
    };

    nkeyFile = nkeyFileOption "listener";

    flakeUrl = mkOption {
      type = types.str;
      example = "git+https://git.example.com/user/nixos-configs.git";
      description = ''
        Git flake URL `nixos-rebuild` builds this host's configuration from;
        the requested branch or commit is added as `ref=`/`rev=`, so the URL
        must not carry either (the listener refuses to start).
      '';
    };

    timeout = mkOption {
      type = types.ints.positive;
      default = 600;
      description = "Deployment timeout in seconds; a `nixos-rebuild` running longer is killed.";
    };

    rollbackTimeout = mkOption {
      type = types.ints.unsigned;
      default = 120;
      description = ''
        Seconds after a `switch` or `test` within which the listener on the
        new system must reach NATS and complete a round trip through the
        server; otherwise a watchdog (a transient systemd unit, started with
        `systemd-run`) rolls the host back and the requester gets `failed`
        with error `rolled_back`.  0 turns automatic rollback off.  See
        docs/operations.md, "Automatic rollback".
      '';
    };

    healthChecks = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "curl -fsS http://127.0.0.1:8080/health" "systemctl is-active nginx.service" ];
      description = ''
        Commands the listener runs, in order, after a `switch` or `test`
        and before it confirms it; each is split into words as a shell
        would, but never run by a shell.  One that exits non-zero, or runs
        longer than `--health-timeout` (60 s; set it with `extraArgs`), rolls
        the host back at once and the requester gets `failed` with error
        `health_check_failed`.  Needs `rollbackTimeout` above 0.
      '';
    };

    healthCheckFailedUnits = mkOption {
      type = types.bool;
      default = true;
      description = ''
        After a `switch` or `test`, with `rollbackTimeout` above 0: a unit
        that `systemctl --failed` lists fails the health checks (named in the
        message, `failed units: a.service, b.service`) and rolls the host
        back at once.  A unit that had failed before the deploy counts too;
        `systemctl reset-failed UNIT` clears it.
      '';
    };

    maintenanceWindows = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "Sat 02:00-05:00" "daily 03:00-04:00" ];
      description = ''
        When the listener carries out `homelab-deploy reboot` requests, in
        the host's local time: `DAY HH:MM-HH:MM`, DAY one of `daily`, `Mon`
        ... `Sun` (an end before the start runs past midnight).  A reboot
        requested outside every window is answered `accepted` saying when
        the next one opens, kept in the state directory (across restarts)
        and run then; `reboot --now` runs it at once.  Empty: at once.
        A malformed window stops the listener at start, naming the format.
      '';
    };

    rebootCommand = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "systemctl kexec";
      description = ''
        What a reboot request runs, split into words as a shell would but
        never run by one; null: the listener's default, `systemctl reboot`.
      '';
    };

    deploySubjects = mkOption {
      type = types.listOf types.str;
      default = [
        "deploy.<tier>.<hostname>"
        "deploy.<tier>.all"
        "deploy.<tier>.role.<role>"
      ];
      description = ''
        NATS subjects to receive deployment requests on.  `<hostname>`,
        `<tier>` and `<role>` are replaced by the listener at startup;
        subjects containing `<role>` are skipped when `role` is null.
      '';
    };

    discoverSubject = mkOption {
      type = types.str;
      default = "deploy.discover";
      description = "NATS subject on which the listener answers discovery requests.";
    };

    allowAnyRef = allowAnyRefOption "listener" "deploy";

    trustedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "UAOSFNKWGLYFMICPCOXKPHA6AJTQMNMKSJ7JZG655Q7OMOEDJDPFL7B5=alice" ];
      description = ''
        NKey user public keys, as `PUBKEY` or `PUBKEY=NAME`, whose signed
        requests this host acts on; any other request is rejected with error
        `unauthorized`.  Empty (and no `trustedKeysFile`): every deploy is
        rejected `unauthorized`, unless `requireSigned = false`.  `homelab-deploy
        nats-config` prints each host's keys.  See docs/security.md,
        "Signed requests and audit".
      '';
    };

    requireSigned = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Act only on signed requests: a host without `trustedKeys` (or
        `trustedKeysFile`) answers every deploy `rejected`/`unauthorized`
        naming this option.  `false`: such a host acts on any request NATS
        delivers (the upstream tool's behaviour), warns at every start, and
        `homelab-deploy status` marks it `unsigned`.
      '';
    };

    trustedKeysFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/homelab-deploy/trusted.keys";
      description = ''
        A file of more trusted keys, one `PUBKEY[=NAME]` per line (`#`
        comments), as `homelab-deploy nats-config --trusted-keys-dir` writes
        them.
      '';
    };

    environment = environmentOption "listener";

    metrics = metricsOptions "listener" ":9972";

    extraArgs = extraArgsOption "listener";
  };

  options.services.homelab-deploy.builder = {
    enable = mkEnableOption "the homelab-deploy builder, which pre-builds the NixOS configurations of the configured repositories when a build request arrives over NATS";

    package = packageOption "builder";

    natsUrl = mkOption {
      type = types.str;
      example = "nats://nats.example.com:4222";
      description = "URL of the NATS server.";
    };

    nkeyFile = nkeyFileOption "builder";

    configFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/homelab-deploy/builder.yaml";
      description = ''
        Path to the builder's YAML configuration file (the `repos` it may
        build).  Set either this or `settings.repos`, not both.
      '';
    };

    settings = mkOption {
      type = types.submodule {
        options.repos = mkOption {
          type = types.attrsOf (types.submodule repoModule);
          default = { };
          example = literalExpression ''
            {
              nixos-servers = {
                url = "git+https://git.example.com/org/nixos-servers.git";
                default_branch = "master";
              };
            }
          '';
          description = ''
            Repositories the builder accepts build requests for, by name (the
            `<repo>` of `build.<repo>.<target>`; one NATS subject token).
          '';
        };
        options.trusted_keys = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = ''
            NKey user public keys (`PUBKEY[=NAME]`) whose signed build
            requests the builder acts on; empty: any request NATS delivers.
          '';
        };
      };
      default = { };
      description = ''
        Builder configuration, written to a generated configuration file
        when `configFile` is null.  Set either `settings.repos` or
        `configFile`, not both.
      '';
    };

    timeout = mkOption {
      type = types.ints.positive;
      default = 1800;
      description = "Build timeout per host in seconds.";
    };

    allowAnyRef = allowAnyRefOption "builder" "build";

    environment = environmentOption "builder";

    metrics = metricsOptions "builder" ":9973";

    extraArgs = extraArgsOption "builder";
  };

  config = mkMerge [
    (mkIf lcfg.enable {
      assertions = [
        {
          assertion = isSubjectToken lcfg.hostname;
          message = "services.homelab-deploy.listener.hostname (${builtins.toJSON lcfg.hostname}) must be one NATS subject token: no '.', '*', '>' or whitespace.";
        }
        {
          assertion = lcfg.role == null || isSubjectToken lcfg.role;
          message = "services.homelab-deploy.listener.role (${builtins.toJSON lcfg.role}) must be one NATS subject token: no '.', '*', '>' or whitespace.";
        }
        {
          assertion = lcfg.healthChecks == [ ] || lcfg.rollbackTimeout > 0;
          message = "services.homelab-deploy.listener.healthChecks needs the rollback watchdog: set rollbackTimeout above 0 (e.g. 120), or healthChecks = [ ].";
        }
        {
          assertion = lcfg.deploySubjects != [ ];
          message = "services.homelab-deploy.listener.deploySubjects must not be empty.";
        }
        {
          assertion = !lcfg.metrics.enable || validPort lcfg.metrics.address;
          message = "services.homelab-deploy.listener.metrics.address (${builtins.toJSON lcfg.metrics.address}) must end in :<port>, with a port from 1 to 65535.";
        }
      ];

      systemd.services.homelab-deploy-listener = {
        description = "homelab-deploy listener (NATS-triggered nixos-rebuild)";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        path = [
          config.nix.package
          pkgs.git
          (config.system.build.nixos-rebuild or pkgs.nixos-rebuild)
          # systemd-run: the rollback watchdog runs as a transient unit, outside this service's cgroup
          config.systemd.package
        ];
        environment = nixEnvironment // lcfg.environment;

        # Deploying a new homelab-deploy (or just a changed listener unit)
        # must not kill the deployment that installs it.  `nixos-rebuild
        # switch` runs as a child of this service, and by default
        # switch-to-configuration restarts (or stops, then starts) every
        # unit whose definition changed; systemd would then kill the whole
        # service, nixos-rebuild included, halfway through activation, and
        # the listener could never report the result.  With
        # restartIfChanged = false switch-to-configuration leaves the
        # running listener alone (it only logs "NOT restarting ...");
        # stopIfChanged = false says the same for the stop-then-start
        # variant.  The new unit and package are picked up by the listener
        # itself: after a successful switch it publishes `completed` first
        # and then restarts into the new version (it exits and systemd's
        # Restart=always starts the new unit).  If the unit is removed
        # altogether (listener disabled), switch-to-configuration still
        # stops it.
        restartIfChanged = false;
        stopIfChanged = false;

        serviceConfig = {
          Type = "simple";
          ExecStart = listenerCommand;
          # `systemctl reload`: the listener reads its trusted keys (trustedKeysFile) anew; a bad file keeps the old.
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          # Runs as root: nixos-rebuild switch needs it.
          Restart = "always";
          RestartSec = 5;
          # The in-flight deploy record ($STATE_DIRECTORY), reported after a crash or kill.
          StateDirectory = "homelab-deploy";
          StateDirectoryMode = "0700";
          # SIGTERM lets a running deploy finish for up to 60 s (--shutdown-grace) before it is killed.
          TimeoutStopSec = 90;
          # Headroom for nixos-rebuild and nix, which inherit it; the metrics port takes 33 descriptors at most.
          LimitNOFILE = 65536;
        };
      };

      networking.firewall.allowedTCPPorts =
        mkIf (lcfg.metrics.enable && lcfg.metrics.openFirewall && validPort lcfg.metrics.address)
          [ (portOf lcfg.metrics.address) ];
    })

    (mkIf bcfg.enable {
      assertions = [
        {
          assertion = (bcfg.configFile != null) != (bcfg.settings.repos != { });
          message =
            "services.homelab-deploy.builder: set exactly one of configFile and settings.repos "
            + (if bcfg.configFile != null then "(both are set)." else "(neither is set).");
        }
        {
          assertion = lib.all isSubjectToken (lib.attrNames bcfg.settings.repos);
          message = "services.homelab-deploy.builder.settings.repos: every repository name must be one NATS subject token: no '.', '*', '>' or whitespace.";
        }
        {
          assertion = !bcfg.metrics.enable || validPort bcfg.metrics.address;
          message = "services.homelab-deploy.builder.metrics.address (${builtins.toJSON bcfg.metrics.address}) must end in :<port>, with a port from 1 to 65535.";
        }
      ];

      users.users.${builderUser} = {
        isSystemUser = true;
        group = builderUser;
        description = "homelab-deploy builder";
        # Created by StateDirectory below; nix keeps its caches under
        # ~/.cache here, and ~/.ssh can hold a key for git+ssh:// repos.
        home = builderStateDir;
      };
      users.groups.${builderUser} = { };

      systemd.services.homelab-deploy-builder = {
        description = "homelab-deploy builder (NATS-triggered nix build)";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        path = [ config.nix.package pkgs.git ];
        environment = nixEnvironment // bcfg.environment;

        serviceConfig = {
          Type = "simple";
          ExecStart = builderCommand;
          # `systemctl reload`: the builder reads its repos' trusted keys anew from its config file.
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          Restart = "always";
          RestartSec = 5;

          User = builderUser;
          Group = builderUser;
          StateDirectory = builderUser;
          StateDirectoryMode = "0750";
          WorkingDirectory = builderStateDir;
          LoadCredential = [ "nkey:${toString bcfg.nkeyFile}" ];
          # Headroom for nix evaluations, which inherit it; the metrics port takes 33 descriptors at most.
          LimitNOFILE = 65536;

          # Builds themselves run in the nix daemon; this process only
          # evaluates, fetches and talks to NATS and the daemon socket.
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictSUIDSGID = true;
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
          LockPersonality = true;
          SystemCallArchitectures = "native";
          UMask = "0077";
        };
      };

      networking.firewall.allowedTCPPorts =
        mkIf (bcfg.metrics.enable && bcfg.metrics.openFirewall && validPort bcfg.metrics.address)
          [ (portOf bcfg.metrics.address) ];
    })
  ];
}
