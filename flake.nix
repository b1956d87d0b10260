{
  description = "homelab-deploy: message-based deployment of NixOS configurations over NATS";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # `nix run` uses meta.mainProgram, so no separate `apps` are needed.
      packages = forAllSystems (pkgs: rec {
        homelab-deploy = pkgs.callPackage ./default.nix { };
        default = homelab-deploy;
        # For an MCP client (`homelab-deploy mcp`); hosts run the package without the MCP SDK.
        mcp = pkgs.callPackage ./default.nix { withMcp = true; };
      });

      overlays.default = final: _prev: {
        homelab-deploy = final.callPackage ./default.nix { };
      };

      # module.nix with this flake's package as the default `package` of the
      # listener and the builder (module.nix alone defaults to building the
      # same source with the host's nixpkgs).
      nixosModules.default =
        { lib, pkgs, ... }:
        let
          system = pkgs.stdenv.hostPlatform.system;
          flakePackage = self.packages.${system}.default or (pkgs.callPackage ./default.nix { });
        in
        {
          imports = [ ./module.nix ];
          config.services.homelab-deploy = {
            listener.package = lib.mkDefault flakePackage;
            builder.package = lib.mkDefault flakePackage;
          };
        };
      nixosModules.homelab-deploy = self.nixosModules.default;

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps: with ps; [
                nats-py
                nkeys
                pyyaml
                prometheus-client
                mcp
                pytest
                hypothesis
                setuptools
              ]
            ))
            pkgs.nats-server
          ];
        };
      });
    };
}
