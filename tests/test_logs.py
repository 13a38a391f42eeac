"""
Tests for L{userli_postfix.logs}: C{LOG_LEVEL} filters events, and
C{LOG_FORMAT=json} writes exactly one JSON object per line.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.logs import LEVELS, makeObserver


class LevelTests(SynchronousTestCase):
    """Events below the configured level are dropped."""

    def emitAll(self, level: str, format: str = "json") -> list[str]:
        """Log one event at each level; return the levels that came out."""
        stream = io.StringIO()
        log = Logger(namespace="test", observer=makeObserver(level, format, stream))
        log.debug("at debug")
        log.info("at info")
        log.warn("at warn")
        log.error("at error")
        log.critical("at critical")
        return [line for line in stream.getvalue().splitlines() if line]

    def test_levels(self) -> None:
        """Each configured level lets through itself and everything more severe."""
        table = {
            "debug": ["debug", "info", "warn", "error", "critical"],
            "info": ["info", "warn", "error", "critical"],
            "warn": ["warn", "error", "critical"],
            "error": ["error", "critical"],
        }
        for level, expected in table.items():
            lines = self.emitAll(level)
            self.assertEqual([json.loads(line)["level"] for line in lines], expected, level)

    def test_text_filtered(self) -> None:
        """The level filter applies to the text format too."""
        lines = self.emitAll("warn", "text")
        self.assertEqual(len(lines), 3)
        self.assertFalse(any("at info" in line for line in lines))
        self.assertTrue(any("at warn" in line for line in lines))

    def test_known_levels(self) -> None:
        """The levels are the Go program's four."""
        self.assertEqual(set(LEVELS), {"debug", "info", "warn", "error"})


class JSONTests(SynchronousTestCase):
    """C{LOG_FORMAT=json}: one object per line, for log shippers."""

    def setUp(self) -> None:
        self.stream = io.StringIO()
        self.log = Logger(
            namespace="userli_postfix.test", observer=makeObserver("debug", "json", self.stream)
        )

    def records(self) -> list[dict[str, object]]:
        lines = self.stream.getvalue().split("\n")
        self.assertEqual(lines[-1], "", "output ends with a newline")
        return [json.loads(line) for line in lines[:-1]]

    def test_fields(self) -> None:
        """Each record has the time, level, namespace and formatted message."""
        self.log.info("Looked up {map}", map="alias")
        (record,) = self.records()
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "userli_postfix.test")
        self.assertEqual(record["message"], "Looked up alias")
        self.assertRegex(str(record["time"]), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

    def test_one_line_each(self) -> None:
        """Line breaks inside a message stay inside its one line."""
        self.log.warn("first\nsecond\r\nthird")
        self.log.info("next")
        records = self.records()
        self.assertEqual(len(records), 2)
        self.assertEqual(records[0]["message"], "first\nsecond\r\nthird")

    def test_failure(self) -> None:
        """A logged failure carries its traceback in C{error}, still on one line."""
        try:
            raise ValueError("boom")
        except ValueError:
            self.log.failure("It failed")
        (record,) = self.records()
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["message"], "It failed")
        self.assertIn("ValueError: boom", str(record["error"]))

    def test_unserialisable_values(self) -> None:
        """Odd values in an event do not break the line."""
        self.log.info("value {v}", v=object())
        (record,) = self.records()
        self.assertIn("object object", str(record["message"]))

    def test_non_ascii(self) -> None:
        """Non-ASCII text survives as text."""
        self.log.info("domain {d}", d="bücher.de")
        (record,) = self.records()
        self.assertEqual(record["message"], "domain bücher.de")
