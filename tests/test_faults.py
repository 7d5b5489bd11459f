"""S3 faults under a real mount: the FUSE client, MDS and OSTs are real processes and
reach moto through the fault-injecting proxy (tests/s3fault.py).

The reliability promises checked here (DESIGN.md, "Reliability principles"):
transient S3 errors are retried and the reader gets the right bytes; a reader
gets EIO only after retries are spent, in bounded time, and the OST log names
the key; an object that does not match the ETag recorded at import is never
served; a restore that cannot reach S3 fails visibly and can be retried.

One filesystem (2 OSTs, 1 MiB stripes, imported files striped every 1 MiB) serves
the whole module; each test has its own keys, and its faults match only those keys.
Between tests the proxy's rules are cleared, S3 traffic is let settle, and a mount
that died is brought up again so that one failure does not hide the others.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import sqlite3
import subprocess
import time

import helpers
import pytest
from helpers import MiB
from s3fault import FaultProxy

pytestmark = pytest.mark.timeout(120)  # the first test also brings the module's mount up

READ_FAILS_WITHIN = 30.0
RELEASED = 0xD  # exists archived released
RESTORED = 0x9  # exists archived

TRANSIENT = {"t/transient.bin": helpers.data(5 * MiB + 12345, "transient"),
             "t/other.txt": b"x" * 100}
RANDOM = {f"r/f{i}.bin": helpers.data(3 * MiB + i * 1000, f"rand{i}") for i in range(3)}
PERSISTENT = {"p/broken.bin": helpers.data(2 * MiB + 300 * 1024, "broken"),  # 3 chunks
              "p/fine.bin": helpers.data(2 * MiB + 5, "fine")}
CHANGED = {"e/etag.bin": helpers.data(2 * MiB + 999, "etag"),
           "e/replaced.bin": helpers.data(2 * MiB + 999, "etag"),
           "e/ok.txt": b"ok\n"}
RESTORE = {"h/restore.bin": helpers.data(3 * MiB + 100, "restore")}
OBJECTS = {**TRANSIENT, **RANDOM, **PERSISTENT, **CHANGED, **RESTORE}


@pytest.fixture(scope="module")
def proxy(s3_server):
    with FaultProxy(s3_server) as p:
        yield p


@pytest.fixture(scope="module")
def fsx(proxy, make_module_fs, s3):
    """The module's filesystem: every S3 request of the MDS (import) and OSTs
    (hydration) goes through ``proxy``."""
    bucket = helpers.unique("lfs-faults")
    s3.create_bucket(Bucket=bucket)
    fs = make_module_fs(bucket, objects=OBJECTS, osts=2, up=False,
                        extra_args=("--imported-file-chunk-size", "1M"))
    fs.endpoint = proxy.url
    fs.up()
    return fs


def healthy(fs) -> bool:
    try:
        os.listdir(fs.path())
        return fs.mounted()
    except OSError:
        return False


@pytest.fixture(autouse=True)
def fresh(proxy, fsx):
    """Before: a working mount and a quiet proxy. After: no faults left, traffic settled."""
    if not healthy(fsx):  # an earlier test took the mount down: bring it back
        fsx.cleanup()
        if fsx.mounted():
            subprocess.run(["fusermount3", "-u", "-z", fsx.path()], capture_output=True, timeout=30)
        fsx.up_again()
    proxy.clear()
    proxy.reset_log()
    yield
    proxy.clear()
    proxy.up()
    if healthy(fsx):
        try:
            fsx.wait_quiet(timeout=20)
        except (AssertionError, OSError):
            pass


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_errno(path) -> int:
    try:
        read_all(path)
    except OSError as e:
        return e.errno
    raise AssertionError(f"reading {path} succeeded")


def ost_logs(fs) -> str:
    return "\n".join(fs.log(f"ost{i}") for i in range(fs.osts))


def ost_chunk_rows(fs, ino: int) -> int:
    """Chunks of ``ino`` recorded present in the OSTs' own tables (a read-only look)."""
    n = 0
    for db in fs.data_dir.glob("ost*/ost.db"):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            n += con.execute("SELECT count(*) FROM chunks WHERE ino=?", (ino,)).fetchone()[0]
        finally:
            con.close()
    return n


def hsm_requests(fs, ino: int) -> list[dict]:
    return [r for r in json.loads(os.getxattr(fs.ctl, "lustrefuse.hsm_list")) if r["ino"] == ino]


