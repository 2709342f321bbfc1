# All of fleetcache's NixOS modules, for use without the flake. Set each enabled service's
# `package` (the flake's nixosModules do it for you) and apply ../nix/overlay.nix for the client.
{
  imports = [
    ./client.nix
    ./cache-server.nix
    ./builder.nix
    ./orchestrator.nix
  ];
}
