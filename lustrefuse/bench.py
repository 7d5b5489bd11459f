"""``lustrefuse bench``: every figure next to the limit measured in the same run.

The bench builds its own dataset (a large file and many small ones, with a
local copy of every byte), brings a filesystem up over it and prints one
table: for each row our figure, the physical limit measured on the same
machine in the same run (a direct boto3 download of the same object, the same
bytes read from local disk or from the OST object files), and the ratio of
the two speeds (1.0 = at the limit). Every byte read is checked against the
xxh3-128 digest taken when it was generated; a mismatch makes the exit code
non-zero (speed never does).

By default it starts its own S3 endpoint (moto's server, see ``demo.py``);
``--endpoint-url`` and ``--bucket`` point it at a real one instead (the
dataset then goes under a fresh prefix that is deleted afterwards).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import errno
import json
import mmap
import os
import random
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import xxhash

from . import demo
from .demo import (
    RELEASED,
    RESIDENT,
    SEGMENT,
    DataMismatch,
    DemoError,
    FileSpec,
    GiB,
    KiB,
    MiB,
    fmt_size,
    info,
    read_range,
    say,
)
from .layout import GET_SPAN
from .s3 import read_body_into

BUCKET = "lustrefuse-bench"
DEFAULT_DIR = "/tmp/lustrefuse-bench"
ARCHIVED, DIRTY = 0x8, 0x2
NA_ERRNOS = (errno.EROFS, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


@dataclass
class Config:
    large: int = 1024 * MiB  # a 1 GiB file: first byte and cold read as a training job sees them
    small_files: int = 2000
    release_files: int = 10_000  # files of the hsm_release row
    small_size: int = 128 * KiB
    readers: int = 8
    rand_seconds: float = 2.0
    write_size: int = 128 * MiB
    osts: int = 2
    stripe_size: str = "1M"
    imported_chunk: str = "64M"
    range_threads: int = 16
    range_size: int = GET_SPAN  # the limit's GETs are as large as our largest
    first_samples: int = 5  # 4 KiB GETs per repeat for the baseline median
    second_up: bool = True  # a second filesystem for the listing-only import
    walk_files: int = 100_000  # empty objects of the big walk (0: skip it)
    walk_dir_files: int = 1000  # files per directory of the big walk's tree


# the parts of the table, in the order they run (--only picks some)
SECTIONS = ("walk", "import", "large", "small", "write")

SMALL = dict(large=32 * MiB, small_files=200, release_files=1000, small_size=64 * KiB,
             rand_seconds=0.5,
             write_size=16 * MiB, first_samples=3, second_up=False, walk_files=5000)


# -- rows ------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    unit: str  # "MB/s", "IOPS", "files/s", "objects/s" (higher is better) or "ms", "s"
    limit_what: str = ""
    ours: list = field(default_factory=list)
    limit: list = field(default_factory=list)
    na: str = ""  # why it could not be measured
    note: str = ""

    @property
    def lower_is_better(self) -> bool:
        return self.unit in ("ms", "s")

    @staticmethod
    def med(xs):
        return statistics.median(xs) if xs else None

    @property
    def ratio(self) -> float | None:
        o, lim = self.med(self.ours), self.med(self.limit)
        if o is None or lim is None or not o or not lim:
            return None
        return lim / o if self.lower_is_better else o / lim

    def as_dict(self) -> dict:
        return {"row": self.name, "unit": self.unit, "ours": self.med(self.ours),
                "limit": self.med(self.limit), "limit_is": self.limit_what,
                "ratio": self.ratio, "samples": {"ours": self.ours, "limit": self.limit},
                "na": self.na or None, "note": self.note or None}


def fmt_num(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "ms":
        return f"{x:,.1f} ms" if x < 100 else f"{x:,.0f} ms"
    if unit == "s":
        return f"{x:,.2f} s" if x < 100 else f"{x:,.0f} s"
    return f"{x:,.0f} {unit}" if x >= 10 else f"{x:,.1f} {unit}"


def render(rows: list[Row]) -> str:
    head = ("row", "ours", "limit", "ratio", "limit measured as")
    body = []
    for r in rows:
        if r.na:
            body.append((r.name, "n/a", "", "", r.na))
            continue
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        what = r.limit_what + (f" [{r.note}]" if r.note else "")
        body.append((r.name, fmt_num(r.med(r.ours), r.unit), fmt_num(r.med(r.limit), r.unit)
                     if r.limit else "-", ratio, what))
    w = [max(len(x[i]) for x in [head, *body]) for i in range(4)]
    out = [f"{head[0]:<{w[0]}}  {head[1]:>{w[1]}}  {head[2]:>{w[2]}}  {head[3]:>{w[3]}}  {head[4]}",
           "  ".join("-" * n for n in w) + "  " + "-" * 20]
    for b in body:
        out.append(f"{b[0]:<{w[0]}}  {b[1]:>{w[1]}}  {b[2]:>{w[2]}}  {b[3]:>{w[3]}}  {b[4]}")
    return "\n".join(out)


def markdown(rows: list[Row]) -> str:
    out = ["| row | ours | limit | ratio | limit measured as |", "|---|--:|--:|--:|---|"]
    for r in rows:
        if r.na:
            out.append(f"| {r.name} | n/a | | | {r.na} |")
            continue
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        what = r.limit_what + (f" ({r.note})" if r.note else "")
        lim = fmt_num(r.med(r.limit), r.unit) if r.limit else "-"
        out.append(f"| {r.name} | {fmt_num(r.med(r.ours), r.unit)} | {lim} | {ratio} | {what} |")
    return "\n".join(out)


# -- cache control ------------------------------------------------------------------

class Caches:
    """Page-cache control: the global drop where allowed (root) and wanted, else
    posix_fadvise(DONTNEED) on exactly the files involved (after a sync, since
    dirty pages cannot be dropped)."""

    def __init__(self, use_global: bool):
        self.use_global = use_global and os.access("/proc/sys/vm/drop_caches", os.W_OK)
        self.global_drops = 0

    @property
    def how(self) -> str:
        return ("echo 3 > /proc/sys/vm/drop_caches" if self.use_global
                else "posix_fadvise(DONTNEED) on the files involved")

    def _global(self) -> bool:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:  # a container's read-only /proc/sys: drop per file from now on
            self.use_global = False
            return False
        self.global_drops += 1
        return True

    def drop(self, paths=()) -> None:
        os.sync()
        if self.use_global and self._global():
            return
        for p in paths:
            try:
                demo.drop_file_cache(p)
            except OSError:
                pass

    def drop_data(self, paths=()) -> None:
        """The files' pages and the kernel's dentries and inodes (``echo 2``), but not
        the page cache as a whole: programs' code stays in memory, the endpoint's and
        the daemons' alike, so a first-byte latency measures data, not page faults."""
        os.sync()
        for p in paths:
            try:
                demo.drop_file_cache(p)
            except OSError:
                pass
        if self.use_global:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("2\n")
            except OSError:
                pass

    def drop_dentries(self) -> bool:
        if not self.use_global:
            return False
        os.sync()
        return self._global()


