# The orchestrator (`orchestrator serve`): resolves fleet revisions, evaluates the variants,
# queues what the cache lacks for the builders, and takes forge webhooks.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.fleetcache.orchestrator;
  common = import ./common.nix { inherit lib pkgs; };
  unit = "fleetcache-orchestrator";
  credential = common.credentialPath unit;
  stateDir = "/var/lib/${unit}";
  inherit (lib) types;

  secrets = common.secretsOf cfg {
    cache-token = "cacheTokenFile";
    builder-tokens = "builderTokensFile";
    api-tokens = "apiTokensFile";
    github-secret = "webhooks.githubSecretFile";
    gitea-secret = "webhooks.giteaSecretFile";
    gitlab-token = "webhooks.gitlabTokenFile";
    status-token = "webhooks.statusTokenFile";
    ssh-key = "sshKeyFile";
  };
  given = name: secrets.${name}.path != null;
  nixClient = common.nixClient {
    nix = config.nix.package;
    inherit unit stateDir;
    home = "/var/cache/${unit}";
    sshKey = given "ssh-key";
  };

  variantSettings = map (v: lib.filterAttrs (_: value: value != null) v) cfg.variants;

  webhookSettings =
    lib.optionalAttrs (cfg.webhooks.repository != null) { inherit (cfg.webhooks) repository; }
    // lib.optionalAttrs (given "github-secret") { github-secret-file = credential "github-secret"; }
    // lib.optionalAttrs (given "gitea-secret") { gitea-secret-file = credential "gitea-secret"; }
    // lib.optionalAttrs (given "gitlab-token") { gitlab-token-file = credential "gitlab-token"; };

  settings = lib.recursiveUpdate cfg.settings (
    {
      state-dir = stateDir;
      fleet.flake = cfg.fleet;
      cache = {
        url = cfg.cacheUrl;
        token-file = credential "cache-token";
      };
      server = {
        listen = common.listenAddress cfg.address cfg.port;
        builder-tokens-file = credential "builder-tokens";
        api-tokens-file = credential "api-tokens";
      };
      webhooks =
        webhookSettings
        // lib.optionalAttrs (given "status-token") { status.token-file = credential "status-token"; };
    }
    // lib.optionalAttrs (cfg.database != null) { inherit (cfg) database; }
    // lib.optionalAttrs (cfg.variants != [ ]) { variant = variantSettings; }
  );

  exe = lib.getExe' cfg.package "orchestrator";
  configFile = common.checkedConfig "fleetcache-orchestrator.toml" settings "${exe} check-config --config";

  variantType = types.submodule {
    freeformType = common.settingsFormat.type;
    options = {
      name = lib.mkOption {
        type = types.strMatching "[A-Za-z0-9_-]+";
        example = "cuda";
        description = "The variant's name in reports and on the command line (`--variant cuda`).";
      };
      attr = lib.mkOption {
        type = types.str;
        example = "nixosConfigurations.carbon.pkgs.llama-cpp-cuda";
        description = "Attribute path in the fleet flake; `{system}` is replaced by each system.";
      };
      systems = lib.mkOption {
        type = types.listOf types.str;
        default = [ pkgs.stdenv.hostPlatform.system ];
        defaultText = lib.literalExpression "[ pkgs.stdenv.hostPlatform.system ]";
        description = "Systems to build the variant for.";
      };
      features = lib.mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "cuda" ];
        description = "Builder features the build needs; only builders with all of them take it.";
      };
      files = lib.mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "lib/libggml-cuda.so" ];
        description = "Files that must exist in the output; without them nothing is published.";
      };
      verify = lib.mkOption {
        type = types.nullOr (types.attrsOf (types.either types.str (types.listOf types.str)));
        default = null;
        example = {
          features = [ "cuda" ];
          command = "bin/llama-cli --list-devices";
          expect = "CUDA0";
        };
        description = "A check run on a builder with `features` after the build: `command` must print `expect`.";
      };
    };
  };
