# The NVIDIA driver, for the machines with an NVIDIA GPU (carbon, forge1). CUDA and the driver
# are unfree.
{ config, ... }:
{
  nixpkgs.config.allowUnfree = true;
  hardware.graphics.enable = true;
  services.xserver.videoDrivers = [ "nvidia" ];
  hardware.nvidia = {
    open = true;
    package = config.boot.kernelPackages.nvidiaPackages.stable;
  };
}
