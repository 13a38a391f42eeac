#!/bin/sh
# Runs the whole test suite on a fresh Debian machine (as root, or with sudo
# available): installs redis-server and postfix when they are missing, and
# for the deployment tests docker.io, debootstrap, prometheus (promtool),
# systemd's tools and docker-compose, the Python packages from PyPI, runs
# the checks (ruff check, ruff format --check, mypy), then runs every test
# with pytest (the Docker image tests start their own dockerd when none
# runs).
set -eu
cd "$(dirname "$0")/.."

# Postfix's own commands live in /usr/sbin, which a non-login root shell may lack.
PATH="$PATH:/usr/sbin:/sbin"
export PATH

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

# The deployment tests (tests/deploy): a Docker engine and client, debootstrap
# for the image's base, promtool, systemd's own checkers, and Compose.
# Without them those tests skip, saying why; so a failed install here is
# reported, not fatal.
deploy_missing=""
command -v dockerd >/dev/null 2>&1 || deploy_missing="$deploy_missing docker.io"
command -v debootstrap >/dev/null 2>&1 || deploy_missing="$deploy_missing debootstrap"
command -v promtool >/dev/null 2>&1 || deploy_missing="$deploy_missing prometheus"
command -v systemd-analyze >/dev/null 2>&1 || deploy_missing="$deploy_missing systemd"
command -v systemd-socket-activate >/dev/null 2>&1 || deploy_missing="$deploy_missing systemd"
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
    || deploy_missing="$deploy_missing docker-compose"
if [ -n "$deploy_missing" ]; then
    echo "Installing from apt:$deploy_missing"
    { [ -n "$missing" ] || $SUDO apt-get update -qq; } \
        && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            $deploy_missing >/dev/null \
        || echo "Could not install$deploy_missing: the tests that need them will be skipped."
fi

VENV=.venv
EXTRAS="[test,dev]"
. scripts/venv.sh

# The checks, before any test and on every run: a failed one fails the run,
# after all three have had their say.
LINTED="userli_postfix tests twisted benchmarks"
failed=""
.venv/bin/ruff check $LINTED || failed="$failed, ruff check"
.venv/bin/ruff format --check $LINTED || failed="$failed, ruff format --check"
.venv/bin/mypy || failed="$failed, mypy"
if [ -n "$failed" ]; then
    echo "Checks failed: ${failed#, }" >&2
    exit 1
fi

if [ "$#" -eq 0 ]; then
    # The whole run (CI's) then proves the lower bounds of setup.cfg: the
    # unit tests on the versions in constraints/minimum.txt, in a second
    # virtualenv.  A run given arguments (a developer's loop) skips this.
    echo "Unit tests on the lowest versions allowed (constraints/minimum.txt):"
    (
        VENV=.venv-min
        EXTRAS="[test]"
        CONSTRAINTS=constraints/minimum.txt
        . scripts/venv.sh
        .venv-min/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/integration \
            --ignore=tests/deploy \
            -m "not integration" tests
    )
fi

exec .venv/bin/python -m pytest "$@"
