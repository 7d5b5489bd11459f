"""The MDS's open tracking: per-inode counts of handles and of writers (kept as
counters, so an open costs the same with 10 or 100,000 other files open)."""

from __future__ import annotations

import stat

import pytest

from lustrefuse.mds import Mds


@pytest.fixture
def mds(tmp_path):
    m = Mds(str(tmp_path), {"osts": 2, "stripe_size": 1 << 20})
    yield m
    m.close()


def create(mds, name: bytes) -> int:
    return mds.h_create(None, parent=1, name=name, mode=stat.S_IFREG | 0o644, uid=0, gid=0)["ino"]


def test_writers_are_counted_per_inode(mds):
    ino, other = create(mds, b"f"), create(mds, b"g")
    w1 = mds.h_open(None, ino=ino, client="a", writable=True)["handle"]
    w2 = mds.h_open(None, ino=ino, client="b", writable=True)["handle"]
    other_writer = mds.h_open(None, ino=other, client="a", writable=True)["handle"]
    reader = mds.h_open(None, ino=ino, client="c")
    assert reader["writers"] is True
    mds.h_close(None, handle=w1)
    assert mds.is_open(ino, writers_only=True)
    mds.h_close(None, handle=w2, more=[w2])  # a repeated close is a no-op
    assert not mds.is_open(ino, writers_only=True)
    assert mds.is_open(ino)  # the reader still holds it
    assert mds.h_open(None, ino=ino, client="c")["writers"] is False
    assert mds.is_open(other, writers_only=True)  # another inode's writer is not ours
    mds.h_close(None, handle=other_writer)
    assert not mds.is_open(other)

