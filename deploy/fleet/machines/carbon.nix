# carbon: an NVIDIA GPU, so the CUDA build of llama.cpp.
{
  imports = [ ./nvidia.nix ];
  services.fleetcache.client.variant = "cuda";
}
