"""How the broker's etcd client classes a failed call (broker/state_etcd.py ``_on_channel``): etcd's own
timeout of a request counts as a timeout, which callers retry on another member, and nothing else is
reclassed."""

from __future__ import annotations

import pytest

pytest.importorskip("aetcd", reason="the etcd client is the optional extra 'etcd': make install installs it")

import aetcd.exceptions as etcd_errors  # noqa: E402

from broker.state_etcd import UNREACHABLE, _on_channel  # noqa: E402


async def _failing(exc: BaseException) -> None:
    raise exc


async def test_etcd_timing_a_request_out_is_a_timeout() -> None:
    # As the cluster test saw it right after a partition healed: no grpc status, only Go's context error.
    with pytest.raises(etcd_errors.ConnectionTimeoutError, match="context deadline exceeded") as caught:
        await _on_channel(_failing, etcd_errors.ClientError("context deadline exceeded"))
    assert isinstance(caught.value, UNREACHABLE)


async def test_other_errors_stay_as_they_were() -> None:
    with pytest.raises(etcd_errors.ClientError, match="permission denied") as caught:
        await _on_channel(_failing, etcd_errors.ClientError("etcdserver: permission denied"))
    assert type(caught.value) is etcd_errors.ClientError
    with pytest.raises(etcd_errors.PreconditionFailedError):
        await _on_channel(_failing, etcd_errors.PreconditionFailedError("context deadline exceeded"))
    assert await _on_channel(lambda: _answer()) == 42


async def _answer() -> int:
    return 42
