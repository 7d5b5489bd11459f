"""SIGKILL one part, recover with ``lustrefuse up``, lose nothing acknowledged (issue #6).

For each victim -- the MDS, one OST, the FUSE client (mount daemon) -- one *crash
cycle* runs four activities at once on the module's filesystem, kills the victim
with SIGKILL while every one of them is in progress, recovers with ``up`` on the
same data directory, and then checks each activity on its own:

``restore``   ``lfs hsm_restore`` of a released 32 MiB file (1 MiB stripes over both
              OSTs); the kill lands while ``hsm_action`` shows RESTORE running and half
              of the stripes are local (GETs of the second half are held back by a
              latency rule of the S3 proxy). The interrupted restore must resume or be
              re-queued and complete by itself (state 0x9), and the bytes read back
              must equal the S3 object (a half-written chunk is never served).
``archive``   ``lfs hsm_archive`` of a 20 MiB written file, killed while a multipart
              part is on its way (PUTs are held back). Afterwards the file is either
              archived with the right S3 object, or still dirty and archivable again.
``writes``    a subprocess writing and fsync'ing checksummed records; every record
              whose fsync returned must be there afterwards, byte for byte.
``renames``   a subprocess renaming files between directories; afterwards every file
              exists exactly once, under its last acknowledged name (or the name of the
              one rename in flight), with its content intact.

Also checked in every cycle: a file held open with 1 MiB fsync'd and 1.5 MiB more
written but not flushed (by a process that forks nothing: every close of a forked
copy of a descriptor would flush it) keeps what was acknowledged, and the rest never
reappears, not even when the file is extended; a dirty file is still dirty; and
``lustrefuse fsck`` after ``down`` reports no problems. The cycles run once each
(memoised) and the tests below report their parts, so one bug does not hide the others.

Outside the cycles: a second MDS (or ``up``) on a data directory in use is refused
with a clear message, and the first operations through a busy mount succeed once a
killed MDS or OST is back (its pooled connections to the dead process go).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helpers
import pytest
from helpers import MiB, pid_alive, ping, wait_for
from s3fault import FaultProxy

from lustrefuse import rpc

pytestmark = pytest.mark.timeout(240)

VICTIMS = ("mds", "ost1", "mount")
RESTORE_SIZE = 32 * MiB
ARCHIVE_SIZE = 20 * MiB + 4321
HELD = 16 * MiB  # GETs of the restore file from this offset on are held back
GET_DELAY = 6.0
# When the client dies, the supervisor stops the OSTs (SIGTERM, SIGKILL after 10 s), then
# the MDS: held longer than that, the restore is surely cut off by the shutdown.
GET_DELAY_MOUNT = 15.0
PUT_DELAY = 2.5
REC = 50_000  # writer record size: not a divisor of the stripe, records straddle chunks
STORM_FILES = 24
DIRTY = "witness/dirty.bin"
PENDING = "witness/pending.bin"
RECOVER_WAIT = 45.0
RESUME_WAIT = 15.0  # a re-queued restore needs at most a few seconds here

RESTORE_OBJECTS = {f"r/{v}.bin": helpers.big_data(RESTORE_SIZE, f"restore-{v}") for v in VICTIMS}

# -- subprocesses that touch the mount (a dead mount may hang or fail them) ----------

WRITER = r"""
import os, random, sys, time
path, stop, limit, rec = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_WRONLY)
for i in range(limit):
    if os.path.exists(stop):
        break
    body = random.Random(i).randbytes(rec)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        print("ERR", i, e, flush=True)
        sys.exit(3)
    print("ACK", i, flush=True)
"""

STORM = r"""
import json, os, random, sys
root, stop, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
where = {int(k): v for k, v in json.loads(sys.argv[4]).items()}
dirs = json.loads(sys.argv[5])
rng = random.Random(7)
for n in range(limit):
    if os.path.exists(stop):
        break
    fid = rng.choice(sorted(where))
    new = f"{rng.choice(dirs)}/f{fid}-{n}"
    print("TRY", fid, new, flush=True)
    try:
        os.rename(os.path.join(root, where[fid]), os.path.join(root, new))
    except OSError as e:
        print("ERR", fid, e, flush=True)
        sys.exit(3)
    where[fid] = new
    print("OK", fid, new, flush=True)
