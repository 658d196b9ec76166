#!/usr/bin/env bash
# Install what tests/ops needs from Debian's packages (Debian/Ubuntu). Idempotent: packages
# already installed are left alone, and `apt-get update` runs only when the package lists are
# missing or an install from the existing lists fails.
#
#   squid          the corporate proxy the agent's tunnel goes through (CONNECT, Basic via
#                  basic_ncsa_auth, NTLM via ntlm_fake_auth); the tests run their own squid
#                  with a private squid.conf, port, pid file, cache and log directories
#   apache2-utils  htpasswd, which writes the proxy's Basic-auth password file
#   chromium       the headless browser that drives the relay's admin page
#   systemd        systemd-analyze verify, which checks the agent's service unit
#   fonts-dejavu-core  text in the admin page's screenshots
#
# Nothing here starts a system service: the package scripts are told not to (policy-rc.d).
set -euo pipefail

PACKAGES=(squid apache2-utils chromium systemd fonts-dejavu-core)

bash "$(dirname "$0")/../../scripts/apt-install.sh" tests/ops/setup.sh "${PACKAGES[@]}"

for tool in squid htpasswd chromium systemd-analyze; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null; then
        echo "tests/ops/setup.sh: $tool is missing after the install" >&2
        exit 1
    fi
done
for helper in basic_ncsa_auth ntlm_fake_auth; do
    if [[ ! -x /usr/lib/squid/$helper ]]; then
        echo "tests/ops/setup.sh: /usr/lib/squid/$helper is missing after the install" >&2
        exit 1
    fi
done
echo "tests/ops/setup.sh: ready"
