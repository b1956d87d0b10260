# A stand-in for the few parts of nixpkgs' `pkgs` that default.nix,
# module.nix and flake.nix use.  Packages are fake derivations: attribute
# sets with `type = "derivation"` and an `outPath`, so they interpolate to
# "/nix/store/...-name" like real ones and pass `types.package`.  Nothing
# is ever built.
#
# `flavour` goes into the fake store hashes, so that packages of two
# different package sets (the host's and the flake's nixpkgs input in the
# flake tests) have different store paths, as they would for real.
{ lib, system ? "x86_64-linux", flavour ? "host" }:
let
  fakeDrv = name: attrs:
    let
      # Like a real store path, the hash covers the build's inputs: other dependencies, another path.
      inputs = "${flavour}-${system}-${name}-${builtins.toJSON (attrs.drvArgs or null)}";
    in
    {
      type = "derivation";
      inherit name system;
      outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" inputs)}-${name}";
    }
    // attrs;

  # A fake buildPythonApplication that keeps its arguments, so tests can
  # look at the dependencies, meta and check phase that default.nix sets.
  buildPythonApplication = args:
    fakeDrv "${args.pname}-${args.version}" (
      args
      // {
        meta = args.meta or { };
        drvArgs = removeAttrs args [ "src" ];
      }
    );

  python3Packages = {
    inherit buildPythonApplication;
    buildPythonPackage = buildPythonApplication;
  }
  // lib.genAttrs [
    "setuptools"
    "wheel"
    "nats-py"
    "nkeys"
    "pyyaml"
    "prometheus-client"
    "mcp"
    "pytest"
    "hypothesis"
    "pytestCheckHook"
  ] (n: fakeDrv "python3-${n}" { pname = n; });

  pkgs = {
    inherit lib python3Packages;
    stdenv.hostPlatform.system = system;

    callPackage = fn: overrides:
      let f = if builtins.isFunction fn then fn else import fn; in
      f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // overrides);

    writeText = name: text: builtins.toFile name text;

    python3 = fakeDrv "python3" {
      pkgs = python3Packages;
      withPackages = f: fakeDrv "python3-env" { packages = f python3Packages; };
    };
    mkShell = args: fakeDrv "nix-shell" args;

    nix = fakeDrv "nix-2.28" { meta.mainProgram = "nix"; };
    git = fakeDrv "git-2.49" { meta.mainProgram = "git"; };
    nixos-rebuild = fakeDrv "nixos-rebuild" { meta.mainProgram = "nixos-rebuild"; };
    nixos-rebuild-ng = fakeDrv "nixos-rebuild-ng" { meta.mainProgram = "nixos-rebuild"; };
    systemd = fakeDrv "systemd-257" { meta.mainProgram = "systemctl"; };
    coreutils = fakeDrv "coreutils-9.5" { };
    nats-server = fakeDrv "nats-server" { meta.mainProgram = "nats-server"; };
    installShellFiles = fakeDrv "install-shell-files" { };
  };
in
pkgs
