#!/usr/bin/env bash
# Install the system packages the benchmark needs (Debian/Ubuntu). Idempotent:
# packages already installed are left alone and `apt-get update` runs at most once.
set -euo pipefail

PACKAGES=(openssh-server openssh-client wrk curl)

if [[ $(id -u) -ne 0 ]]; then
    SUDO=sudo
else
    SUDO=
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1 \
        || ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "bench/setup.sh: all packages present: ${PACKAGES[*]}"
else
    echo "bench/setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Update the package lists only if they have never been fetched, or the install fails
    # because they are stale.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    elif ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

# The benchmark starts its own sshd with a private config; it never uses the system
# service. Debian's sshd needs its privilege-separation directory to exist.
$SUDO mkdir -p /run/sshd
$SUDO chmod 0755 /run/sshd

echo "bench/setup.sh: ready"
