#!/usr/bin/env bash
# Install what tests/real needs from Debian's packages (Debian/Ubuntu). Idempotent: packages
# already installed are left alone, and `apt-get update` runs only when the package lists are
# missing or an install from the existing lists fails.
#
#   krb5-kdc krb5-admin-server  an MIT KDC with its own realm (kdb5_util, kadmin.local)
#   krb5-user                   kinit / klist / kvno, used to check the KDC is up
#   apache2 + mod_auth_gssapi   the internal API: Negotiate/Kerberos, NTLM and Basic locations
#   gss-ntlmssp                 the GSSAPI NTLM mechanism mod_auth_gssapi uses for NTLM
#   faketime                    runs a second KDC an hour ahead, for the clock-skew test
#   python3                     Debian's, for the upload CGI that Apache runs as www-data
#   libkrb5-dev                 krb5-config and headers: the gssapi and krb5 Python packages
#                               (pyspnego's Kerberos backend) build against them
#
# Nothing here starts a system service: tests/real/servers.py runs the KDC and Apache as the
# tests' own child processes with private configuration, ports and directories.
#
#   bash tests/real/setup.sh               everything above (make test)
#   bash tests/real/setup.sh --build-deps  only what building the agent's Kerberos needs
#                                          (make's venv step, so `make demo` works too)
set -euo pipefail

BUILD_DEPS=(libkrb5-dev gcc)
PACKAGES=(
    krb5-kdc krb5-admin-server krb5-user
    apache2 libapache2-mod-auth-gssapi gss-ntlmssp
    faketime python3 "${BUILD_DEPS[@]}"
)
build_only=false
if [[ ${1:-} == --build-deps ]]; then
    build_only=true
    PACKAGES=("${BUILD_DEPS[@]}")
fi

bash "$(dirname "$0")/../../scripts/apt-install.sh" tests/real/setup.sh "${PACKAGES[@]}"

if $build_only; then
    command -v krb5-config >/dev/null || { echo "tests/real/setup.sh: no krb5-config" >&2; exit 1; }
    exit 0
fi

for tool in krb5kdc kdb5_util kadmin.local kinit apache2 krb5-config; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null; then
        echo "tests/real/setup.sh: $tool is missing after the install" >&2
        exit 1
    fi
done
if [[ ! -e /usr/lib/apache2/modules/mod_auth_gssapi.so ]] \
    || ! compgen -G '/usr/lib/*/gssntlmssp/gssntlmssp.so' >/dev/null; then
    echo "tests/real/setup.sh: mod_auth_gssapi or gss-ntlmssp is missing after the install" >&2
    exit 1
fi
echo "tests/real/setup.sh: ready"
