"""The one token bucket: burst, refill, one warning per overflow, bounded senders."""

from __future__ import annotations

from agents.ratelimit import RateLimit, TokenBucket


def test_a_bucket_gives_its_burst_then_its_rate():
    bucket = TokenBucket(burst=2, rate=0.5, at=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert not bucket.take(1.0) and bucket.take(2.0)          # one token in two seconds
    assert bucket.take(100.0) and bucket.take(100.0) and not bucket.take(100.0)  # never more than the burst


def test_per_sender_limits_warn_once_per_overflow_and_forget_the_least_recent():
    now = [0.0]
    limit = RateLimit(burst=1, rate=1.0, max_senders=2, clock=lambda: now[0])
    assert limit.take("a") == (True, False)
    assert limit.take("a") == (False, True)
    assert limit.take("a") == (False, False)                 # the flood was answered once
    assert limit.take("b") == (True, False)                  # others are not held back
    now[0] = 1.0
    assert limit.take("a") == (True, False) and limit.take("a") == (False, True)
    limit.take("c")                                          # a third sender: b, least recent, is forgotten
    assert list(limit._buckets) == ["a", "c"]
