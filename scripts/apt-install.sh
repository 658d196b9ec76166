#!/usr/bin/env bash
# Install Debian packages idempotently for the project's own setup scripts.
#
#   bash scripts/apt-install.sh LABEL PACKAGE...
#
# Packages already installed are left alone; `apt-get update` runs only when the package
# lists are missing or an install from the existing lists fails (stale lists). Package
# scripts are told not to start system services (policy-rc.d): the tests run their own
# servers with private configuration.
set -euo pipefail

label=$1
shift
if [[ $(id -u) -ne 0 ]]; then
    SUDO=sudo
else
    SUDO=
fi

missing=()
for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "$label: all packages present"
    exit 0
fi

echo "$label: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 0755 "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
fi
install() { $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    $SUDO apt-get update -q >/dev/null
    install
elif ! install; then
    $SUDO apt-get update -q >/dev/null
    install
fi
