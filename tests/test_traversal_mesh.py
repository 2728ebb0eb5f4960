"""A whole group meshes in the NAT lab: twelve ``kerjostunt join`` over five sites (issue 12).

The scenario of ``tests/natlab/group.py`` (and ``bench/group.py``): five
hosts behind a preserving NAT that drops unsolicited SYNs, three behind a
sequential NAT with step 4, two behind a preserving NAT that answers RST,
one behind a random NAT and one public host, all members of one group,
every one running the real ``kerjostunt join`` at once against the real
``twistd kerjostunt``.  Three runs, each in a fresh lab; each must reach:

- every joinable pair (63 of the 66: the random NAT and the sequential one
  cannot be joined) connected, both sides printing ``peer X connected``;
- every member's signaling closed, its last ``signaling`` line ``closed``;
- the three unjoinable pairs reported ``unreachable`` by both sides, no
  joinable pair reported so.

The times (full mesh, all signaling closed) are printed, not asserted
beyond the run's deadline: speed is measured in ``bench/group.py``.
Skips with ``lab_unavailable()``'s reason where the lab cannot run.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests.natlab import lab_unavailable
from tests.natlab.group import joinable, run_group, summary

RUNS = 3
#: seconds a run may take from starting the members
DEADLINE = 60.0


class GroupMeshTests(unittest.TestCase):
    timeout = RUNS * (DEADLINE + 60)

    @defer.inlineCallbacks
    def test_twelve_members_over_five_sites_mesh_and_close_signaling(self):  # type: ignore[no-untyped-def]
        reason = lab_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        from twisted.internet import reactor

        lines = []
        for i in range(1, RUNS + 1):
            run = yield run_group(reactor, Path(self.mktemp()), deadline=DEADLINE)
            text = summary(run)
            lines.append(f"run {i}: {text}")
            detail = f"run {i}: {text}\n\n" + "\n\n".join(
                f"=== {m}\n{out[-2500:]}" for m, out in run.outputs.items())
            self.assertEqual(run.missing(), [], detail)
            self.assertEqual(run.signaling_open, [], detail)
            for line in run.unreachable:
                me, _, rest = line.partition("->")
                other = rest.split(":", 1)[0]
                self.assertFalse(joinable(me, other), f"a joinable pair given up: {line}\n{detail}")
        print("\n" + "\n".join(lines))
