"""The /status page: one self-contained HTML document with inline SVG charts.

Drawn on the server, no script and nothing fetched from elsewhere (operators'
networks may have no Internet, and the page is only HTML and CSS). Every
number the page shows is also in a ``data-*`` attribute or an ``id``, so a
test (tests/test_status_page.py, headless Chromium) reads them back from the
DOM and compares them with the database.
"""

from __future__ import annotations

import time
from html import escape

from kerjostunt.server.status import OUTCOMES, Summary

__all__ = ["render"]

COLOURS = {"direct": "#2b8a3e", "stunt": "#1971c2", "failed": "#c92a2a"}
_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:.9em}
.big{font-size:2em;font-weight:bold}.legend span{display:inline-block;margin-right:1em}
.sw{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:middle}
svg text{font-size:12px;font-family:sans-serif}
"""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _legend() -> str:
    items = "".join(f'<span><i class="sw" style="background:{COLOURS[o]}"></i>{o}</span>' for o in OUTCOMES)
    return f'<p class="legend">{items}</p>'


def _outcome_bar(s: Summary) -> str:
    """One stacked bar: the hour's calls by outcome."""
    width, x, parts = 800.0, 0.0, []
    total = max(1, s.calls)
    for outcome in OUTCOMES:
        n = s.by_outcome.get(outcome, 0)
        w = width * n / total
        if n:
            parts.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="28" fill="{COLOURS[outcome]}">'
                         f'<title>{outcome}: {n}</title></rect>')
            if w > 40:
                parts.append(f'<text x="{x + 4:.1f}" y="19" fill="#fff">{outcome} {n}</text>')
        x += w
    if not s.calls:
        parts.append('<rect x="0" y="0" width="800" height="28" fill="#eee"/>'
                     '<text x="6" y="19">no calls in this window</text>')
    cells = "".join(f'<td data-outcome="{o}">{s.by_outcome.get(o, 0)}</td>' for o in OUTCOMES)
    return (f'<svg id="outcomes" width="800" height="28" role="img" aria-label="calls by outcome">{"".join(parts)}'
            f'</svg>{_legend()}<table><tr>{"".join(f"<th>{o}</th>" for o in OUTCOMES)}<th>all</th></tr>'
            f'<tr>{cells}<td id="calls">{s.calls}</td></tr></table>')


def _technique_bars(s: Summary) -> str:
    """One horizontal bar per technique, split by outcome."""
    rows = sorted(s.by_technique.items(), key=lambda kv: -sum(kv[1].values()))
    most = max([sum(c.values()) for _, c in rows] or [1])
    height = 24 * max(1, len(rows)) + 4
    parts = []
    for i, (technique, counts) in enumerate(rows):
        y, x = 24 * i + 2, 150.0
        parts.append(f'<text x="0" y="{y + 15}">{escape(technique)}</text>')
        for outcome in OUTCOMES:
            n = counts.get(outcome, 0)
            if n:
                w = 600.0 * n / most
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="18" fill="{COLOURS[outcome]}" '
                             f'data-technique="{escape(technique)}" data-outcome="{outcome}" data-count="{n}">'
                             f'<title>{escape(technique)} {outcome}: {n}</title></rect>')
                x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 15}">{sum(counts.values())}</text>')
    return f'<svg id="techniques" width="820" height="{height}" role="img">{"".join(parts)}</svg>'


def _colour(rate: float) -> str:
    """Red (0 %) through yellow to green (100 %)."""
    red = 220 if rate < 0.5 else int(220 * (1 - rate) * 2)
    green = int(180 * rate * 2) if rate < 0.5 else 180
    return f"rgb({red},{green},60)"


