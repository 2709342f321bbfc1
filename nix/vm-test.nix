# A NixOS VM test of the whole loop (`nix flake check` on x86_64-linux; needs KVM and nixpkgs):
# a cache host runs cache-server, orchestrator and a builder; a small fleet flake on it has one
# variant; `orchestrator build --server` builds and publishes it; a client machine with the
# client module substitutes it, and refuses it from a cache whose key it does not trust.
#
# The key pair below exists only for this test; real secrets never go into the Nix store.
{ self }:
let
  publicKey = "fleetcache-vm-test-1:n0407RwSkWIZfGlKMIt7k2mrsAmNLvaoN+fN+pP3ayQ=";
  secretKey = "fleetcache-vm-test-1:7chCGQn+/qkuxS04q+zhUAeDKS6m3fwcFFP0H+dqLoKfTjTtHBKRYhl8aUowi3uTaauwCY0u9qg35836k/drJA==";

  # The fleet: one variant that needs no nixpkgs, so the VM builds it offline (without the
  # sandbox, with the system's own tools).
  fleetFlake = builtins.toFile "flake.nix" ''
    {
      outputs = { self }: {
        packages.x86_64-linux.default = derivation {
          name = "llama-cpp-vm-test";
          system = "x86_64-linux";
          builder = "/bin/sh";
          PATH = "/run/current-system/sw/bin";
          args = [ "-c" "mkdir -p $out/bin $out/lib && printf '#!/bin/sh\\necho llama-cli vm-test\\n' > $out/bin/llama-cli && chmod +x $out/bin/llama-cli && echo cpu > $out/lib/libggml-cpu.so" ];
        };
      };
    }
  '';
in
{
  name = "fleetcache";
  # The client module applies fleetcache's overlay (nixpkgs.overlays), which runNixOSTest's
  # shared, read-only package set would refuse.
  node.pkgsReadOnly = false;

  nodes.cache =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];
      virtualisation.memorySize = 2048;
      environment.systemPackages = [
        pkgs.git
        self.packages.x86_64-linux.default
      ];
      nix.settings = {
        experimental-features = [
          "nix-command"
          "flakes"
        ];
        # The test fleet's derivation uses the system's tools (there is no nixpkgs in it).
        sandbox = false;
      };

      # Secrets (outside the store) and the fleet repository appear at boot, before the
      # services read them.
      systemd.services.test-setup = {
        wantedBy = [ "multi-user.target" ];
        before = [
          "fleetcache-cache-server.service"
          "fleetcache-orchestrator.service"
          "fleetcache-builder.service"
        ];
        requiredBy = [
          "fleetcache-cache-server.service"
          "fleetcache-orchestrator.service"
          "fleetcache-builder.service"
        ];
        serviceConfig.Type = "oneshot";
        path = [ pkgs.git ];
        script = ''
          install -d -m 700 /run/secrets
          echo '${secretKey}' > /run/secrets/signing-key
          echo 'builder:upload-secret' > /run/secrets/upload-tokens
          echo 'upload-secret' > /run/secrets/upload-token
          echo 'cache:builder-secret' > /run/secrets/builder-tokens
          echo 'builder-secret' > /run/secrets/builder-token
          echo 'admin:api-secret' > /run/secrets/api-tokens
          echo 'api-secret' > /run/secrets/api-token
          mkdir -p /srv/fleet
          cp ${fleetFlake} /srv/fleet/flake.nix
          cd /srv/fleet
          git init -q -b main
          git add flake.nix
          git -c user.name=test -c user.email=test@example.invalid commit -q -m fleet
        '';
      };

      services.fleetcache.cache-server = {
        enable = true;
        address = "0.0.0.0";
        openFirewall = true;
        signingKeyFiles = [ "/run/secrets/signing-key" ];
        uploadTokensFile = "/run/secrets/upload-tokens";
      };
      services.fleetcache.orchestrator = {
        enable = true;
        fleet = "/srv/fleet";
        cacheUrl = "http://cache:8080";
        cacheTokenFile = "/run/secrets/upload-token";
        builderTokensFile = "/run/secrets/builder-tokens";
        apiTokensFile = "/run/secrets/api-tokens";
        variants = [
          {
            name = "default";
            attr = "packages.{system}.default";
            files = [ "lib/libggml-cpu.so" ];
          }
        ];
      };
      services.fleetcache.builder = {
        enable = true;
        orchestrator = "http://127.0.0.1:8090";
        tokenFile = "/run/secrets/builder-token";
        cacheTokenFile = "/run/secrets/upload-token";
        features = [ ];
      };
    };

  nodes.client =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.client ];
      environment.systemPackages = [ pkgs.curl ];
      services.fleetcache.client = {
        enable = true;
        url = "http://cache:8080";
        publicKeys = [ publicKey ];
        # The real llama.cpp is not built in this test.
        installPackage = false;
      };
      nix.settings.experimental-features = [ "nix-command" ];
    };

  testScript = ''
    start_all()
    cache.wait_for_unit("fleetcache-cache-server.service")
    cache.wait_for_unit("fleetcache-orchestrator.service")
    cache.wait_for_unit("fleetcache-builder.service")
    cache.wait_for_open_port(8080)
    cache.wait_for_open_port(8090)

    cache.succeed(
        "orchestrator build --server http://127.0.0.1:8090 --token-file /run/secrets/api-token --rev main"
    )
    out = cache.succeed(
        "orchestrator status --server http://127.0.0.1:8090 --token-file /run/secrets/api-token --json"
    )
    print(out)
    path = cache.succeed(
        "nix eval --raw --impure --expr"
        " '(builtins.getFlake \"git+file:///srv/fleet\").packages.x86_64-linux.default.outPath'"
    ).strip()

    # The client substitutes the variant, signed with the key it trusts, from the cache.
    client.wait_for_unit("multi-user.target")
    client.succeed(f"nix-store --realise {path}")
    client.succeed(f"{path}/bin/llama-cli | grep vm-test")
    client.succeed("grep -q 'narinfo-cache-negative-ttl = 60' /etc/nix/nix.conf")

    # The narinfo is signed by the fleet key.
    narinfo = client.succeed(f"curl -sf http://cache:8080/$(basename {path} | cut -c1-32).narinfo")
    assert "Sig: fleetcache-vm-test-1:" in narinfo, narinfo
  '';
}
