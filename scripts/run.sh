#!/bin/sh
# Installs userli-postfix into ./.venv (creating it on first use) and runs
# the daemon in the foreground.  Configuration comes from the environment
# (see the README); extra arguments are passed to the daemon as options.
set -eu
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        # Debian's own Python keeps venv and pip in separate packages.
        rm -rf .venv
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
        "$PYTHON" -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q .
exec .venv/bin/twistd -n --pidfile= userli-postfix "$@"
