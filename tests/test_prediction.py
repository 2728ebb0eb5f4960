"""NAT classification and port prediction from hand-made observation series."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kerjostunt.wire.prediction import (
    AD,
    APD,
    EI,
    PRESERVING,
    RANDOM,
    SEQUENTIAL,
    UNKNOWN,
    NATDescription,
    Prediction,
    Sample,
    classify,
    predict,
)

SERVER = "198.51.100.1"
ALT = "198.51.100.2"
PUBLIC = "203.0.113.9"


def call(t: float, local: int, mapped: list[int], servers=((SERVER, 3478), (SERVER, 3479)),
         ip: str = PUBLIC, local_ip: str | None = None) -> list[Sample]:
    """One call's probes: from one local port to each server endpoint in turn."""
    return [Sample(local, ip, m, sip, sport, t + i * 0.01, local_ip)
            for i, (m, (sip, sport)) in enumerate(zip(mapped, servers))]


def series(pairs, **kw) -> list[Sample]:
    out: list[Sample] = []
    for i, (local, mapped) in enumerate(pairs):
        out += call(100.0 * i, local, mapped, **kw)
    return out


class ClassifyTests(TestCase):
    def test_preserving_ei(self) -> None:
        s = series([(40001, [40001, 40001]), (40517, [40517, 40517])])
        nat = classify(s)
        self.assertEqual((nat.mapping, nat.allocation, nat.delta), (EI, PRESERVING, None))
        self.assertEqual(nat.public_ip, PUBLIC)
        p = predict(s)
        self.assertEqual(p.ports[0], 40517)
        self.assertEqual(p.endpoints()[0], (PUBLIC, 40517))
        self.assertGreaterEqual(p.confidence, 0.8)
        self.assertEqual(predict(s, local_port=45000).ports[0], 45000)

    def test_crowded_preserving_nat_collides_now_and_then(self) -> None:
        """Another host probed from the same local port first: the newest mapping got some other port."""
        s = series([(40001, [40001, 40001]), (40517, [40517, 40517]), (41000, [52345, 41000])])
        self.assertEqual(classify(s).allocation, PRESERVING)
        self.assertEqual(predict(s).ports[0], 41000)

    def test_one_kept_port_of_two_is_not_preserving_when_the_newest_moved(self) -> None:
        s = series([(40001, [40001, 40001]), (41000, [43123, 43123])])
        self.assertNotEqual(classify(s).allocation, PRESERVING)

    def test_not_behind_nat_with_local_ip(self) -> None:
        s = series([(40001, [40001, 40001])], ip=PUBLIC, local_ip=PUBLIC)
        nat = classify(s)
        self.assertFalse(nat.behind_nat)
        self.assertEqual(predict(s).ports, (40001,))
        s = series([(40001, [40001, 40001])], ip=PUBLIC, local_ip="10.0.0.2")
        self.assertTrue(classify(s).behind_nat)
        self.assertEqual(classify(s).allocation, PRESERVING)

    def test_not_behind_nat_hint(self) -> None:
        self.assertFalse(classify(series([(40001, [40001, 40001])])).behind_nat)
        self.assertTrue(classify(series([(40001, [40001, 40002])])).behind_nat)

    def test_ei_sequential(self) -> None:
        s = series([(40001, [1000, 1000]), (40002, [1001, 1001]), (40003, [1002, 1002])])
        nat = classify(s)
        self.assertEqual((nat.mapping, nat.allocation, nat.delta), (EI, SEQUENTIAL, 1))
        p = predict(s)  # the probed port's mapping is reused for the peer
        self.assertEqual(p.ports[0], 1002)
        self.assertEqual(p.ports[1:], (1003, 1004, 1005))
        self.assertEqual(predict(s, local_port=50000).ports[0], 1003)

    def test_apd_sequential_delta_1(self) -> None:
        s = series([(40001, [1000, 1001]), (40002, [1002, 1003])])
        nat = classify(s)
        self.assertEqual((nat.mapping, nat.allocation, nat.delta), (APD, SEQUENTIAL, 1))
        p = predict(s, window=3)
        self.assertEqual(p.ports, (1004, 1005, 1006))
        self.assertTrue(0 < p.confidence <= 1)

    def test_apd_sequential_delta_4(self) -> None:
        s = series([(40001, [2000, 2004]), (40002, [2008, 2012]), (40003, [2016, 2020])])
        nat = classify(s)
        self.assertEqual((nat.allocation, nat.delta), (SEQUENTIAL, 4))
        self.assertEqual(predict(s).ports, (2024, 2028, 2032, 2036))

    def test_negative_delta(self) -> None:
        s = series([(40001, [9000, 8998]), (40002, [8996, 8994])])
        nat = classify(s)
        self.assertEqual((nat.allocation, nat.delta), (SEQUENTIAL, -2))
        self.assertEqual(predict(s).ports[:2], (8992, 8990))

    def test_noise_from_other_hosts(self) -> None:
        # delta 2; other hosts took ports between some of our mappings
        s = series([(40001, [5000, 5002]), (40002, [5010, 5012]), (40003, [5016, 5018]),
                    (40004, [5024, 5026])])
        nat = classify(s)
        self.assertEqual((nat.mapping, nat.allocation, nat.delta), (APD, SEQUENTIAL, 2))
        self.assertEqual(predict(s).ports[0], 5028)

    def test_noise_inside_a_call(self) -> None:
        # delta 1, but in one call another host took a port between our two probes
        s = series([(40001, [7000, 7001]), (40002, [7005, 7007]), (40003, [7010, 7011]),
                    (40004, [7014, 7015])])
        nat = classify(s)
        self.assertEqual((nat.allocation, nat.delta), (SEQUENTIAL, 1))
        self.assertEqual(predict(s).ports[:2], (7016, 7017))

    def test_random(self) -> None:
        s = series([(40001, [31000, 52011]), (40002, [1777, 44120]), (40003, [23456, 9001])])
        nat = classify(s)
        self.assertEqual((nat.mapping, nat.allocation, nat.delta), (APD, RANDOM, None))
        p = predict(s)
        self.assertEqual(p.ports, (9001,))
        self.assertLess(p.confidence, 0.2)

    def test_one_short_step_by_chance_is_not_sequential(self) -> None:
        """Three probes of a random NAT whose first two mappings happen to be 120 apart."""
        three = ((SERVER, 3478), (SERVER, 3479), (ALT, 3478))
        s = series([(40001, [31000, 31120, 5023])], servers=three)
        self.assertEqual(classify(s).allocation, RANDOM)

    def test_two_short_steps_are_sequential(self) -> None:
        three = ((SERVER, 3478), (SERVER, 3479), (ALT, 3478))
        s = series([(40001, [31000, 31004, 31008])], servers=three)
        nat = classify(s)
        self.assertEqual((nat.allocation, nat.delta), (SEQUENTIAL, 4))

    def test_address_dependent(self) -> None:
        servers = ((SERVER, 3478), (SERVER, 3479), (ALT, 3478))
        s = call(0, 40001, [3000, 3000, 3001], servers=servers)
        nat = classify(s)
        self.assertEqual(nat.mapping, AD)
        s = call(0, 40001, [3000, 3001, 3002], servers=servers)
        self.assertEqual(classify(s).mapping, APD)

    def test_single_sample(self) -> None:
        s = call(0, 40001, [3000])
        nat = classify(s)
        self.assertEqual((nat.mapping, nat.allocation), (UNKNOWN, UNKNOWN))
        p = predict(s)
        self.assertEqual(p.ports[0], 3000)
        self.assertEqual(len(p.ports), 4)

    def test_unordered_input(self) -> None:
        s = series([(40001, [1000, 1001]), (40002, [1002, 1003])])
        self.assertEqual(predict(list(reversed(s))), predict(s))

    def test_public_ip_change_breaks_steps(self) -> None:
        s = (call(0, 40001, [1000, 1001], ip="203.0.113.1")
             + call(100, 40002, [50000, 50001], ip="203.0.113.2"))
        nat = classify(s)
        self.assertEqual(nat.public_ip, "203.0.113.2")
        self.assertEqual((nat.allocation, nat.delta), (SEQUENTIAL, 1))
        self.assertEqual(predict(s).endpoints()[0], ("203.0.113.2", 50002))

    def test_wraps_in_range(self) -> None:
        s = series([(40001, [65533, 65534]), (40002, [65535, 1024])])
        # 65535 -> 1024 is a wrap, not a step: delta stays 1 by majority
        p = predict(s)
        self.assertTrue(all(1 <= x <= 65535 for x in p.ports))

    def test_empty(self) -> None:
        self.assertRaises(ValueError, predict, [])
        self.assertEqual(classify([]).mapping, UNKNOWN)

    def test_description_dict_round_trip(self) -> None:
        nat = NATDescription(True, APD, SEQUENTIAL, -4, PUBLIC)
        self.assertEqual(NATDescription.from_dict(nat.to_dict()), nat)
        self.assertEqual(nat.to_dict()["delta"], -4)
        self.assertIsInstance(predict(call(0, 1, [2])), Prediction)


