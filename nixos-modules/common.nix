# What fleetcache's service modules share: secrets handed over as systemd credentials, the
# check that no secret sits in the world-readable store, the build-time configuration check,
# and the hardening block. Imported as `import ./common.nix { inherit lib pkgs; }`.
{ lib, pkgs }:
rec {
  settingsFormat = pkgs.formats.toml { };

  # Where systemd's LoadCredential= puts the credential `name` for `unit` (a service name
  # without `.service`): the path the service's configuration file refers to.
  credentialPath = unit: name: "/run/credentials/${unit}.service/${name}";

  # An option for a secret given as a file path outside the store; optional ones default to
  # null (not given).
  secretFileOption =
    {
      description,
      example ? "/run/secrets/fleetcache",
      required ? false,
    }:
    lib.mkOption (
      {
        type = if required then lib.types.path else lib.types.nullOr lib.types.path;
        inherit example;
        description = ''
          ${description}

          A path outside the Nix store (for example managed by agenix or sops-nix), read by
          systemd and handed to the service as a credential.
        '';
      }
      // lib.optionalAttrs (!required) { default = null; }
    );

  # A service's secrets, `{ <credential name> = { option = "<its option>"; path = <file or
  # null>; }; }`, from `{ <credential name> = "<option under cfg, dotted>"; }`.
  secretsOf =
    cfg:
    lib.mapAttrs (
      _: option: {
        inherit option;
        path = lib.attrByPath (lib.splitString "." option) null cfg;
      }
    );

  # The secrets that are given.
  givenSecrets = lib.filterAttrs (_: secret: secret.path != null);

  # Assertions that no given secret of the service whose options are under `prefix` is in the
  # Nix store.
  secretsOutsideStore =
    prefix: secrets:
    lib.mapAttrsToList (_: secret: {
      assertion = !(lib.hasPrefix builtins.storeDir (toString secret.path));
      message = "${prefix}.${secret.option} = ${toString secret.path} is in the Nix store, where every user can read it: give a path outside the store (e.g. from agenix or sops-nix).";
    }) (givenSecrets secrets);

  # `name:path` entries for LoadCredential= from the given secrets.
  loadCredentials =
    secrets: lib.mapAttrsToList (name: secret: "${name}:${toString secret.path}") (givenSecrets secrets);

  # The configuration file, checked at build time by `command` (which gets the file as its
  # last argument and must not need the secrets it names).
  checkedConfig =
    name: settings: command:
    let
      file = settingsFormat.generate name settings;
    in
    pkgs.runCommand name { } ''
      ${command} ${file}
      cp ${file} $out
    '';

  # The option for an SSH key that fetches a private fleet repository (git+ssh:// URLs).
  sshKeyFileOption = secretFileOption {
    description = ''
      An SSH private key that may read the fleet repository (and private flake inputs), for
      `git+ssh://` URLs. Host keys are learnt on first use (kept in the state directory).
    '';
  };

  # PATH entries and environment for a service that evaluates and fetches the fleet with nix and
  # git: flakes on, a home for their caches, any checkout readable (a local one belongs to
  # another user), and the `ssh-key` credential of `unit` when `sshKey` is set (known hosts kept
  # in `stateDir`).
  nixClient =
    {
      nix,
      unit,
      home,
      stateDir,
      sshKey,
    }:
    {
      path = [
        nix
        pkgs.git
        pkgs.openssh
      ];
      environment = {
        HOME = home;
        NIX_CONFIG = "extra-experimental-features = nix-command flakes";
        GIT_CONFIG_COUNT = "1";
        GIT_CONFIG_KEY_0 = "safe.directory";
        GIT_CONFIG_VALUE_0 = "*";
      }
      // lib.optionalAttrs sshKey {
        GIT_SSH_COMMAND = "ssh -i ${credentialPath unit "ssh-key"} -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=${stateDir}/known_hosts";
      };
    };

  # `host:port` for the TOML `listen` keys; IPv6 addresses in brackets.
  listenAddress =
    address: port:
    if lib.hasInfix ":" address then "[${address}]:${toString port}" else "${address}:${toString port}";

  # Open files for a server: systemd's default soft limit (1024) is exhausted by that many idle
  # clients; the servers bound their connections below whatever limit they get.
  serverLimits = {
    LimitNOFILE = 65536;
  };

  # systemd hardening for a network service that needs nothing of the host but its own
  # directories; services that run Nix or GPU programs relax parts of it.
  hardening = {
    CapabilityBoundingSet = "";
    DevicePolicy = "closed";
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    NoNewPrivileges = true;
    PrivateDevices = true;
    PrivateTmp = true;
    PrivateUsers = true;
    ProcSubset = "pid";
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHome = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectProc = "invisible";
    ProtectSystem = "strict";
    RemoveIPC = true;
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    UMask = "0077";
  };
}
