# carbon: an NVIDIA GPU, so the CUDA build of llama.cpp.
{ config, ... }:
{
  services.fleetcache.client.variant = "cuda";

  # CUDA and the NVIDIA driver are unfree.
  nixpkgs.config.allowUnfree = true;
  hardware.graphics.enable = true;
  services.xserver.videoDrivers = [ "nvidia" ];
  hardware.nvidia = {
    open = true;
    package = config.boot.kernelPackages.nvidiaPackages.stable;
  };
}
