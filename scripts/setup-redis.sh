#!/usr/bin/env bash
# Redis for the tests of rate limits shared through Redis (lorapool.scheduler.redis_limits):
# Debian's `redis-server` package, installed when the redis-server binary is missing.
# Idempotent. The tests start their own throwaway server (no persistence) on a free
# loopback port; nothing here starts one. Needs root (or sudo) only when it is missing.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-redis: no redis-server found and no apt-get: install Redis (>= 6) yourself;" \
        "the Redis tests are skipped without it" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup-redis: not root and no sudo: install Debian's redis-server package" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends redis-server
# Debian's package may start a server of its own on port 6379; the tests do not use it.
command -v redis-server >/dev/null