def _matrix(s: Summary) -> str:
    """A heat map: caller NAT rows, callee NAT columns, success rate as colour, ``ok/total`` in the cell."""
    kinds = s.nat_kinds
    if not kinds:
        return "<p>no calls in this window</p>"
    cell, left, top = 120, 130, 40
    parts = [f'<text x="{left}" y="12">callee NAT &#8594;</text>',
             f'<text x="0" y="{top - 6}">caller NAT &#8595;</text>']
    for j, kind in enumerate(kinds):
        parts.append(f'<text x="{left + j * cell + 4}" y="{top - 6}">{escape(kind)}</text>')
    for i, row in enumerate(kinds):
        y = top + i * cell // 2
        parts.append(f'<text x="0" y="{y + 28}">{escape(row)}</text>')
        for j, col in enumerate(kinds):
            ok, total = s.matrix.get((row, col), [0, 0])
            x = left + j * cell
            fill = _colour(ok / total) if total else "#f1f3f5"
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 4}" height="{cell // 2 - 4}" fill="{fill}"/>')
            if total:
                parts.append(f'<text x="{x + 8}" y="{y + 27}" data-pair="{escape(row)}|{escape(col)}" '
                             f'data-ok="{ok}" data-total="{total}">{ok}/{total}</text>')
    width = left + cell * len(kinds)
    height = top + (cell // 2) * len(kinds)
    return f'<svg id="matrix" width="{width}" height="{height}" role="img">{"".join(parts)}</svg>'


def _histogram(s: Summary) -> str:
    """Vertical bars: connected calls by time to connect."""
    most = max([n for _, n in s.histogram] or [1]) or 1
    bar, gap, height = 80, 10, 160
    parts = []
    for i, (name, n) in enumerate(s.histogram):
        x = i * (bar + gap)
        h = (height - 20) * n / most
        parts.append(f'<rect x="{x}" y="{height - 20 - h:.1f}" width="{bar}" height="{h:.1f}" '
                     f'fill="{COLOURS["stunt"]}" data-bucket="{escape(name)}" data-count="{n}">'
                     f'<title>{escape(name)}: {n}</title></rect>')
        parts.append(f'<text x="{x + 2}" y="{height - 4}">{escape(name)}</text>')
        if n:  # the count inside the bar's top (the tallest bar reaches the top)
            parts.append(f'<text x="{x + 4}" y="{height - 20 - h + 14:.1f}" fill="#fff">{n}</text>')
    width = len(s.histogram) * (bar + gap)
    return f'<svg id="histogram" width="{width}" height="{height}" role="img">{"".join(parts)}</svg>'


def _failures(s: Summary) -> str:
    if not s.slowest_failures:
        return "<p>no failed calls in this window</p>"
    rows = "".join(
        f'<tr class="failure" data-call="{escape(f.call_id)}"><td>{_when(f.when)}</td>'
        f'<td>{escape(f.caller)} &#8594; {escape(f.callee)}</td>'
        f'<td data-ms="{f.duration_ms if f.duration_ms is not None else ""}">'
        f'{"-" if f.duration_ms is None else f"{f.duration_ms:.0f} ms"}</td><td>{escape(f.reason)}</td></tr>'
        for f in s.slowest_failures)
    return f'<table id="failures"><tr><th>when (UTC)</th><th>call</th><th>time</th><th>why</th></tr>{rows}</table>'


def _peers(s: Summary) -> str:
    rows = "".join(f'<tr class="peer"><td>{escape(p.user_id)}</td><td>{escape(p.address)}</td>'
                   f'<td>{_when(p.registered_at)}</td></tr>' for p in s.peers[:200])
    more = f"<p>and {len(s.peers) - 200} more</p>" if len(s.peers) > 200 else ""
    table = (f"<table><tr><th>user</th><th>address</th><th>registered (UTC)</th></tr>{rows}</table>{more}"
             if s.peers else "")
    return f'<p><span class="big" id="registered">{len(s.peers)}</span> registered now</p>{table}'


def render(s: Summary, domain: str) -> bytes:
    minutes = round(s.window / 60)
    body = (
        f"<h1>kerjostunt status: {escape(domain)}</h1><p>at {_when(s.now)} UTC; calls of the last "
        f'<span id="window-minutes">{minutes}</span> minutes</p>'
        f"<h2>Registered peers</h2>{_peers(s)}"
        f"<h2>Calls by outcome</h2>{_outcome_bar(s)}"
        f"<h2>Calls by technique</h2>{_technique_bars(s)}"
        f"<h2>Success by NAT pair</h2>{_matrix(s)}"
        f"<h2>Time to connect (connected calls)</h2>{_histogram(s)}"
        f"<h2>Slowest failures</h2>{_failures(s)}"
    )
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>kerjostunt status</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")
    return page.encode("utf-8")
