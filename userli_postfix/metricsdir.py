"""
The directory where worker processes keep their metrics.

prometheus-client keeps every process's metrics in files of a shared
directory (its multiprocess mode) when C{PROMETHEUS_MULTIPROC_DIR} is set
as it is imported, and only then: the choice is made once, at import.  The
children get the variable in their environment when they are started; the
first process learns that it will have children only from its options, so
L{prepare} sets the variable for it while the options are read, before
anything imports prometheus-client.

This module imports nothing of prometheus-client or of Twisted's
networking, so that it can run that early.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

#: prometheus-client's own variable: where every process keeps its metrics.
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: Set by the parent in each child's environment (see L{userli_postfix.workers}).
LISTENERS_VARIABLE = "USERLI_POSTFIX_INHERITED_LISTENERS"


class TooLate(RuntimeError):
    """prometheus-client was imported before the directory was chosen."""


def prepare(workers: str | None, environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """
    In the first process, when C{workers} (the unchecked C{WORKERS} value)
    asks for more than one process: make a private metrics directory, put
    it in the environment for prometheus-client (and the children), and
    remove it when the process exits.  Otherwise nothing.

    A malformed C{WORKERS} is left to the configuration check, which
    refuses it.

    @raise TooLate: if prometheus-client is imported already; its metrics
        would then not add up over the processes.
    """
    text = (workers or "").strip()
    if environ.get(LISTENERS_VARIABLE) or not (text.isascii() and text.isdigit()):
        return None
    if int(text) <= 1:
        return None
    if "prometheus_client" in sys.modules:
        raise TooLate(
            "prometheus_client was imported before the worker processes' metrics "
            f"directory was chosen; {METRICS_VARIABLE} must be set first"
        )
    directory = Path(tempfile.mkdtemp(prefix="userli-postfix-metrics-"))
    environ[METRICS_VARIABLE] = str(directory)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def current(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """The metrics directory L{prepare} chose, if any."""
    value = environ.get(METRICS_VARIABLE)
    return Path(value) if value else None