"""

HOLDER = r"""
import os, random, sys, time
path, stop, seed = sys.argv[1], sys.argv[2], sys.argv[3]
a = random.Random("a" + seed).randbytes(1 << 20)
b = random.Random("b" + seed).randbytes(3 << 19)
fd = os.open(path, os.O_WRONLY)
for chunk in (a, b):
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]
    if chunk is a:
        os.fsync(fd)
print("READY", flush=True)
while not os.path.exists(stop):
    time.sleep(0.02)
try:
    os.close(fd)
    print("CLOSED ok", flush=True)
except OSError as e:
    print("CLOSED", e, flush=True)
"""

DIGEST = r"""
import errno, hashlib, json, os, sys
out = {}
for p in sys.argv[1:]:
    try:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            digs, size = [], 0
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                size += len(b)
                digs.append(hashlib.sha256(b).hexdigest())
        finally:
            os.close(fd)
        out[p] = {"size": size, "mib": digs}
    except OSError as e:
        out[p] = {"error": errno.errorcode.get(e.errno, str(e.errno)), "msg": str(e)}
print(json.dumps(out))
"""

PROBE = r"""
import errno, json, os, sys
mnt, rel = sys.argv[1], sys.argv[2]
path = os.path.join(mnt, rel)
res = []
for what, fn in [("listdir", lambda: sorted(os.listdir(mnt)))] + [
        ("getxattr", lambda: os.getxattr(path, "lustrefuse.info"))] * 8 + [
        ("open+read", lambda: len(open(path, "rb").read()))] * 4:
    try:
        fn()
        res.append([what, "ok"])
    except OSError as e:
        res.append([what, errno.errorcode.get(e.errno, str(e.errno))])
