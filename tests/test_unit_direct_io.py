"""Chunk writes that bypass the OST's page cache, and the reused row buffers.

Fetched chunks go to disk with O_DIRECT from page-aligned row buffers (whole 4 KiB
blocks) and through the page cache for a file's unaligned tail; the bytes on disk
must be exactly the chunk's either way.
"""

import os

import pytest

from lustrefuse.ost import DIRECT_ALIGN, RowBuffers, write_chunk

MiB = 1 << 20


@pytest.fixture
def obj(tmp_path):
    path = tmp_path / "object"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        os.close(fd)
        pytest.skip("this filesystem has no O_DIRECT")
    yield fd, direct
    os.close(direct)
    os.close(fd)


@pytest.mark.parametrize("length", [DIRECT_ALIGN, MiB, MiB + 100, 100, DIRECT_ALIGN - 1])
@pytest.mark.parametrize("offset", [0, 64 * 1024, 512])
def test_written_bytes_are_the_chunk(obj, length, offset):
    fd, direct = obj
    rows = RowBuffers(2 * MiB, keep=1)
    data = os.urandom(length)
    with rows.take(length) as row:
        row.view[:length] = data
        write_chunk(fd, direct, row.view[:length], offset)
        write_chunk(fd, None, row.view[:length], offset + 4 * MiB)  # no direct descriptor
    assert os.pread(fd, length, offset) == data
    assert os.pread(fd, length, offset + 4 * MiB) == data
    assert os.fstat(fd).st_size == offset + 4 * MiB + length
    rows.close()


def test_row_buffers_are_reused_up_to_the_limit():
    rows = RowBuffers(MiB, keep=1)
    with rows.take(MiB) as a, rows.take(100) as b:
        assert a is not b
    with rows.take(10) as c:
        assert c in (a, b)  # one of them was kept
    assert len(rows.idle) == 1
    with rows.take(3 * MiB) as big:  # larger than a row: made for this GET only
        assert big.size == 3 * MiB
    assert [r.size for r in rows.idle] == [MiB]
    rows.close()
    assert rows.idle == []
