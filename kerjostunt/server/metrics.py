"""Prometheus metrics, read at scrape time from the server's own counters.

Server code counts events with ``StuntServer.count(name)`` into one
``collections.Counter``; nothing else is instrumented. A custom collector
turns that Counter into metric families whenever ``/metrics`` is scraped, so
counting stays a dict increment on the hot path and a new event name shows
up without any registration step. Each server gets its own
``CollectorRegistry`` (never prometheus_client's global one), so several
servers in one test process do not collide.

Names in the Counter and what they become:

- a name in ``KNOWN_COUNTERS`` -> its own ``kerjostunt_<name>_total``;
- ``calls_<outcome>`` or ``calls_<outcome>_<technique>`` ->
  ``kerjostunt_calls_total{outcome, technique, code}``: one series per way a
  call ends, each call counted once. The peers' outcomes (``direct``,
  ``stunt``, ``failed``) carry their technique (``none`` when absent;
  techniques may contain ``-`` or ``_``, outcomes may not) and code
  ``200``; the ends before a connection (``refused``, ``rejected``,
  ``timed-out``, ``cancelled``) carry the SIP code in ``code`` and
  technique ``none`` (``calls_refused_404``). Calls answered are counted
  apart, in ``kerjostunt_calls_answered_total`` (each also ends as one of
  the peers' outcomes);
- anything else -> ``kerjostunt_events_total{event=<name>}``, so no count
  is ever dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "CONTENT_TYPE",
    "KNOWN_COUNTERS",
    "ServerCollector",
    "call_counter_name",
    "make_registry",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "kerjostunt"

#: Counter key -> (metric name without prefix/suffix, help). Always exported,
#: at 0 before the first event, so dashboards and alerts see the series.
KNOWN_COUNTERS: dict[str, tuple[str, str]] = {
    "registrations": ("registrations", "Successful REGISTER requests."),
    "challenges": ("challenges", "REGISTER requests answered with a digest challenge."),
    "auth_failures": ("auth_failures", "REGISTER requests with wrong credentials."),
    "probes": ("probes", "STUN probe observations received."),
    "parse_errors": ("parse_errors", "Signaling messages that could not be parsed."),
    "timeouts": ("timeouts", "Signaling connections closed by a handshake, register or idle timeout."),
    "rate_limited": ("rate_limited", "Signaling requests refused by rate limiting."),
    "internal_errors": ("internal_errors", "Requests that failed inside the server (answered 500)."),
    "refused_per_ip": ("refused_connections", "Signaling connections refused by the per-IP limit."),
    "web_requests": ("web_requests", "HTTPS requests handled by the web service."),
    "web_auth_failures": ("web_auth_failures", "HTTPS requests with missing or wrong credentials."),
    "store_write_retries": ("store_write_retries", "Store writes that found the database busy and wait to be retried."),
    "store_records_saved": ("store_records_saved", "Usage records put in the pending file (not yet in the database)."),
    "store_records_lost": ("store_records_lost", "Usage records neither the database nor the pending file took."),
    "register_store_unavailable": (
        "register_store_unavailable", "REGISTERs answered 503: the user database failed or did not answer in time."),
    "calls_answered": ("calls_answered", "Calls the callee answered (each also ends in kerjostunt_calls_total)."),
}

#: outcomes of calls that ended before the peers dialed: the key's rest is the SIP code
UNCONNECTED_OUTCOMES = frozenset({"refused", "rejected", "timed-out", "cancelled"})

CALLS_PREFIX = "calls_"


def call_counter_name(outcome: str, technique: str | None = None) -> str:
    """The Counter key for one finished call, as ``kerjostunt_calls_total`` reads it.

    For an outcome in ``UNCONNECTED_OUTCOMES`` the ``technique`` argument is
    the SIP code (``call_counter_name("refused", "404")``).
    """
    if "_" in outcome:
        raise ValueError(f"an outcome may not contain '_': {outcome!r}")
    return f"{CALLS_PREFIX}{outcome}" + (f"_{technique}" if technique else "")


def _split_call(name: str) -> tuple[str, str, str]:
    """(outcome, technique, code) of a call key."""
    outcome, _, rest = name[len(CALLS_PREFIX) :].partition("_")
    if outcome in UNCONNECTED_OUTCOMES:
        return outcome, "none", rest or "none"
    return outcome, rest or "none", "200"


class ServerCollector:
    """Builds the metric families from the Counter and the gauge callbacks."""

    def __init__(
        self,
        counters: Mapping[str, int],
        *,
        registered: Callable[[], int] = lambda: 0,
        connections: Callable[[], int] = lambda: 0,
        store_waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        self._counters = counters
        self._registered = registered
        self._connections = connections
        self._store_waiting = store_waiting

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_registered_peers", "Users registered (online) right now.", value=self._registered()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_signaling_connections", "Open TLS signaling connections.", value=self._connections()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_store_waiting_records", "Usage records (outcomes, last seen, NAT) waiting in memory to be "
            "written.", value=self._store_waiting(),
        )
        # A copy: scrapes run on the reactor thread today, but a copy costs
        # little and keeps iteration safe if that ever changes.
        counts = dict(self._counters)
        for key, (name, help_text) in KNOWN_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=counts.get(key, 0))
        calls = CounterMetricFamily(
            f"{PREFIX}_calls", "Finished calls, each once: by outcome, technique and SIP code.",
            labels=["outcome", "technique", "code"],
        )
        events = CounterMetricFamily(
            f"{PREFIX}_events", "Other counted server events, by name.", labels=["event"]
        )
        for key in sorted(counts):
            if key in KNOWN_COUNTERS:
                continue
            if key.startswith(CALLS_PREFIX) and len(key) > len(CALLS_PREFIX):
                calls.add_metric(list(_split_call(key)), counts[key])
            else:
                events.add_metric([key], counts[key])
        yield calls
        yield events


def make_registry(
    counters: Mapping[str, int],
    *,
    registered: Callable[[], int] = lambda: 0,
    connections: Callable[[], int] = lambda: 0,
    process: bool = True,
    store_waiting: Callable[[], int] = lambda: 0,
) -> CollectorRegistry:
    """A private registry with the server collector (and the standard ``process_*`` metrics)."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(counters, registered=registered, connections=connections,
                                      store_waiting=store_waiting))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition format, served with ``CONTENT_TYPE``."""
    return generate_latest(registry)
