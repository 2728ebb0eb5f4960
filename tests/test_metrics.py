"""The metrics collector reads the server's Counter at scrape time."""

from __future__ import annotations

from collections import Counter

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from kerjostunt.server import metrics


def samples(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    text = metrics.render(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class CollectorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.counters: Counter[str] = Counter()
        self.online = 0
        self.registry = metrics.make_registry(
            self.counters, registered=lambda: self.online, connections=lambda: 7, process=False
        )

    def test_known_counters_exist_at_zero(self) -> None:
        values = samples(self.registry)
        for key, (name, _) in metrics.KNOWN_COUNTERS.items():
            self.assertEqual(values[(f"kerjostunt_{name}_total", ())], 0.0, key)
        self.assertEqual(values[("kerjostunt_signaling_connections", ())], 7.0)

    def test_counts_are_read_at_scrape_time(self) -> None:
        self.counters["registrations"] += 3
        self.counters["refused_per_ip"] += 1
        self.online = 2
        values = samples(self.registry)
        self.assertEqual(values[("kerjostunt_registrations_total", ())], 3.0)
        self.assertEqual(values[("kerjostunt_refused_connections_total", ())], 1.0)
        self.assertEqual(values[("kerjostunt_registered_peers", ())], 2.0)
        self.counters["registrations"] += 1
        self.assertEqual(samples(self.registry)[("kerjostunt_registrations_total", ())], 4.0)

    def test_calls_are_labelled_by_outcome_and_technique(self) -> None:
        self.counters[metrics.call_counter_name("stunt", "simultaneous-open")] += 2
        self.counters[metrics.call_counter_name("direct")] += 1
        self.counters["calls_failed_low_ttl"] += 1  # underscores belong to the technique
        values = samples(self.registry)
        self.assertEqual(
            values[("kerjostunt_calls_total",
                    (("code", "200"), ("outcome", "stunt"), ("technique", "simultaneous-open")))], 2.0
        )
        self.assertEqual(values[("kerjostunt_calls_total",
                                 (("code", "200"), ("outcome", "direct"), ("technique", "none")))], 1.0)
        self.assertEqual(values[("kerjostunt_calls_total",
                                 (("code", "200"), ("outcome", "failed"), ("technique", "low_ttl")))], 1.0)
        self.assertRaises(ValueError, metrics.call_counter_name, "not_found")

    def test_sip_codes_have_their_own_label(self) -> None:
        self.counters["calls_refused_404"] += 2
        self.counters["calls_rejected_486"] += 1
        self.counters["calls_timed-out_408"] += 1
        self.counters["calls_cancelled_487"] += 1
        values = samples(self.registry)
        calls = {dict(labels)["outcome"]: (dict(labels), value)
                 for (name, labels), value in values.items() if name == "kerjostunt_calls_total"}
        self.assertEqual(calls["refused"], ({"outcome": "refused", "technique": "none", "code": "404"}, 2.0))
        self.assertEqual(calls["rejected"][0]["code"], "486")
        self.assertEqual(calls["timed-out"][0], {"outcome": "timed-out", "technique": "none", "code": "408"})
        self.assertEqual(calls["cancelled"][0]["code"], "487")
        self.assertTrue(all(labels["technique"] == "none" for labels, _ in calls.values()))

    def test_answered_calls_are_not_counted_twice(self) -> None:
        """Three calls: one answered that connected, one answered that failed, one refused."""
        self.counters["calls_answered"] += 2
        self.counters[metrics.call_counter_name("stunt", "simultaneous-open")] += 1
        self.counters[metrics.call_counter_name("failed", "none")] += 1
        self.counters["calls_refused_480"] += 1
        values = samples(self.registry)
        total = sum(v for (name, _), v in values.items() if name == "kerjostunt_calls_total")
        self.assertEqual(total, 3.0)
        self.assertEqual(values[("kerjostunt_calls_answered_total", ())], 2.0)
        self.assertNotIn("answered", {dict(labels).get("outcome") for (_, labels) in values})

    def test_unknown_names_are_kept_as_events(self) -> None:
        self.counters["something_new"] += 5
        values = samples(self.registry)
        self.assertEqual(values[("kerjostunt_events_total", (("event", "something_new"),))], 5.0)

    def test_registries_are_private(self) -> None:
        other = metrics.make_registry(Counter({"registrations": 9}), process=False)
        self.assertEqual(samples(other)[("kerjostunt_registrations_total", ())], 9.0)
        self.assertEqual(samples(self.registry)[("kerjostunt_registrations_total", ())], 0.0)
        self.assertNotIn("kerjostunt_registrations", {m.name for m in REGISTRY.collect()})

    def test_process_metrics_are_optional(self) -> None:
        with_process = metrics.make_registry(Counter())
        names = {name for name, _ in samples(with_process)}
        self.assertIn("process_cpu_seconds_total", names)  # the standard names, no prefix
        self.assertIn("process_resident_memory_bytes", names)
        self.assertFalse(any(name.startswith("kerjostunt_process") for name in names))
        self.assertNotIn("process_cpu_seconds_total", {name for name, _ in samples(self.registry)})


class DashboardTests(unittest.TestCase):
    """docs/grafana-dashboard.json asks only for series the server exports."""

    def test_every_queried_metric_is_exported(self) -> None:
        import json
        import re
        from pathlib import Path

        dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        wanted = {name for expr in exprs for name in re.findall(r"\b((?:kerjostunt|process)_[a-z_]+)", expr)}
        self.assertIn("kerjostunt_calls_total", wanted)
        exported = {name for name, _ in samples(metrics.make_registry(Counter({"calls_direct_lan": 1})))}
        self.assertEqual(wanted - exported, set())
        labels = set(re.findall(r"by \(([a-z_, ]+)\)", " ".join(exprs)))
        grouped = {label.strip() for group in labels for label in group.split(",")}
        self.assertTrue(grouped <= {"outcome", "technique", "code"}, grouped)
