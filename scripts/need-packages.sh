#!/usr/bin/env bash
# Installs the Debian packages of commands that are missing, so that the tests, the demo and
# the benchmarks work on a fresh Debian 12 machine with only PostgreSQL 15 on it.
#
#   scripts/need-packages.sh COMMAND[:PACKAGE]...
#
# PACKAGE defaults to COMMAND; COMMAND may be an absolute path (/usr/bin/time:time).
# Installing needs root. A fresh machine may have no package lists yet, so `apt-get update`
# runs only when the first install fails. Exits 0 when nothing was missing or everything
# missing was installed; otherwise one line on stderr says what to install.
set -euo pipefail

missing=()
for spec in "$@"; do
    cmd="${spec%%:*}"
    pkg="${spec#*:}"
    if [[ "$cmd" == /* ]]; then
        [ -x "$cmd" ] && continue
    else
        command -v "$cmd" >/dev/null 2>&1 && continue
    fi
    missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "need-packages: ${missing[*]} not installed, and installing needs root: run apt-get install ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# A fresh VM's first boot often has apt-daily holding the lock for a while: wait for it.
apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
if ! "${apt[@]}" install "${missing[@]}" >/dev/null 2>&1; then
    "${apt[@]}" update >/dev/null && "${apt[@]}" install "${missing[@]}" >/dev/null || {
        echo "need-packages: could not install ${missing[*]} with apt-get: install them by hand" >&2
        exit 1
    }
fi
