# A quick check of the NixOS modules with the real nixpkgs (`checks.<system>.modules`; no VM,
# no KVM), on the example fleet's service machines in deploy/fleet: the cache host (cache-server,
# orchestrator, a builder) and the GPU builder. Both are evaluated as that fleet evaluates them,
# their assertions must hold, and building the check builds each service's configuration file
# (checked there by the service's own binary) and nix.conf (checked by Nix), then looks at what
# they say.
{
  self,
  nixpkgs,
  pkgs,
}:
let
  inherit (pkgs) lib;
  machine =
    name:
    (nixpkgs.lib.nixosSystem {
      inherit (pkgs.stdenv.hostPlatform) system;
      modules = [
        self.nixosModules.default
        ../deploy/fleet/machines/common.nix
        ../deploy/fleet/machines/${name}.nix
        { networking.hostName = name; }
      ];
    }).config;
  cache = machine "cache";
  forge1 = machine "forge1";
  failed = map (a: a.message) (
    builtins.filter (a: !a.assertion) (cache.assertions ++ forge1.assertions)
  );
  execStart = config: unit: config.systemd.services.${unit}.serviceConfig.ExecStart;
in
if failed != [ ] then
  throw "fleetcache module check: failed assertions:\n${lib.concatStringsSep "\n" failed}"
else
  pkgs.runCommand "fleetcache-module-check"
    {
      # (not `builder`: that is the derivation's own builder)
      cacheServerExec = execStart cache "fleetcache-cache-server";
      orchestratorExec = execStart cache "fleetcache-orchestrator";
      cacheBuilderExec = execStart cache "fleetcache-builder";
      gpuBuilderExec = execStart forge1 "fleetcache-builder";
      cacheNixConf = cache.environment.etc."nix/nix.conf".source;
      gpuNixConf = forge1.environment.etc."nix/nix.conf".source;
    }
    ''
      grep -q '^substituters = https://cache.fleet.example.org https://cache.nixos.org/' $cacheNixConf
      grep -q '^narinfo-cache-negative-ttl = 60' $cacheNixConf
      grep -q '^extra-system-features = cuda' $gpuNixConf
      grep -q '^system-features = .*big-parallel' $gpuNixConf
      for exec in "$cacheServerExec" "$orchestratorExec" "$cacheBuilderExec" "$gpuBuilderExec"; do
        file=''${exec##*--config }
        grep -q /run/credentials/ "$file"
      done
      echo ok > $out
    ''
