#!/usr/bin/env bash
# PostgreSQL for the registry's tests (lorapool.registry.postgres): Debian's `postgresql`
# package, installed when its server binaries (initdb, pg_ctl) are missing. Idempotent.
# The tests start their own throwaway cluster with initdb/pg_ctl under a temp directory
# on a free loopback port; nothing here starts a server. Needs root (or sudo) only when
# the package is missing.
set -euo pipefail

have_server() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null 2>&1
}

if have_server; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-postgres: no initdb found and no apt-get: install PostgreSQL (>= 12) yourself;" \
        "the PostgreSQL tests are skipped without it" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup-postgres: not root and no sudo: install Debian's postgresql package" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends postgresql
# Debian's package starts a cluster of its own on port 5432; the tests do not use it.
have_server
