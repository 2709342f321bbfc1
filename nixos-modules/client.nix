# A fleet machine: the fleetcache binary cache as a substituter (beside cache.nixos.org) and the
# llama.cpp variant this machine's hardware runs. The packages come from fleetcache's overlay
# (`overlays.default`), which the flake's `nixosModules.client` applies.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.fleetcache.client;
  common = import ./common.nix { inherit lib pkgs; };
  pushUnit = "fleetcache-push";
  # Written by the hook (which Nix runs as root), read and emptied by the pusher.
  queue = "/var/lib/${pushUnit}/queue";
  orchestratorExe = "${cfg.push.package}/bin/orchestrator";
  hook = pkgs.writeShellScript "fleetcache-post-build-hook" ''
    exec ${orchestratorExe} hook --queue ${queue}
  '';
  attrFor = {
    cpu = "llama-cpp";
    cuda = "llama-cpp-cuda";
    vulkan = "llama-cpp-vulkan";
    rocm = "llama-cpp-rocm";
  };
  # What a builder needs to build (and verify) each variant, in Nix's system-features words.
  featuresFor = {
    cpu = [ ];
    cuda = [ "cuda" ];
    vulkan = [ "vulkan" ];
    rocm = [ "rocm" ];
  };
  attr = attrFor.${cfg.variant};
  system = pkgs.stdenv.hostPlatform.system;