print(json.dumps(res))
"""


def py(code: str, *args, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return helpers.run([sys.executable, "-c", code, *args], timeout=timeout)


def mib_digests(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i:i + MiB]).hexdigest() for i in range(0, len(data), MiB)]


def read_digests(path: str, attempts: int = 3) -> dict:
    """Size and per-MiB sha256 of a file read through the mount (page cache dropped
    first), in a subprocess with a timeout. An EIO is retried a couple of times (a
    stale pooled connection after a restart fails once; see
    ``test_first_operations_after_restart_succeed``)."""
    for i in range(attempts):
        r = py(DIGEST, path, timeout=90)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)[path]
        if got.get("error") != "EIO" or i == attempts - 1:
            return got
        time.sleep(0.5)
    raise AssertionError("unreachable")


def assert_same_bytes(path: str, expected: bytes, what: str):
    got = read_digests(path)
    assert "error" not in got, f"{what}: reading {path} failed: {got}"
    want = mib_digests(expected)
    bad = [i for i, (a, b) in enumerate(zip(got["mib"], want, strict=False)) if a != b]
    assert got["size"] == len(expected) and not bad, (
        f"{what}: {path} differs from the expected bytes: size {got['size']} (want "
        f"{len(expected)}), MiB blocks differing: {bad[:20]}")


def lfs_out(*args) -> str:
    r = helpers.lfs(*args)
    assert r.returncode == 0, f"lfs {' '.join(args)}: {r.stderr}"
    return r.stdout


def hsm_state(fs, rel: str) -> str:
    return lfs_out("hsm_state", fs.path(rel)).split(": ", 1)[1].strip()


def hsm_flags(fs, rel: str) -> int:
    return int(hsm_state(fs, rel).split(")")[0].strip("("), 16)


def lines(path: Path) -> list[list[str]]:
    try:
        return [ln.split(" ", 2) for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def stop_proc(p: subprocess.Popen, stop_file: Path, timeout: float = 20.0):
    stop_file.touch()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


# -- the crash cycle ---------------------------------------------------------------

class Cycle:
    """One victim's crash and recovery; ``failures[part]`` is None or what went wrong."""

    PARTS = ("restore_resumes", "restore_bytes", "archive", "writes", "renames",
             "dirty_kept", "pending", "fsck", "pending_extend")

    def __init__(self, lab: Lab, victim: str):
        self.lab = lab
        self.fs = lab.fs
        self.victim = victim
        self.work = lab.work / victim
        self.work.mkdir()
        self.failures: dict[str, str | None] = {}
        self.notes: list[str] = []
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.holder: subprocess.Popen | None = None

    def check(self, part: str, fn):
        try:
            fn()
            self.failures[part] = None
        except Exception:
            self.failures[part] = (traceback.format_exc(limit=3) + "\n--- notes ---\n"
                                   + "\n".join(self.notes) + "\n--- logs ---\n"
                                   + self.fs.log_tails(25))

    # -- set-up: four activities in progress --------------------------------------

    def start(self):
        fs, v, proxy = self.fs, self.victim, self.lab.proxy
        # restore: hold back the second half of the file's GETs
        self.rkey = f"r/{v}.bin"

        def held(req, key=self.rkey):
            if req.key != key or not req.range:
                return False
            return int(req.range.split("=")[1].split("-")[0]) >= HELD

        proxy.add("latency", method="GET", predicate=held,
                  delay=GET_DELAY_MOUNT if v == "mount" else GET_DELAY)
        # archive: a written file whose multipart parts are held back
        self.akey = f"a/{v}.bin"
        self.adata = helpers.data(ARCHIVE_SIZE, f"archive-{v}")
        os.makedirs(fs.path("a"), exist_ok=True)
        lfs_out("setstripe", "-c", "-1", fs.path(self.akey))
        with open(fs.path(self.akey), "wb") as f:
            f.write(self.adata)
        proxy.add("latency", method="PUT", key=self.akey, delay=PUT_DELAY)
        # writes: a file over both OSTs
        os.makedirs(fs.path("w"), exist_ok=True)
        self.wrel = f"w/{v}.log"
        lfs_out("setstripe", "-c", "-1", fs.path(self.wrel))
        self.wout, self.wstop = self.work / "writer.out", self.work / "writer.stop"
        # renames: files spread over four directories
        self.sroot = f"s/{v}"
        self.sdirs = [f"d{i}" for i in range(4)]
        for d in self.sdirs:
            os.makedirs(fs.path(f"{self.sroot}/{d}"))
        self.sdata = {}
        where = {}
        for i in range(STORM_FILES):
            body = f"id={i}\n".encode() + helpers.data(2000 + i * 997, f"storm-{v}-{i}")
            rel = f"{self.sdirs[i % 4]}/f{i}"
            with open(fs.path(f"{self.sroot}/{rel}"), "wb") as f:
                f.write(body)
            self.sdata[i] = body
            where[i] = rel
        self.sout, self.sstop = self.work / "storm.out", self.work / "storm.stop"

        # a file with data not yet flushed when the victim dies, held open by a process
        # that forks nothing (every close of a descriptor, even a forked copy's, flushes)
        if os.path.exists(fs.path(PENDING)):
            os.unlink(fs.path(PENDING))
        lfs_out("setstripe", "-c", "-1", fs.path(PENDING))
        self.pdata = (random.Random(f"a{v}").randbytes(MiB),
                      random.Random(f"b{v}").randbytes(MiB + MiB // 2))
        self.pout, self.pstop = self.work / "holder.out", self.work / "holder.stop"
        with open(self.pout, "wb") as o:
            self.holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, fs.path(PENDING), str(self.pstop), v], stdout=o,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=helpers.env())
        wait_for(lambda: any(ln[0] == "READY" for ln in lines(self.pout)), 30, 0.05,
                 "the holder to write its file")

        # go: the writer and the renamer first, then (their windows are a few seconds
        # of held-back S3 requests) the restore and the archive
        for script, out, args in (
                (WRITER, self.wout, [fs.path(self.wrel), self.wstop, 2000, REC]),
                (STORM, self.sout, [fs.path(self.sroot), self.sstop, 20000, json.dumps(where),
                                    json.dumps(self.sdirs)])):
            with open(out, "wb") as o:
                p = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=o,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=helpers.env())
            stop = self.wstop if script is WRITER else self.sstop
            self.procs.append((p, stop))
        wait_for(lambda: self.counts() >= (20, 60), 60, 0.1, "the writer and the renamer to get going")
        lfs_out("hsm_archive", fs.path(self.akey))
        lfs_out("hsm_restore", fs.path(self.rkey))

    def counts(self) -> tuple[int, int]:
        acks = sum(1 for ln in lines(self.wout) if ln[0] == "ACK")
        renames = sum(1 for ln in lines(self.sout) if ln[0] == "OK")
        return acks, renames

    def in_progress(self) -> bool:
        fs = self.fs
        r = fs.info(self.rkey)
        restoring = (r["action"].get("action") == "RESTORE" and r["action"].get("state") == "running"
                     and r["present"] >= HELD // MiB)
        a = fs.info(self.akey)
        archiving = (a["action"].get("action") == "ARCHIVE" and a["action"].get("state") == "running"
                     and self.lab.proxy.count(method="PUT", key=self.akey) >= 1)
        acks, renames = self.counts()
        self.progress = dict(restoring=restoring, archiving=archiving, acks=acks, renames=renames)
        return restoring and archiving

    # -- kill and recover ------------------------------------------------------------

    def kill(self):
        fs = self.fs
        wait_for(self.in_progress, 30, 0.1, "the restore and the archive to be in progress")
        self.notes.append(f"hsm_action before the kill: {lfs_out('hsm_action', fs.path(self.rkey))}"
                          f"{lfs_out('hsm_action', fs.path(self.akey))}".strip())
        self.pids = fs.pids()
        pid = self.pids[self.victim]
        os.kill(pid, signal.SIGKILL)
        self.killed_at = time.monotonic()
        wait_for(lambda: not pid_alive(pid), 10, 0.05, f"{self.victim} (pid {pid}) to die")
        self.notes.append(f"killed {self.victim} pid {pid}; progress {self.progress}")
        self.lab.proxy.clear()
        if self.victim == "mount":
            stop_proc(self.holder, self.pstop)
        time.sleep(0.5)
        for p, stop in self.procs:
            stop_proc(p, stop)

    def recover(self):
        fs, v = self.fs, self.victim
        if v == "mount":
            # the supervisor stops the other parts when its mount dies
            sup = self.pids["supervisor"]
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not pid_alive(sup), 40, 0.1, "the supervisor to stop")
            self.notes.append(f"supervisor alive after its mount died: {pid_alive(sup)}; "
                              f"mounted: {fs.mounted()}")
            r = helpers.lustrefuse("down", fs.mnt, "--data-dir", fs.data_dir, timeout=90)
            assert r.returncode == 0, f"down after the client was killed: {r.stderr}"
            assert not fs.mounted(), "lustrefuse down left the dead mount in place"
            left = [p for p in self.pids.values() if pid_alive(p)]
            assert not left, f"processes left running after down: {left}"
            fs.up_again()
            return
        r = fs.up_again()
        self.notes.append(f"up: {r.stdout.strip()} {r.stderr.strip()}")
        old = self.pids[v]
        dd = fs.data_dir
        mds_sock = f"unix:{dd / 'mds.sock'}"

        def back():
            new = fs.pids().get(v)
            if not new or new == old or not pid_alive(new):
                return False
            if v == "mds":
                return ping(mds_sock)
            idx = v[3:]
            c = rpc.Client(mds_sock, timeout=3)
            try:
                cfg = c.call("config")
            finally:
                c.close()
            return idx in cfg["osts"] and ping(f"unix:{dd / v / 'ost.sock'}")

        wait_for(back, RECOVER_WAIT, 0.1, f"{v} to be restarted by up")
        self.notes.append(f"{v} back {time.monotonic() - self.killed_at:.1f}s after the kill")

    # -- the checks ------------------------------------------------------------------

    def restore_resumes(self):
        fs = self.fs

        def done():
            return fs.info(self.rkey)["action"]["action"] == "NOOP" and hsm_flags(fs, self.rkey) == 0x9

        try:
            wait_for(done, RESUME_WAIT, 0.2, "the interrupted restore to complete")
        except AssertionError as e:
            info = fs.info(self.rkey)
            reqs = [r for r in json.loads(os.getxattr(fs.ctl, "lustrefuse.hsm_list"))
                    if r["ino"] == info["ino"]]
            raise AssertionError(
                f"{e}: after killing {self.victim} mid-restore, {self.rkey} is "
                f"'{hsm_state(fs, self.rkey)}', action {info['action']}, {info['present']}/"
                f"{info['chunks']} stripes local; its requests: {reqs}") from None

    def restore_bytes(self):
        fs = self.fs
        if hsm_flags(fs, self.rkey) != 0x9:  # not resumed: ask again, then judge the bytes
            self.notes.append("restore re-issued by the test")
            lfs_out("hsm_restore", fs.path(self.rkey))
            wait_for(lambda: hsm_flags(fs, self.rkey) == 0x9, RECOVER_WAIT, 0.2,
                     "the re-issued restore to complete")
        body = fs.s3.get_object(Bucket=fs.bucket, Key=self.rkey)["Body"].read()
        assert body == RESTORE_OBJECTS[self.rkey]
        assert_same_bytes(fs.path(self.rkey), body, "restored file")

    def archive(self):
        fs = self.fs
        wait_for(lambda: fs.info(self.akey)["action"]["action"] == "NOOP", RECOVER_WAIT, 0.2,
                 "the interrupted archive to end")
        flags = hsm_flags(fs, self.akey)
        self.notes.append(f"archive file after recovery: {hsm_state(fs, self.akey)}")
        if flags & 0x8 and not flags & 0x2:  # archived and clean: S3 must hold the bytes
            body = fs.s3.get_object(Bucket=fs.bucket, Key=self.akey)["Body"].read()
            assert body == self.adata, "the file is marked archived but S3 holds other bytes"
        else:
            assert flags & 0x2 or not flags & 0x8, f"state {flags:#x}: not archived, not dirty"
            lfs_out("hsm_archive", fs.path(self.akey))
            wait_for(lambda: fs.info(self.akey)["action"]["action"] == "NOOP", RECOVER_WAIT, 0.2,
                     "the second archive to end")
            assert hsm_flags(fs, self.akey) == 0x9, hsm_state(fs, self.akey)
            body = fs.s3.get_object(Bucket=fs.bucket, Key=self.akey)["Body"].read()
            assert body == self.adata
        assert_same_bytes(fs.path(self.akey), self.adata, "archived file")

    def writes(self):
        out = lines(self.wout)
        acked = [int(ln[1]) for ln in out if ln[0] == "ACK"]
        assert acked == list(range(len(acked))), out[:5]
        self.notes.append(f"writer: {len(acked)} records acknowledged; last lines {out[-2:]}")
        expected = b"".join(record_bytes(i) for i in range(len(acked)))
        got = read_digests(self.fs.path(self.wrel))
        assert "error" not in got, f"reading the written file failed: {got}"
        assert got["size"] >= len(expected), (
            f"{len(acked)} records ({len(expected)} bytes) were fsync'd, the file has "
            f"{got['size']} bytes")
        want = mib_digests(expected)
        full = len(expected) // MiB
        bad = [i for i in range(full) if got["mib"][i] != want[i]]
        if len(expected) % MiB:  # the last, partial MiB: compare the acknowledged prefix
            with open(self.fs.path(self.wrel), "rb") as f:
                f.seek(full * MiB)
                tail = f.read(len(expected) - full * MiB)
            if tail != expected[full * MiB:]:
                bad.append(full)
        assert not bad, f"fsync'd records differ in MiB blocks {bad} of the file"

    def renames(self):
        fs = self.fs
        out = lines(self.sout)
        last, trying = {}, {}
        for ln in out:
            if ln[0] == "OK":
                last[int(ln[1])] = ln[2]
                trying.pop(int(ln[1]), None)
            elif ln[0] == "TRY":
                trying[int(ln[1])] = ln[2]
        self.notes.append(f"storm: {sum(1 for ln in out if ln[0] == 'OK')} renames acknowledged, "
                          f"in flight {trying}, last line {out[-1:]}")
        root = fs.path(self.sroot)
        found: dict[int, list[str]] = {}
        paths = []
        for d, _dirs, files in os.walk(root):
            for name in files:
                paths.append(os.path.join(d, name))
        r = py(DIGEST, *paths, timeout=90)
        assert r.returncode == 0, r.stderr
        digests = json.loads(r.stdout)
        for p in paths:
            rel = os.path.relpath(p, root)
            with open(p, "rb") as f:
                head = f.read(16)
            fid = int(head.split(b"\n", 1)[0][3:])
            found.setdefault(fid, []).append(rel)
            want = self.sdata[fid]
            assert digests[p].get("mib") == mib_digests(want), f"{rel}: content differs"
        assert sorted(found) == list(range(STORM_FILES)), f"files missing: {found}"
        dup = {k: v for k, v in found.items() if len(v) != 1}
        assert not dup, f"files under more than one name: {dup}"
        for fid, (rel,) in found.items():
            ok = {last.get(fid, f"{self.sdirs[fid % 4]}/f{fid}"), trying.get(fid)}
            assert rel in ok, f"file {fid} is at {rel}, acknowledged at {ok}"
            assert os.stat(os.path.join(root, rel)).st_nlink == 1

    def dirty_kept(self):
        fs = self.fs
        st = hsm_state(fs, DIRTY)
        assert st.startswith("(0x0000000b) exists dirty archived"), st
        assert_same_bytes(fs.path(DIRTY), self.lab.dirty_data, "dirty file")

    def pending(self):
        """A file written with 1 MiB fsync'd and 1.5 MiB more not yet flushed when the
        victim died. Its descriptor is closed after recovery (a killed client's dies
        with the mount): a close that succeeded acknowledges everything."""
        fs = self.fs
        stop_proc(self.holder, self.pstop)
        closed = [" ".join(ln) for ln in lines(self.pout) if ln[0] == "CLOSED"]
        size = os.stat(fs.path(PENDING)).st_size
        self.notes.append(f"pending file: {closed}, {size} bytes")
        a, b = self.pdata
        if closed == ["CLOSED ok"]:
            assert size == len(a) + len(b), f"close succeeded, the file has {size} bytes"
            assert_same_bytes(fs.path(PENDING), a + b, "closed file")
        else:
            assert size in (len(a), len(a) + len(b)), size
            assert_same_bytes(fs.path(PENDING), (a + b)[:size], "fsync'd file")

    def fsck(self):
        fs = self.fs
        fs.down()
        assert not fs.mounted()
        r = helpers.lustrefuse("fsck", fs.data_dir, timeout=120)
        # The writer's last record may or may not have reached a new chunk when the
        # victim died: its leftovers beyond EOF are judged on PENDING, deterministically.
        problems = [ln for ln in r.stdout.splitlines()
                    if ln.strip() and not ln.startswith("fsck:") and f"/{self.wrel})" not in ln]
        self.notes.append(f"fsck rc {r.returncode}: {r.stdout.strip()}")
        summary = [ln for ln in r.stdout.splitlines() if ln.startswith("fsck:")]
        assert summary, f"fsck printed no summary (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
        assert r.returncode in (0, 1) and not problems, (
            f"fsck after recovery and down (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")

    def pending_extend(self):
        """Bytes of writes that never became part of the file (neither fsync'd nor
        closed before the crash) must not come back when the file is extended."""
        fs = self.fs
        self.lab.ensure_up()
        path = fs.path(PENDING)
        try:
            size = os.stat(path).st_size
            os.truncate(path, size + 2 * MiB)
            got = helpers.pread_uncached(path, size, 2 * MiB)
        finally:  # the next cycle starts without this cycle's leftovers
            for rel in (PENDING, self.wrel):
                with contextlib.suppress(OSError):
                    os.unlink(fs.path(rel))
        stale = [i for i in range(0, len(got), 4096) if any(got[i:i + 4096])]
        assert len(got) == 2 * MiB and not stale, (
            f"{PENDING} was {size} bytes after recovery; extended by truncate to "
            f"{size + 2 * MiB}, the new range should read as zeros but {len(stale)} of its 4 KiB "
            f"pages hold data (first at file offset {size + stale[0] if stale else None}); "
            f"they hold the unacknowledged write: {got[stale[0]:stale[0] + 64] in self.pdata[1]}")

    def run(self):
        t = time.monotonic()
        self.lab.ensure_up()
        try:
            self.start()
            self.kill()
            self.recover()
        except Exception:
            msg = ("crash cycle failed before the checks:\n" + traceback.format_exc()
                   + "\n".join(self.notes) + "\n" + self.fs.log_tails(30))
            self.failures = dict.fromkeys(self.PARTS, msg)
            for p, stop in self.procs:
                stop_proc(p, stop)
            if self.holder is not None:
                stop_proc(self.holder, self.pstop)
            with contextlib.suppress(Exception):
                self.fs.cleanup()
            return self
        self.notes.append(self.lab.drain())
        for part in self.PARTS:
            self.check(part, getattr(self, part))
        self.notes.append(f"cycle took {time.monotonic() - t:.1f}s")
        return self


