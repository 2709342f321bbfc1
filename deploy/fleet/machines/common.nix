# Every machine of the fleet: the fleet's cache as a substituter (cache.nixos.org stays).
{ lib, ... }:
{
  services.fleetcache.client = {
    enable = true;
    url = "https://cache.fleet.example.org";
    # `orchestrator keygen --name cache.fleet.example.org-1 …` printed this; replace it with yours.
    publicKeys = [ "cache.fleet.example.org-1:rmrwQ1tHJj0HERL4eN2U2Ga5BX0a3V55xUxhIp+KQ4E=" ];
  };

  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];

  # The rest of a real machine (disks, boot loader, users) goes here or in its own file.
  boot.loader.grub.device = lib.mkDefault "nodev";
  fileSystems."/" = lib.mkDefault {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };
  system.stateVersion = "26.05";
}
