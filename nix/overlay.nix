# The llama.cpp variants a fleet machine installs, taken from the llama.cpp flake it pins.
#
#   llama-cpp           CPU, with the CPU backend chosen at run time (x86-64: SSE4.2 up to AVX-512)
#   llama-cpp-baseline  the upstream `default` untouched (x86-64 baseline: no AVX, AVX2 or FMA)
#   llama-cpp-cuda      upstream `cuda` (Linux)
#   llama-cpp-vulkan    upstream `vulkan`
#   llama-cpp-rocm      upstream `rocm` (x86_64-linux)
#
# A variant the llama.cpp flake does not have for this system is absent, not an error.
# Usage: `overlays.default = import ./nix/overlay.nix inputs.llama-cpp;`
llama-cpp: final: prev:
let
  inherit (prev) lib;
  upstream = llama-cpp.packages.${prev.stdenv.hostPlatform.system} or { };
  from = name: attr: lib.optionalAttrs (upstream ? ${attr}) { ${name} = upstream.${attr}; };

  # Upstream builds `default` with GGML_NATIVE=OFF and no backend loading, which inside Nix is
  # the baseline instruction set. GGML_BACKEND_DL builds the backends as modules and
  # GGML_CPU_ALL_VARIANTS builds one CPU module per x86-64 level; the best one for the machine
  # is loaded at start. ggml supports the variants on x86-64 only, so elsewhere `llama-cpp` is
  # the upstream build.
  runtimeDispatch =
    drv:
    if prev.stdenv.hostPlatform.isx86_64 then
      drv.overrideAttrs (old: {
        cmakeFlags = (old.cmakeFlags or [ ]) ++ [
          (lib.cmakeBool "GGML_BACKEND_DL" true)
          (lib.cmakeBool "GGML_CPU_ALL_VARIANTS" true)
        ];
      })
    else
      drv;
in
lib.optionalAttrs (upstream ? default) {
  llama-cpp = runtimeDispatch upstream.default;
  llama-cpp-baseline = upstream.default;
}
// from "llama-cpp-cuda" "cuda"
// from "llama-cpp-vulkan" "vulkan"
// from "llama-cpp-rocm" "rocm"
