"""The read path through a real mount (issue #2, "What must hold", 1-5).

Three filesystems are shared by the tests of this module (each costs an `up` and a
`down`): ``imp`` (import + byte-exactness: 3 OSTs, 64K stripes, 1M imported chunk
size so small files stripe widely), ``wide`` (10,000 entries, --no-posix-metadata,
a linked prefix) and ``hyd`` (per-stripe hydration, ETag pinning, HSM requests:
2 OSTs, 1M stripes). Every check that needs "nothing happened yet" uses the
snapshot the fixture took right after `up`, so the tests do not depend on order.
"""

from __future__ import annotations

import errno
import filecmp
import functools
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import new_bucket
from helpers import (
    KiB,
    MiB,
    big_data,
    data,
    drop_file_cache,
    lfs,
    lustrefuse,
    pread_uncached,
    put_many_small,
    put_objects,
    read_file,
    wait_for,
)

from lustrefuse import hsm, rpc
from lustrefuse.client import PREFETCH_CHUNKS
from lustrefuse.layout import GET_SPAN
from lustrefuse.protocol import RpcError

IMPORTED_LINE = "{}: (0x0000000d) released exists archived, archive_id:1"
RESIDENT_LINE = "{}: (0x00000009) exists archived, archive_id:1"

# -- the `imp` filesystem -----------------------------------------------------------

STRIPE = 64 * KiB
CHUNK = 1 * MiB  # --imported-file-chunk-size
OSTS = 3
T_NS = 1600000000123456789

META_PERM = {"file-permissions": "0100640", "file-owner": "1000", "file-group": "1001",
             "file-mtime": f"{T_NS}ns", "file-atime": f"{T_NS - 5}ns"}


@functools.cache
def good() -> dict:
    return {
        "empty": b"",
        "one": b"\x01",
        "stripe": data(STRIPE, "stripe"),
        "stripe-1": data(STRIPE - 1, "stripe-1"),
        "stripe+1": data(STRIPE + 1, "stripe+1"),
        "plain.txt": b"no POSIX headers here\n",
        "wide/two-stripes.bin": data(CHUNK + 5, "two"),
        "wide/three-stripes.bin": data(2 * CHUNK + 123, "three"),
        "wide/exact.bin": data(STRIPE * OSTS * 12, "exact"),  # 2.25 MiB: 3 stripes, full rows
        "wide/exact-1.bin": data(STRIPE * OSTS * 12 - 1, "exact-1"),
        "wide/exact+1.bin": data(STRIPE * OSTS * 12 + 1, "exact+1"),
        "wide/big.bin": data(5 * MiB + 17, "big"),  # 6 stripes by size, capped at 3 OSTs
        "names/with space.txt": b"space\n",
        "names/fïlé ünïcødé 名前.txt": "ünïcødé\n".encode(),
        "names/emoji 😀.bin": data(STRIPE * 2 + 3, "emoji"),
        "names/dir with space/inner file": b"inner\n",
        "names/" + "n" * 255: b"longest name\n",
        "/".join(f"d{i}" for i in range(1, 13)) + "/leaf.txt": b"deep\n",
        "implied/a/b/c/file.txt": b"implied dirs\n",
        "meta/perm.txt": (b"perm\n", META_PERM),
        "meta/ms.txt": (b"ms\n", {"file-mtime": "1600000000123"}),
        "meta/setuid.bin": (b"setuid\n", {"file-permissions": "0104755", "file-owner": "7"}),
        "meta/badowner.txt": (b"bad\n", {"file-owner": "abc", "file-permissions": "0100600"}),
        "clash": b"clash is a file\n",
    }
MARKERS = {
    "markers/empty-dir/": b"",
    "markers/meta-dir/": (b"", {"file-permissions": "040750", "file-owner": "1234",
                                "file-group": "2345", "file-mtime": f"{T_NS}ns"}),
}
BAD = {
    "bad//double": b"x",
    "./dot": b"x",
    "../dotdot": b"x",
    "okdir/../escape": b"x",
    "sub/./x": b"x",
    "long/" + "é" * 128: b"x",  # a 256-byte segment (128 characters)
    "clash/child": b"a key below a file",
}


def body(v):
    return v[0] if isinstance(v, tuple) else v


@pytest.fixture(scope="module")
def imp(make_module_fs, s3):
    b = new_bucket(s3)
    objs = {**good(), **MARKERS, **BAD}
    fs = make_module_fs(b, osts=OSTS, stripe_size="64K", objects=objs,
                        extra_args=("--imported-file-chunk-size", "1M"))
    files = sorted(good())
    r = lfs("hsm_state", *[fs.path(k) for k in files])
    fs.after_up["hsm_state"] = (r.returncode, r.stdout, r.stderr)
    fs.after_up["info"] = {k: fs.info(k) for k in files}
    fs.after_up["last_modified"] = {k: s3.head_object(Bucket=b, Key=k)["LastModified"]
                                    for k in ("plain.txt", "wide/big.bin")}
    return fs


