#!/bin/sh
# Installs userli-postfix into ./.venv (creating it on first use) and runs
# the daemon in the foreground.  Configuration comes from the environment
# (see the README); extra arguments are passed to the daemon as options.
set -eu
cd "$(dirname "$0")/.."
EXTRAS=""
. scripts/venv.sh
exec .venv/bin/twistd -n --pidfile= userli-postfix "$@"
