# A quick check of the NixOS modules with the real nixpkgs (`checks.<system>.modules`; no VM,
# no KVM): a system with every service enabled is evaluated, its assertions must hold, and
# building the check builds each service's configuration file (checked there by the service's
# own binary) and nix.conf (checked by Nix), then looks at what they say.
{
  self,
  nixpkgs,
  pkgs,
}:
let
  inherit (pkgs) lib;
  host = nixpkgs.lib.nixosSystem {
    inherit (pkgs.stdenv.hostPlatform) system;
    modules = [
      self.nixosModules.default
      {
        boot.loader.grub.enable = false;
        fileSystems."/" = {
          device = "none";
          fsType = "tmpfs";
        };
        system.stateVersion = "25.05";

        services.fleetcache.client = {
          enable = true;
          url = "https://cache.example.org";
          publicKeys = [ "cache.example.org-1:rmrwQ1tHJj0HERL4eN2U2Ga5BX0a3V55xUxhIp+KQ4E=" ];
          installPackage = false;
        };
        services.fleetcache.cache-server = {
          enable = true;
          store = "s3://fleet-cache?endpoint=http://127.0.0.1:3900&region=garage";
          s3CredentialsFile = "/run/secrets/s3";
          signingKeyFiles = [ "/run/secrets/signing-key" ];
          uploadTokensFile = "/run/secrets/upload-tokens";
        };
        services.fleetcache.orchestrator = {
          enable = true;
          fleet = "git+https://git.example.org/ops/fleet";
          cacheUrl = "https://cache.example.org";
          cacheTokenFile = "/run/secrets/cache-token";
          builderTokensFile = "/run/secrets/builder-tokens";
          apiTokensFile = "/run/secrets/api-tokens";
          variants = (lib.importTOML ../deploy/fleet/fleetcache.toml).variant;
          webhooks = {
            repository = "ops/fleet";
            githubSecretFile = "/run/secrets/github";
          };
        };
        services.fleetcache.builder = {
          enable = true;
          orchestrator = "http://127.0.0.1:8090";
          tokenFile = "/run/secrets/builder-token";
          cacheTokenFile = "/run/secrets/upload-token";
          features = [ "cuda" ];
        };
      }
    ];
  };
  inherit (host) config;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  execStart = unit: config.systemd.services.${unit}.serviceConfig.ExecStart;
in
if failed != [ ] then
  throw "fleetcache module check: failed assertions:\n${lib.concatStringsSep "\n" failed}"
else
  pkgs.runCommand "fleetcache-module-check"
    {
      # (not `builder`: that is the derivation's own builder)
      cacheServerExec = execStart "fleetcache-cache-server";
      orchestratorExec = execStart "fleetcache-orchestrator";
      builderExec = execStart "fleetcache-builder";
      nixConf = config.environment.etc."nix/nix.conf".source;
    }
    ''
      grep -q '^substituters = https://cache.example.org https://cache.nixos.org/' $nixConf
      grep -q '^narinfo-cache-negative-ttl = 60' $nixConf
      grep -q '^extra-system-features = cuda' $nixConf
      grep -q '^system-features = .*big-parallel' $nixConf
      for exec in "$cacheServerExec" "$orchestratorExec" "$builderExec"; do
        file=''${exec##*--config }
        grep -q /run/credentials/ "$file"
      done
      echo ok > $out
    ''