def record_bytes(i: int) -> bytes:
    """Record ``i`` as the writer subprocess writes it."""
    return random.Random(i).randbytes(REC)


class Lab:
    def __init__(self, fs, proxy, work: Path):
        self.fs = fs
        self.proxy = proxy
        self.work = work
        self.cycles: dict[str, Cycle] = {}
        self.dirty_data = b""

    def ensure_up(self):
        if self.fs.mounted():
            return
        self.fs.cleanup()
        self.fs.up_again()

    def drain(self) -> str:
        """Let failing calls flush connections to a dead process out of the mount's pools
        (see ``test_first_operations_after_restart_succeed``), so that the checks after
        it judge their own promise."""
        def one(_):
            try:
                os.getxattr(self.fs.ctl, "lustrefuse.stats")
                self.fs.info(DIRTY)
                return 0
            except OSError:
                return 1

        failed = []
        for _round in range(10):
            with ThreadPoolExecutor(16) as pool:
                failed.append(sum(pool.map(one, range(48))))
            if not failed[-1]:
                break
        return f"drain: calls failed per round of 48: {failed}"

    def cycle(self, victim: str) -> Cycle:
        if victim not in self.cycles:
            self.cycles[victim] = Cycle(self, victim).run()
        return self.cycles[victim]


@pytest.fixture(scope="module")
def proxy(s3_server):
    with FaultProxy(s3_server) as p:
        yield p


