# Test harness: evaluates module.nix the way NixOS would, with the stand-in
# NixOS options of nixos-stub.nix and the stand-in pkgs of pkgs.nix.
#
#   nixpkgsLib  "" for the stand-in lib in this directory, or the path of a
#               real nixpkgs `lib` directory (the tests pass $NIXPKGS_LIB).
#   modules     extra modules: the host configuration under test.
#   withModule  whether to import ../../module.nix (false when `modules`
#               bring it in another way, e.g. the flake's nixosModules).
#
# `config` fails, like building a NixOS system does, when an assertion
# does not hold; `unchecked` is the configuration without that check.
{ nixpkgsLib ? "", modules ? [ ], withModule ? true }:
let
  lib = if nixpkgsLib == "" then import ./default.nix else import nixpkgsLib;
  pkgs = import ./pkgs.nix { inherit lib; };

  evaluated = lib.evalModules {
    modules = [ ./nixos-stub.nix ] ++ lib.optional withModule ../../module.nix ++ modules;
    specialArgs = { inherit pkgs; };
  };

  unchecked = evaluated.config;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) unchecked.assertions);
in
{
  inherit lib pkgs unchecked failed;
  config =
    if failed == [ ] then unchecked
    else throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failed}";
}
