# Nix package of homelab-deploy, built from setup.cfg with setuptools.
#
#   nix-build -E 'with import <nixpkgs> { }; callPackage ./default.nix { }'
#
# The flake (flake.nix) exposes it as packages.<system>.default, and with
# withMcp = true (the MCP server's SDK and its ~25 dependencies) as
# packages.<system>.mcp; the listener and builder run the one without.
{ lib, python3Packages, installShellFiles, withMcp ? false }:

python3Packages.buildPythonApplication {
  pname = "homelab-deploy";
  version = "0.1.0";
  pyproject = true;

  # cleanSource drops .git, result links and editor droppings.
  src = lib.cleanSource ./.;

  build-system = with python3Packages; [ setuptools ];

  # homelab-deploy.1 is generated from the CLI's parser (bash .ci/manpage) and committed.
  nativeBuildInputs = [ installShellFiles ];
  postInstall = ''
    installManPage homelab-deploy.1
  '';

  dependencies = with python3Packages; [
    nats-py
    nkeys
    pyyaml
    prometheus-client
  ] ++ lib.optional withMcp mcp;

  # The version bounds in setup.cfg are for pip; nixpkgs supplies one
  # consistent set, which may trail PyPI by a release.  The import check and
  # the unit tests below still catch a real incompatibility.
  pythonRelaxDeps = true;

  nativeCheckInputs = with python3Packages; [
    pytest
    hypothesis
  ];

  # The unit tests only: the integration tests need a NATS server, a
  # working nix and more, none of which the build sandbox has.
  checkPhase = ''
    runHook preCheck
    pytest -m "not integration" test_homelab_deploy.py
    runHook postCheck
  '';

  pythonImportsCheck = [ "homelab_deploy" ] ++ lib.optional withMcp "homelab_deploy_mcp";

  meta = {
    description = "Message-based deployment of NixOS configurations over NATS";
    license = lib.licenses.mit;
    mainProgram = "homelab-deploy";
    platforms = lib.platforms.unix;
  };
}