in
{
  options.services.fleetcache.client = {
    enable = lib.mkEnableOption "the fleetcache binary cache as a substituter, and a llama.cpp build for this machine's hardware";

    url = lib.mkOption {
      type = lib.types.str;
      example = "https://cache.example.org";
      description = "The fleetcache cache-server (or the bucket or CDN serving its layout).";
    };

    publicKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      example = [ "cache.example.org-1:rmrwQ1tHJj0HERL4eN2U2Ga5BX0a3V55xUxhIp+KQ4E=" ];
      description = ''
        The cache's public signing keys in Nix's format (`name:base64`), as printed by
        `orchestrator keygen` or by the cache-server at start. List two during a key rotation.
      '';
    };

    variant = lib.mkOption {
      type = lib.types.enum (builtins.attrNames attrFor);
      default = "cpu";
      example = "cuda";
      description = ''
        The llama.cpp build for this machine: `cpu` (`llama-cpp`, CPU backend chosen at run
        time), `cuda` (`llama-cpp-cuda`, needs the NVIDIA driver), `vulkan` (`llama-cpp-vulkan`,
        needs `hardware.graphics.enable`) or `rocm` (`llama-cpp-rocm`, x86_64-linux).
      '';
    };

    package = lib.mkOption {
      type = lib.types.package;
      default =
        pkgs.${attr}
          or (throw "services.fleetcache.client.variant = \"${cfg.variant}\": pkgs.${attr} does not exist for ${system} (is fleetcache's overlay applied?)");
      defaultText = lib.literalMD "the overlay's build for `variant`: `pkgs.llama-cpp`, `pkgs.llama-cpp-cuda`, `pkgs.llama-cpp-vulkan` or `pkgs.llama-cpp-rocm`";
      description = "The llama.cpp package to install; by default the one `variant` selects.";
    };

    builderFeatures = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = featuresFor.${cfg.variant};
      defaultText = lib.literalMD "`[ ]` for `cpu`, `[ \"cuda\" ]`, `[ \"vulkan\" ]` or `[ \"rocm\" ]` for the others";
      example = [ "cuda" ];
      description = ''
        The features a fleetcache builder must have to build `package` for this machine. The
        orchestrator reads this (with `package`) from every machine that enables the client and
        queues the build for a builder with these features.
      '';
    };

    installPackage = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Whether to put the chosen llama.cpp build into `environment.systemPackages`.";
    };

    netrcFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/secrets/fleetcache-netrc";
      description = ''
        A netrc file with a read token of the cache, for a cache-server with `readTokensFile`
        (private caches): `machine cache.example.org login <name> password <token>`, one line
        per host. Handed to Nix as `netrc-file` (the Nix daemon reads it as root; keep it
        readable by root only). A path outside the Nix store (agenix, sops-nix), never a
        file in it: every user can read the store.
      '';
    };

    push = {
      enable = lib.mkEnableOption ''
        pushing what this machine builds to the cache: Nix's post-build-hook queues each
        built path (and returns at once: a build never waits for or fails by an upload) and the
        `fleetcache-push` service uploads the queue, keeping what could not be uploaded for
        its next try'';

      url = lib.mkOption {
        type = lib.types.str;
        default = cfg.url;
        defaultText = lib.literalExpression "config.services.fleetcache.client.url";
        description = "The cache-server to upload to (its upload endpoint, if it differs from the substituter URL).";
      };

      tokenFile = common.secretFileOption {
        description = "A file holding an upload token of the cache-server (a token of its `upload-tokens-file`).";
        example = "/run/secrets/fleetcache-upload-token";
      };

      package = lib.mkOption {
        type = lib.types.package;
        description = "fleetcache's package (its `orchestrator` uploads); the flake's `nixosModules.client` sets it.";
      };
    };

    connectTimeout = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 5;
      description = ''
        Seconds Nix waits to connect to a substituter (`connect-timeout`; 0 leaves Nix's
        default, no limit of its own: curl's 300 s). When the cache cannot be reached and its
        packets are dropped (a laptop off the VPN, the cache host down behind a firewall), Nix
        tries five times: with no limit every Nix command waits up to 25 minutes, with 5 s
        about half a minute. Then a machine that never reached the cache builds without it, and
        one whose Nix remembers the cache stops with an error naming it unless
        `nix.settings.fallback` is set. The setting applies to every download;
        `nix.settings.connect-timeout` set elsewhere wins.
      '';
    };

    negativeTtl = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 60;
      description = ''
        Seconds Nix remembers that a cache lacks a path (`narinfo-cache-negative-ttl`, 3600 by
        default). Lowered so that a variant published after a miss is used within a minute.
        The setting applies to every substituter.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.netrcFile == null || !(lib.hasPrefix builtins.storeDir (toString cfg.netrcFile));
        message = "services.fleetcache.client.netrcFile = ${toString cfg.netrcFile} is in the Nix store, where every user can read it: give a path outside the store (e.g. from agenix or sops-nix).";
      }
      {
        assertion = !cfg.push.enable || cfg.push.tokenFile != null;
        message = "services.fleetcache.client.push.enable needs push.tokenFile: a file with an upload token of the cache-server.";
      }
    ]
    ++ common.secretsOutsideStore "services.fleetcache.client" (
      common.secretsOf cfg { upload-token = "push.tokenFile"; }
    )
    ++ [
      {
        assertion = cfg.publicKeys != [ ];
        message = "services.fleetcache.client.publicKeys is empty: without the cache's public key Nix ignores everything it serves. Add the key `orchestrator keygen` printed.";
      }
      {
        assertion = lib.hasPrefix "http://" cfg.url || lib.hasPrefix "https://" cfg.url;
        message = "services.fleetcache.client.url = \"${cfg.url}\" is not an http:// or https:// URL.";
      }
      {
        assertion = pkgs ? llama-cpp-baseline;
        message = "services.fleetcache.client needs fleetcache's overlay: use the flake's nixosModules.client, or add overlays.default to nixpkgs.overlays.";
      }
      {
        assertion = !(pkgs ? llama-cpp-baseline) || pkgs ? ${attr};
        message = "services.fleetcache.client.variant = \"${cfg.variant}\": the llama.cpp flake has no such build for ${system}.";
      }
      {
        assertion = cfg.variant != "vulkan" || config.hardware.graphics.enable;
        message = "services.fleetcache.client.variant = \"vulkan\" needs a Vulkan driver: set hardware.graphics.enable = true (called hardware.opengl.enable before NixOS 24.11).";
      }
      {
        assertion =
          cfg.variant != "cuda"
          || builtins.elem "nvidia" config.services.xserver.videoDrivers
          || config.hardware.nvidia.datacenter.enable;
        message = "services.fleetcache.client.variant = \"cuda\" needs the NVIDIA driver: add \"nvidia\" to services.xserver.videoDrivers (also on headless machines), or set hardware.nvidia.datacenter.enable for a datacenter GPU.";
      }
      {
        assertion = cfg.variant != "cuda" || config.hardware.graphics.enable;
        message = "services.fleetcache.client.variant = \"cuda\" needs hardware.graphics.enable = true: CUDA programs load libcuda from /run/opengl-driver, which it provides.";
      }
    ];

    nix.settings = {
      substituters = [ cfg.url ];
      trusted-public-keys = cfg.publicKeys;
      narinfo-cache-negative-ttl = cfg.negativeTtl;
    }
    // lib.optionalAttrs (cfg.connectTimeout > 0) { connect-timeout = lib.mkDefault cfg.connectTimeout; }
    // lib.optionalAttrs (cfg.netrcFile != null) { netrc-file = toString cfg.netrcFile; }
    // lib.optionalAttrs cfg.push.enable { post-build-hook = toString hook; };

    systemd.services.${pushUnit} = lib.mkIf cfg.push.enable {
      description = "fleetcache: push what this machine builds to the cache";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "nix-daemon.service"
      ];
      path = [ config.nix.package ];
      # nix keeps its caches under HOME; root's is hidden by ProtectHome.
      environment.HOME = "/var/lib/${pushUnit}";
      serviceConfig = removeAttrs common.hardening [ "PrivateUsers" ] // {
        ExecStart = "${orchestratorExe} push --cache ${cfg.push.url} --token-file ${common.credentialPath pushUnit "upload-token"} --from-queue ${queue} --watch";
        LoadCredential = [ "upload-token:${toString cfg.push.tokenFile}" ];
        StateDirectory = pushUnit;
        Restart = "always";
        RestartSec = 10;
      };
    };

    environment.systemPackages = lib.mkIf cfg.installPackage [ cfg.package ];
  };
}