def wait_request_done(fs, ino: int, after_id: int = 0, timeout: float = 30.0) -> dict:
    def done():
        rows = [r for r in hsm_requests(fs, ino) if r["action"] == "RESTORE" and r["id"] > after_id]
        return rows[-1] if rows and rows[-1]["state"] not in ("WAITING", "STARTED") else None

    return helpers.wait_for(done, timeout, 0.1, f"the restore of inode {ino} to end")


class Delta:
    """OST counters (summed over OSTs) since construction."""

    def __init__(self, fs):
        self.fs = fs
        self.before = fs.stats()

    def __call__(self, name: str) -> int:
        return self.fs.ost_sum(name) - self.fs.ost_sum(name, self.before)


# -- transient faults ---------------------------------------------------------------

def test_transient_faults_are_retried_and_bytes_are_right(fsx, proxy):
    key = "t/transient.bin"
    data = TRANSIENT[key]
    delta = Delta(fsx)
    # At most 5 broken answers in all (< RETRIES), so even if they all hit one chunk
    # it still comes back; latency on top.
    rules = [proxy.add("latency", method="GET", key=key, ranged=True, times=4, delay=0.3),
             proxy.add("status", method="GET", key=key, ranged=True, times=2, status=503,
                       code="SlowDown"),
             proxy.add("reset", method="GET", key=key, ranged=True, times=1, fraction=0.5),
             proxy.add("truncate", method="GET", key=key, ranged=True, times=1, fraction=0.3),
             proxy.add("short", method="GET", key=key, ranged=True, times=1, fraction=0.7)]
    assert read_all(fsx.path(key)) == data
    assert all(r.fired == r.times for r in rules), [(r.kind, r.fired) for r in rules]
    fsx.wait_quiet()
    # every broken body costs one retry of ours (a 503 may also be retried inside boto3)
    assert delta("s3_retries") >= 3, fsx.stats()["osts"]
    assert delta("hydrate_errors") == 0
    assert delta("chunks_hydrated") == 6
    # the hydrated chunks hold the right bytes (read from the OSTs, not the page cache)
    assert helpers.pread_uncached(fsx.path(key), 0, len(data)) == data
    info = fsx.info(key)
    assert info["present"] == info["chunks"] == 6
    assert fsx.hsm_flags(key) == RESTORED
    log = ost_logs(fsx)
    assert f"get {key} [" in log and "retrying" in log
    assert read_all(fsx.path("t/other.txt")) == TRANSIENT["t/other.txt"]


def test_random_faults_on_parallel_reads(fsx, proxy):
    """Seeded random resets, truncations, short bodies and 503s while files are read at once."""
    # two sure faults, then about one request in five broken at random (a chunk would
    # need RETRIES broken answers in a row to fail: ~1e-4 over the whole test)
    proxy.add("reset", method="GET", key_prefix="r/", ranged=True, times=1)
    proxy.add("status", method="GET", key_prefix="r/", ranged=True, times=1, status=500)
    for i, kind in enumerate(("reset", "truncate", "status", "short")):
        proxy.add(kind, method="GET", key_prefix="r/", ranged=True, probability=0.05, seed=i,
                  fraction=0.5)
    proxy.add("latency", method="GET", key_prefix="r/", ranged=True, probability=0.3, seed=9,
              delay=0.05)
    with concurrent.futures.ThreadPoolExecutor(len(RANDOM)) as pool:
        got = dict(zip(RANDOM, pool.map(lambda k: read_all(fsx.path(k)), RANDOM), strict=True))
    for k, v in RANDOM.items():
        assert got[k] == v, k
    assert sum(r.fired for r in proxy.rules if r.kind != "latency") >= 2


# -- persistent faults ------------------------------------------------------------------