@pytest.fixture(scope="module")
def lab(proxy, make_module_fs, s3, tmp_path_factory):
    from conftest import new_bucket

    fs = make_module_fs(new_bucket(s3), objects=RESTORE_OBJECTS, osts=2, up=False,
                        extra_args=("--imported-file-chunk-size", "1M"))
    fs.endpoint = proxy.url  # every S3 request of the MDS and OSTs goes through the proxy
    fs.up()
    lab = Lab(fs, proxy, tmp_path_factory.mktemp("crash"))
    # a dirty file: archived, then changed
    os.makedirs(fs.path("witness"))
    lfs_out("setstripe", "-c", "-1", fs.path(DIRTY))
    data = bytearray(helpers.data(3 * MiB + 777, "dirty"))
    with open(fs.path(DIRTY), "wb") as f:
        f.write(data)
    lfs_out("hsm_archive", fs.path(DIRTY))
    wait_for(lambda: hsm_flags(fs, DIRTY) == 0x9 and fs.info(DIRTY)["action"]["action"] == "NOOP",
             30, 0.1, "the witness to be archived")
    patch = helpers.data(300_000, "patch")
    with open(fs.path(DIRTY), "r+b") as f:
        f.seek(MiB - 1000)
        f.write(patch)
    data[MiB - 1000:MiB - 1000 + len(patch)] = patch
    lab.dirty_data = bytes(data)
    assert hsm_state(fs, DIRTY).startswith("(0x0000000b) exists dirty archived")
    yield lab
    proxy.clear()


