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

bash "$(dirname "$0")/../../scripts/apt-install.sh" tests/faults/setup.sh "${PACKAGES[@]}"

for tool in ip nft; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null; then
        echo "tests/faults/setup.sh: $tool is missing after the install" >&2
        exit 1
    fi
done
echo "tests/faults/setup.sh: ready"
