# The cache-server: serves the fleet's binary cache from a directory or an S3 bucket, and
# verifies, signs and stores what builders upload.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.fleetcache.cache-server;
  common = import ./common.nix { inherit lib pkgs; };
  unit = "fleetcache-cache-server";
  credential = common.credentialPath unit;

  signingKeys = lib.listToAttrs (
    lib.imap0 (
      i: path:
      lib.nameValuePair "signing-key-${toString i}" {
        option = "signingKeyFiles";
        inherit path;
      }
    ) cfg.signingKeyFiles
  );
  secrets =
    signingKeys
    // common.secretsOf cfg {
      upload-tokens = "uploadTokensFile";
      read-tokens = "readTokensFile";
      admin-tokens = "adminTokensFile";
      s3-credentials = "s3CredentialsFile";
    };

  settings =
    cfg.settings
    // {
      listen = common.listenAddress cfg.address cfg.port;
      inherit (cfg) store;
      signing-key-files = map credential (builtins.attrNames signingKeys);
    }
    // lib.optionalAttrs (cfg.uploadTokensFile != null) { upload-tokens-file = credential "upload-tokens"; }
    // lib.optionalAttrs (cfg.readTokensFile != null) { read-tokens-file = credential "read-tokens"; }
    // lib.optionalAttrs (cfg.adminTokensFile != null) { admin-tokens-file = credential "admin-tokens"; }
    // lib.optionalAttrs (cfg.s3CredentialsFile != null) {
      s3-credentials-file = credential "s3-credentials";
    };

  exe = lib.getExe' cfg.package "cache-server";
  configFile = common.checkedConfig "fleetcache-cache-server.toml" settings "${exe} --check-config --settings-only --config";
in
{
  options.services.fleetcache.cache-server = {
    enable = lib.mkEnableOption "the fleetcache cache-server, a verifying and signing Nix binary cache";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The fleetcache package providing `bin/cache-server` (the flake's module sets it).";
    };

    address = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address to listen on. The default serves only this host, e.g. behind a TLS proxy.";
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 8080;
      description = "Port to listen on.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Whether to open `port` in the firewall.";
    };

    store = lib.mkOption {
      type = lib.types.str;
      default = "file:///var/lib/${unit}/cache";
      example = "s3://fleet-cache?endpoint=https://s3.example.org&region=garage";
      description = ''
        Where the cache lives: `file:///dir` or `s3://bucket?endpoint=URL&region=R`, in Nix's
        binary cache layout (so the bucket alone is a valid cache). The default directory is
        the service's state directory.
      '';
    };

    signingKeyFiles = lib.mkOption {
      type = lib.types.listOf lib.types.path;
      default = [ ];
      example = [ "/run/secrets/fleet-cache-signing-key" ];
      description = ''
        Secret signing keys in Nix's format (`orchestrator keygen`); every key signs every
        narinfo, so list two during a rotation. Without a key the server is read-only. Paths
        outside the Nix store, handed to the service as credentials.
      '';
    };

    uploadTokensFile = common.secretFileOption {
      description = "File of `name:token` lines allowed to upload (builders, `nix copy --to`). Without it the server is read-only.";
    };
    readTokensFile = common.secretFileOption {
      description = "File of `name:token` lines allowed to read. Without it reads are public.";
    };
    adminTokensFile = common.secretFileOption {
      description = ''
        File of `name:token` lines allowed to collect garbage (`POST /api/v1/gc`, what
        `orchestrator gc` and the orchestrator's `gc.every-hours` do). Without it nobody can over
        HTTP. The S3 key then needs delete rights on the bucket.
      '';
    };
    s3CredentialsFile = common.secretFileOption {
      description = ''
        File with `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…` lines for an `s3://`
        store. The service waits for it: on a host where the bucket's key is made after the first
        deployment (Garage on the same host), it starts by itself once the file is there.
      '';
    };

    settings = lib.mkOption {
      type = lib.types.submodule { freeformType = common.settingsFormat.type; };
      default = { };
      example = {
        priority = 30; # ask this cache before cache.nixos.org (default 41: after it)
        narinfo-cache-seconds = 30;
      };
      description = ''
        Further cache-server settings (see `cache-server.example.toml`), rendered to TOML. The
        options above set `listen`, `store` and the file settings.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = common.secretsOutsideStore "services.fleetcache.cache-server" secrets;

    systemd.services.${unit} = {
      description = "fleetcache cache-server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ] ++ lib.optional config.services.garage.enable "garage.service";
      # Without its S3 key the service is skipped, not failed; the path unit below starts it.
      unitConfig = lib.optionalAttrs (cfg.s3CredentialsFile != null) {
        ConditionPathExists = cfg.s3CredentialsFile;
      };
      serviceConfig = common.hardening // common.serverLimits // {
        ExecStart = "${exe} --config ${configFile}";
        DynamicUser = true;
        StateDirectory = unit;
        LoadCredential = common.loadCredentials secrets;
        Restart = "on-failure";
        RestartSec = 5;
      };
    };

    systemd.paths.${unit} = lib.mkIf (cfg.s3CredentialsFile != null) {
      description = "start the fleetcache cache-server once its S3 credentials exist";
      wantedBy = [ "multi-user.target" ];
      pathConfig.PathExists = cfg.s3CredentialsFile;
    };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.port ];
  };
}
