# fleetcache as a flake: the binaries, the overlay with the llama.cpp variants, the NixOS
# modules, and checks. A fleet uses it as an input and makes it follow its own pins:
#
#   inputs.fleetcache = {
#     url = "git+https://git.example.org/ops/fleetcache";
#     inputs.llama-cpp.follows = "llama-cpp";
#   };
#
# (Let `nixpkgs` follow too only if the fleet's nixpkgs has rustc 1.94.1 or later, the lock's
# minimum (`scripts/check-msrv`): NixOS 26.05 and later.)
{
  description = "fleetcache: a Nix binary cache and build orchestrator for a NixOS fleet's hardware variants";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    llama-cpp = {
      url = "github:ggml-org/llama.cpp";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      llama-cpp,
    }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # A service module with its package defaulting to this flake's build.
      service =
        name: file:
        {
          key = "fleetcache#nixosModules.${name}";
          _file = "${toString ./flake.nix}#nixosModules.${name}";
          imports = [
            file
            (
              { pkgs, ... }:
              {
                services.fleetcache.${name}.package =
                  lib.mkDefault
                    self.packages.${pkgs.stdenv.hostPlatform.system}.default;
              }
            )
          ];
        };
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          fleetcache = pkgs.callPackage ./nix/package.nix { };
          # One build, one package per program (for `nix run .#cache-server` and `lib.getExe`).
          program =
            name:
            pkgs.runCommand "fleetcache-${name}-${fleetcache.version}"
              {
                meta = fleetcache.meta // {
                  mainProgram = name;
                };
              }
              ''
                mkdir -p $out/bin
                ln -s ${fleetcache}/bin/${name} $out/bin/${name}
              '';
        in
        {
          default = fleetcache;
          orchestrator = program "orchestrator";
          cache-server = program "cache-server";
          builder = program "builder";
          # deploy/s3/garage-setup, for `nix run .#garage-setup` on the host that runs Garage
          # (services.garage puts `garage` on its PATH; GARAGE names another).
          garage-setup =
            pkgs.runCommand "garage-setup"
              {
                meta.mainProgram = "garage-setup";
                meta.description = "gives a fresh Garage node its role, the cache's bucket and cache-server's key";
              }
              ''
                mkdir -p $out/bin
                cp ${./deploy/s3/garage-setup} $out/bin/garage-setup
                chmod +x $out/bin/garage-setup
              '';
        }
      );

      overlays.default = import ./nix/overlay.nix llama-cpp;

      nixosModules = {
        client = {
          key = "fleetcache#nixosModules.client";
          _file = "${toString ./flake.nix}#nixosModules.client";
          imports = [
            ./nixos-modules/client.nix
            (
              { pkgs, ... }:
              {
                # What push.enable uploads with.
                services.fleetcache.client.push.package =
                  lib.mkDefault
                    self.packages.${pkgs.stdenv.hostPlatform.system}.default;
              }
            )
          ];
          nixpkgs.overlays = [ self.overlays.default ];
        };
        cache-server = service "cache-server" ./nixos-modules/cache-server.nix;
        builder = service "builder" ./nixos-modules/builder.nix;
        orchestrator = service "orchestrator" ./nixos-modules/orchestrator.nix;
        default = {
          key = "fleetcache#nixosModules.default";
          imports = with self.nixosModules; [
            client
            cache-server
            builder
            orchestrator
          ];
        };
      };

      checks = forAllSystems (
        pkgs:
        {
          inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) default;
          modules = import ./nix/module-check.nix { inherit self nixpkgs pkgs; };
        }
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
          vm = pkgs.testers.runNixOSTest (import ./nix/vm-test.nix { inherit self; });
        }
      );
    };
}