# -- the bench ------------------------------------------------------------------------

class Bench:
    def __init__(self, cfg: Config, args):
        self.cfg = cfg
        self.args = args
        self.dir = os.path.abspath(args.dir)
        self.repeat = args.repeat
        self.rows: list[Row] = []
        self.mismatches: list[str] = []
        self.errors: list[str] = []
        self.caches = Caches(not args.no_drop_caches)
        self.local = args.endpoint_url is None
        self.endpoint: demo.Endpoint | None = None
        self.mounted: list[tuple[str, str]] = []  # (mountpoint, data_dir)
        self.rss: dict = {}
        self.t_start = time.perf_counter()
        self.load0 = os.getloadavg()[0]

    # -- plumbing
    def log(self, msg: str):
        if not self.args.quiet:
            say(f"[{time.perf_counter() - self.t_start:6.1f}s] {msg}", err=True)

    def row(self, name, unit, limit_what="", note="") -> Row:
        r = Row(name, unit, limit_what, note=note)
        self.rows.append(r)
        return r

    def check(self, what: str, got: tuple, want: tuple):
        if got != want:
            self.mismatches.append(what)
            say(f"lustrefuse bench: DATA MISMATCH: {what}: got {got}, want {want}", err=True)

    def attempt(self, row: Row, fn, *a):
        """Run one measurement; record n/a (and an error unless it is a known gap)."""
        self.log(f"{row.name} ...")
        try:
            fn(row, *a)
        except DataMismatch:
            raise
        except OSError as e:
            row.na = f"{os.strerror(e.errno) if e.errno else e} ({type(e).__name__})"
            if e.errno not in NA_ERRNOS:
                self.errors.append(f"{row.name}: {e}")
            self.log(f"{row.name}: n/a: {e}")
        except Exception as e:
            row.na = f"failed: {e}"[:200]
            self.errors.append(f"{row.name}: {e}")
            self.log(f"{row.name}: failed: {e!r}")

    def path(self, f: FileSpec) -> str:
        return os.path.join(self.mnt, f.path)

    def lpath(self, f: FileSpec) -> str:
        return os.path.join(self.localdir, f.path)

    def object_path(self, ost: int, ino: int) -> str:
        """Where OST ``ost`` of the main filesystem keeps its object of inode ``ino``."""
        return os.path.join(self.data, f"ost{ost}", "objects", f"{ino & 0xFF:02x}", f"{ino:x}")

    def objects(self, p: str) -> list[str]:
        """The OST object files holding a file of the main filesystem."""
        inf = info(p)
        osts = sorted(set(inf["layout"]["osts"])) if inf.get("layout") else []
        return [self.object_path(i, inf["ino"]) for i in osts]

    def release(self, paths: list[str]):
        inos = [os.stat(p).st_ino for p in paths]
        for attempt in range(20):
            try:
                demo.hsm_request(self.mnt, "release", inos)
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 19:
                    raise
                time.sleep(0.2)
        left = demo.wait_hsm(paths, RELEASED, 60)
        if left:
            raise DemoError(f"{len(left)} files not released, e.g. {left[0]}")

    def make_cold(self, paths: list[str], code_cached: bool = False):
        """Released with nothing local. A partly hydrated file still reads as released
        and `hsm_release` leaves its chunks alone, so restore it whole first.
        ``code_cached``: drop only data and dentries (see Caches.drop_data)."""
        if len(paths) <= 8:  # a large file may still be prefetching; small ones never are
            for p in paths:
                self.settle(p)
        infos = {p: info(p) for p in paths}
        full = [p for p, i in infos.items() if i["present_bytes"] and i["hsm"]["flags"] & 0x4]
        if full:
            demo.hsm_request(self.mnt, "restore", [os.stat(p).st_ino for p in full])
            left = demo.wait_hsm(full, RESIDENT, 600)
            if left:
                raise DemoError(f"{len(left)} files not restored, e.g. {left[0]}")
        self.release(paths)
        warm = [p for p in paths if info(p)["present_bytes"]]
        if warm:
            raise DemoError(f"{len(warm)} files still have local data after release, e.g. "
                            f"{warm[0]}: a cold measurement would not be cold")
        if code_cached:
            self.caches.drop_data(paths)
        else:
            self.caches.drop(paths)

    def settle(self, p: str, timeout: float = 120):
        """Wait until background hydration (prefetch) of ``p`` has stopped."""
        last, same = None, 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            inf = info(p)
            cur = (inf.get("present_bytes"), inf["action"]["action"])
            same = same + 1 if cur == last else 0
            if same >= 3 and cur[1] == "NOOP":
                return
            last = cur
            time.sleep(0.15)

    # -- phases
    def run(self) -> int:
        os.makedirs(self.dir, exist_ok=True)
        self.work = os.path.join(self.dir, f"run-{os.getpid()}")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.localdir = os.path.join(self.work, "local")
        self.mnt = os.path.join(self.work, "mnt")
        self.data = os.path.join(self.work, "data")
        self.failed = False
        try:
            self.setup_s3()
            self.make_data()
            only = set(self.args.only or SECTIONS)
            if "import" in only:
                self.bench_import_baselines()
            self.bring_up()
            for section in SECTIONS:
                if section in only:
                    getattr(self, f"bench_{section}")()
            self.rss = demo.peak_rss(self.data)
        except BaseException:
            self.failed = True
            raise
        finally:
            self.teardown()
        return self.report()

    def setup_s3(self):
        a = self.args
        if self.local:
            self.endpoint = demo.Endpoint.start(os.path.join(self.work, "s3.log"))
            self.url = self.endpoint.url
            self.bucket = BUCKET
            self.key_prefix = ""
            self.log(f"S3 endpoint: moto on {self.url} (pid {self.endpoint.pid})")
        else:
            self.url = a.endpoint_url
            self.bucket = a.bucket
            self.key_prefix = (a.prefix or f"lustrefuse-bench/{time.strftime('%Y%m%dT%H%M%S')}-"
                               f"{os.getpid()}").strip("/") + "/"
            self.log(f"S3 endpoint: {self.url}, s3://{self.bucket}/{self.key_prefix}")
        self.s3 = demo.s3_client(self.url, local=self.local)

    def make_data(self):
        c = self.cfg
        t0 = time.perf_counter()
        self.ds = demo.make_dataset(
            self.s3, self.bucket, [c.large], c.small_files, c.small_size, c.small_size,
            key_prefix=self.key_prefix, local_dir=self.localdir, create_bucket=self.local,
            progress=self.log, single_put_max=4 << 30 if self.local else 64 * MiB)
        self.big = self.ds.large[0]
        self.log(f"dataset: {fmt_size(c.large)} + {c.small_files} x {fmt_size(c.small_size)} "
                 f"uploaded in {time.perf_counter() - t0:.1f}s")

    def source(self) -> str:
        return f"s3://{self.bucket}/{self.key_prefix}".rstrip("/")

    def up_args(self) -> list[str]:
        c = self.cfg
        return ["--osts", str(c.osts), "--stripe-size", c.stripe_size,
                "--imported-file-chunk-size", c.imported_chunk]

    def up(self, mnt: str, data: str, extra: list[str] = ()) -> tuple[float, str]:
        self.mounted.append((mnt, data))
        return demo.fs_up(self.source(), mnt, data, self.url, [*self.up_args(), *extra],
                          local=self.local)

    def down(self, mnt: str, data: str):
        demo.fs_down(mnt, data)
        if (mnt, data) in self.mounted:
            self.mounted.remove((mnt, data))

    def teardown(self):
        for mnt, data in list(self.mounted):
            try:
                self.down(mnt, data)
            except Exception as e:
                self.errors.append(f"down {mnt}: {e}")
        if self.endpoint:
            self.endpoint.stop()
        elif not self.local and not self.args.keep and hasattr(self, "s3"):
            self.delete_prefix()
            if getattr(self, "walk_prefix", None):
                self.delete_prefix(self.walk_prefix)
        if self.failed or self.errors or self.mismatches:
            say(f"lustrefuse bench: logs kept in {self.work} (data/log, s3.log)", err=True)
        elif not self.args.keep:
            for mnt, _ in self.mounted:
                if demo.is_mounted(mnt):
                    return  # never delete under a live mount
            shutil.rmtree(self.work, ignore_errors=True)

    def delete_prefix(self, prefix: str | None = None):
        prefix = prefix or self.key_prefix
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix):
                objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objs:
                    self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": objs})
        except Exception as e:
            self.errors.append(f"cleaning s3://{self.bucket}/{prefix}: {e}")

    # -- import
    def n_objects(self) -> int:
        return len(self.ds.files)

    def list_all(self) -> int:
        n = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.key_prefix):
            n += len(page.get("Contents", []))
        return n

    def bench_import_baselines(self):
        self.r_import_list = self.row("import, listing only (--no-posix-metadata)", "objects/s",
                                      "ListObjectsV2 alone, 1,000 keys a page")
        self.r_import_head = self.row("import, with POSIX metadata (HEAD per object)",
                                      "objects/s", "LIST + HEAD per object, 32 threads")
        n = self.n_objects()
        self.log("import baselines: LIST, LIST + HEADs")
        for _ in range(self.repeat):
            t0 = time.perf_counter()
            got = self.list_all()
            self.r_import_list.limit.append(got / (time.perf_counter() - t0))
            keys = [self.key_prefix + f.path for f in self.ds.files]
            t0 = time.perf_counter()
            self.list_all()
            with cf.ThreadPoolExecutor(32) as ex:
                list(ex.map(lambda k: self.s3.head_object(Bucket=self.bucket, Key=k), keys))
            self.r_import_head.limit.append(n / (time.perf_counter() - t0))
            if got < n:
                raise DemoError(f"listed {got} objects, uploaded {n}")

    def bring_up(self):
        self.log(f"lustrefuse up {self.source()} ({self.n_objects()} objects)")
        _, err = self.up(self.mnt, self.data)
        secs = demo.import_seconds(self.data, err)
        if secs and hasattr(self, "r_import_head"):
            self.r_import_head.ours.append(self.n_objects() / secs)

    def bench_import(self):
        self.bench_import_listing_only()

    def bench_import_listing_only(self):
        r = self.r_import_list
        if not self.cfg.second_up:
            r.na = "skipped by --small (it takes a second `up`)"
            return
        self.log("a second filesystem over the same objects: up --no-posix-metadata")
        for i in range(self.repeat):
            mnt, data = os.path.join(self.work, f"mnt-list{i}"), os.path.join(self.work, f"data-list{i}")
            _, err = self.up(mnt, data, ["--no-posix-metadata"])
            try:
                secs = demo.import_seconds(data, err)
                if secs:
                    r.ours.append(self.n_objects() / secs)
            finally:
                self.down(mnt, data)
        for i in range(1, self.repeat):  # more samples of the import with HEADs
            mnt, data = os.path.join(self.work, f"mnt-head{i}"), os.path.join(self.work, f"data-head{i}")
            _, err = self.up(mnt, data)
            try:
                secs = demo.import_seconds(data, err)
                if secs:
                    self.r_import_head.ours.append(self.n_objects() / secs)
            finally:
                self.down(mnt, data)

    # -- namespace
    @staticmethod
    def walk(root: str) -> int:
        n = 0
        for d, dirs, files in os.walk(root):
            for name in dirs + files:
                os.lstat(os.path.join(d, name))
                n += 1
        return n

    def bench_walk(self):
        cold = self.row("walk + stat of the tree, cold", "s", "")
        warm = self.row("walk + stat of the tree, warm", "s", "same tree on local disk, warm")
        dirs = set()
        for f in self.ds.files:
            parts = f.path.split("/")[:-1]
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        want = self.n_objects() + len(dirs)
        self.log("walk + stat")
        before = self.walk_requests(self.mnt)
        for i in range(self.repeat):
            if i and not self.drop_metadata(self.mnt):
                break  # a cold walk needs the kernel's dentries dropped
            t0 = time.perf_counter()
            n = self.walk(self.mnt)
            cold.ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.walk(self.mnt)
            warm.ours.append(time.perf_counter() - t0)
            if n != want:
                raise DemoError(f"walk of the mount saw {n} entries, want {want}")
        for _ in range(self.repeat):
            if self.caches.drop_dentries():
                t0 = time.perf_counter()
                self.walk(self.localdir)
                cold.limit.append(time.perf_counter() - t0)
                cold.limit_what = "same tree on local disk, dentries dropped"
            t0 = time.perf_counter()
            self.walk(self.localdir)
            warm.limit.append(time.perf_counter() - t0)
        if not cold.limit:
            t0 = time.perf_counter()
            self.walk(self.localdir)
            cold.limit.append(time.perf_counter() - t0)
            cold.limit_what = "same tree on local disk (warm: dentries not droppable here)"
        after = self.walk_requests(self.mnt)
        reqs = f"S3 requests while walking: {after[0] - before[0]}"
        if self.local:
            reqs += f" (endpoint log: {after[1] - before[1]})"
        cold.note = warm.note = f"{want:,} entries; {reqs}"
        if self.cfg.walk_files:
            self.bench_walk_many()

    def drop_metadata(self, mnt: str) -> bool:
        """Cold metadata: the kernel's dentries and inodes, and the names and attributes
        the mount keeps under its leases (as ``lctl set_param ldlm...lru_size=clear``)."""
        if not self.caches.drop_dentries():
            return False
        os.setxattr(os.path.join(mnt, ".lustrefuse_ctl"), "lustrefuse.drop_leases", b"")
        return True

    def walk_requests(self, mnt: str) -> tuple[int, int | None]:
        """S3 requests so far: the filesystem's own counters (MDS + OSTs), and the lines
        of our local endpoint's request log (None with a real endpoint)."""
        st = json.loads(os.getxattr(os.path.join(mnt, ".lustrefuse_ctl"), "lustrefuse.stats"))
        seen = None
        if self.local:
            with open(os.path.join(self.work, "s3.log"), "rb") as f:
                seen = sum(1 for line in f if b'HTTP/1.1" ' in line)
        return st["total"]["s3_requests"], seen

    @staticmethod
    def client_counters(mnt: str) -> dict:
        return json.loads(os.getxattr(os.path.join(mnt, ".lustrefuse_ctl"),
                                      "lustrefuse.stats")).get("client", {})

    def put_walk_tree(self, keys: list[str]) -> float:
        t0 = time.perf_counter()
        if self.local:  # straight into moto's backend: 100,000 PUTs take minutes here
            self.s3.create_bucket(Bucket=self.walk_bucket)
            demo.bulk_put_empty(self.url, self.walk_bucket, keys)
        else:
            with cf.ThreadPoolExecutor(64) as ex:
                list(ex.map(lambda k: self.s3.put_object(Bucket=self.walk_bucket, Key=k,
                                                         Body=b""), keys))
        return time.perf_counter() - t0

    def bench_walk_many(self):
        """The namespace at scale: N empty objects (dirs of walk_dir_files), imported
        listing-only into a second filesystem, walked cold and warm against the same tree
        on local disk, counting the S3 requests made while walking (the target is 0)."""
        c = self.cfg
        n = c.walk_files
        cold = self.row(f"walk + stat of {n:,} imported files, cold", "s", "")
        warm = self.row(f"walk + stat of {n:,} imported files, warm", "s",
                        "same tree on local disk (empty files), warm")
        imp = self.row(f"import, listing only ({n:,} objects)", "objects/s",
                       "ListObjectsV2 alone, 1,000 keys a page (first 10,000 keys)")
        per = max(1, c.walk_dir_files)
        keys = [f"d{i // per:04d}/f{i:06d}" for i in range(n)]
        if self.local:
            self.walk_bucket, self.walk_prefix = BUCKET + "-walk", ""
        else:
            self.walk_bucket, self.walk_prefix = self.bucket, self.key_prefix.rstrip("/") + "-walk/"
            keys = [self.walk_prefix + k for k in keys]
        self.log(f"big walk: {n:,} empty objects")
        secs = self.put_walk_tree(keys)
        self.log(f"big walk: {n:,} objects created in {secs:.1f}s "
                 f"({'moto backend' if self.local else 'PUTs, 64 threads'})")
        local = os.path.join(self.work, "walk-local")
        made = set()
        for k in keys:
            p = os.path.join(local, k[len(self.walk_prefix):])
            d = os.path.dirname(p)
            if d not in made:
                os.makedirs(d, exist_ok=True)
                made.add(d)
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
        want = n + (n + per - 1) // per
        t0 = time.perf_counter()  # the limit of the import: listing alone, 10 pages of it
        listed = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.walk_bucket, Prefix=self.walk_prefix):
            listed += len(page.get("Contents", []))
            if listed >= 10_000:
                break
        imp.limit.append(listed / (time.perf_counter() - t0))
        mnt, data = os.path.join(self.work, "mnt-walk"), os.path.join(self.work, "data-walk")
        source = f"s3://{self.walk_bucket}/{self.walk_prefix}".rstrip("/")
        self.mounted.append((mnt, data))
        self.log(f"big walk: lustrefuse up {source} --no-posix-metadata")
        _, err = demo.fs_up(source, mnt, data, self.url,
                            [*self.up_args(), "--no-posix-metadata"], local=self.local)
        try:
            isecs = demo.import_seconds(data, err)
            if isecs:
                imp.ours.append(n / isecs)
            imp.note = "1 sample; the import of the big walk's tree"
            s3_used = [0, 0]
            for i in range(self.repeat):
                if i and not self.drop_metadata(mnt):
                    break
                before = self.walk_requests(mnt)
                t0 = time.perf_counter()
                got = self.walk(mnt)
                cold.ours.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                self.walk(mnt)
                warm.ours.append(time.perf_counter() - t0)
                after = self.walk_requests(mnt)
                s3_used[0] += after[0] - before[0]
                if after[1] is not None:
                    s3_used[1] += after[1] - before[1]
                if got != want:
                    raise DemoError(f"walk of the big tree saw {got} entries, want {want}")
        finally:
            self.down(mnt, data)
        for _ in range(self.repeat):
            if self.caches.drop_dentries():
                t0 = time.perf_counter()
                self.walk(local)
                cold.limit.append(time.perf_counter() - t0)
                cold.limit_what = "same tree on local disk (empty files), dentries dropped"
            t0 = time.perf_counter()
            self.walk(local)
            warm.limit.append(time.perf_counter() - t0)
        if not cold.limit:
            cold.limit_what = "same tree on local disk (warm: dentries not droppable here)"
            cold.limit.append(warm.limit[-1])
        shutil.rmtree(local, ignore_errors=True)
        reqs = f"S3 requests while walking: {s3_used[0]}"
        if self.local:
            reqs += f" (endpoint log: {s3_used[1]})"
        cold.note = warm.note = f"{want:,} entries, dirs of {per:,}; {reqs}"

    # -- the large file
    def bench_large(self):
        big = self.path(self.big)
        c = self.cfg
        rows = {
            "first": self.row("first 4 KiB of a cold released large file", "ms",
                              "one 4 KiB ranged GET (boto3)",
                              note="path lookup, open and read; nothing local, the file's "
                              "pages and dentries dropped, programs' code kept in memory"),
            "cold": self.row("cold lazy sequential read (large file)", "MB/s",
                             f"boto3 parallel ranged GETs, {c.range_threads} x "
                             f"{fmt_size(c.range_size)}"),
            "hyd": self.row("sequential read, hydrated, page cache dropped", "MB/s",
                            "same bytes read from the OST object files"),
            "warm": self.row("sequential re-read, page cache warm", "MB/s",
                             "page-cache read of a local file"),
            "r1": self.row("random 4 KiB reads, hydrated, 1 thread", "IOPS",
                           "same on a local file (page cache dropped)"),
            "r8": self.row(f"random 4 KiB reads, hydrated, {c.readers} threads", "IOPS",
                           "same on a local file (page cache dropped)"),
            "restore": self.row("hsm_restore of the large file", "MB/s",
                                f"boto3 parallel ranged GETs, {c.range_threads} x "
                                f"{fmt_size(c.range_size)}"),
        }
        self.attempt(rows["first"], self.m_first_4k, big)
        self.attempt(rows["cold"], self.m_cold_seq, big)
        self.attempt(rows["hyd"], self.m_hydrated_seq, big)
        self.attempt(rows["warm"], self.m_warm, big)
        self.attempt(rows["r1"], self.m_random, big, 1)
        self.attempt(rows["r8"], self.m_random, big, c.readers)
        rows["restore"].limit = list(rows["cold"].limit)
        self.attempt(rows["restore"], self.m_restore_large, big)

    def m_first_4k(self, row: Row, big: str):
        key = self.key_prefix + self.big.path
        for _ in range(self.repeat):
            self.make_cold([big], code_cached=True)
            t0 = time.perf_counter()
            fd = os.open(big, os.O_RDONLY)
            try:
                data = os.pread(fd, 4096, 0)
            finally:
                os.close(fd)
            row.ours.append((time.perf_counter() - t0) * 1000)
            self.settle(big)
            for _ in range(self.cfg.first_samples):
                t0 = time.perf_counter()
                ref = self.s3.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-4095")["Body"].read()
                row.limit.append((time.perf_counter() - t0) * 1000)
            self.check("first 4 KiB of the large file", (len(data), xxhash.xxh3_64_hexdigest(data)),
                       (len(ref), xxhash.xxh3_64_hexdigest(ref)))

    def direct_download(self, key: str, size: int, threads: int, rng: int,
                        cpu: dict | None = None) -> tuple[float, list]:
        """Parallel ranged GETs of a whole object into memory; (seconds, segment digests).
        ``cpu``: filled with the CPU seconds of ``self.cpu_pids()``'s endpoint and this
        process during the download (not the hashing after it)."""
        buf = bytearray(size)
        mv = memoryview(buf)

        def get(off):
            n = min(rng, size - off)
            body = self.s3.get_object(Bucket=self.bucket, Key=key,
                                      Range=f"bytes={off}-{off + n - 1}")["Body"].read()
            mv[off:off + len(body)] = body
            return len(body)

        pids = {k: v for k, v in self.cpu_pids().items() if k in ("S3 endpoint", "reader")}
        with demo.cpu_used(pids) as used:
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(threads) as ex:
                got = sum(ex.map(get, range(0, size, rng)))
            dt = time.perf_counter() - t0
        if cpu is not None:
            cpu.update(used)
        if got != size:
            raise DataMismatch(f"direct download of {key}: {got} bytes, want {size}")
        segs = [xxhash.xxh3_128_hexdigest(mv[o:o + SEGMENT]) for o in range(0, size, SEGMENT)]
        return dt, segs

    def download_to_disk(self) -> float:
        """MB/s of downloading the large file with parallel ranged GETs, each thread
        writing its range to a file on the OSTs' disk before its next GET (``O_DIRECT``
        from a reused page-aligned buffer, as the OSTs write; ``fsync`` at the end): the
        plain way to store what a hydration must store, a reference beside the download
        into memory, not a bound (our OSTs overlap GETs and writes). Checked by reading
        the file back afterwards (not timed)."""
        c = self.cfg
        key, size = self.key_prefix + self.big.path, self.big.size
        threads, rng = c.range_threads, c.range_size
        path = os.path.join(self.work, "download-to-disk.bin")
        direct = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o600)
        plain = os.open(path, os.O_WRONLY)  # an unaligned tail cannot go O_DIRECT
        local = threading.local()

        def get(off):
            n = min(rng, size - off)
            if not hasattr(local, "buf"):
                local.buf = mmap.mmap(-1, rng)
            body = self.s3.get_object(Bucket=self.bucket, Key=key,
                                      Range=f"bytes={off}-{off + n - 1}")["Body"]
            view = memoryview(local.buf)[:n]
            read_body_into(body, view, key)  # exactly n bytes, or an error
            aligned = n - n % 4096
            if aligned:
                os.pwrite(direct, view[:aligned], off)
            if aligned < n:
                os.pwrite(plain, view[aligned:], off + aligned)

        try:
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(threads) as ex:
                list(ex.map(get, range(0, size, rng)))
            os.fsync(direct)
            dt = time.perf_counter() - t0
            with open(path, "rb") as f:
                segs = [xxhash.xxh3_128_hexdigest(f.read(SEGMENT)) for _ in range(0, size, SEGMENT)]
            self.check("download written to disk", segs, self.big.segments)
        finally:
            os.close(direct)
            os.close(plain)
            os.unlink(path)
        return size / dt / 1e6

    def cpu_pids(self) -> dict[str, int]:
        """The processes whose CPU time a row accounts for: ours, the local S3 endpoint,
        and this one (the reader, and the limit's boto3 client)."""
        pids = dict(demo.up_state(self.data).get("pids", {}))
        if self.endpoint and self.endpoint.pid:
            pids["S3 endpoint"] = self.endpoint.pid
        pids["reader"] = os.getpid()
        return pids

    def cpu_note(self, ours: list[dict], limit: list[dict], nbytes: int, limit_who: str) -> str:
        """CPU seconds per GiB by process, medians of the samples: where a gap comes from
        when the machine's cores, not the disk or the network, are what runs out."""
        gib = nbytes / GiB

        def per_gib(samples: list[dict]) -> dict[str, float]:
            names = sorted({k for smp in samples for k in smp})
            return {k: statistics.median(smp.get(k, 0.0) for smp in samples) / gib for k in names}

        def fold(d: dict[str, float]) -> dict[str, float]:  # the OSTs as one figure
            out: dict[str, float] = {}
            for k, v in d.items():
                key = "OSTs" if k.startswith("ost") else k
                out[key] = out.get(key, 0.0) + v
            return out

        o = fold(per_gib(ours))
        lim = {limit_who if k == "reader" else k: v for k, v in per_gib(limit).items()}

        def show(d: dict[str, float]) -> str:  # the largest first
            return ", ".join(f"{k} {v:.2f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])
                             if v >= 0.01)

        return (f"CPU s per GiB on {os.cpu_count()} cores: ours {sum(o.values()):.2f} "
                f"({show(o)}), limit {sum(lim.values()):.2f} ({show(lim)})")

    def m_cold_seq(self, row: Row, big: str):
        c = self.cfg
        key = self.key_prefix + self.big.path
        pids = self.cpu_pids()
        self.cpu_ours, self.cpu_limit, self.to_disk = [], [], []
        for _ in range(self.repeat):
            self.make_cold([big])
            with demo.cpu_used(pids) as cpu:
                r = demo.read_file_checked(self.mnt, self.big)
            self.check("cold read of the large file", (r.bytes, not r.mismatches), (self.big.size, True))
            row.ours.append(r.mbps)
            self.cpu_ours.append(cpu)
            cpu = {}
            dt, segs = self.direct_download(key, self.big.size, c.range_threads, c.range_size, cpu)
            self.check("direct download of the large file", segs, self.big.segments)
            row.limit.append(self.big.size / dt / 1e6)
            self.cpu_limit.append(cpu)
            self.to_disk.append(self.download_to_disk())
        half = c.range_size // 2
        dt, segs = self.direct_download(key, self.big.size, c.range_threads, half)
        self.check("direct download (smaller ranges)", segs, self.big.segments)
        disk = statistics.median(self.to_disk)
        row.note = (f"{c.range_threads} x {fmt_size(half)} GETs: "
                    f"{self.big.size / dt / 1e6:,.0f} MB/s; each written to local disk "
                    f"(a hydration stores them): {disk:,.0f} MB/s, ours "
                    f"{statistics.median(row.ours) / disk:.2f} of that; "
                    + self.cpu_note(self.cpu_ours, self.cpu_limit, self.big.size, "boto3"))

    def read_objects_in_order(self, big: str) -> tuple[float, int, str]:
        """Read the large file's bytes straight from its OST objects, in file order."""
        inf = info(big)
        lay = inf["layout"]
        ss, osts = lay["stripe_size"], lay["osts"]
        ino, size = inf["ino"], inf["size"]
        fds = {o: os.open(self.object_path(o, ino), os.O_RDONLY) for o in set(osts)}
        h = xxhash.xxh3_128()
        n = 0
        t0 = time.perf_counter()
        try:
            for s in range((size + ss - 1) // ss):
                want = min(ss, size - s * ss)
                data = os.pread(fds[osts[s % len(osts)]], want, (s // len(osts)) * ss)
                h.update(data)
                n += len(data)
        finally:
            for fd in fds.values():
                os.close(fd)
        return time.perf_counter() - t0, n, h.hexdigest()

    def m_hydrated_seq(self, row: Row, big: str):
        inf = info(big)
        if inf["hsm"]["flags"] != RESIDENT:
            raise DemoError(f"the large file is not hydrated (flags {inf['hsm']['flags']:#x})")
        objs = self.objects(big)
        for _ in range(self.repeat):
            self.caches.drop([big, *objs])
            r = demo.read_file_checked(self.mnt, self.big)
            self.check("hydrated read of the large file", (r.bytes, not r.mismatches),
                       (self.big.size, True))
            row.ours.append(r.mbps)
            self.caches.drop([big, *objs])
            dt, n, digest = self.read_objects_in_order(big)
            self.check("the large file's OST objects", (n, digest), (self.big.size, self.big.digest))
            row.limit.append(n / dt / 1e6)

    def fuse_reads(self) -> int:
        stats = json.loads(os.getxattr(os.path.join(self.mnt, demo.CTL), "lustrefuse.stats"))
        return stats["client"].get("reads", 0)

    def m_warm(self, row: Row, big: str):
        demo.read_file_checked(self.mnt, self.big)  # make sure every page is cached
        demo.read_file_checked(self.localdir, self.big)
        before = self.fuse_reads()
        for _ in range(self.repeat * 3):  # cheap: interleave A and B, 3 pairs a repeat
            r = demo.read_file_checked(self.mnt, self.big)
            self.check("warm read of the large file", (r.bytes, not r.mismatches), (self.big.size, True))
            row.ours.append(r.mbps)
            r = demo.read_file_checked(self.localdir, self.big)
            self.check("local copy of the large file", (r.bytes, not r.mismatches), (self.big.size, True))
            row.limit.append(r.mbps)
        row.note = f"{self.fuse_reads() - before} FUSE read requests in {self.repeat * 3} re-reads"

    def random_reads(self, path: str, threads: int, seconds: float, ref: str | None):
        size = os.path.getsize(path)
        pages = size // 4096
        count = [0]
        bad = []
        lock = threading.Lock()
        stop = time.perf_counter() + seconds

        def worker(seed):
            rng = random.Random(seed)
            fd = os.open(path, os.O_RDONLY)
            rfd = os.open(ref, os.O_RDONLY) if ref else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            n = 0
            try:
                while time.perf_counter() < stop:
                    off = rng.randrange(pages) * 4096
                    data = os.pread(fd, 4096, off)
                    n += 1
                    if rfd is not None and n % 16 == 0 and os.pread(rfd, 4096, off) != data:
                        bad.append(off)
            finally:
                os.close(fd)
                if rfd is not None:
                    os.close(rfd)
            with lock:
                count[0] += n

        t0 = time.perf_counter()
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return count[0] / (time.perf_counter() - t0), bad

    def m_random(self, row: Row, big: str, threads: int):
        local = self.lpath(self.big)
        objs = self.objects(big)
        for _ in range(self.repeat):
            self.caches.drop([big, local, *objs])
            iops, bad = self.random_reads(big, threads, self.cfg.rand_seconds, local)
            self.check(f"random 4 KiB reads ({threads} threads)", bad, [])
            row.ours.append(iops)
            self.caches.drop([big, local, *objs])
            iops, _ = self.random_reads(local, threads, self.cfg.rand_seconds, None)
            row.limit.append(iops)

    def m_restore_large(self, row: Row, big: str):
        pids = {k: v for k, v in self.cpu_pids().items() if k != "reader"}  # not our poll
        cpu_ours = []
        for i in range(self.repeat):
            self.make_cold([big])
            ino = os.stat(big).st_ino
            with demo.cpu_used(pids) as cpu:
                t0 = time.perf_counter()
                demo.hsm_request(self.mnt, "restore", [ino])
                left = demo.wait_hsm([big], RESIDENT, 600, poll=0.05)
                dt = time.perf_counter() - t0
            cpu_ours.append(cpu)
            if left:
                raise DemoError("the large file was not restored within 600 s")
            row.ours.append(self.big.size / dt / 1e6)
            if i == self.repeat - 1:
                objs = self.objects(big)
                self.caches.drop([big, *objs])
                r = demo.read_file_checked(self.mnt, self.big)
                self.check("restored large file", (r.bytes, not r.mismatches), (self.big.size, True))
        # the cold-read row's samples (as its direct downloads below), else one of our own
        disk = statistics.median(getattr(self, "to_disk", None) or [self.download_to_disk()])
        row.note = (f"the same GETs, each written to local disk: {disk:,.0f} MB/s, "
                    f"ours {statistics.median(row.ours) / disk:.2f} of that")
        if getattr(self, "cpu_limit", None):  # the cold-read row's direct downloads
            row.note += "; " + self.cpu_note(cpu_ours, self.cpu_limit, self.big.size, "boto3")

    # -- small files
    def bench_small(self):
        c = self.cfg
        n = len(self.ds.small)
        label = f"{n:,} x {fmt_size(c.small_size)}, {c.readers} readers"
        self.r_cold = self.row(f"small files, cold ({label})", "files/s",
                               f"direct GETs, {c.readers} threads")
        self.r_hyd = self.row(f"small files, hydrated, page cache dropped ({label})", "files/s",
                              f"same files on local disk, {c.readers} threads, page cache dropped")
        self.r_restore = self.row(f"hsm_restore of a directory ({n:,} small files)", "MB/s",
                                  f"direct GETs, {c.readers} threads")
        self.r_release = self.row(f"hsm_release of {c.release_files:,} files", "s", "")
        self.small_paths = [self.path(f) for f in self.ds.small]
        self.attempt(self.r_cold, self.m_small_cold)
        self.attempt(self.r_hyd, self.m_small_hydrated)
        self.attempt(self.r_release, self.m_release_small)
        self.attempt(self.r_restore, self.m_restore_small)

    def direct_gets(self, threads: int) -> tuple[float, list[str]]:
        def get(f: FileSpec):
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key_prefix + f.path)["Body"].read()
            return f.path if (len(body), xxhash.xxh3_128_hexdigest(body)) != (f.size, f.digest) else None

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as ex:
            bad = [p for p in ex.map(get, self.ds.small) if p]
        return time.perf_counter() - t0, bad

    def m_small_cold(self, row: Row):
        c = self.cfg
        for _ in range(self.repeat):
            self.make_cold(self.small_paths)
            r = demo.parallel_read(self.mnt, self.ds.small, c.readers)
            self.check("cold small files", r.mismatches, [])
            row.ours.append(r.files_per_s)
            dt, bad = self.direct_gets(c.readers)
            self.check("direct GETs of the small files", bad, [])
            row.limit.append(len(self.ds.small) / dt)
            self.small_get_mbps = getattr(self, "small_get_mbps", []) + [
                sum(f.size for f in self.ds.small) / dt / 1e6]

    def small_objects(self) -> list[str]:
        out = []
        for p in self.small_paths:
            out += self.objects(p)
        return out

    def m_small_hydrated(self, row: Row):
        """Data cold (page cache dropped), metadata as a training job's second epoch
        finds it: the mount keeps its leases across passes; the first pass after the
        cold one re-opens every file on the MDS (hydration changed its HSM state)."""
        c = self.cfg
        objs = [] if self.caches.use_global else self.small_objects()
        local = [self.lpath(f) for f in self.ds.small]
        for _ in range(self.repeat):
            self.caches.drop(self.small_paths + objs)
            before = self.client_counters(self.mnt).get("lease_opens", 0)
            r = demo.parallel_read(self.mnt, self.ds.small, c.readers)
            self.check("hydrated small files", r.mismatches, [])
            row.ours.append(r.files_per_s)
            leased = self.client_counters(self.mnt).get("lease_opens", 0) - before
            row.note = ((row.note + ", ") if row.note else "passes: ") + \
                f"{r.files_per_s:,.0f} files/s with {leased:,} opens from leases"
            self.caches.drop(local)
            r = demo.parallel_read(self.localdir, self.ds.small, c.readers)
            self.check("local small files", r.mismatches, [])
            row.limit.append(r.files_per_s)

    def make_release_set(self) -> tuple[list[str], list[int]]:
        """``release_files`` files that hold their data locally and have an S3 copy: 4 KiB
        files written through the mount (8 threads), then ``hsm_archive``. The cheaper of
        the two honest ways measured here (10,000 files, 2 vCPUs): ~21 s of writes + ~40 s
        of archives, against ~35 s of PUTs + the import + ~43 s of hsm_restore; one S3
        request a file bounds both (moto serves ~370 a second)."""
        n = self.cfg.release_files
        top = os.path.join(self.mnt, "bench-release")
        paths = [os.path.join(top, f"d{i // 1000:03d}", f"f{i:05d}.bin") for i in range(n)]
        for d in sorted({os.path.dirname(p) for p in paths}):
            os.makedirs(d, exist_ok=True)

        def write(i: int):
            fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, f"{i:015d}\n".encode() * 256)
            finally:
                os.close(fd)

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(8) as ex:
            list(ex.map(write, range(n)))
        t1 = time.perf_counter()
        inos = [os.stat(p).st_ino for p in paths]
        demo.hsm_request(self.mnt, "archive", inos)
        left = demo.wait_hsm(paths, RESIDENT, 1800)
        if left:
            raise DemoError(f"{len(left)} files not archived, e.g. {left[0]}")
        self.log(f"release set: {n:,} x 4 KiB written in {t1 - t0:.1f}s, archived in "
                 f"{time.perf_counter() - t1:.1f}s")
        return paths, inos

    def m_release_small(self, row: Row):
        paths, inos = self.make_release_set()
        for i in range(self.repeat):
            if i:  # local data again
                demo.hsm_request(self.mnt, "restore", inos)
                left = demo.wait_hsm(paths, RESIDENT, 1800)
                if left:
                    raise DemoError(f"{len(left)} files not restored, e.g. {left[0]}")
            t0 = time.perf_counter()
            demo.hsm_request(self.mnt, "release", inos)
            row.ours.append(time.perf_counter() - t0)
            for p in paths:  # each one released, with nothing left on the OSTs
                inf = info(p)
                if inf["hsm"]["flags"] != RELEASED or inf["present_bytes"]:
                    raise DemoError(f"{p} not released: flags {inf['hsm']['flags']:#x}, "
                                    f"{inf['present_bytes']} bytes local")
        row.note = (f"synchronous, as Lustre's; {len(paths):,} x 4 KiB files written through "
                    "the mount and archived, each holding its data locally")

    def restore_small(self) -> float:
        inos = [os.stat(p).st_ino for p in self.small_paths]
        t0 = time.perf_counter()
        demo.hsm_request(self.mnt, "restore", inos)
        left = demo.wait_hsm(self.small_paths, RESIDENT, 900)
        dt = time.perf_counter() - t0
        if left:
            raise DemoError(f"{len(left)} small files not restored, e.g. {left[0]}")
        return dt

    def m_restore_small(self, row: Row):
        total = sum(f.size for f in self.ds.small)
        for _ in range(self.repeat):
            self.make_cold(self.small_paths)
            dt = self.restore_small()
            row.ours.append(total / dt / 1e6)
        row.limit = list(getattr(self, "small_get_mbps", []))
        row.note = f"{len(self.small_paths) / dt:,.0f} files/s"
        self.caches.drop(self.small_paths)
        r = demo.parallel_read(self.mnt, self.ds.small, self.cfg.readers)
        self.check("restored small files", r.mismatches, [])

    # -- writes
    def bench_write(self):
        w = self.row("sequential write + close", "MB/s", "same bytes written + closed on local disk")
        a = self.row("hsm_archive of the written file", "MB/s",
                     "boto3 multipart upload, 8 MiB parts, 8 threads")
        self.attempt(w, self.m_write, a)
        if not w.na:
            self.attempt(a, self.m_archive)
        else:
            a.na = f"no written file to archive ({w.na})"

    def m_write(self, row: Row, arow: Row):
        size = self.cfg.write_size
        data = os.urandom(size)
        self.wdigest = xxhash.xxh3_128_hexdigest(data)
        self.wdata = data
        d = os.path.join(self.mnt, "bench-write")
        os.makedirs(d, exist_ok=True)
        self.wfiles = []
        mv = memoryview(data)
        for i in range(self.repeat):
            p = os.path.join(d, f"w{i}.bin")
            lp = os.path.join(self.localdir, "bench-write", f"w{i}.bin")
            os.makedirs(os.path.dirname(lp), exist_ok=True)
            for path, rowlist in ((p, row.ours), (lp, row.limit)):
                t0 = time.perf_counter()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    for off in range(0, size, MiB):
                        os.write(fd, mv[off:off + MiB])
                finally:
                    os.close(fd)
                rowlist.append(size / (time.perf_counter() - t0) / 1e6)
            self.wfiles.append(p)
            n, digest, _, _ = read_range(p)
            self.check(f"read back of {p}", (n, digest), (size, self.wdigest))

    def m_archive(self, row: Row):
        import io

        from boto3.s3.transfer import TransferConfig

        size = self.cfg.write_size
        for i, p in enumerate(self.wfiles):
            t0 = time.perf_counter()
            demo.hsm_request(self.mnt, "archive", [os.stat(p).st_ino])
            left = demo.wait_hsm([p], RESIDENT, 600, poll=0.05)
            dt = time.perf_counter() - t0
            if left:
                inf = info(p)
                raise DemoError(f"archive did not finish: flags {inf['hsm']['flags']:#x}, "
                                f"action {inf['action']}")
            row.ours.append(size / dt / 1e6)
            key = self.key_prefix + os.path.relpath(p, self.mnt)
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            self.check(f"archived object {key}", (len(body), xxhash.xxh3_128_hexdigest(body)),
                       (size, self.wdigest))
            bkey = self.key_prefix + f"bench-baseline/w{i}.bin"
            t0 = time.perf_counter()
            self.s3.upload_fileobj(io.BytesIO(self.wdata), self.bucket, bkey, Config=TransferConfig(
                multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=8))
            row.limit.append(size / (time.perf_counter() - t0) / 1e6)

    # -- the report
    def report(self) -> int:
        a = self.args
        elapsed = time.perf_counter() - self.t_start
        meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": demo.machine_info(),
                "endpoint": "moto (local, zero-copy ranged GETs)" if self.local else self.url,
                "config": self.cfg.__dict__, "repeat": self.repeat, "cache_drop": self.caches.how,
                "seconds": round(elapsed, 1), "load_average": [self.load0, os.getloadavg()[0]]}
        if a.json:
            out = {**meta, "rows": [r.as_dict() for r in self.rows],
                   "peak_rss_bytes": self.rss, "mismatches": self.mismatches, "errors": self.errors}
            print(json.dumps(out, indent=1))
        else:
            table_rows = self.rows
            print(f"lustrefuse bench, {meta['date']}, {meta['machine']}")
            c = self.cfg
            print(f"dataset: {fmt_size(c.large)} file + {c.small_files:,} x {fmt_size(c.small_size)}; "
                  f"{c.osts} OSTs, stripe {c.stripe_size}, imported chunk {c.imported_chunk}; "
                  f"endpoint {meta['endpoint']}; median of {self.repeat}; caches: {meta['cache_drop']}; "
                  f"load average {self.load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
            print("ratio = our speed / the limit's speed (1.00 = at the limit)\n")
            print(markdown(table_rows) if a.markdown else render(table_rows))
            if self.rss:
                print("\npeak RSS (VmHWM): " + ", ".join(f"{k} {v / MiB:,.0f} MiB"
                                                         for k, v in self.rss.items()))
            verdict = (f"NO - {len(self.mismatches)} MISMATCHES" if self.mismatches
                       else "every byte read matched its source (xxh3-128)")
            print(f"\nverified: {verdict}; {elapsed:.0f} s")
        if self.mismatches:
            say(f"lustrefuse bench: {len(self.mismatches)} data mismatches: {self.mismatches[:5]}",
                err=True)
            return 3
        if self.errors:
            say("lustrefuse bench: errors: " + "; ".join(self.errors[:5]), err=True)
            return 1
        return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lustrefuse bench",
        description="Measure lustrefuse against the limits of this machine and endpoint, in one "
                    "run: prints one table (our figure, the limit, the ratio). Exits non-zero "
                    "when data read back differs from the source, never because of speed.")
    p.add_argument("--small", action="store_true",
                   help="CI smoke size (32 MiB + 200 x 64 KiB; well under a minute)")
    p.add_argument("--repeat", type=int, default=1, help="samples per figure; medians are shown "
                   "(default 1; the README figures use 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"work directory (default {DEFAULT_DIR})")
    p.add_argument("--keep", action="store_true", help="keep the work directory (and, with a real "
                   "endpoint, the uploaded objects)")
    p.add_argument("--endpoint-url", help="a real S3 endpoint instead of a local moto server")
    p.add_argument("--bucket", help="bucket on --endpoint-url (must exist)")
    p.add_argument("--prefix", help="key prefix for the dataset on a real endpoint "
                   "(default lustrefuse-bench/DATE-PID; deleted afterwards unless --keep)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="never drop the global page cache; use posix_fadvise(DONTNEED) on the "
                   "files involved (cold directory walks are then not measured)")
    p.add_argument("--large-size", help="size of the large file (default 1G)")
    p.add_argument("--small-files", type=int, help="number of small files (default 2000)")
    p.add_argument("--small-size", help="size of each small file (default 128K)")
    p.add_argument("--release-files", type=int, help="files of the hsm_release row, written "
                   "through the mount and archived first (default 10000, 1000 with --small)")
    p.add_argument("--readers", type=int, help="parallel readers (default 8)")
    p.add_argument("--write-size", help="size of the written file (default 128M)")
    p.add_argument("--osts", type=int, help="OSTs (default 2)")
    p.add_argument("--stripe-size", help="default stripe size (default 1M)")
    p.add_argument("--imported-file-chunk-size", help="passed to up (default 64M: the large "
                   "file is striped over the OSTs)")
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="run only this part of the table (repeatable; default: all)")
    p.add_argument("--walk-files", type=int, help="empty objects of the big walk + stat rows "
                   "(default 100000, 5000 with --small; 0 skips them)")
    p.add_argument("--walk-dir-files", type=int, help="files per directory of the big walk's "
                   "tree (default 1000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.repeat < 1:
        parser().error("--repeat must be at least 1")
    if bool(args.endpoint_url) != bool(args.bucket):
        parser().error("--endpoint-url and --bucket go together")
    cfg = Config(**SMALL) if args.small else Config()
    try:
        for name, conv in (("large_size", demo.parse_size), ("small_files", int),
                           ("release_files", int),
                           ("small_size", demo.parse_size), ("readers", int),
                           ("write_size", demo.parse_size), ("osts", int),
                           ("stripe_size", str), ("imported_file_chunk_size", str),
                           ("walk_files", int), ("walk_dir_files", int)):
            v = getattr(args, name)
            if v is not None:
                field_name = {"large_size": "large", "imported_file_chunk_size": "imported_chunk"
                              }.get(name, name)
                setattr(cfg, field_name, conv(v))
    except ValueError as e:
        parser().error(str(e))
    if cfg.walk_files < 0 or cfg.walk_dir_files < 1:
        parser().error("--walk-files must be >= 0 and --walk-dir-files >= 1")
    if cfg.large < 4096 or cfg.small_files < 1 or cfg.readers < 1 or cfg.write_size < 1 \
            or cfg.release_files < 1:
        parser().error("sizes and counts must be positive (large file >= 4 KiB)")
    if not os.path.exists("/dev/fuse"):
        say("lustrefuse bench: /dev/fuse is missing", err=True)
        return 1
    return demo.guarded("lustrefuse bench", lambda: Bench(cfg, args).run())


if __name__ == "__main__":
    sys.exit(main())
