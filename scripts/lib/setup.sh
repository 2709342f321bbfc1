# Shared set-up for scripts/test, scripts/demo and scripts/bench: installs what is missing on a
# fresh Debian machine and exports the environment the tools need. Source it; do not run it.

FLEETCACHE_CACHE_DIR=${FLEETCACHE_CACHE_DIR:-/var/cache/fleetcache-test}
GARAGE_VERSION=2.5.0

# Nix as Debian's nix-bin runs it here: single-user as root, no sandbox, offline. The narinfo
# disk-cache TTLs are 0 because every demo, bench and test cache is new, on a port an earlier
# one may have used.
export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nexperimental-features = nix-command flakes\nsubstituters =\nnarinfo-cache-negative-ttl = 0\nnarinfo-cache-positive-ttl = 0'

step() { printf '\n==> %s\n' "$*" >&2; }
# The median of the numbers on stdin, one a line (the lower middle one of an even count).
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# Debian packages: nix-bin (the real Nix), git (flakes), a C toolchain (Garage's bundled C
# libraries, libfuzzer), curl.
ensure_debian_packages() {
    local missing=()
    command -v nix-store >/dev/null || missing+=(nix-bin)
    command -v git >/dev/null || missing+=(git)
    command -v cc >/dev/null || missing+=(build-essential)
    command -v c++ >/dev/null || missing+=(g++)
    command -v make >/dev/null || missing+=(make)
    command -v curl >/dev/null || missing+=(curl)
    if [ ${#missing[@]} -gt 0 ]; then
        step "installing Debian packages: ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    if ! command -v cargo >/dev/null; then
        echo "error: cargo is not installed (this project needs a Rust toolchain, 1.94.1 or newer)" >&2
        return 1
    fi
}

# nginx (Debian's package): the TLS proxy the HTTPS tests put in front of our servers; and
# tinyproxy, the HTTP proxy they go through.
ensure_nginx() {
    if ! [ -x /usr/sbin/nginx ] && ! command -v nginx >/dev/null; then
        step "installing Debian packages: nginx"
        # The package's own service is not wanted: each test starts its own nginx.
        apt_install nginx
    fi
    command -v openssl >/dev/null || apt_install openssl
    # An HTTP proxy for the HTTPS_PROXY test; the package's own daemon is not wanted.
    if ! command -v tinyproxy >/dev/null; then
        step "installing Debian packages: tinyproxy"
        apt_install tinyproxy
        as_root service tinyproxy stop >/dev/null 2>&1 || true
    fi
}

# Chromium (Debian's package), run headless by the tests of the web pages.
ensure_chromium() {
    if ! command -v chromium >/dev/null; then
        step "installing Debian packages: chromium (headless, for the web page tests)"
        apt_install chromium
    fi
}

# A current Nix beside Debian 12's 2.8 (Debian sid's nix-bin, run from its own directory under
# $FLEETCACHE_CACHE_DIR; ../shared/modern-nix/install does it in ~40 s the first time). Sets
# MODERN_NIX to the directory whose bin/ has it, or leaves it empty (with a warning) where the
# installer is not beside this repository.
ensure_modern_nix() {
    local installer=${FLEETCACHE_MODERN_NIX_INSTALL:-../shared/modern-nix/install}
    MODERN_NIX=
    if [ ! -x "$installer" ]; then
        echo "WARNING: $installer is missing: the Nix-facing tests run with Debian's Nix only" >&2
        return 0
    fi
    step "a current Nix beside Debian's (../shared/modern-nix)"
    MODERN_NIX=$(FLEETCACHE_CACHE_DIR=$FLEETCACHE_CACHE_DIR "$installer" sid | tail -n 1)
}

# PostgreSQL (Debian's package) for the replicated-orchestrator tests; each test starts its own
# throw-away cluster, so the package's own service need not run.
ensure_postgres() {
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        step "installing Debian packages: postgresql"
        apt_install postgresql
    fi
    command -v setpriv >/dev/null || apt_install util-linux
}

# Garage, the S3 server the tests run against, built from crates.io once per version and kept
# under $FLEETCACHE_CACHE_DIR (outside the clone). It is AGPL: run as a program, never linked.
ensure_garage() {
    local root="$FLEETCACHE_CACHE_DIR/garage-$GARAGE_VERSION"
    local bin="$root/bin/garage"
    if ! { [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; }; then
        step "building Garage $GARAGE_VERSION from crates.io into $root (once per machine, ~10-15 min)"
        mkdir -p "$FLEETCACHE_CACHE_DIR"
        local build="$FLEETCACHE_CACHE_DIR/garage-build"
        CARGO_TARGET_DIR="$build" cargo install garage --version "$GARAGE_VERSION" --locked \
            --no-default-features --features sqlite,bundled-libs --root "$root" --quiet
        rm -rf "$build"
    fi
    export FLEETCACHE_GARAGE="$bin"
}
