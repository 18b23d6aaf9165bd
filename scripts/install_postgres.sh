#!/usr/bin/env bash
# Installs Debian's PostgreSQL 15 server (for `make tracking-server` and its tests) when it
# is missing; does nothing when it is there. Needs root (apt-get).
set -euo pipefail
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
if [[ -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" ]]; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "PostgreSQL 15 missing in $PG_BIN; install it as root: apt-get install postgresql" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d: keep the package's own cluster from starting; ours lives under the repo
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap "rm -f /usr/sbin/policy-rc.d" EXIT
fi
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
"$PG_BIN/initdb" --version
