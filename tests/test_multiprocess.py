"""
Tests for L{userli_postfix.multiprocess}: the worker processes' metrics
directory is chosen before prometheus-client is imported, the way
prometheus-client documents, and what a process that ended counted stays
in the totals.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.multiprocess import (
    ARCHIVE,
    LISTENERS_VARIABLE,
    METRICS_VARIABLE,
    TooLate,
    current,
    prepare,
    removeLeftovers,
    retire,
)


class PrepareTests(SynchronousTestCase):
    """L{prepare} in a process that imported prometheus-client long ago (this one)."""

    def test_one_process(self) -> None:
        """One worker, a malformed count, or no count: no directory, nothing set."""
        for value in (None, "", "1", " 1 ", "two", "²", "-3"):
            environ: dict[str, str] = {}
            self.assertIsNone(prepare(value, environ))
            self.assertEqual(environ, {})

    def test_child(self) -> None:
        """A child (it inherited listeners) keeps the directory its parent gave it."""
        environ = {LISTENERS_VARIABLE: "socketmap=3", METRICS_VARIABLE: "/given"}
        self.assertIsNone(prepare("4", environ))
        self.assertEqual(environ[METRICS_VARIABLE], "/given")

    def test_too_late(self) -> None:
        """
        More than one worker once prometheus-client is imported is an error,
        not metrics that silently fail to add up.
        """
        import prometheus_client  # noqa: F401

        with self.assertRaises(TooLate):
            prepare("2", {})

    def test_current(self) -> None:
        """L{current} reads the directory back from the environment."""
        self.assertIsNone(current({}))
        self.assertEqual(str(current({METRICS_VARIABLE: "/d"})), "/d")


class FirstProcessTests(SynchronousTestCase):
    """The first process, as twistd starts it: a fresh interpreter."""

    def test_options_make_metrics_shared(self) -> None:
        """
        Reading the options with C{WORKERS=2} sets the directory before
        prometheus-client is imported, and prometheus-client then keeps
        the metrics in it (its documented multiprocess mode): fails if the
        daemon's imports or prometheus-client's choice at import change.
        """
        script = textwrap.dedent(
            """
            import os, sys
            from userli_postfix.tap import Options
            options = Options()
            options.parseOptions([])
            from userli_postfix.daemon import build
            from userli_postfix.metrics import Metrics
            Metrics()
            directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
            print(directory)
            print(sorted(os.listdir(directory)))
            """
        )
        environ = {
            k: v for k, v in os.environ.items() if k not in (METRICS_VARIABLE, LISTENERS_VARIABLE)
        }
        environ.update(USERLI_TOKEN="t", WORKERS="2", REDIS_URL="redis://127.0.0.1:1/0")
        result = subprocess.run(
            [sys.executable, "-c", script], env=environ, capture_output=True, check=False
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        directory, files = result.stdout.decode().splitlines()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.assertIn("counter_", files)
        # Removed when the process exits.
        self.assertFalse(os.path.exists(directory))


def writeMetrics(directory: Path, pid: int, requests: float, connections: float) -> None:
    """
    Files as prometheus-client writes them for process C{pid}: a counter
    (C{requests_total}), a histogram (C{duration}, every observation in its
    first bucket) and a live gauge (C{connections}).
    """

    def write(kind: str, values: list[tuple[str, str, dict[str, str], float]]) -> None:
        # Added to what the file holds already.
        data = MmapedDict(str(directory / f"{kind}_{pid}.db"))
        try:
            for metric, name, labels, value in values:
                key = mmap_key(metric, name, list(labels), list(labels.values()), metric)
                data.write_value(key, data.read_value(key)[0] + value, 0.0)
        finally:
            data.close()

    write("counter", [("requests", "requests_total", {"map": "alias"}, requests)])
    write(
        "histogram",
        [
            ("duration", "duration_bucket", {"le": "0.1"}, requests),
            ("duration", "duration_bucket", {"le": "+Inf"}, 0.0),
            ("duration", "duration_sum", {}, requests * 0.05),
        ],
    )
    write("gauge_livesum", [("connections", "connections", {}, connections)])


def readTotals(directory: Path) -> dict[str, float]:
    """What a scrape of C{directory} shows: each sample (a bucket by its bound) and its value."""
    totals: dict[str, float] = {}
    for metric in MultiProcessCollector(None, path=str(directory)).collect():
        for sample in metric.samples:
            name = sample.name
            if "le" in sample.labels:
                name += f"{{le={sample.labels['le']}}}"
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


class RetireTests(SynchronousTestCase):
    """L{retire}: a process that ended, taken out of the metrics without losing its counts."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def realProcess(self, increments: int) -> int:
        """
        A process that counts as the daemon's do, in multiprocess mode in
        L{directory}, and exits: a labelled counter, a histogram and a live
        gauge, written by prometheus-client itself.  Its pid.
        """
        script = textwrap.dedent(
            f"""
            import os
            from prometheus_client import Counter, Gauge, Histogram
            c = Counter("c", "A counter.", ["map"])
            h = Histogram("h_seconds", "A histogram.", ["map"], buckets=(0.01, 0.1))
            g = Gauge("g", "A live gauge.", multiprocess_mode="livesum")
            for i in range({increments}):
                c.labels("alias" if i % 2 else "domain").inc()
                h.labels("alias").observe(0.05 * (i % 3))
            g.set(3)
            print(os.getpid())
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, METRICS_VARIABLE: str(self.directory)},
            capture_output=True,
            check=True,
        )
        return int(result.stdout)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The parsed exposition of the directory, as the first process serves it."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))
        text = generate_latest(registry).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def test_counts_kept(self) -> None:
        """
        After each of two processes ends and is retired, every counter and
        histogram sample on the scrape is what it was (the live gauge
        alone goes), and the directory holds one archive per type: fails if
        prometheus-client's file names, format or merge change.
        """
        first = self.realProcess(7)
        second = self.realProcess(4)
        before = self.scrape()
        self.assertEqual(before[("g", ())], 6.0)
        self.assertEqual(before[("c_total", (("map", "alias"),))], 5.0)
        self.assertEqual(before[("h_seconds_count", (("map", "alias"),))], 11.0)
        counts = {k: v for k, v in before.items() if k[0] != "g"}
        retire(self.directory, first)
        after = self.scrape()
        self.assertEqual(after.pop(("g", ())), 3.0)
        self.assertEqual(after, counts)
        retire(self.directory, second)
        after = self.scrape()
        self.assertEqual(after, counts)
        self.assertEqual(
            sorted(p.name for p in self.directory.iterdir()),
            [f"counter_{ARCHIVE}.db", f"histogram_{ARCHIVE}.db"],
        )

    def test_other_processes_untouched(self) -> None:
        """Only the files of the given process go; a pid that ends like it is not taken for it."""
        writeMetrics(self.directory, 123, requests=1, connections=1)
        writeMetrics(self.directory, 1123, requests=2, connections=1)
        retire(self.directory, 123)
        self.assertEqual(
            sorted(p.name for p in self.directory.iterdir()),
            sorted(
                [
                    f"counter_{ARCHIVE}.db",
                    f"histogram_{ARCHIVE}.db",
                    "counter_1123.db",
                    "histogram_1123.db",
                    "gauge_livesum_1123.db",
                ]
            ),
        )
        totals = readTotals(self.directory)
        self.assertEqual(totals["requests_total"], 3.0)
        self.assertEqual(totals["connections"], 1.0)

    def test_unreadable(self) -> None:
        """
        A file cut short raises, is removed, and leaves the archive as it
        was.
        """
        writeMetrics(self.directory, 1, requests=4, connections=0)
        retire(self.directory, 1)
        (self.directory / "counter_2.db").write_bytes(b"\x01\x02")
        self.assertRaises(struct.error, retire, self.directory, 2)
        self.assertFalse((self.directory / "counter_2.db").exists())
        self.assertEqual(readTotals(self.directory)["requests_total"], 4.0)


class RemoveLeftoversTests(SynchronousTestCase):
    """L{removeLeftovers}: a worker whose parent died cleans up after it."""

    def test_removes_dead_given_and_archives(self) -> None:
        """
        Files of the given pids, of processes that no longer run, and the
        archives go; files of running processes stay, and so does the
        directory then.
        """
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        mine = os.getpid()
        names = [
            f"counter_{mine}.db",
            "counter_999999999.db",
            f"counter_{ARCHIVE}.db",
            f"gauge_livesum_{os.getppid()}.db",
        ]
        for name in names:
            (directory / name).write_bytes(b"")
        removeLeftovers(directory, (mine,))
        self.assertEqual(sorted(p.name for p in directory.iterdir()), [names[3]])
        removeLeftovers(directory, (os.getppid(),))
        self.assertFalse(directory.exists())
