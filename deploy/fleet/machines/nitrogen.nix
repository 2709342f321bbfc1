# nitrogen: an AMD or Intel GPU, so the Vulkan build of llama.cpp (Mesa's Vulkan drivers).
{
  services.fleetcache.client.variant = "vulkan";
  hardware.graphics.enable = true;
}