def expect(lab: Lab, victim: str, part: str):
    c = lab.cycle(victim)
    msg = c.failures.get(part)
    if msg:
        pytest.fail(f"[{victim} killed] {part}:\n{msg}", pytrace=False)


# -- a second MDS is refused ----------------------------------------------------------

def test_second_mds_on_a_data_dir_in_use_is_refused(lab, tmp_path):
    fs = lab.fs
    lab.ensure_up()
    mds_pid = fs.pids()["mds"]
    r = helpers.lustrefuse("mds", "--data-dir", fs.data_dir, timeout=30)
    assert r.returncode != 0
    assert "another MDS is already running" in r.stderr, r.stderr
    other = tmp_path / "mnt2"
    other.mkdir()
    r = helpers.lustrefuse("up", fs.source, other, "--endpoint-url", fs.endpoint, "--data-dir",
                           fs.data_dir, timeout=60)
    assert r.returncode != 0
    assert "in use by lustrefuse" in r.stderr, r.stderr
    assert not helpers.is_mounted(other)
    # the running filesystem did not notice
    assert fs.pids()["mds"] == mds_pid and pid_alive(mds_pid)
    assert "r" in os.listdir(fs.path())
    assert fs.stats()["mds"]["inodes"] > 0


# -- the first operations after a restart ------------------------------------------------

