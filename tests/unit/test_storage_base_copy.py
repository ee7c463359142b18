"""How the base copy chooses, batch by batch, between direct writes and the page cache: direct while it keeps
up; once batches wait behind it, the way that cost less per byte lately, now and then the other way again."""

from __future__ import annotations

import mmap

from agents.storage import embedded
from agents.storage.embedded import _Copier, _direct_when_behind
from agents.storage.packs import ALIGN

BATCH = 256 * ALIGN


def test_behind_the_cheaper_way_wins_and_the_other_is_tried_again():
    assert _direct_when_behind({True: 1e-9, False: 3e-9}, retry=False) is True
    assert _direct_when_behind({True: 3e-9, False: 1e-9}, retry=False) is False
    assert _direct_when_behind({True: 1e-9, False: 3e-9}, retry=True) is False
    assert _direct_when_behind({True: 3e-9, False: 1e-9}, retry=True) is True


def test_behind_a_way_not_measured_yet_is_tried_first():
    assert _direct_when_behind({True: 1e-9}, retry=False) is False       # the page cache, never tried
    assert _direct_when_behind({False: 1e-9}, retry=False) is True       # direct, never tried
    assert _direct_when_behind({}, retry=False) is False


def _copier_behind(cost: dict[bool, float]) -> _Copier:
    copier = _Copier(direct=True)
    copier._queued, copier._started = 10, 1          # nine batches wait behind the one being written
    copier._cost = dict(cost)
    return copier


def test_a_copy_that_keeps_up_writes_direct_and_unaligned_tails_through_the_page_cache():
    copier = _Copier(direct=True)
    try:
        copier._queued = copier._started = 3
        copier._cost = {True: 9e-9, False: 1e-9}      # costs decide nothing while the copy keeps up
        assert copier._way(BATCH) is True
        assert copier._way(BATCH + 1) is False
        assert _Copier(direct=False)._way(BATCH) is False
    finally:
        copier.close()


def test_behind_with_the_page_cache_costlier_the_copy_stays_direct_but_for_a_retry_in_sixteen():
    """On a VM that hands freed memory back to its host, a copy into page-cache pages took 2.4-3 ms a MiB
    against 1.1-1.3 ms direct: sending the copy there whenever it fell behind kept it behind."""
    copier = _copier_behind({True: 1.2e-9, False: 2.7e-9})
    try:
        ways = [copier._way(BATCH) for _ in range(64)]
        assert ways.count(False) == 64 // embedded._Copier._RETRY
        assert ways.count(True) == 64 - 64 // embedded._Copier._RETRY
    finally:
        copier.close()


def test_behind_with_a_slow_device_the_page_cache_takes_the_copy():
    copier = _copier_behind({True: 8e-9, False: 0.3e-9})
    try:
        ways = [copier._way(BATCH) for _ in range(64)]
        assert ways.count(True) == 64 // embedded._Copier._RETRY
    finally:
        copier.close()


def test_a_batch_of_holes_costs_neither_way_anything(tmp_path):
    """Blocks of zeros stay holes, so their batch writes nothing: it must not make its way look free."""
    copier = _Copier(direct=False)
    buf = mmap.mmap(-1, BATCH)
    fd = copier.open(tmp_path / "copy")
    write = copier.tee(fd)
    blocks = BATCH // embedded.BLOCK_SIZE
    write(buf, BATCH, [embedded._ZERO_ID] * blocks, lambda: None)
    copier.close_file(fd, BATCH)
    copier.close()
    assert copier._cost == {}
    assert (tmp_path / "copy").stat().st_blocks == 0

    copier = _Copier(direct=False)
    buf.write(b"\1" * BATCH)
    fd = copier.open(tmp_path / "data")
    copier.tee(fd)(buf, BATCH, [b"x" * 32] * blocks, lambda: None)
    copier.close_file(fd, BATCH)
    copier.close()
    assert set(copier._cost) == {False} and copier._cost[False] > 0
