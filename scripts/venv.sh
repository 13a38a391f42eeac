# Sourced by run.sh and test.sh: makes the virtualenv $VENV (default
# ./.venv; created on first use, also on Debian's own Python, which keeps
# venv and pip in separate packages) and installs this checkout into it,
# with the extras in $EXTRAS (e.g. "[test]") and the pip constraints file
# $CONSTRAINTS, if set.  The install is skipped when none of its inputs
# changed since the last one, so a start needs no network once installed.
# Sets SUDO for the callers' apt-get.
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
        "$PYTHON" -m venv "$VENV"
    fi
fi
# Everything the install is made of: the package's files, its metadata,
# the constraints asked for and the interpreter; then the extras.  An
# install with extras serves a start without them (run.sh after test.sh).
stamp="$VENV/.userli-postfix-install"
inputs=$(
    {
        find userli_postfix twisted setup.cfg pyproject.toml README.md LICENSE \
            ${CONSTRAINTS:+"$CONSTRAINTS"} -type f \
            ! -name '*.pyc' ! -name dropin.cache -print0 |
            sort -z | xargs -0 sha256sum
        echo "constraints=${CONSTRAINTS:-}"
        "$VENV/bin/python" --version
    } | sha256sum | cut -d' ' -f1
)
installed=$(cat "$stamp" 2>/dev/null || true)
if [ "$installed" != "$inputs ${EXTRAS:-}" ] &&
    { [ -n "${EXTRAS:-}" ] || [ "${installed%% *}" != "$inputs" ]; }; then
    rm -f "$stamp"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # Not editable: an editable install would map the repository's
    # twisted/plugins over Twisted's own package.
    "$VENV/bin/python" -m pip install -q ${CONSTRAINTS:+-c "$CONSTRAINTS"} ".${EXTRAS:-}"
    # Twisted's plugin cache, built now rather than by the daemon's first
    # start (which would have to import every plugin, and may run as a user
    # who cannot write it).
    "$VENV/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
    echo "$inputs ${EXTRAS:-}" >"$stamp"
fi
