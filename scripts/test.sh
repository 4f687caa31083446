#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest args...]
# Installs the PostgreSQL server, redis-server/redis-cli, rabbitmq-server and openssl with apt (as root)
# when missing; the suite itself starts and stops its own private servers on 127.0.0.1.
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

have_initdb() {
    if [ -n "${IDEMPOTENT_PG_BIN:-}" ] && [ -x "$IDEMPOTENT_PG_BIN/initdb" ]; then
        return 0
    fi
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then
        return 0
    fi
    command -v initdb >/dev/null 2>&1
}

apt_install() {
    # apt_install WHAT PKG... : install Debian packages, or explain and exit 1.
    local what="$1"; shift
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "error: $what not found and cannot install it (needs root and apt-get)." >&2
        echo "       install it (Debian: apt-get install $*) or set IDEMPOTENT_PG_BIN" >&2
        echo "       to the directory holding initdb and postgres." >&2
        exit 1
    fi
    echo "==> installing $what: apt-get install $*" >&2
    if [ -z "${_apt_updated:-}" ]; then
        apt-get update -qq
        _apt_updated=1
    fi
    # Don't let the packages start system-wide services during install.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
}

if ! have_initdb; then
    # Don't create (and start) the distribution's default cluster: the suite
    # runs its own throwaway server.
    apt_install "postgresql-common" postgresql-common
    conf=/etc/postgresql-common/createcluster.conf
    if [ -f "$conf" ]; then
        sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' "$conf"
    fi
    apt_install "PostgreSQL server (initdb)" postgresql
fi

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install "redis-server and redis-cli" redis-server redis-tools
fi

# The RabbitMQ tests (and Celery on RabbitMQ) run Debian's rabbitmq-server as a plain
# process of their own on 127.0.0.1.
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    apt_install "rabbitmq-server" rabbitmq-server
fi

# The rediss:// test makes a throwaway CA and certificate with openssl.
if ! command -v openssl >/dev/null 2>&1; then
    apt_install "openssl" openssl
fi

exec .venv/bin/python -m pytest "$@"
