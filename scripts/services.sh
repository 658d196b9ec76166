#!/usr/bin/env bash
# Start the machine's PostgreSQL and Redis if they are down (the scale-out tests use both).
# Idempotent; installs them from Debian's packages when missing.
set -euo pipefail

bash "$(dirname "$0")/apt-install.sh" scripts/services.sh postgresql redis-server redis-tools

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 50); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
fi
# Trust auth on loopback and a `test` database, as the tests expect.
if ! psql -h 127.0.0.1 -d test -Atc 'select 1' >/dev/null 2>&1; then
    su postgres -c "psql -Atc \"select 1 from pg_roles where rolname='root'\"" | grep -q 1 \
        || su postgres -c "createuser --superuser root"
    su postgres -c "psql -lqt" | cut -d'|' -f1 | grep -qw test || su postgres -c "createdb test"
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
echo "services: PostgreSQL and Redis are up"
