#!/usr/bin/env bash
# Install what tests/faults needs from Debian's packages. Idempotent: packages already present
# are left alone, and `apt-get update` runs only when the package lists are missing or an
# install from the existing lists fails.
#
#   iproute2   `ip netns` and veth pairs: the half-open network test builds two private network
#              namespaces joined by a veth pair on a /30 that exists only inside them
#   nftables   `nft`: drops the agent's packets inside its namespace (silently, no RST)
#
# Nothing here changes the host's own network: the tests create and delete their namespaces.
set -euo pipefail

PACKAGES=(iproute2 nftables)

if [[ $(id -u) -ne 0 ]]; then
    echo "tests/faults/setup.sh: not root; the network namespace tests will be skipped"
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "tests/faults/setup.sh: all packages present"
else
    echo "tests/faults/setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    install() { apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update -q >/dev/null
        install
    elif ! install; then
        apt-get update -q >/dev/null
        install
    fi
fi

for tool in ip nft; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null; then
        echo "tests/faults/setup.sh: $tool is missing after the install" >&2
        exit 1
    fi
done
echo "tests/faults/setup.sh: ready"
