#!/bin/sh
# Runs the whole test suite on a fresh Debian machine (as root, or with sudo
# available): installs redis-server and postfix when they are missing, the
# Python packages from PyPI, then runs every test with pytest.
set -eu
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v redis-sentinel >/dev/null 2>&1 || missing="$missing redis-sentinel"
command -v postmap >/dev/null 2>&1 || missing="$missing postfix"
if [ -n "$missing" ]; then
    echo "Installing from apt:$missing"
    $SUDO apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
# Postfix's own commands live in /usr/sbin, which a non-login root shell may lack.
PATH="$PATH:/usr/sbin:/sbin"
export PATH

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
# Not editable: an editable install would map the repository's
# twisted/plugins over Twisted's own package.
.venv/bin/python -m pip install -q ".[test]"

exec .venv/bin/python -m pytest "$@"
