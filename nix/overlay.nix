# The llama.cpp variants a fleet machine installs, taken from the llama.cpp flake it pins.
#
#   llama-cpp           CPU, with the CPU backend chosen at run time
#   llama-cpp-baseline  the upstream `default` untouched (x86-64 baseline: no AVX, AVX2 or FMA)
#   llama-cpp-cuda      upstream `cuda` (Linux), CPU backend chosen at run time, built for the
#                       fleet's `nixpkgs.config.cudaCapabilities` when it sets them
#   llama-cpp-vulkan    upstream `vulkan`, CPU backend chosen at run time
#   llama-cpp-rocm      upstream `rocm` (x86_64-linux)
#
# A variant the llama.cpp flake does not have for this system is absent, not an error.
#
# These names replace nixpkgs' own `llama-cpp` (and `llama-cpp-vulkan`), on purpose: a machine
# then has one llama.cpp, the fleet's pin, and whatever takes `pkgs.llama-cpp` (nixpkgs'
# `services.llama-cpp`, a package built on it) gets the build the fleet's cache holds. The cost:
# a nixpkgs package that depends on llama-cpp is rebuilt against it and is not in
# cache.nixos.org; fleetcache builds it only if a machine installs it through the client or a
# `[[variant]]` names it.
#
# Usage: `overlays.default = import ./nix/overlay.nix inputs.llama-cpp;`
llama-cpp: final: prev:
let
  inherit (prev) lib;
  platform = prev.stdenv.hostPlatform;
  upstream = llama-cpp.packages.${platform.system} or { };
  withFlags =
    drv: keep: flags:
    drv.overrideAttrs (old: {
      cmakeFlags = builtins.filter keep (old.cmakeFlags or [ ]) ++ flags;
    });

  # Upstream builds every backend with GGML_NATIVE=OFF and no backend loading, which inside Nix
  # is the baseline instruction set: the layers a GPU build does not offload run there too.
  # GGML_BACKEND_DL builds the backends as modules and GGML_CPU_ALL_VARIANTS one CPU module per
  # instruction-set level; the best one for the machine is loaded at start. ggml has the
  # variants on x86-64, and on aarch64-linux from the releases whose CMake lists the armv8.x
  # modules (older pins stop with a CMake error there, so they keep the upstream build).
  ggmlCmake = "${upstream.default.src}/ggml/src/CMakeLists.txt";
  hasCpuVariants =
    platform.isx86_64
    || (
      platform.isAarch64
      && platform.isLinux
      && upstream.default ? src
      && builtins.pathExists ggmlCmake
      && lib.hasInfix "armv8.2_1" (builtins.readFile ggmlCmake)
    );
  runtimeDispatch =
    drv:
    if hasCpuVariants then
      withFlags drv (_: true) [
        (lib.cmakeBool "GGML_BACKEND_DL" true)
        (lib.cmakeBool "GGML_CPU_ALL_VARIANTS" true)
      ]
    else
      drv;

  # Every CUDA capability upstream's nixpkgs defaults to is most of the build's hour and of its
  # size; a fleet that knows its GPUs says so in `nixpkgs.config.cudaCapabilities` (["8.6"]).
  capabilities = prev.config.cudaCapabilities or [ ];
  forCapabilities =
    drv:
    if capabilities == [ ] then
      drv
    else
      withFlags drv (f: !lib.hasPrefix "-DCMAKE_CUDA_ARCHITECTURES" f) [
        (lib.cmakeFeature "CMAKE_CUDA_ARCHITECTURES" (
          builtins.concatStringsSep ";" (map (c: builtins.replaceStrings [ "." ] [ "" ] c) capabilities)
        ))
      ];

  from =
    name: attr: f:
    lib.optionalAttrs (upstream ? ${attr}) { ${name} = f upstream.${attr}; };
in
lib.optionalAttrs (upstream ? default) {
  llama-cpp = runtimeDispatch upstream.default;
  llama-cpp-baseline = upstream.default;
}
// from "llama-cpp-cuda" "cuda" (drv: forCapabilities (runtimeDispatch drv))
// from "llama-cpp-vulkan" "vulkan" runtimeDispatch
// from "llama-cpp-rocm" "rocm" (drv: drv)
