"""The broker's shared state on a real three-member etcd (broker/state_etcd.py), beside the lead:
the rate limits of workflow steps, counted by compare-and-swap so that instances racing for the
last slot cannot both have it, and chosen from the mesh file's broker state (broker/shared_state.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agents.config import StateConfig
from broker import shared_state
from broker.constraints import RateLimits
from etcd_cluster import PrivateEtcd

pytest.importorskip("aetcd", reason="the etcd client is the optional extra 'etcd': make install installs it")

from broker.state_etcd import EtcdLease, EtcdRateLimits  # noqa: E402  (after the check above)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with PrivateEtcd(tmp_path_factory.mktemp("etcd-state")) as cluster:
        yield cluster


async def test_racing_instances_never_take_more_than_the_limit(etcd: PrivateEtcd) -> None:
    cfg = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/rates-test")
    clock = Clock()
    one, two = EtcdRateLimits(cfg, clock), EtcdRateLimits(cfg, clock)
    try:
        verdicts = await asyncio.gather(*(limits.take("fence.off", 5, 60, f"op{n}@x")
                                          for n in range(12) for limits in (one, two)))
        granted = [v for v in verdicts if v.ok]
        assert len(granted) == 5
        assert sorted(v.reason for v in granted) == [f"rate limit: use {n} of 5 in 60s" for n in range(1, 6)]
        refused = [v.reason for v in verdicts if not v.ok]
        assert refused and set(refused) == {"rate limit: fence.off already used 5 times in the last 60s (at most 5)"}
        assert not (await one.take("fence.off", 5, 60, "late@x")).ok
        assert (await one.take("other.op", 5, 60, "op@x")).ok  # every key counts apart
        clock.now += 61  # the window has moved past every use
        assert (await two.take("fence.off", 5, 60, "op@x")).reason == "rate limit: use 1 of 5 in 60s"
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_mesh_file_s_state_chooses_the_store(etcd: PrivateEtcd, tmp_path: Path) -> None:
    on_sqlite = SimpleNamespace(state_config=None, shared_dir=tmp_path)
    limits = shared_state.rate_limits(on_sqlite)
    lease = shared_state.lease(on_sqlite, "b@x/broker", 6)
    assert isinstance(limits, RateLimits) and (tmp_path / shared_state.RATES_FILE).is_file()
    assert await lease.take() == 1 and (tmp_path / shared_state.LEASE_FILE).is_file()
    await limits.aclose()
    await lease.aclose()
    on_etcd = SimpleNamespace(state_config=StateConfig(endpoints=tuple(etcd.endpoints), prefix="/choice"),
                              shared_dir=tmp_path / "unused")
    limits, lease = shared_state.rate_limits(on_etcd), shared_state.lease(on_etcd, "b@x/broker", 6)
    try:
        assert isinstance(limits, EtcdRateLimits) and isinstance(lease, EtcdLease)
        assert (await limits.take("k", 1, 60, "a@x")).ok and await lease.take() is not None
        assert not (tmp_path / "unused").exists()
    finally:
        await limits.aclose()
        await lease.aclose()