@pytest.mark.parametrize("victim", ["mds", "ost1"])
def test_first_operations_after_restart_succeed(lab, victim):
    """A busy client (many requests at once) keeps pooled connections to the MDS and
    each OST. SIGKILL one, ``up`` restarts it: once it answers on its socket again, the
    operations through the mount must just work."""
    fs = lab.fs
    lab.ensure_up()

    def busy(_):
        os.getxattr(fs.ctl, "lustrefuse.stats")  # the MDS and every OST
        fs.info(DIRTY)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(busy, range(96)))
    old = fs.pids()[victim]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), 10, 0.05, f"{victim} to die")
    fs.up_again()
    sock = f"unix:{fs.data_dir / ('mds.sock' if victim == 'mds' else victim + '/ost.sock')}"
    wait_for(lambda: fs.pids().get(victim) not in (None, old) and ping(sock), RECOVER_WAIT, 0.1,
             f"{victim} to be restarted")
    r = py(PROBE, fs.path(), DIRTY, timeout=60)
    lab.drain()  # whatever happened, the next tests start with working pools
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    failed = [x for x in res if x[1] != "ok"]
    assert not failed, (f"after {victim} was restarted (and answers on its socket), "
                        f"{len(failed)} of the first {len(res)} operations through the mount "
                        f"failed: {res}")