def test_import_reads_metadata_only(imp):
    st = imp.after_up["stats"]
    assert st["total"]["s3_gets"] == 0, st["total"]
    assert st["total"]["s3_bytes_in"] == 0
    assert imp.ost_sum("chunks_hydrated", st) == 0
    assert imp.imported is not None, imp.up_result.stderr
    assert imp.imported["skipped"] == len(BAD), imp.imported
    assert imp.imported["new"] == len(good())


def test_import_sizes_and_tree(imp):
    for k, v in good().items():
        st = os.stat(imp.path(k))
        assert stat.S_ISREG(st.st_mode), k
        assert st.st_size == len(body(v)), k
    for d in ("markers/empty-dir", "markers/meta-dir", "implied", "implied/a", "implied/a/b",
              "implied/a/b/c", "names/dir with space", "wide", "d1/d2/d3"):
        assert os.path.isdir(imp.path(d)), d
    assert os.listdir(imp.path("markers/empty-dir")) == []
    assert sorted(os.listdir(imp.path("markers"))) == ["empty-dir", "meta-dir"]
    top = set(os.listdir(imp.path())) - {".lustrefuse_ctl"}
    assert top == {"empty", "one", "stripe", "stripe-1", "stripe+1", "plain.txt", "wide", "names",
                   "d1", "implied", "meta", "clash", "markers"}