in
{
  options.services.fleetcache.orchestrator = {
    enable = lib.mkEnableOption "the fleetcache orchestrator (`orchestrator serve`)";

    package = lib.mkOption {
      type = types.package;
      description = "The fleetcache package providing `bin/orchestrator` (the flake's module sets it).";
    };

    fleet = lib.mkOption {
      type = types.str;
      example = "git+https://git.example.org/ops/fleet";
      description = ''
        The fleet flake: a git URL (`git+https://…`, `git+ssh://…`, `github:owner/repo`),
        mirrored under the state directory and fetched for every build, or a local checkout
        readable by the service.
      '';
    };

    cacheUrl = lib.mkOption {
      type = types.str;
      example = "https://cache.example.org";
      description = "The cache-server the builders push to and the orchestrator asks what is cached.";
    };

    cacheTokenFile = common.secretFileOption {
      required = true;
      example = "/run/secrets/fleetcache-orchestrator-cache-token";
      description = "File holding an upload token of the cache-server.";
    };

    builderTokensFile = common.secretFileOption {
      required = true;
      example = "/run/secrets/fleetcache-builder-tokens";
      description = "File of `name:token` lines, one per builder agent.";
    };

    apiTokensFile = common.secretFileOption {
      required = true;
      example = "/run/secrets/fleetcache-api-tokens";
      description = "File of `name:token` lines for `orchestrator build --server` and friends.";
    };

    address = lib.mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address to listen on; builders and forges must reach it.";
    };

    port = lib.mkOption {
      type = types.port;
      default = 8090;
      description = "Port to listen on.";
    };

    openFirewall = lib.mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open `port` in the firewall.";
    };

    database = lib.mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "postgres://fleetcache@db.example.org/fleetcache";
      description = ''
        A PostgreSQL database shared by several orchestrators. Default: SQLite in the state
        directory. Give the password as `PGPASSWORD` in `environmentFile`, not in the URL.
      '';
    };

    sshKeyFile = common.sshKeyFileOption;

    environmentFile = lib.mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/fleetcache-orchestrator.env";
      description = "A systemd EnvironmentFile (e.g. `PGPASSWORD=…`), outside the Nix store.";
    };

    variants = lib.mkOption {
      type = types.listOf variantType;
      default = [ ];
      example = [
        {
          name = "cuda";
          attr = "nixosConfigurations.carbon.config.services.fleetcache.client.package";
          features = [ "cuda" ];
          files = [ "bin/libggml-cuda.so" ];
        }
      ];
      description = ''
        Variants by attribute path in the fleet flake. By default (none) the orchestrator builds
        what the fleet's machines install: every `nixosConfigurations` machine that enables
        `services.fleetcache.client` contributes its package. Listed variants replace that,
        unless `settings.fleet.machines = true`, with which they join it and lend their name
        and checks to the machines' derivation they equal.
      '';
    };

    webhooks = {
      repository = lib.mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "ops/fleet";
        description = "The fleet repository as the forge names it; pushes from others are ignored.";
      };
      githubSecretFile = common.secretFileOption {
        description = "The GitHub webhook secret (`POST /hooks/github`). Without it the endpoint is off.";
      };
      giteaSecretFile = common.secretFileOption {
        description = "The Gitea/Forgejo webhook secret (`POST /hooks/gitea`). Without it the endpoint is off.";
      };
      gitlabTokenFile = common.secretFileOption {
        description = "The GitLab webhook secret token (`POST /hooks/gitlab`). Without it the endpoint is off.";
      };
      statusTokenFile = common.secretFileOption {
        description = "A forge token that may set commit statuses; also set `settings.webhooks.status.forge` and `api-url`.";
      };
    };

    settings = lib.mkOption {
      type = types.submodule { freeformType = common.settingsFormat.type; };
      default = { };
      example = {
        server.lease-seconds = 120;
        webhooks.branch = "production";
      };
      description = ''
        Further orchestrator settings (see `fleetcache.example.toml`), rendered to TOML and
        merged under the ones the options above set.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    # The environment file is read by systemd, not handed over as a credential; it stays out of
    # the store all the same.
    assertions = common.secretsOutsideStore "services.fleetcache.orchestrator" (
      secrets // common.secretsOf cfg { environment-file = "environmentFile"; }
    );

    systemd.services.${unit} = {
      description = "fleetcache orchestrator";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # It evaluates the fleet with nix and fetches it with git.
      inherit (nixClient) path environment;
      serviceConfig = common.hardening // common.serverLimits // {
        ExecStart = "${exe} serve --config ${configFile}";
        DynamicUser = true;
        StateDirectory = unit;
        CacheDirectory = unit;
        LoadCredential = common.loadCredentials secrets;
        Restart = "on-failure";
        RestartSec = 5;
        # nix raises its stack limit (setrlimit) and reads more of /proc than the service does.
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        ProcSubset = "all";
      }
      // lib.optionalAttrs (cfg.environmentFile != null) { EnvironmentFile = cfg.environmentFile; };
    };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.port ];
  };
}
