# Test harness: calls flake.nix's `outputs` with a stand-in nixpkgs input
# (the lib of default.nix or $NIXPKGS_LIB, and pkgs.nix for every system),
# without fetching or locking anything.
{ nixpkgsLib ? "" }:
let
  lib = if nixpkgsLib == "" then import ./default.nix else import nixpkgsLib;
  flake = import ../../flake.nix;
  systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
  nixpkgs = {
    inherit lib;
    outPath = "/nix/store/00000000000000000000000000000000-nixpkgs";
    legacyPackages = lib.genAttrs systems (system: import ./pkgs.nix { inherit lib system; flavour = "flake-input"; });
  };
  self = outputs // {
    outPath = toString ../..;
    inputs = { inherit nixpkgs; };
  };
  outputs = flake.outputs { inherit self nixpkgs; };
in
{
  inherit flake outputs lib;
  pkgsFor = system: nixpkgs.legacyPackages.${system};
}
