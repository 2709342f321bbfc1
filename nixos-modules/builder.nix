# A build machine: the builder agent claims the orchestrator's jobs that fit this machine, builds
# them with the Nix daemon and pushes the closures to the cache-server.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.fleetcache.builder;
  common = import ./common.nix { inherit lib pkgs; };
  unit = "fleetcache-builder";
  user = "fleetcache-builder";
  credential = common.credentialPath unit;
  inherit (lib) types;

  stateDir = "/var/lib/${unit}";
  secrets = common.secretsOf cfg {
    token = "tokenFile";
    cache-token = "cacheTokenFile";
    ssh-key = "sshKeyFile";
  };
  nixClient = common.nixClient {
    nix = config.nix.package;
    inherit unit stateDir;
    home = stateDir;
    sshKey = cfg.sshKeyFile != null;
  };

  settings =
    cfg.settings
    // {
      inherit (cfg) orchestrator;
      token-file = credential "token";
      cache-token-file = credential "cache-token";
      mandatory-features = cfg.mandatoryFeatures;
      max-jobs = cfg.maxJobs;
    }
    // lib.optionalAttrs (cfg.cache != null) { inherit (cfg) cache; }
    // lib.optionalAttrs (cfg.features != null) { inherit (cfg) features; }
    // lib.optionalAttrs (cfg.systems != null) { inherit (cfg) systems; };

  exe = lib.getExe' cfg.package "builder";
  configFile = common.checkedConfig "fleetcache-builder.toml" settings "${exe} --check-config --settings-only --config";
in
{
  options.services.fleetcache.builder = {
    enable = lib.mkEnableOption "a fleetcache builder agent on this machine";

    package = lib.mkOption {
      type = types.package;
      description = "The fleetcache package providing `bin/builder` (the flake's module sets it).";
    };

    orchestrator = lib.mkOption {
      type = types.str;
      example = "http://cache.example.org:8090";
      description = "The orchestrator this builder takes jobs from.";
    };

    tokenFile = common.secretFileOption {
      required = true;
      example = "/run/secrets/fleetcache-builder-token";
      description = "File holding this builder's token, a line of the orchestrator's builder tokens.";
    };

    cacheTokenFile = common.secretFileOption {
      required = true;
      example = "/run/secrets/fleetcache-cache-upload-token";
      description = "File holding an upload token of the cache-server.";
    };

    cache = lib.mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://cache.example.org";
      description = "The cache-server to push to. Default: the one the orchestrator names.";
    };

    features = lib.mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "cuda" ];
      description = ''
        Features this machine offers to jobs (`cuda`, `vulkan`, `kvm`, …). Default: detected at
        start (`nvidia-smi` lists a GPU: `cuda`; `vulkaninfo` lists a Vulkan GPU: `vulkan`;
        `/dev/kvm`: `kvm`). When given, they are also added to Nix's `system-features`
        (after the defaults, which stay).
      '';
    };

    mandatoryFeatures = lib.mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "cuda" ];
      description = "Take only jobs that require these features (a GPU machine kept for GPU variants).";
    };

    maxJobs = lib.mkOption {
      type = types.ints.positive;
      default = 1;
      description = "Jobs built at once (each `nix build` may use every core Nix allows).";
    };

    systems = lib.mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      description = "Systems this machine builds for. Default: its own.";
    };

    sshKeyFile = common.sshKeyFileOption;

    settings = lib.mkOption {
      type = types.submodule { freeformType = common.settingsFormat.type; };
      default = { };
      example = {
        max-jobs = 2;
      };
      description = ''
        Further builder settings (see `builder.example.toml`), rendered to TOML; the options
        above win over the same keys here.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = common.secretsOutsideStore "services.fleetcache.builder" secrets;

    # The agent builds through the Nix daemon and copies unsigned paths it verifies
    # (`nix copy --no-check-sigs`): it runs as a trusted user of the daemon.
    users.users.${user} = {
      isSystemUser = true;
      group = user;
      home = stateDir;
      description = "fleetcache builder agent";
    };
    users.groups.${user} = { };

    nix.settings = {
      trusted-users = [ user ];
    }
    // lib.optionalAttrs (cfg.features != null && cfg.features != [ ]) {
      # NixOS writes extra-* settings after the others, so the defaults stay.
      extra-system-features = cfg.features;
    };

    systemd.services.${unit} = {
      description = "fleetcache builder agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "nix-daemon.service"
      ];
      # nix and git to build; the system profile for nvidia-smi and vulkaninfo (detection) and
      # for what verification commands need.
      path = nixClient.path ++ [ "/run/current-system/sw" ];
      inherit (nixClient) environment;
      # GPU programs run here (verification; CUDA compiles kernels at run time) and the Nix
      # daemon builds on the agent's behalf: the common hardening without what those need.
      serviceConfig =
        removeAttrs common.hardening [
          "DevicePolicy"
          "MemoryDenyWriteExecute"
          "PrivateDevices"
          "PrivateUsers"
          "ProcSubset"
          "ProtectProc"
          "SystemCallFilter"
        ]
        // {
          ExecStart = "${exe} --config ${configFile}";
          User = user;
          Group = user;
          StateDirectory = unit;
          LoadCredential = common.loadCredentials secrets;
          Restart = "on-failure";
          RestartSec = 5;
          # Running builds go back to the queue on stop; give nix time to be stopped.
          TimeoutStopSec = 30;
          # GPU drivers and tools talk netlink.
          RestrictAddressFamilies = common.hardening.RestrictAddressFamilies ++ [ "AF_NETLINK" ];
        };
    };
  };
}
