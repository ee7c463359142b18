"""The workflow lease broker instances share (broker.leadership.Lease), on a real SQLite file."""

from __future__ import annotations

from broker.leadership import Lease


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair(tmp_path, clock):
    path = tmp_path / "leader.sqlite"
    return Lease(path, "b@x/broker", term=6, clock=clock), Lease(path, "b@x/broker-2", term=6, clock=clock)


def test_one_holder_at_a_time_and_renewal_keeps_it(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    assert one.take() and not two.take()
    clock.now += 5
    assert one.take()  # renewed: a further 6 s from now
    clock.now += 5
    assert not two.take() and one.current() == "b@x/broker"


def test_an_expired_lease_is_taken_over(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    assert one.take()
    clock.now += 6.5
    assert one.current() is None
    assert two.take() and two.current() == "b@x/broker-2"
    assert not one.take()  # the old holder, back, does not take it back while it is renewed


def test_a_holder_the_server_says_has_gone_is_replaced_at_once(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    assert one.take()
    assert not two.take(gone="b@x/someone-else")
    assert two.take(gone="b@x/broker") and two.current() == "b@x/broker-2"


def test_release_frees_it_only_for_its_holder(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    assert one.take()
    two.release()
    assert one.current() == "b@x/broker"
    one.release()
    assert one.current() is None and two.take()
