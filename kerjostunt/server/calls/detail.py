"""The per-technique detail of a call's attempt row (``attempts.detail``, JSON).

What ``kerjostunt attempts`` and the /status page show beyond the outcome:
each side's race in order (the outcome INFO's ``tried=``), the ports the
server predicted for each side against the one that connected, both NATs as
the probes described them, and each side's time. Kept beside the call code
so machine.py stays about the call's life.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kerjostunt.wire.kerjo import Outcome
from kerjostunt.wire.prediction import NATDescription, Prediction

__all__ = ["nat_label", "attempt_detail", "refusal_detail"]


def nat_label(nat: NATDescription | None) -> str:
    """``public``, ``unknown``, or ``MAPPING/ALLOCATION`` (``address-and-port-dependent/sequential``)."""
    if nat is None:
        return "unknown"
    if not nat.behind_nat:
        return "public"
    return f"{nat.mapping}/{nat.allocation}"


def _window(prediction: Prediction | None) -> list[int]:
    return list(prediction.ports) if prediction is not None else []


def attempt_detail(reports: Mapping[str, Outcome], predictions: Mapping[str, Prediction | None]) -> str:
    """The JSON for a dialed call: ``side -> {tried, elapsed_ms, predicted, nat}``."""
    detail: dict[str, Any] = {}
    for side, prediction in predictions.items():
        report = reports.get(side)
        detail[side] = {
            "tried": [list(entry) for entry in report.tried] if report is not None else [],
            "elapsed_ms": report.elapsed_ms if report is not None else None,
            "outcome": report.outcome if report is not None else "no report",
            "predicted": _window(prediction),
            "ip": prediction.ip if prediction is not None else None,
            "nat": nat_label(prediction.nat if prediction is not None else None),
        }
    return json.dumps(detail, sort_keys=True)


def refusal_detail(why: str, nats: tuple[NATDescription | None, ...], sides: tuple[str, str]) -> str:
    """The JSON for a call refused before any dial (488: no technique joins the NATs)."""
    detail: dict[str, Any] = {"refused": why}
    for side, nat in zip(sides, nats):
        detail[side] = {"tried": [], "elapsed_ms": None, "outcome": "refused", "predicted": [],
                        "nat": nat_label(nat)}
    return json.dumps(detail, sort_keys=True)
