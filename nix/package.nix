# fleetcache's three binaries (orchestrator, cache-server, builder) from this workspace and its
# committed Cargo.lock. Needs rustc 1.94.1 or later (what the locked AWS SDK asks for; checked by
# scripts/check-msrv): NixOS 26.05 or newer.
#
# The test suite is not run here: its end-to-end tests start Nix, Garage and PostgreSQL
# (`scripts/test` runs it).
{
  lib,
  rustPlatform,
}:
let
  workspace = (lib.importTOML ../Cargo.toml).workspace.package;
in
rustPlatform.buildRustPackage {
  pname = "fleetcache";
  inherit (workspace) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../rustfmt.toml
      ../nix-formats
      ../cache-protocol
      ../cache-server
      ../builder
      ../orchestrator
      ../tests
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "--package=cache-server"
    "--package=builder"
    "--package=orchestrator"
  ];
  doCheck = false;

  meta = {
    description = "Nix binary cache and build orchestrator for a NixOS fleet's hardware variants";
    license = with lib.licenses; [
      mit
      asl20
    ];
    platforms = lib.platforms.linux;
    mainProgram = "orchestrator";
  };
}
