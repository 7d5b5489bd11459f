"""The OST's chunk records around a crash (pure parts of the OST, real classes, no network).

A write records the chunk's checksum-to-be before touching its bytes, so a crash
between the write and the record leaves a chunk that matches the old or the pending
checksum, never one that is refused forever; and a chunk with no clean copy that
fails its checksum keeps failing with EIO instead of turning into zeros.
"""

import errno
import os

import pytest

from lustrefuse.integrity import checksum
from lustrefuse.ost import ObjectStore, OstService
from lustrefuse.protocol import RpcError

S = 64 * 1024


@pytest.fixture
def ost(tmp_path):
    svc = OstService(ObjectStore(str(tmp_path / "ost0"), 0), mds=None, repo=None)
    svc.ready = True
    yield svc
    svc.close()


def desc(ino=7):
    return {"ino": ino, "layout": {"stripe_size": S, "osts": [0]}, "s3_key": None,
            "etag": None, "s3_size": 0, "size": 0}


def test_write_that_landed_without_its_record_is_completed(ost):
    d = desc()
    assert tuple(ost.h_write(None, d, 0, 0, b"a" * 1000)) == (1000, checksum(b"a" * 1000))
    # a crash after the pending record and the pwrite, before the final record:
    new = b"b" * 10 + b"a" * 990
    ost.store.set_pending(7, 0, 1000, checksum(new))
    fd = ost.store.open(7, True)
    os.pwrite(fd, b"b" * 10, 0)
    os.close(fd)
    assert tuple(ost.h_verify(None, d, 0, refetch=False)) == (1000, checksum(new))
    assert ost.store.table(7)[0] == (1000, checksum(new))


def test_corrupt_chunk_without_clean_copy_keeps_failing(ost):
    d = desc(8)
    ost.h_write(None, d, 0, 0, b"x" * 5000)
    fd = ost.store.open(8, True)
    os.pwrite(fd, b"Y", 123)  # bit rot
    os.close(fd)
    for _ in range(2):
        with pytest.raises(RpcError) as e:
            ost.h_verify(None, d, 0, refetch=False)
        assert e.value.errno == errno.EIO
    assert 0 in ost.store.table(8)  # still recorded: never silently a hole
