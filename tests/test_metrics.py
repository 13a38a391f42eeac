"""Tests for the helpers of L{userli_postfix.metrics}."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.metrics import increments, observations


class CountingCounter(Counter):
    """A counter that counts how often a child was looked up."""

    lookups = 0

    def labels(self, *values: object, **named: object) -> CountingCounter:
        CountingCounter.lookups += 1
        return super().labels(*values, **named)


class ChildrenTests(SynchronousTestCase):
    """Labelled children, looked up once per label values, counting on the right series."""

    def setUp(self) -> None:
        self.registry = CollectorRegistry()

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def test_increments(self) -> None:
        """Each label tuple counts on its own series."""
        counter = Counter("things", "Things.", ["map", "result"], registry=self.registry)
        inc = increments(counter)
        inc["alias", "hit"]()
        inc["alias", "hit"]()
        inc["alias", "miss"]()
        self.assertEqual(self.value("things_total", map="alias", result="hit"), 2.0)
        self.assertEqual(self.value("things_total", map="alias", result="miss"), 1.0)

    def test_one_label(self) -> None:
        """A single label is given as a string, not spelled out letter by letter."""
        counter = Counter("things", "Things.", ["map"], registry=self.registry)
        increments(counter)["alias"]()
        self.assertEqual(self.value("things_total", map="alias"), 1.0)

    def test_observations(self) -> None:
        """A histogram child observes on its own series."""
        histogram = Histogram(
            "took", "Took.", ["map", "status"], buckets=(1.0,), registry=self.registry
        )
        observe = observations(histogram)
        observe["alias", "success"](0.5)
        observe["alias", "success"](2.0)
        self.assertEqual(self.value("took_sum", map="alias", status="success"), 2.5)
        self.assertEqual(self.value("took_bucket", map="alias", status="success", le="1.0"), 1.0)

    def test_looked_up_once(self) -> None:
        """The child is looked up the first time its labels are used, never again."""
        counter = CountingCounter("things", "Things.", ["map"], registry=self.registry)
        CountingCounter.lookups = 0
        inc = increments(counter)
        self.assertEqual(CountingCounter.lookups, 0)
        for _ in range(10):
            inc["alias"]()
        inc["domain"]()
        self.assertEqual(CountingCounter.lookups, 2)
        self.assertEqual(self.value("things_total", map="alias"), 10.0)
