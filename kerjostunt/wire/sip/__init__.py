"""The SIP message layer: model, stream parser, header values, digest math.

Pure Python (no Twisted, no SQL); see docs/sip-syntax.rst for the exact
framing rules and limits.
"""

from kerjostunt.wire.sip.message import (
    COMPACT_FORMS,
    REASONS,
    Headers,
    Request,
    Response,
    make_response,
)

__all__ = [
    "COMPACT_FORMS",
    "REASONS",
    "Headers",
    "Request",
    "Response",
    "make_response",
]
