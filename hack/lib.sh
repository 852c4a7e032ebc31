# Shared helpers for hack/ scripts: sourced, not run.

# Installs the Debian packages named as arguments that are not installed yet.
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "hack: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# Makes cargo available: the machine's toolchain if there is one, else rustup's stable.
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            ensure_packages curl ca-certificates
            echo "hack: installing the Rust toolchain with rustup" >&2
            curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy >&2
            export PATH="$HOME/.cargo/bin:$PATH"
        fi
    fi
}

# Where cargo builds when the caller did not say: one directory per machine, outside the
# checkout, so a fresh clone (as CI runs) reuses what an earlier run compiled. Cargo rebuilds
# whatever changed, the berth crate of a new checkout always.
use_build_cache() {
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/berth-cargo-target}"
}

# What building and running berthd needs.
BUILD_PACKAGES=(build-essential pkg-config protobuf-compiler libseccomp-dev libelf-dev zlib1g-dev)
RUN_PACKAGES=(iproute2 nftables util-linux libelf1)
# What the test fixtures (offline images, a local registry) need.
FIXTURE_PACKAGES=(python3 docker-registry zstd gcc libc6-dev apache2-utils)
# Debian's runc (1.1.5, without the November 2025 fixes) for the two tests that need such a
# runtime: berthd's refusal of it, and a runtime without idmapped mounts. The runc handler of
# every other test is built by e2e/tools/build-runc. And the CNI plugins (with the iptables they
# call) the CNI-mode tests run.
HANDLER_PACKAGES=(runc containernetworking-plugins iptables)
# The cgroup v2 guest (e2e/vm): a KVM machine, and debootstrap for its root.
VM_PACKAGES=(qemu-system-x86 debootstrap e2fsprogs)
