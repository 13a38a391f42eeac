"""
Metrics of several processes: the directory where worker processes keep
them, what is kept of a process that ended, and their sum on a scrape.

prometheus-client keeps every process's metrics in files of a shared
directory (its multiprocess mode) when C{PROMETHEUS_MULTIPROC_DIR} is set
as it is imported, and only then: the choice is made once, at import.  The
children get the variable in their environment when they are started; the
first process learns that it will have children only from its options, so
L{prepare} sets the variable for it while the options are read, before
anything imports prometheus-client.

When a worker process ends, L{retire} keeps what it counted: its counters
and histograms are folded into one archive file per type, which every
scrape adds up with the files of the live processes, so the totals on
C{/metrics} never go down while the first process lives; only its live
gauges go (prometheus-client's C{mark_process_dead}).  The first process
serves the sum of them all from L{aggregatedRegistry}.

This module imports nothing of prometheus-client (but inside the functions
that run once it is imported) or of Twisted's networking, so that
L{prepare} can run that early.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

#: prometheus-client's own variable: where every process keeps its metrics.
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: Set by the parent in each child's environment (see L{userli_postfix.workers}).
LISTENERS_VARIABLE = "USERLI_POSTFIX_INHERITED_LISTENERS"

#: What stands for the process id in the name of an archive file
#: (C{counter_archive.db}): prometheus-client reads a file of the
#: directory by the type its name begins with, whatever follows.
ARCHIVE = "archive"


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


def retire(directory: Path, pid: int) -> None:
    """
    Take the ended process C{pid} out of the metrics of C{directory},
    keeping what it counted: its live gauges are dropped, as
    prometheus-client's C{mark_process_dead} does, and its counters and
    histograms are added to the archive file of their type, so that the
    totals every scrape adds up stay the same.  Its files are removed
    then: a worker that keeps crashing leaves no file per attempt behind,
    each read again by every scrape; the directory holds the live
    processes' files and one archive per type.

    @raise Exception: what reading or writing a file raised (a file cut
        short, a full disk); the file is removed with what it held, the
        archive is as it was.
    """
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory))
    for path in sorted(directory.glob(f"*_{pid}.db")):
        kind = path.name.split("_", 1)[0]
        try:
            if kind != "gauge":
                _fold(path, directory / f"{kind}_{ARCHIVE}.db")
        finally:
            path.unlink(missing_ok=True)


def _fold(path: Path, archive: Path) -> None:
    """
    Make C{archive} hold its own values plus those of C{path}, through
    prometheus-client's own merge (unaccumulated, as it says for writing
    merged values back to a file) and its own file format.  The new
    archive is written beside the old one and put in its place at once, so
    that no moment sees the values twice or not at all.
    """
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from prometheus_client.multiprocess import MultiProcessCollector

    sources = [str(p) for p in (archive, path) if p.exists()]
    merged = MultiProcessCollector.merge(sources, accumulate=False)
    # Not *.db: no scrape reads it while it is written.
    staging = archive.with_suffix(".new")
    staging.unlink(missing_ok=True)
    values = MmapedDict(str(staging))
    try:
        for metric in merged:
            for sample in metric.samples:
                key = mmap_key(
                    metric.name,
                    sample.name,
                    list(sample.labels),
                    list(sample.labels.values()),
                    metric.documentation,
                )
                values.write_value(key, sample.value, 0.0)
    finally:
        values.close()
    os.replace(staging, archive)


def aggregatedRegistry() -> Any:
    """
    A registry that reads the metrics of every process from the
    multiprocess directory, plus this process's own process metrics.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    ProcessCollector(registry=registry)
    return registry


def removeLeftovers(directory: Path, pids: tuple[int, ...]) -> None:
    """
    Remove the metrics files of C{pids}, of every process that no longer
    runs, and the archives, and the directory once it is empty: the last
    worker to exit after its parent died (and with it the only reader of
    the directory) leaves nothing behind.
    """
    for path in directory.glob("*.db"):
        owner = path.stem.rsplit("_", 1)[-1]
        if not owner.isdigit() or int(owner) in pids or not _running(int(owner)):
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        # Another worker's files are still there; the last one removes it.
        pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
