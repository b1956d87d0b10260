# Stand-ins for the few NixOS options that module.nix reads or defines.
# The types follow NixOS closely enough that a misspelt attribute (for
# example `restartIfChange`) or a wrongly typed value is an evaluation
# error here too: systemd units and users are submodules with a fixed set
# of options, not free-form attribute sets.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;

  unitAtom = types.oneOf [ types.bool types.int types.str types.path types.package ];
  unitOption = types.either unitAtom (types.listOf unitAtom);

  serviceModule = {
    options = {
      description = mkOption { type = types.str; default = ""; };
      documentation = mkOption { type = types.listOf types.str; default = [ ]; };
      wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
      requiredBy = mkOption { type = types.listOf types.str; default = [ ]; };
      wants = mkOption { type = types.listOf types.str; default = [ ]; };
      requires = mkOption { type = types.listOf types.str; default = [ ]; };
      after = mkOption { type = types.listOf types.str; default = [ ]; };
      before = mkOption { type = types.listOf types.str; default = [ ]; };
      path = mkOption { type = types.listOf (types.either types.package types.str); default = [ ]; };
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
      };
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      startLimitIntervalSec = mkOption { type = types.nullOr types.int; default = null; };
      startLimitBurst = mkOption { type = types.nullOr types.int; default = null; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      reloadIfChanged = mkOption { type = types.bool; default = false; };
      stopIfChanged = mkOption { type = types.bool; default = true; };
      restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      script = mkOption { type = types.lines; default = ""; };
      preStart = mkOption { type = types.lines; default = ""; };
    };
  };

  userModule = {
    options = {
      isSystemUser = mkOption { type = types.bool; default = false; };
      isNormalUser = mkOption { type = types.bool; default = false; };
      group = mkOption { type = types.str; default = ""; };
      extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
      description = mkOption { type = types.str; default = ""; };
      home = mkOption { type = types.path; default = "/var/empty"; };
      createHome = mkOption { type = types.bool; default = false; };
      shell = mkOption { type = types.nullOr (types.either types.package types.path); default = null; };
    };
  };

  groupModule = {
    options.members = mkOption { type = types.listOf types.str; default = [ ]; };
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.attrs;
      default = [ ];
      description = "Assertions checked before the system is built.";
    };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };

    networking.hostName = mkOption { type = types.str; default = "nixos"; };
    networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    networking.firewall.allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };

    nix.package = mkOption { type = types.package; default = pkgs.nix; };

    # In NixOS this is a lazy attribute set filled by many modules;
    # installer/tools/tools.nix puts nixos-rebuild there.
    system.build = mkOption { type = types.attrs; default = { }; };

    systemd.package = mkOption { type = types.package; default = pkgs.systemd; };
    systemd.services = mkOption { type = types.attrsOf (types.submodule serviceModule); default = { }; };

    users.users = mkOption { type = types.attrsOf (types.submodule userModule); default = { }; };
    users.groups = mkOption { type = types.attrsOf (types.submodule groupModule); default = { }; };
  };

  # Like NixOS (installer/tools/tools.nix), which puts its own build of
  # nixos-rebuild (nowadays nixos-rebuild-ng) here.
  config = {
    system.build.nixos-rebuild = pkgs.nixos-rebuild-ng;
  };
}
