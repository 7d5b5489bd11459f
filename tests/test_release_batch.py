"""``lfs hsm_release`` of many files: one request, all or nothing (issue #5).

The MDS checks every file of the request first (archived, clean, not open), then
forgets their chunks, has each OST punch all of its objects in one call, and
marks them all released in one transaction.
"""

from __future__ import annotations

import os

import pytest
from helpers import FS, MiB, data, read_file, wait_for

N = 300
BIG = 2  # files of two stripes (1M import chunks, 2 OSTs): objects on both OSTs

RELEASED = "(0x0000000d) released exists archived, archive_id:1"
ARCHIVED = "(0x00000009) exists archived, archive_id:1"
DIRTY = "(0x0000000b) exists dirty archived, archive_id:1"


def body(i: int) -> bytes:
    return data(MiB + 1000 * i + 7 if i < BIG else 1000 + i, f"batch{i}")


def rel(i: int) -> str:
    return f"rb/d{i // 100}/f{i:03d}.bin"


@pytest.fixture
def bfs(make_fs, bucket) -> FS:
    return make_fs(bucket, objects={rel(i): body(i) for i in range(N)},
                   extra_args=("--imported-file-chunk-size", "1M"))


def states(fs: FS, rels: list[str]) -> list[str]:
    r = fs.lfs("hsm_state", *[fs.path(x) for x in rels])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(": ", 1)[0] for ln in lines] == [fs.path(x) for x in rels]
    return [ln.split(": ", 1)[1] for ln in lines]


def hydrate(fs: FS, rels: list[str]):
    r = fs.lfs("hsm_restore", *[fs.path(x) for x in rels])
    assert r.returncode == 0, r.stderr
    wait_for(lambda: states(fs, rels) == [ARCHIVED] * len(rels), 120, 0.2, "restored")


def present_bytes(fs: FS, rels: list[str]) -> list[int]:
    return [fs.info(x)["present_bytes"] for x in rels]


def test_release_many_in_one_request(bfs):
    rels = [rel(i) for i in range(N)]
    hydrate(bfs, rels)
    assert all(present_bytes(bfs, rels))
    used = bfs.ost_objects_du()
    assert used >= sum(len(body(i)) for i in range(N))

    r = bfs.lfs("hsm_release", *[bfs.path(x) for x in rels])
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert states(bfs, rels) == [RELEASED] * N
    assert not any(present_bytes(bfs, rels))
    assert bfs.ost_objects_du() < used // 10
    assert all(os.stat(bfs.path(x)).st_blocks == 0 for x in rels)
    # again: a no-op on files released with nothing local
    r = bfs.lfs("hsm_release", *[bfs.path(x) for x in rels])
    assert (r.returncode, r.stderr) == (0, "")
    assert states(bfs, rels) == [RELEASED] * N

    # the data comes back from S3, equal to the objects
    for i in range(N):
        assert read_file(bfs.path(rel(i))) == body(i), rel(i)
    wait_for(lambda: states(bfs, rels) == [ARCHIVED] * N, 60, 0.2, "hydrated by the reads")


def test_release_is_all_or_nothing(bfs):
    rels = [rel(i) for i in range(40)]
    hydrate(bfs, rels)
    dirty = rels[25]
    with open(bfs.path(dirty), "r+b") as f:
        f.write(b"changed")
    assert states(bfs, [dirty]) == [DIRTY]
    before = present_bytes(bfs, rels)
    assert all(before)

    paths = [bfs.path(x) for x in rels]
    r = bfs.lfs("hsm_release", *paths)
    assert r.returncode == 1
    # as lfs.c: one request, and its refusal names the first file
    assert r.stderr == (f"lfs hsm_release: Cannot send HSM request (use of {paths[0]}): "
                        "Operation not permitted\n")
    assert states(bfs, rels) == [DIRTY if x == dirty else ARCHIVED for x in rels]
    assert present_bytes(bfs, rels) == before

    # a file held open: EBUSY, and again nothing is released
    clean = [x for x in rels if x != dirty]
    with open(bfs.path(clean[-1]), "rb"):
        r = bfs.lfs("hsm_release", *[bfs.path(x) for x in clean])
        assert r.returncode == 1
        assert "Device or resource busy" in r.stderr
        assert states(bfs, clean) == [ARCHIVED] * len(clean)
        assert all(present_bytes(bfs, clean))

    # closed: the whole batch goes; the dirty file keeps its data
    wait_for(lambda: bfs.lfs("hsm_release", *[bfs.path(x) for x in clean]).returncode == 0,
             10, 0.2, "release after close")
    assert states(bfs, clean) == [RELEASED] * len(clean)
    assert not any(present_bytes(bfs, clean))
    assert states(bfs, [dirty]) == [DIRTY]
    assert read_file(bfs.path(dirty)) == b"changed" + body(25)[7:]
    for x in clean[:5] + clean[-5:]:
        i = rels.index(x)
        assert read_file(bfs.path(x)) == body(i)
