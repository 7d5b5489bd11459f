"""A directory of 20,000 imported entries lists completely and correctly, a page at a
time (the MDS answers readdir in pages of DIR_PAGE; the client holds one page per open
directory), and listing plus stat of all of it makes no S3 request.

The objects are created straight in the backend of our own moto endpoint
(``demo.bulk_put_empty``, about a second): 20,000 PUTs over HTTP take about a minute
on two vCPUs.
"""

import os
import stat
import subprocess
import time

import pytest
from conftest import FsFactory

from lustrefuse import demo
from lustrefuse.client import DIR_PAGE

N = 20_000


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("widedir")
    ep = demo.Endpoint.start(str(root / "moto.log"))
    factory = None
    try:
        s3 = demo.s3_client(ep.url)
        s3.create_bucket(Bucket="wide")
        keys = [f"w/big/e{i:05d}" for i in range(N)] + [f"w/small/s{i}" for i in range(3)]
        t = time.monotonic()
        assert demo.bulk_put_empty(ep.url, "wide", keys) == len(keys)
        print(f"{len(keys)} objects created in {time.monotonic() - t:.1f}s")
        factory = FsFactory(root, ep.url, s3)
        t = time.monotonic()
        fs = factory("wide", prefix="w", extra_args=("--no-posix-metadata",))
        print(f"up (import of {len(keys)} objects) took {time.monotonic() - t:.1f}s")
        yield fs
    finally:
        if factory is not None:
            notes = factory.cleanup()
            if notes:
                print("cleanup notes:\n" + "\n".join(notes))
        ep.stop()


def counters(fs) -> tuple[dict, int]:
    st = fs.stats()
    return st["client"], st["total"]["s3_requests"]


def test_wide_directory_lists_completely_in_pages(wide):
    want = {f"e{i:05d}" for i in range(N)}
    c0, s3_0 = counters(wide)
    with os.scandir(wide.path("big")) as it:
        entries = list(it)
    names = [e.name for e in entries]
    assert len(names) == N and set(names) == want  # every entry once
    for e in entries:  # attributes came with the listing (readdirplus)
        st = e.stat(follow_symlinks=False)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0, e.name
    c1, s3_1 = counters(wide)
    pages = c1.get("readdir_pages", 0) - c0.get("readdir_pages", 0)
    assert pages >= N // DIR_PAGE, f"{pages} MDS readdir calls for {N} entries"
    assert pages <= N // DIR_PAGE + 2  # and no page asked for twice
    assert c1.get("lookups", 0) - c0.get("lookups", 0) < N // 10  # stat needed no LOOKUP each
    assert s3_1 == s3_0, "listing and stat made S3 requests"

    r = subprocess.run(["ls", "-f", wide.path("big")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [n for n in r.stdout.splitlines() if n not in (".", "..")]  # (we list neither)
    assert len(lines) == N and set(lines) == want


def test_rewind_lists_the_whole_directory_again(wide):
    fd = os.open(wide.path("big"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = os.listdir(fd)  # listdir(fd) rewinds the stream before reading
        second = os.listdir(fd)  # from cookie 0 again, with the last page still held
    finally:
        os.close(fd)
    assert len(first) == len(second) == N
    assert set(first) == set(second)


def test_small_directory_and_the_root(wide):
    assert sorted(os.listdir(wide.path())) == ["big", "small"]
    assert sorted(os.listdir(wide.path("small"))) == ["s0", "s1", "s2"]
    assert os.listdir(wide.path("small")) == os.listdir(wide.path("small"))
