# An example fleet: four machines that run llama.cpp on different hardware, the cache host, and
# a GPU build machine, all pinned by this flake's lock file. fleetcache builds exactly what the
# machines install (see fleetcache.toml) and they substitute it from the fleet's cache.
#
#   carbon     NVIDIA GPU    llama-cpp-cuda
#   beryllium  CPU           llama-cpp (CPU backend chosen at run time)
#   boron      CPU           llama-cpp
#   nitrogen   AMD/Intel GPU llama-cpp-vulkan
#   cache      cache-server (on Garage), orchestrator, a CPU builder
#   forge1     builder with an NVIDIA GPU: builds and verifies the CUDA variant
{
  description = "example NixOS fleet using fleetcache";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    llama-cpp = {
      url = "github:ggml-org/llama.cpp";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    fleetcache = {
      # Where you keep fleetcache; the machines get its overlay and modules from it.
      url = "git+https://git.example.org/ops/fleetcache";
      inputs.nixpkgs.follows = "nixpkgs";
      inputs.llama-cpp.follows = "llama-cpp";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      llama-cpp,
      fleetcache,
    }:
    let
      machine =
        name: modules:
        nixpkgs.lib.nixosSystem {
          system = "x86_64-linux";
          modules = [
            fleetcache.nixosModules.default
            ./machines/common.nix
            { networking.hostName = name; }
          ] ++ modules;
        };
    in
    {
      nixosConfigurations = {
        carbon = machine "carbon" [ ./machines/carbon.nix ];
        beryllium = machine "beryllium" [ { services.fleetcache.client.variant = "cpu"; } ];
        boron = machine "boron" [ { services.fleetcache.client.variant = "cpu"; } ];
        nitrogen = machine "nitrogen" [ ./machines/nitrogen.nix ];
        cache = machine "cache" [ ./machines/cache.nix ];
        forge1 = machine "forge1" [ ./machines/forge1.nix ];
      };
    };
}