@st.composite
def sequential_series(draw, ei: bool):
    d = draw(st.integers(-50, 50).filter(lambda x: x != 0))
    calls = draw(st.integers(1 if not ei else 2, 6))
    per_call = 1 if ei else 2
    n = calls * per_call
    base = draw(st.integers(2000, 30000))
    assume(2000 <= base + (n + 1) * d <= 30000)
    local0 = draw(st.integers(40000, 60000))
    samples = []
    for c in range(calls):
        local = local0 + c
        if ei:
            mapped = [base + c * d] * 2
        else:
            mapped = [base + (c * 2 + i) * d for i in range(2)]
        samples += call(10.0 * c, local, mapped)
    return samples, d, base, n


class PropertyTests(TestCase):
    @settings(max_examples=300, deadline=None)
    @given(sequential_series(ei=False))
    def test_sequential_apd_exact(self, args) -> None:
        samples, d, base, n = args
        p = predict(samples)
        self.assertEqual(p.nat.allocation, SEQUENTIAL)
        self.assertEqual(p.nat.delta, d)
        self.assertEqual(p.ports[0], base + n * d)

    @settings(max_examples=300, deadline=None)
    @given(sequential_series(ei=True))
    def test_sequential_ei_new_port_exact(self, args) -> None:
        samples, d, base, n = args
        p = predict(samples, local_port=1000)
        self.assertEqual((p.nat.mapping, p.nat.allocation), (EI, SEQUENTIAL))
        self.assertEqual(p.ports[0], base + n * d)
        self.assertEqual(predict(samples).ports[0], base + (n - 1) * d)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 65535), min_size=1, max_size=8, unique=True),
           st.integers(1, 65535))
    def test_preserving(self, locals_, new_local) -> None:
        samples = series([(p, [p, p]) for p in locals_])
        self.assertEqual(predict(samples).ports[0], locals_[-1])
        self.assertEqual(predict(samples, local_port=new_local).ports[0], new_local)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(1, 65535), st.integers(1, 65535),
                              st.integers(1, 65535), st.sampled_from([SERVER, ALT]),
                              st.sampled_from([3478, 3479]), st.floats(0, 1e6)),
                    min_size=1, max_size=20),
           st.integers(1, 10), st.one_of(st.none(), st.integers(1, 65535)))
    def test_always_in_range(self, rows, window, local_port) -> None:
        samples = [Sample(lp, PUBLIC, mp, sip, sp, t) for lp, mp, _, sip, sp, t in rows]
        p = predict(samples, local_port=local_port, window=window)
        self.assertTrue(p.ports)
        self.assertLessEqual(len(p.ports), window)
        self.assertTrue(all(1 <= x <= 65535 for x in p.ports), p)
        self.assertEqual(len(set(p.ports)), len(p.ports))
        self.assertTrue(0.0 <= p.confidence <= 1.0)
        self.assertEqual(predict(samples, local_port=local_port, window=window), p)
