# cache: the fleet's binary cache (cache-server on a local Garage), the orchestrator that
# builds on every flake.lock change, and a CPU builder. nginx terminates TLS for both.
#
# Secrets are files under /run/secrets, put there by your secret manager (agenix, sops-nix, …),
# never in the Nix store; deploy/README.md says how to make each one.
{ config, lib, pkgs, ... }:
let
  fleetcacheToml = lib.importTOML ../fleetcache.toml;
in
{
  # It uses the cache like every machine, but runs no llama.cpp itself.
  services.fleetcache.client.installPackage = false;

  # S3 for the cache: one Garage node (see ../../s3/garage.toml for the same without NixOS).
  services.garage = {
    enable = true;
    # A Garage major version, named: the module wants one chosen (upgrading is a migration).
    package = pkgs.garage_2;
    environmentFile = "/run/secrets/garage.env"; # GARAGE_RPC_SECRET=<64 hex digits>
    settings = {
      replication_factor = 1;
      db_engine = "sqlite";
      rpc_bind_addr = "127.0.0.1:3901";
      rpc_public_addr = "127.0.0.1:3901";
      s3_api = {
        s3_region = "garage";
        api_bind_addr = "127.0.0.1:3900";
        root_domain = ".s3.cache.fleet.example.org";
      };
    };
  };

  services.fleetcache.cache-server = {
    enable = true;
    store = "s3://fleet-cache?endpoint=http://127.0.0.1:3900&region=garage";
    s3CredentialsFile = "/run/secrets/fleetcache-s3.env";
    signingKeyFiles = [ "/run/secrets/fleetcache-signing-key" ];
    uploadTokensFile = "/run/secrets/fleetcache-upload-tokens";
    # What cache.nixos.org serves (glibc, the compilers, the CUDA runtime's dependencies) is not
    # stored again: pushes skip it and the machines substitute it from there (the client module
    # keeps cache.nixos.org among their substituters).
    settings.upstream = [
      {
        url = "https://cache.nixos.org";
        public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      }
    ];
  };

  services.fleetcache.orchestrator = {
    enable = true;
    fleet = "git+https://git.example.org/ops/fleet";
    cacheUrl = "https://cache.fleet.example.org";
    cacheTokenFile = "/run/secrets/fleetcache-orchestrator-upload-token";
    builderTokensFile = "/run/secrets/fleetcache-builder-tokens";
    apiTokensFile = "/run/secrets/fleetcache-api-tokens";
    # What `orchestrator build --config fleetcache.toml` builds by hand: the machines' packages,
    # with the checks of the variants named there.
    variants = fleetcacheToml.variant;
    settings.fleet.machines = fleetcacheToml.fleet.machines;
    webhooks = {
      repository = "ops/fleet";
      giteaSecretFile = "/run/secrets/fleetcache-webhook-secret";
    };
  };

  # Builds the CPU and Vulkan variants (compiling Vulkan needs no GPU); CUDA goes to forge1.
  services.fleetcache.builder = {
    enable = true;
    orchestrator = "http://127.0.0.1:8090";
    tokenFile = "/run/secrets/fleetcache-builder-token";
    cacheTokenFile = "/run/secrets/fleetcache-upload-token";
    features = [ ];
    maxJobs = 2;
  };

  services.nginx = {
    enable = true;
    recommendedProxySettings = true;
    recommendedTlsSettings = true;
    virtualHosts."cache.fleet.example.org" = {
      enableACME = true;
      forceSSL = true;
      locations."/" = {
        proxyPass = "http://127.0.0.1:${toString config.services.fleetcache.cache-server.port}";
        # NARs are large; stream uploads and downloads instead of buffering them.
        extraConfig = ''
          client_max_body_size 0;
          proxy_request_buffering off;
          proxy_buffering off;
        '';
      };
    };
    virtualHosts."fleetcache.fleet.example.org" = {
      enableACME = true;
      forceSSL = true;
      locations."/".proxyPass = "http://127.0.0.1:${toString config.services.fleetcache.orchestrator.port}";
    };
  };
  security.acme = {
    acceptTerms = true;
    defaults.email = "ops@fleet.example.org";
  };
  networking.firewall.allowedTCPPorts = [
    80
    443
  ];
}
