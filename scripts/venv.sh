# Sourced by run.sh and test.sh: makes ./.venv (creating it on first use,
# also on Debian's own Python, which keeps venv and pip in separate
# packages) and installs this checkout into it, with the extras in
# $EXTRAS (e.g. "[test]").  Sets SUDO for the callers' apt-get.
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
        "$PYTHON" -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q --upgrade pip
# Not editable: an editable install would map the repository's
# twisted/plugins over Twisted's own package.
.venv/bin/python -m pip install -q ".${EXTRAS:-}"
# Twisted's plugin cache, built now rather than by the daemon's first start
# (which would have to import every plugin, and may run as a user who cannot
# write it).
.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
