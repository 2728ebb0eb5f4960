"""Calls: "connect me to user X" (docs/protocol.rst, "Calls").

The server is a small back-to-back user agent: the caller's INVITE is
answered on the caller's dialog, and a *new* INVITE (own Call-ID, branch and
From tag) goes to the callee, so two calls never share an identifier however
the peers pick theirs, and the callee never learns the caller's Call-ID.

- ``machine``: one call's life, the ``Call`` and its Automat machine;
- ``messages``: the B2BUA's messages in both dialogs (``Dialogs``);
- ``dialing``: dial moments, predictions and the candidates the server adds;
- ``manager``: the call table (``CallManager``): routing, rate limit, lingering;
- ``seams``: what the calls need from the store, the probes and the clock, and their settings.
"""

from __future__ import annotations

from kerjostunt.server.calls.dialing import PREDICTION_WINDOW, augmented, dial_in_ms, format_endpoint, nat_header
from kerjostunt.server.calls.machine import Call, CallInputs, Phase
from kerjostunt.server.calls.manager import CallManager, log
from kerjostunt.server.calls.seams import CallSettings, CallStore, Observations
from kerjostunt.wire.kerjo import Outcome, OutcomeError, parse_outcome

__all__ = ["CallManager", "CallSettings", "Call", "CallInputs", "Phase", "CallStore", "Observations", "Outcome",
           "OutcomeError", "parse_outcome", "dial_in_ms", "augmented", "nat_header", "format_endpoint",
           "PREDICTION_WINDOW", "log"]
