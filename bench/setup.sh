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

bash "$(dirname "$0")/../scripts/apt-install.sh" bench/setup.sh "${PACKAGES[@]}"

# The benchmark starts its own sshd with a private config; it never uses the system
# service. Debian's sshd needs its privilege-separation directory to exist.
$SUDO mkdir -p /run/sshd
$SUDO chmod 0755 /run/sshd

echo "bench/setup.sh: ready"