def test_persistent_500_gives_eio_in_bounded_time(fsx, proxy):
    bad, good = "p/broken.bin", "p/fine.bin"
    delta = Delta(fsx)
    proxy.add("status", method="GET", key=bad, status=500, code="InternalError")
    t = time.monotonic()
    assert read_errno(fsx.path(bad)) == errno.EIO
    assert time.monotonic() - t < READ_FAILS_WITHIN
    assert proxy.count(method="GET", key=bad) >= 6  # retries were spent first
    # the OST log says which key and why
    helpers.wait_for(lambda: "giving up" in ost_logs(fsx), 10, 0.1, "the OST log to say why")
    line = next(ln for ln in ost_logs(fsx).splitlines() if repr(bad) in ln and "ERROR" in ln)
    assert "giving up" in line and "InternalError" in line, line
    assert delta("hydrate_errors") >= 1
    # nothing was recorded for the broken file, and it is still a released stub
    info = fsx.info(bad)
    assert info["present"] == 0 and fsx.hsm_flags(bad) == RELEASED
    assert ost_chunk_rows(fsx, info["ino"]) == 0
    # the filesystem keeps working for other files
    assert healthy(fsx)
    assert read_all(fsx.path(good)) == PERSISTENT[good]
    assert sorted(os.listdir(fsx.path("p"))) == ["broken.bin", "fine.bin"]
    # and once S3 answers again, the broken file reads fine (no error was cached)
    proxy.clear()
    assert read_all(fsx.path(bad)) == PERSISTENT[bad]


def test_changed_object_is_never_served(fsx, proxy, s3):
    mangled, replaced = "e/etag.bin", "e/replaced.bin"
    delta = Delta(fsx)

    def check_refused(key):
        t = time.monotonic()
        err = read_errno(fsx.path(key))
        # ost.py maps a changed object (StaleObject) to ESTALE; the brief asked for EIO.
        # Either way an error, never the other version's bytes.
        assert err in (errno.EIO, errno.ESTALE), errno.errorcode.get(err, err)
        assert time.monotonic() - t < READ_FAILS_WITHIN
        # a mismatch is not transient: no retry storm against S3 (at most one GET per
        # chunk, twice over if the kernel asks again)
        assert 1 <= proxy.count(method="GET", key=key) <= 2 * 3
        info = fsx.info(key)
        assert info["present"] == 0, info
        assert ost_chunk_rows(fsx, info["ino"]) == 0
        assert fsx.hsm_flags(key) & 0x4  # still released
        helpers.wait_for(lambda: repr(key) in ost_logs(fsx), 5, 0.1, "the OST log to name the key")

    # a store that ignored If-Match and answered with another version: new ETag, other bytes
    proxy.add("etag", method="GET", key=mangled, ranged=True,
              mangle=lambda b: bytes(x ^ 0x5A for x in b))
    check_refused(mangled)
    # the real thing: the object was replaced after import; S3 answers 412 to If-Match
    s3.put_object(Bucket=fsx.bucket, Key=replaced, Body=helpers.data(2 * MiB + 999, "after"))
    check_refused(replaced)
    assert "changed since import" in ost_logs(fsx)
    assert delta("chunks_hydrated") == 0
    assert healthy(fsx)
    assert read_all(fsx.path("e/ok.txt")) == b"ok\n"


# -- restore with the endpoint down ----------------------------------------------------------

def test_restore_with_endpoint_down_fails_then_succeeds(fsx, proxy):
    key = "h/restore.bin"
    data = RESTORE[key]
    ino = os.stat(fsx.path(key)).st_ino
    assert fsx.hsm_flags(key) == RELEASED
    # slow GETs, so that the restore is surely in flight when the endpoint goes away
    proxy.add("latency", method="GET", key=key, ranged=True, delay=2.0)
    fsx.request("restore", key)
    helpers.wait_for(lambda: proxy.count(method="GET", key=key) >= 1, 10, 0.02,
                     "the restore to start fetching")
    proxy.down()
    try:
        t = time.monotonic()
        req = wait_request_done(fsx, ino, timeout=READ_FAILS_WITHIN)
        assert time.monotonic() - t < READ_FAILS_WITHIN
        assert req["state"] == "FAILED", req
        assert req["error"]
        assert fsx.hsm_flags(key) == RELEASED
        assert fsx.info(key)["present"] == 0
        assert "failed" in fsx.log("mds").lower()
    finally:
        proxy.clear()
        proxy.up()
    bytes_before = fsx.stats()["total"]["s3_bytes_in"]
    fsx.request("restore", key)
    req2 = wait_request_done(fsx, ino, after_id=req["id"], timeout=30)
    assert req2["state"] == "SUCCEED", req2
    helpers.wait_for(lambda: fsx.hsm_flags(key) == RESTORED, 10, 0.1, "the file to be restored")
    info = fsx.info(key)
    assert info["present"] == info["chunks"] == 4
    assert fsx.stats()["total"]["s3_bytes_in"] - bytes_before == len(data)  # each byte once
    # a restored file is read from the OSTs: no more S3 traffic
    proxy.reset_log()
    assert read_all(fsx.path(key)) == data
    assert proxy.count(method="GET", key=key) == 0
