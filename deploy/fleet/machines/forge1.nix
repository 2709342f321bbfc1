# forge1: a build machine with an NVIDIA GPU. It takes only jobs that need CUDA: it builds the
# CUDA variant and runs its verification (`llama-cli --list-devices` must show CUDA0).
{
  imports = [ ./nvidia.nix ];

  # It uses the cache like every machine, but runs no llama.cpp itself.
  services.fleetcache.client.installPackage = false;

  services.fleetcache.builder = {
    enable = true;
    orchestrator = "https://fleetcache.fleet.example.org";
    tokenFile = "/run/secrets/fleetcache-builder-token";
    cacheTokenFile = "/run/secrets/fleetcache-upload-token";
    features = [ "cuda" ];
    mandatoryFeatures = [ "cuda" ];
  };
}