# -- the crash cycles, reported part by part -----------------------------------------------

@pytest.mark.parametrize("victim", VICTIMS)
def test_restore_resumes_after_kill(lab, victim):
    expect(lab, victim, "restore_resumes")


@pytest.mark.parametrize("victim", VICTIMS)
def test_restored_bytes_match_s3_after_kill(lab, victim):
    expect(lab, victim, "restore_bytes")


@pytest.mark.parametrize("victim", VICTIMS)
def test_archive_interrupted_by_kill(lab, victim):
    expect(lab, victim, "archive")


@pytest.mark.parametrize("victim", VICTIMS)
def test_fsynced_records_survive_kill(lab, victim):
    expect(lab, victim, "writes")


@pytest.mark.parametrize("victim", VICTIMS)
def test_rename_storm_namespace_consistent_after_kill(lab, victim):
    expect(lab, victim, "renames")


@pytest.mark.parametrize("victim", VICTIMS)
def test_dirty_file_still_dirty_after_kill(lab, victim):
    expect(lab, victim, "dirty_kept")


@pytest.mark.parametrize("victim", VICTIMS)
def test_unacknowledged_file_after_kill(lab, victim):
    expect(lab, victim, "pending")


@pytest.mark.parametrize("victim", VICTIMS)
def test_fsck_clean_after_recovery(lab, victim):
    expect(lab, victim, "fsck")


@pytest.mark.parametrize("victim", VICTIMS)
def test_unacknowledged_bytes_do_not_reappear_on_extend(lab, victim):
    expect(lab, victim, "pending_extend")