def test_import_posix_metadata_from_fsx_headers(imp):
    st = os.stat(imp.path("meta/perm.txt"))
    assert stat.S_IMODE(st.st_mode) == 0o640 and stat.S_ISREG(st.st_mode)
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert st.st_mtime_ns == T_NS
    assert st.st_atime_ns == T_NS - 5
    # a bare number is milliseconds
    assert os.stat(imp.path("meta/ms.txt")).st_mtime_ns == 1600000000123 * 1_000_000
    # setuid is not imported; other fields still are
    st = os.stat(imp.path("meta/setuid.bin"))
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 7
    # a bad owner falls back to root, the good mode is kept
    st = os.stat(imp.path("meta/badowner.txt"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    # a directory marker with headers
    st = os.stat(imp.path("markers/meta-dir"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1234, 2345, T_NS)


def test_import_defaults_without_headers(imp):
    for k in ("plain.txt", "wide/big.bin"):
        st = os.stat(imp.path(k))
        assert stat.S_IMODE(st.st_mode) == 0o755, k
        assert (st.st_uid, st.st_gid) == (0, 0), k
        lm = imp.after_up["last_modified"][k].timestamp()
        assert abs(st.st_mtime - lm) < 1.0, (k, st.st_mtime, lm)
    for d in ("implied", "implied/a/b/c", "markers/empty-dir"):
        st = os.stat(imp.path(d))
        assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0), d


def test_import_state_is_released_exists_archived(imp):
    rc, out, err = imp.after_up["hsm_state"]
    assert rc == 0, err
    want = [IMPORTED_LINE.format(imp.path(k)) for k in sorted(good())]
    assert out.splitlines() == want
    for k, info in imp.after_up["info"].items():
        assert info["hsm"] == {"flags": hsm.IMPORTED, "archive_id": 1}, k
        assert info["s3"]["key"] == k


def test_import_fsx_striping(imp):
    for k, info in imp.after_up["info"].items():
        size = len(body(good()[k]))
        lay = info["layout"]
        assert lay["stripe_size"] == STRIPE, k
        assert lay["stripe_count"] == min(size // CHUNK + 1, OSTS), (k, size, lay)
        assert len(set(lay["osts"])) == lay["stripe_count"]
        assert all(0 <= o < OSTS for o in lay["osts"])
    assert imp.after_up["info"]["wide/big.bin"]["layout"]["stripe_count"] == 3
    assert imp.after_up["info"]["wide/two-stripes.bin"]["layout"]["stripe_count"] == 2
    assert imp.after_up["info"]["stripe+1"]["layout"]["stripe_count"] == 1


def test_import_skips_bad_keys_and_names_them(imp):
    log = imp.log("mds")
    for key in BAD:
        assert repr(key) in log or key in log, f"{key!r} not named in mds.log"
    assert re.search(rf"import done: .*{len(BAD)} skipped", log), log[-2000:]
    # none of them appears anywhere in the namespace
    assert not os.path.exists(imp.path("bad"))
    assert not os.path.exists(imp.path("okdir"))
    assert not os.path.exists(imp.path("sub"))
    assert not os.path.exists(imp.path("long"))
    assert not os.path.exists(imp.path("escape"))
    assert os.path.isfile(imp.path("clash"))
    assert read_file(imp.path("clash")) == good()["clash"]


def test_byte_exact_reads(imp):
    for k, v in good().items():
        assert read_file(imp.path(k)) == body(v), k


def test_byte_exact_at_stripe_boundaries(imp):
    """Reads that start and end around every stripe edge, with the page cache out of the way."""
    for k in ("wide/three-stripes.bin", "wide/exact+1.bin", "wide/big.bin", "stripe+1",
              "names/emoji 😀.bin"):
        want = body(good()[k])
        edges = sorted({e for s in range(0, len(want) + STRIPE, STRIPE) for e in (s - 1, s, s + 1)
                        if 0 <= e <= len(want)})
        for e in edges[:40]:
            for off, n in ((e, 1), (max(0, e - 3000), 6000), (e, STRIPE + 2)):
                assert pread_uncached(imp.path(k), off, n) == want[off:off + n], (k, off, n)
        assert pread_uncached(imp.path(k), len(want), 10) == b""
        assert pread_uncached(imp.path(k), len(want) + 5 * STRIPE, 10) == b""


def test_data_spread_over_every_ost(imp):
    k = "wide/big.bin"
    assert read_file(imp.path(k)) == body(good()[k])
    info = wait_for(lambda: (i := imp.info(k)) and i["present"] == i["chunks"] and i, 30,
                    what="big.bin fully present")
    assert set(info["layout"]["osts"]) == {0, 1, 2}
    assert all(n > 0 for n in info["present_by_ost"].values()), info["present_by_ost"]
    ino = info["ino"]
    for i in range(OSTS):
        obj = imp.data_dir / f"ost{i}" / "objects" / f"{ino & 0xFF:02x}" / f"{ino:x}"
        assert obj.stat().st_size > 0, obj
    wait_for(lambda: imp.hsm_flags(k) == hsm.RESIDENT, 30, what="big.bin resident")
    r = lfs("hsm_state", imp.path(k))
    assert r.stdout.strip() == RESIDENT_LINE.format(imp.path(k))


def test_cp_r_equals_bucket(imp, tmp_path):
    dest = tmp_path / "copy"
    r = subprocess.run(["cp", "-r", imp.path(), str(dest)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    files, dirs = set(), set()
    for root, ds, fs_ in os.walk(dest):
        rel = os.path.relpath(root, dest)
        for d in ds:
            dirs.add(os.path.normpath(os.path.join(rel, d)))
        for f in fs_:
            files.add(os.path.normpath(os.path.join(rel, f)))
    files.discard(".lustrefuse_ctl")
    assert files == set(good())
    for k, v in good().items():
        assert (dest / k).read_bytes() == body(v), k
    want_dirs = {m.rstrip("/") for m in MARKERS}
    for k in good():
        parts = k.split("/")[:-1]
        want_dirs |= {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}
    want_dirs |= {"markers"}
    assert dirs == want_dirs


def test_nothing_written_outside_ost_dirs(imp):
    assert sorted(os.listdir(imp.root)) == ["data", "mnt"]
    allowed = re.compile(r"^(fs\.json|log|mds\.db(-wal|-shm|-journal)?|mds\.lock|mds\.sock|"
                         r"up\.json|ost\d+|.*\.tmp)$")
    extra = [n for n in os.listdir(imp.data_dir) if not allowed.match(n)]
    assert not extra, extra
    for name in ("escape", "dotdot", "dot", "x", "child"):
        for where in (imp.root, imp.data_dir, imp.root.parent):
            assert not (where / name).exists(), where / name
    for ost in imp.data_dir.glob("ost*"):
        objects = ost / "objects"
        for root, _dirs, files in os.walk(objects):
            rel = os.path.relpath(root, objects)
            assert rel == "." or re.fullmatch(r"[0-9a-f]{2}", rel), root
            for f in files:
                assert re.fullmatch(r"[0-9a-f]+", f), os.path.join(root, f)


# -- the `hyd` filesystem: hydration, ETag pinning, HSM requests ----------------------------

@functools.cache
def hyd_objects() -> dict:
    return {
        "h/mid.bin": big_data(64 * MiB, "mid"),
        "h/seq.bin": big_data(40 * MiB, "seq"),
        "h/restore.bin": big_data(24 * MiB, "restore"),
        "h/busy.bin": big_data(3 * MiB + 5, "busy"),
        "h/dirty.bin": big_data(3 * MiB, "dirty"),
        "h/etag.bin": big_data(8 * MiB, "etag"),
        "h/lost.bin": big_data(4 * MiB, "lost"),
        "h/lost2.bin": big_data(4 * MiB, "lost2"),
        "h/seq-stale.bin": big_data(6 * MiB, "seq-stale"),
        "h/rows.bin": big_data(24 * MiB + 5, "rows"),  # 25 chunks over 2 OSTs
        "h/rows-seq.bin": big_data(32 * MiB, "rows-seq"),
        "h/reopen.bin": big_data(2 * MiB + 3, "reopen"),
    }


@pytest.fixture(scope="module")
def hyd(make_module_fs, s3):
    b = new_bucket(s3)
    return make_module_fs(b, osts=2, stripe_size="1M", objects=hyd_objects(),
                          extra_args=("--imported-file-chunk-size", "16M"))


def delta(before: dict, after: dict, fs) -> dict:
    return {
        "gets": after["total"]["s3_gets"] - before["total"]["s3_gets"],
        "bytes_in": after["total"]["s3_bytes_in"] - before["total"]["s3_bytes_in"],
        "hydrated": fs.ost_sum("chunks_hydrated", after) - fs.ost_sum("chunks_hydrated", before),
        "joins": fs.ost_sum("single_flight_joins", after) - fs.ost_sum("single_flight_joins", before),
        "served": after["total"]["bytes_served_from_osts"] - before["total"]["bytes_served_from_osts"],
        "bytes_read": after["client"].get("bytes_read", 0) - before["client"].get("bytes_read", 0),
    }


def test_hydrate_one_stripe_for_a_small_read(hyd):
    k, want = "h/mid.bin", hyd_objects()["h/mid.bin"]
    assert hyd.after_up["stats"]["total"]["s3_gets"] == 0
    before = hyd.wait_quiet()
    off = 32 * MiB + 3 * 4096
    assert pread_uncached(hyd.path(k), off, 4096) == want[off:off + 4096]
    after = hyd.wait_quiet()
    d = delta(before, after, hyd)
    assert d["gets"] == 1, d
    assert d["bytes_in"] == MiB, d  # exactly one stripe, no prefetch for a random read
    assert d["hydrated"] == 1, d
    info = wait_for(lambda: (i := hyd.info(k))["present"] == 1 and i, 15, what="presence")
    assert info["hsm"]["flags"] == hsm.IMPORTED  # still released until every stripe is here
    assert info["present_bytes"] == MiB

    # the same range again, and another range of that stripe: served by the OST, no S3
    before = after
    assert pread_uncached(hyd.path(k), off, 4096) == want[off:off + 4096]
    off2 = 32 * MiB + 700 * KiB
    assert pread_uncached(hyd.path(k), off2, 8192) == want[off2:off2 + 8192]
    after = hyd.stats()
    d = delta(before, after, hyd)
    assert d["gets"] == 0 and d["bytes_in"] == 0, d
    assert d["served"] >= 4096 + 8192, d


def test_concurrent_readers_share_one_get(hyd):
    """Readers of one missing stripe (different pages, so the kernel sends them all)
    cause one GET; single_flight_joins shows they waited on it."""
    k, want = "h/mid.bin", hyd_objects()["h/mid.bin"]
    joined = 0
    for stripe in (40, 45, 50, 55):
        base = stripe * MiB
        n = 8
        barrier = threading.Barrier(n)
        fds = [os.open(hyd.path(k), os.O_RDONLY) for _ in range(n)]
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        before = hyd.wait_quiet()

        def reader(i, fds=fds, barrier=barrier, base=base):
            barrier.wait(10)
            off = base + i * 64 * KiB
            return os.pread(fds[i], 4096, off) == want[off:off + 4096]

        try:
            with ThreadPoolExecutor(n) as pool:
                assert all(pool.map(reader, range(n)))
        finally:
            for fd in fds:
                os.close(fd)
        d = delta(before, hyd.wait_quiet(), hyd)
        assert d["gets"] == 1 and d["hydrated"] == 1, (stripe, d)
        assert d["bytes_in"] == MiB, (stripe, d)
        joined += d["joins"]
        if joined:
            break
    assert joined >= 1, "no reader ever joined an in-flight fetch"


def test_sequential_read_prefetch_is_bounded(hyd):
    k, want = "h/seq.bin", hyd_objects()["h/seq.bin"]
    before = hyd.wait_quiet()
    with open(hyd.path(k), "rb") as f:
        got = b"".join(f.read(128 * KiB) for _ in range(32))  # the first 4 MiB
    assert got == want[:4 * MiB]
    after = hyd.wait_quiet()
    d = delta(before, after, hyd)
    read_stripes = -(-d["bytes_read"] // MiB)  # what the kernel asked for, read-ahead included
    assert read_stripes >= 4, d
    assert d["bytes_in"] > read_stripes * MiB, f"no prefetch beyond the reads: {d}"
    # the issue said a window of 16 stripes; the client now keeps PREFETCH_CHUNKS (32)
    window = PREFETCH_CHUNKS
    assert d["bytes_in"] <= (read_stripes + window) * MiB, f"prefetch beyond {window} stripes: {d}"
    assert d["bytes_in"] % MiB == 0 and d["hydrated"] == d["bytes_in"] // MiB, d  # whole stripes
    assert 1 <= d["gets"] <= d["hydrated"], d  # adjacent stripes may share one GET


def test_etag_pinning_never_mixes_versions(hyd, s3):
    k, old = "h/etag.bin", hyd_objects()["h/etag.bin"]
    # hydrate stripe 1 only (a random read, so no prefetch)
    assert pread_uncached(hyd.path(k), MiB + 10, 100) == old[MiB + 10:MiB + 110]
    hyd.wait_quiet()
    new = big_data(len(old), "etag-v2")
    s3.put_object(Bucket=hyd.bucket, Key=k, Body=new)

    # the present stripe still reads as the imported version
    assert pread_uncached(hyd.path(k), MiB, 4096) == old[MiB:MiB + 4096]
    # a missing stripe fails instead of returning bytes of the new object
    t = time.monotonic()
    with pytest.raises(OSError) as e:
        pread_uncached(hyd.path(k), 5 * MiB, 4096)
    assert time.monotonic() - t < 30
    print(f"stale read failed with {errno.errorcode.get(e.value.errno)}")
    # every missing stripe fails; present ones keep the imported bytes (stripe 0 is left
    # out: a read at offset 0 counts as the start of a sequential read and prefetches)
    for s in range(len(old) // MiB - 1, 0, -1):
        try:
            got = pread_uncached(hyd.path(k), s * MiB, 4096)
        except OSError:
            assert s != 1
            continue
        assert got == old[s * MiB:s * MiB + 4096] != new[s * MiB:s * MiB + 4096], s
    assert repr(k) in hyd.log("ost0") + hyd.log("ost1")
    assert hyd.mounted()


def test_stale_object_read_is_eio_and_lost(hyd, s3):
    k = "h/lost.bin"
    s3.put_object(Bucket=hyd.bucket, Key=k, Body=big_data(len(hyd_objects()[k]), "lost-v2"))
    with pytest.raises(OSError) as e:
        pread_uncached(hyd.path(k), 2 * MiB, 4096)
    assert e.value.errno == errno.EIO
    flags = wait_for(lambda: (f := hyd.hsm_flags(k)) & hsm.LOST and f, 10, 0.1, "LOST flag")
    assert flags == hsm.IMPORTED | hsm.LOST
    assert lfs("hsm_state", hyd.path(k)).stdout.strip() == (
        f"{hyd.path(k)}: (0x0000004d) released exists archived lost_from_hsm, archive_id:1")
    # a lost file cannot be restored (reference §1.5: LOST -> EPERM)
    r = lfs("hsm_restore", hyd.path(k))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
    assert hyd.mounted()


def test_restore_of_changed_object_marks_lost(hyd, s3):
    k = "h/lost2.bin"
    s3.put_object(Bucket=hyd.bucket, Key=k, Body=big_data(len(hyd_objects()[k]), "lost2-v2"))
    r = lfs("hsm_restore", hyd.path(k))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: lfs("hsm_action", hyd.path(k)).stdout.strip().endswith("NOOP"), 60,
             0.1, "the failed restore to finish")
    flags = wait_for(lambda: (f := hyd.hsm_flags(k)) & hsm.LOST and f, 10, what="LOST flag")
    assert flags & hsm.RELEASED
    r = lfs("hsm_state", hyd.path(k))
    assert "lost_from_hsm" in r.stdout
    assert re.search(re.escape(repr(k)) + "|" + re.escape(k), hyd.log("mds"))
    with pytest.raises(OSError):
        pread_uncached(hyd.path(k), MiB, 4096)
    assert hyd.mounted()


def test_hsm_restore_then_release(hyd):
    k, want = "h/restore.bin", hyd_objects()["h/restore.bin"]
    p = hyd.path(k)
    assert hyd.hsm_flags(k) == hsm.IMPORTED
    t = time.monotonic()
    r = lfs("hsm_restore", p)
    took = time.monotonic() - t
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
    assert took < 10, f"hsm_restore took {took:.1f}s: it must only queue the request"
    first = lfs("hsm_action", p).stdout.strip()
    assert re.fullmatch(re.escape(p) + r": (NOOP|RESTORE (waiting|running) .*)", first), first
    seen = {first}

    def done():
        line = lfs("hsm_action", p).stdout.strip()
        seen.add(line)
        return line == f"{p}: NOOP"

    wait_for(done, 120, 0.1, "hsm_action to show NOOP")
    wait_for(lambda: hyd.hsm_flags(k) == hsm.RESIDENT, 30, what="state 0x9")
    assert lfs("hsm_state", p).stdout.strip() == RESIDENT_LINE.format(p)
    before = hyd.wait_quiet()
    assert read_file(p) == want
    d = delta(before, hyd.stats(), hyd)
    assert d["gets"] == 0 and d["bytes_in"] == 0, d
    assert d["served"] >= len(want) or d["bytes_read"] == 0, d

    # release: back to 0xd, the OST space comes back, content unchanged on re-read
    used = hyd.ost_objects_du()
    r = lfs("hsm_release", p)
    assert r.returncode == 0, r.stderr
    assert lfs("hsm_state", p).stdout.strip() == IMPORTED_LINE.format(p)
    freed = used - hyd.ost_objects_du()
    assert freed >= len(want) - MiB, (used, freed)
    info = hyd.info(k)
    assert info["present"] == 0 and info["hsm"]["flags"] == hsm.IMPORTED
    drop_file_cache(p)
    before = hyd.stats()
    assert read_file(p) == want
    d = delta(before, hyd.wait_quiet(), hyd)
    assert d["gets"] >= 1, d  # it really came back from S3


def test_restore_of_striped_file_fetches_whole_stripe_rows(hyd):
    """A file striped over 2 OSTs with 1 MiB stripes: each GET covers a row of
    adjacent stripes (GET_SPAN), the fetching OST hands the other OST its chunks, and
    every chunk ends up on the OST the layout names, with its checksum."""
    k, want = "h/rows.bin", hyd_objects()["h/rows.bin"]
    p = hyd.path(k)
    info = hyd.info(k)
    assert len(info["layout"]["osts"]) == 2 and info["layout"]["stripe_size"] == MiB, info
    before = hyd.wait_quiet()
    assert lfs("hsm_restore", p).returncode == 0
    wait_for(lambda: hyd.hsm_flags(k) == hsm.RESIDENT, 60, 0.1, "resident")
    after = hyd.wait_quiet()
    d = delta(before, after, hyd)
    assert d["bytes_in"] == len(want), d  # every byte once
    assert d["hydrated"] == 25, d  # counted by the OST that stores each chunk
    assert d["gets"] == -(-25 * MiB // GET_SPAN), d  # rows of GET_SPAN, not 25 one-stripe GETs
    handed = hyd.ost_sum("chunks_handed_over", after) - hyd.ost_sum("chunks_handed_over", before)
    assert handed >= 12, handed  # about half of each row belongs to the other OST
    # each chunk is where the layout says: read straight from the OST objects
    drop_file_cache(p)
    assert read_file(p) == want
    assert delta(after, hyd.stats(), hyd)["gets"] == 0
    r = lustrefuse("scrub", str(hyd.mnt), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cold_sequential_read_of_striped_file_gets_rows(hyd):
    k, want = "h/rows-seq.bin", hyd_objects()["h/rows-seq.bin"]
    before = hyd.wait_quiet()
    assert read_file(hyd.path(k)) == want
    d = delta(before, hyd.wait_quiet(), hyd)
    assert d["bytes_in"] == len(want) and d["hydrated"] == 32, d
    # a few one-stripe demand GETs before the reader is seen as sequential, then rows
    assert d["gets"] <= 12, d


def make_resident(fs, k):
    r = lfs("hsm_restore", fs.path(k))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: fs.hsm_flags(k) == hsm.RESIDENT, 60, 0.1, f"{k} resident")


def test_release_of_open_file_is_ebusy(hyd):
    k = "h/busy.bin"
    p = hyd.path(k)
    make_resident(hyd, k)
    with open(p, "rb") as f:
        assert f.read(10) == hyd_objects()[k][:10]
        r = lfs("hsm_release", p)
        assert r.returncode != 0
        assert "Device or resource busy" in r.stderr, r.stderr
        with pytest.raises(OSError) as e:
            hyd.request("release", k)
        assert e.value.errno == errno.EBUSY
        assert hyd.hsm_flags(k) == hsm.RESIDENT
    r = lfs("hsm_release", p)
    assert r.returncode == 0, r.stderr
    assert hyd.hsm_flags(k) == hsm.IMPORTED
    assert read_file(p) == hyd_objects()[k]


def test_reopen_reuses_objects_until_the_file_changes(hyd):
    """A read-only re-open of an unchanged file reuses the OST descriptors and chunk
    tables of the last open (no OST round trip); a release, a restore or a write in
    between is seen. The handle this client keeps for the next open (under a lease)
    does not make the file busy: the release takes it back at once."""
    k = "h/reopen.bin"
    p = hyd.path(k)
    want = hyd_objects()[k]
    make_resident(hyd, k)

    def hits():
        return hyd.stats()["client"].get("object_cache_hits", 0)

    assert read_file(p) == want
    h0 = hits()
    assert read_file(p) == want
    assert hits() == h0 + 1
    assert hyd.stats()["client"].get("lease_opens", 0) >= 1  # the second open was local
    r = lfs("hsm_release", p)  # just closed: not busy, though its handle was kept
    assert r.returncode == 0, r.stderr
    h1 = hits()
    assert read_file(p) == want  # released: fetched again, not the old tables
    assert hits() == h1
    make_resident(hyd, k)
    assert read_file(p) == want
    with open(p, "r+b") as f:
        f.seek(MiB)
        f.write(b"new bytes")
    want = want[:MiB] + b"new bytes" + want[MiB + 9:]
    h2 = hits()
    assert read_file(p) == want
    assert hits() == h2  # written since: not from the cache
    assert read_file(p) == want
    assert hits() == h2 + 1


def test_release_of_dirty_or_unarchived_file_is_eperm(hyd):
    k = "h/dirty.bin"
    p = hyd.path(k)
    make_resident(hyd, k)
    r = lfs("hsm_set", "--dirty", p)
    assert r.returncode == 0, r.stderr
    assert hyd.hsm_flags(k) == hsm.RESIDENT | hsm.DIRTY
    r = lfs("hsm_release", p)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
    with pytest.raises(OSError) as e:
        hyd.request("release", k)
    assert e.value.errno == errno.EPERM
    assert hyd.hsm_flags(k) == hsm.RESIDENT | hsm.DIRTY
    assert read_file(p) == hyd_objects()[k]

    new = hyd.path("h/new-file.txt")
    with open(new, "wb") as f:
        f.write(b"never archived\n")
    assert hyd.hsm_flags("h/new-file.txt") & hsm.ARCHIVED == 0
    r = lfs("hsm_release", new)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
    assert read_file(new) == b"never archived\n"


def test_stats_cli_matches_control_file(hyd):
    cli = hyd.stats_cli()
    direct = hyd.stats()
    assert cli["total"].keys() == direct["total"].keys()
    for name in ("s3_gets", "s3_bytes_in"):
        assert cli["total"][name] <= direct["total"][name]
    assert set(cli["osts"]) == {"0", "1"}
    assert all("single_flight_joins" in o and "chunks_hydrated" in o for o in cli["osts"].values())


def test_copy_out_of_mount_with_shutil(hyd, tmp_path):
    """An ordinary tool (shutil.copyfile uses sendfile/copy_file_range) gets the same bytes."""
    k = "h/seq.bin"
    dest = tmp_path / "seq.bin"
    shutil.copyfile(hyd.path(k), dest)
    assert dest.read_bytes() == hyd_objects()[k]
    assert filecmp.cmp(hyd.path(k), dest, shallow=False)


def test_sequential_read_of_changed_object_keeps_the_mount(hyd, s3):
    """A failed prefetch must not take the FUSE daemon down (it did before 181ff5d).
    Last of the `hyd` tests: if it regresses, only this test sees the dead mount."""
    k, old = "h/seq-stale.bin", hyd_objects()["h/seq-stale.bin"]
    s3.put_object(Bucket=hyd.bucket, Key=k, Body=big_data(len(old), "seq-stale-v2"))
    got = bytearray()
    with pytest.raises(OSError), open(hyd.path(k), "rb", buffering=0) as f:
        while chunk := f.read(256 * KiB):
            got += chunk
    assert bytes(got) == old[:len(got)]  # never bytes of the new version
    time.sleep(1.0)  # the prefetch of the next stripes fails in the background meanwhile
    assert hyd.mounted(), "the FUSE daemon died:\n" + hyd.log("mount")[-3000:]
    assert read_file(hyd.path("h/busy.bin")) == hyd_objects()["h/busy.bin"]


# -- the `wide` filesystem: 10,000 entries, --no-posix-metadata, a prefix -----------------

N_WIDE = 10_000


class Preload(threading.Thread):
    """PUTs the 10,000 objects in the background while the other tests of this module run
    (moto takes about 5 ms a PUT, most of a minute for all of them)."""

    def __init__(self, s3, endpoint):
        super().__init__(name="wide-preload", daemon=True)
        self.s3, self.endpoint = s3, endpoint
        self.bucket = new_bucket(s3)
        self.error = None
        self.took = 0.0

    def run(self):
        t = time.monotonic()
        try:
            put_objects(self.s3, self.bucket, {
                "nm/perm.txt": (b"perm\n", META_PERM), "outside.txt": b"not linked",
                "nm/sub/": (b"", {"file-permissions": "040700"})})
            put_many_small(self.endpoint, self.bucket, [f"nm/big/f{i:05d}" for i in range(N_WIDE)],
                           body_of=lambda k: k[-5:].lstrip("0").encode(), threads=4)
        except Exception as e:
            self.error = e
        self.took = time.monotonic() - t


@pytest.fixture(scope="module", autouse=True)
def wide_preload(request, s3, s3_server):
    """Started at the first test of the module, if any selected test uses ``wide``."""
    if not any("wide" in getattr(it, "fixturenames", ()) for it in request.session.items
               if it.module is request.module):
        return None
    p = Preload(s3, s3_server)
    p.start()
    return p


@pytest.fixture(scope="module")
def wide(make_module_fs, s3, wide_preload):
    wide_preload.join(240)
    assert not wide_preload.is_alive(), "the 10,000 PUTs did not finish"
    if wide_preload.error:
        raise wide_preload.error
    print(f"{N_WIDE} PUTs took {wide_preload.took:.1f}s (in the background)")
    b = wide_preload.bucket
    fs = make_module_fs(b, prefix="nm", extra_args=("--no-posix-metadata",))
    fs.after_up["last_modified"] = s3.head_object(Bucket=b, Key="nm/perm.txt")["LastModified"]
    return fs


def test_no_posix_metadata_ignores_headers(wide):
    st = os.stat(wide.path("perm.txt"))
    assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)
    assert abs(st.st_mtime - wide.after_up["last_modified"].timestamp()) < 1.0
    assert st.st_mtime_ns != T_NS
    st = os.stat(wide.path("sub"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert wide.after_up["stats"]["total"]["s3_gets"] == 0


def test_prefix_links_only_its_subtree(wide):
    assert sorted(set(os.listdir(wide.path())) - {".lustrefuse_ctl"}) == ["big", "perm.txt", "sub"]
    assert wide.info("perm.txt")["s3"]["key"] == "nm/perm.txt"
    assert read_file(wide.path("perm.txt")) == b"perm\n"


def test_directory_with_10000_entries(wide):
    t = time.monotonic()
    names = os.listdir(wide.path("big"))
    assert len(names) == N_WIDE
    assert sorted(names) == [f"f{i:05d}" for i in range(N_WIDE)]
    for n in names:
        st = os.stat(wide.path(f"big/{n}"))
        assert st.st_size == len(n[-5:].lstrip("0")), n
        assert stat.S_ISREG(st.st_mode)
    r = subprocess.run(["ls", "-l", wide.path("big")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == N_WIDE + 1  # plus the "total" line
    print(f"listing and stat of {N_WIDE} entries took {time.monotonic() - t:.1f}s")
    for i in (0, 1, 4999, 9999):
        assert read_file(wide.path(f"big/f{i:05d}")) == str(i).encode().lstrip(b"0")


def test_install_refuses_chunks_that_are_not_whole_or_not_its_own(hyd):
    """The OST call that receives a stripe row's chunks from another OST checks what
    it is given and changes nothing when it refuses."""
    k = "h/rows.bin"
    info = hyd.info(k)
    lay = info["layout"]
    desc = {"ino": info["ino"], "layout": lay, "s3_key": k, "etag": None,
            "s3_size": len(hyd_objects()[k]), "size": len(hyd_objects()[k])}
    own = {i: lay["osts"][i % 2] for i in range(4)}  # chunk -> the OST that holds it
    s_theirs = next(s for s, o in own.items() if o != 0)
    s_ours = next(s for s, o in own.items() if o == 0)
    ost0 = rpc.Client(f"unix:{hyd.data_dir / 'ost0' / 'ost.sock'}", timeout=10)
    before = ost0.call("table", ino=info["ino"])
    cases = [
        {"chunks": {s_theirs: bytes(MiB)}},  # another OST's chunk
        {"chunks": {s_ours: bytes(MiB - 1)}},  # not a whole stripe
        {"spans": {s_ours: [0, MiB]}},  # a memory file announced, none sent
    ]
    for args in cases:
        with pytest.raises(RpcError) as e:
            ost0.call("install", desc=desc, **args)
        assert e.value.errno == errno.EINVAL, args
    fd = os.memfd_create("test-row")
    try:
        os.ftruncate(fd, 2 * MiB)
        for spans in ({s_ours: [2 * MiB, MiB]},  # beyond the memory file's end
                      {s_ours: [512, MiB]},  # not on a page
                      {s_theirs: [0, MiB]},  # another OST's chunk
                      {s_ours: [0, MiB - 1]}):  # not a whole stripe
            with pytest.raises(RpcError) as e:
                ost0.call("install", desc=desc, spans=spans, send_fds=[fd])
            assert e.value.errno == errno.EINVAL, spans
    finally:
        os.close(fd)
    assert ost0.call("table", ino=info["ino"]) == before
