"""
Tests for L{userli_postfix.metricsdir}: the worker processes' metrics
directory is chosen before prometheus-client is imported, the way
prometheus-client documents.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.metricsdir import (
    LISTENERS_VARIABLE,
    METRICS_VARIABLE,
    TooLate,
    current,
    prepare,
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
