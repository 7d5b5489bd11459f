"""OST worker: one process per target directory, holding stripe objects.

Each file with data on this OST has one sparse object file
``DIR/objects/XX/INO``. Each stripe chunk of it has a row in ``DIR/ost.db``
with its length and xxh3-64 checksum: a chunk is present iff its row is. A
row is written only after the chunk's bytes are, so a chunk cut short by a
crash is simply not present and is fetched again.

Hydration is single-flight: concurrent requests for a missing chunk, from any
number of clients, share one ranged GET. Landed chunks are reported to the MDS
in batches by a background thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from . import rpc
from .integrity import checksum
from .layout import GET_SPAN, Layout
from .protocol import RpcError
from .s3 import NoSuchObject, Repository, S3Error, StaleObject

log = logging.getLogger(__name__)

PUNCH_THREADS = 8  # truncations in flight in one punch_many
HYDRATE_BUDGET = 64 * 1024 * 1024  # bytes of GETs in flight at once (demand, prefetch, restore)
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of any disk's block

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    ino INTEGER NOT NULL,
    s INTEGER NOT NULL,          -- file-wide stripe chunk number
    length INTEGER NOT NULL,     -- bytes of the chunk held in the object
    xxh INTEGER NOT NULL,        -- xxh3_64 of those bytes (signed 64-bit in SQLite)
    pending_length INTEGER,      -- an overwrite in progress: what the chunk becomes if it
    pending_xxh INTEGER,         -- lands (a crash between write and record leaves either)
    PRIMARY KEY (ino, s)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class ObjectStore:
    """The OST directory: object files and the chunk table. No network here."""

    def __init__(self, root: str, index: int, capacity: int = 0):
        self.root = root
        self.index = index
        self.capacity = capacity  # 0: the filesystem's own size
        os.makedirs(os.path.join(root, "objects"), exist_ok=True)
        self.db = sqlite3.connect(os.path.join(root, "ost.db"), check_same_thread=False,
                                  isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()
        row = self.db.execute("SELECT value FROM meta WHERE key='index'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('index', ?)", (str(index),))
        elif int(row[0]) != index:
            raise SystemExit(f"{root} holds OST {row[0]}, not OST {index}")
        (self.used,) = self.db.execute("SELECT coalesce(sum(length), 0) FROM chunks").fetchone()
        self.reserved = 0
        self.direct = True  # fetched chunks are written with O_DIRECT while this holds

    def path(self, ino: int) -> str:
        # Named by inode number only: object keys never reach the local filesystem.
        return os.path.join(self.root, "objects", f"{ino & 0xFF:02x}", f"{ino:x}")

    def open(self, ino: int, create: bool) -> int:
        p = self.path(ino)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            return os.open(p, flags, 0o600)
        except FileNotFoundError:
            if not create:
                raise
            os.makedirs(os.path.dirname(p), exist_ok=True)
            return os.open(p, flags, 0o600)

    def open_direct(self, ino: int) -> int | None:
        """A second descriptor of the object that bypasses the page cache, or None where
        the filesystem has no O_DIRECT."""
        if not self.direct:
            return None
        try:
            return os.open(self.path(ino), os.O_WRONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.stop_direct(e)
            return None

    def stop_direct(self, why: OSError):
        """The filesystem refused O_DIRECT (at open or at a write): stop trying."""
        log.info("%s refuses O_DIRECT (%s): chunks go through the page cache", self.root, why)
        self.direct = False

    def table(self, ino: int) -> dict[int, tuple[int, int]]:
        with self.lock:
            rows = self.db.execute("SELECT s, length, xxh FROM chunks WHERE ino=?", (ino,))
            return {s: (n, x) for s, n, x in rows}

    def has(self, ino: int, s: int):
        with self.lock:
            return self.db.execute("SELECT length, xxh FROM chunks WHERE ino=? AND s=?",
                                   (ino, s)).fetchone()

    def record(self, ino: int, entries: list[tuple[int, int, int]]):
        with self.lock:
            self.db.execute("BEGIN")
            for s, n, x in entries:
                old = self.db.execute("SELECT length FROM chunks WHERE ino=? AND s=?",
                                      (ino, s)).fetchone()
                self.used += n - (old[0] if old else 0)
                self.db.execute("INSERT OR REPLACE INTO chunks(ino, s, length, xxh) "
                                "VALUES (?,?,?,?)", (ino, s, n, x))
            self.db.execute("COMMIT")

    def forget(self, ino: int, chunks: list[int] | None = None):
        with self.lock:
            if chunks is None:
                (n,) = self.db.execute("SELECT coalesce(sum(length), 0) FROM chunks WHERE ino=?",
                                       (ino,)).fetchone()
                self.db.execute("DELETE FROM chunks WHERE ino=?", (ino,))
                self.used -= n
            else:
                for s in chunks:
                    row = self.db.execute("SELECT length FROM chunks WHERE ino=? AND s=?",
                                          (ino, s)).fetchone()
                    if row:
                        self.used -= row[0]
                        self.db.execute("DELETE FROM chunks WHERE ino=? AND s=?", (ino, s))

    def set_pending(self, ino: int, s: int, length: int, xxh: int):
        with self.lock:
            self.db.execute("UPDATE chunks SET pending_length=?, pending_xxh=? WHERE ino=? AND s=?",
                            (length, xxh, ino, s))

    def pending(self, ino: int, s: int):
        with self.lock:
            row = self.db.execute("SELECT pending_length, pending_xxh FROM chunks WHERE ino=? "
                                  "AND s=? AND pending_xxh IS NOT NULL", (ino, s)).fetchone()
        return row

    def free_bytes(self) -> int:
        """Room left for chunks: the configured capacity or the disk, whichever is tighter."""
        st = os.statvfs(self.root)
        disk = st.f_bavail * st.f_frsize
        with self.lock:
            if self.capacity:
                return min(self.capacity - self.used, disk) - self.reserved
            return disk - self.reserved

    def total_bytes(self) -> int:
        st = os.statvfs(self.root)
        return self.capacity or st.f_blocks * st.f_frsize

    def reserve(self, n: int) -> bool:
        """Claim room for a chunk before downloading it (released with ``unreserve``)."""
        if self.free_bytes() < n:
            return False
        with self.lock:
            self.reserved += n
        return True

    def unreserve(self, n: int):
        with self.lock:
            self.reserved -= n

    def inos(self) -> list[int]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT DISTINCT ino FROM chunks")]

    def punch(self, ino: int) -> int:
        """Drop an object's data, keep nothing. Returns bytes freed.

        The file is truncated in place rather than unlinked so that descriptors
        clients hold stay valid (they see EOF and ask again).
        """
        self.forget(ino)
        try:
            fd = os.open(self.path(ino), os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            freed = os.fstat(fd).st_blocks * 512
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        return freed

    def forget_many(self, inos: list[int]):
        """Every chunk of many objects, in one transaction."""
        with self.lock:
            gone = 0
            self.db.execute("BEGIN")
            try:
                for i in range(0, len(inos), 500):
                    part = inos[i:i + 500]
                    marks = ",".join("?" * len(part))
                    (n,) = self.db.execute("SELECT coalesce(sum(length), 0) FROM chunks WHERE "
                                           f"ino IN ({marks})", part).fetchone()
                    self.db.execute(f"DELETE FROM chunks WHERE ino IN ({marks})", part)
                    gone += n
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            self.used -= gone

    def punch_many(self, inos: list[int]) -> int:
        """``punch`` of many objects: their chunks forgotten in one transaction first
        (as ``punch``: a crash then leaves bytes nobody counts on, never a row without
        its bytes), then the objects truncated, several at once (a truncate waits on
        the filesystem's journal: measured 3x faster with 4 threads than one by one).
        Returns bytes freed."""
        self.forget_many(inos)

        def truncate(ino: int) -> int:
            p = self.path(ino)
            try:
                freed = os.stat(p).st_blocks * 512
                os.truncate(p, 0)
            except FileNotFoundError:
                return 0
            return freed

        if len(inos) < 32:
            return sum(map(truncate, inos))
        with ThreadPoolExecutor(PUNCH_THREADS, thread_name_prefix="punch") as ex:
            return sum(ex.map(truncate, inos, chunksize=16))

    def destroy(self, ino: int) -> int:
        freed = self.punch(ino)
        try:
            os.unlink(self.path(ino))
        except FileNotFoundError:
            pass
        return freed

    def statfs(self) -> dict:
        st = os.statvfs(self.root)
        with self.lock:
            (objects,) = self.db.execute("SELECT count(DISTINCT ino) FROM chunks").fetchone()
        if self.capacity:
            free = max(0, self.free_bytes())
            return {"index": self.index, "blocks": self.capacity, "bfree": free, "bavail": free,
                    "files": st.f_files, "ffree": st.f_ffree, "objects": objects,
                    "used": self.used}
        return {"index": self.index, "blocks": st.f_blocks * st.f_frsize,
                "bfree": st.f_bfree * st.f_frsize, "bavail": st.f_bavail * st.f_frsize,
                "files": st.f_files, "ffree": st.f_ffree, "objects": objects, "used": self.used}


def pwrite_all(fd: int, view, offset: int):
    view = memoryview(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_chunk(fd: int, fd_direct: int | None, view: memoryview, offset: int):
    """Write ``view`` at ``offset``: its whole 4 KiB blocks with O_DIRECT when there is a
    direct descriptor (the view must then start on a page), the tail through the cache."""
    head = len(view) - len(view) % DIRECT_ALIGN
    if fd_direct is None or offset % DIRECT_ALIGN or not head:
        head = 0
    if head:
        pwrite_all(fd_direct, view[:head], offset)
    if head < len(view):
        pwrite_all(fd, view[head:], offset + head)


class RowBuffer:
    """A page-aligned memory file and its mapping: a GET lands in it, goes to disk from it
    with O_DIRECT, and travels to a same-host OST as its descriptor."""

    def __init__(self, size: int):
        self.size = size
        self.fd = os.memfd_create("lustrefuse-row", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map)

    def close(self):
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a view of it still lives (an exception's frame): GC closes it
            pass
        os.close(self.fd)


class RowBuffers:
    """Row buffers kept for reuse. Touching fresh memory is not free: on VMs whose host
    takes back freed guest pages, it costs 1-2 s of CPU per GiB, more than the GET.
    So GETs land in memory already touched, and chunks bypass our page cache."""

    def __init__(self, size: int, keep: int):
        self.size = size
        self.keep = keep
        self.idle: list[RowBuffer] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def take(self, n: int):
        buf = None
        if n <= self.size:
            with self.lock:
                buf = self.idle.pop() if self.idle else None
        if buf is None:
            buf = RowBuffer(max(n, self.size))  # one larger than a row is not kept
        try:
            yield buf
        finally:
            with self.lock:
                if buf.size == self.size and len(self.idle) < self.keep:
                    self.idle.append(buf)
                    buf = None
            if buf is not None:
                buf.close()

    def close(self):
        with self.lock:
            idle, self.idle = self.idle, []
        for buf in idle:
            buf.close()


class ByteBudget:
    """Bytes of GETs in flight, bounded: memory is set by configuration, never by how
    many readers, prefetchers and restores there are. One GET larger than the whole
    budget may still run alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        with self.cond:
            while self.used and self.used + n > self.limit:
                self.cond.wait()
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


class OstService:
    def __init__(self, store: ObjectStore, mds: rpc.Client, repo: Repository | None,
                 hydrate_threads: int = 16, low_watermark: float = 0.0,
                 high_watermark: float = 0.0, hydrate_budget: int = HYDRATE_BUDGET):
        self.store = store
        self.low = low_watermark  # auto-release starts when free space < low * total
        self.high = high_watermark  # ... and stops once free space >= high * total
        self.last_use: dict[int, float] = {}  # ino -> last time a client used it (LRU)
        self.evict_lock = threading.Lock()
        self.ready = False  # set once registered with the MDS (and its S3 link is known)
        self.mds = mds
        self.repo = repo
        self.pool = ThreadPoolExecutor(hydrate_threads, thread_name_prefix="hydrate")
        # prefetch has its own threads so a reader's GET never queues behind read-ahead
        self.prefetch_pool = ThreadPoolExecutor(max(2, hydrate_threads // 2),
                                                thread_name_prefix="prefetch")
        self.inflight: dict[tuple[int, int], Future] = {}
        self.budget = ByteBudget(hydrate_budget)  # one budget for every GET in flight
        self.rows = RowBuffers(GET_SPAN, max(1, hydrate_budget // GET_SPAN))
        self.peers: dict[int, rpc.Client] = {}  # other OSTs, for chunks of stripe rows
        self.sf_lock = threading.Lock()
        self.reports: queue.Queue = queue.Queue()
        self.counters = {"chunks_hydrated": 0, "bytes_hydrated": 0, "bytes_served": 0,
                         "fds_handed": 0, "bytes_written": 0, "verify_failures": 0,
                         "refetched": 0, "hydrate_errors": 0, "single_flight_joins": 0,
                         "auto_released_files": 0, "enospc": 0, "chunks_handed_over": 0}
        self._stop = threading.Event()
        threading.Thread(target=self._reporter, name="reporter", daemon=True).start()
        if self.low > 0:
            threading.Thread(target=self._watermark_loop, name="auto-release",
                             daemon=True).start()

    # -- capacity ------------------------------------------------------------

    def _touch(self, ino: int):
        self.last_use[ino] = time.monotonic()

    def make_room(self, need: int) -> int:
        """Ask the MDS to release eligible files held here, least recently used first."""
        with self.evict_lock:
            have = self.store.free_bytes()
            if have >= need:
                return have
            now = time.monotonic()
            order = sorted(self.store.inos(), key=lambda i: self.last_use.get(i, 0.0))
            for start in range(0, len(order), 64):
                batch = order[start:start + 64]
                try:
                    res = self.mds.call("evict", ost=self.store.index, inos=batch,
                                        need=need - have, timeout=120)
                except (OSError, RpcError) as e:
                    log.warning("auto-release: the MDS did not answer: %s", e)
                    break
                self.counters["auto_released_files"] += len(res.get("released", []))
                for ino in res.get("released", []):
                    self.last_use.pop(ino, None)
                have = self.store.free_bytes()
                if have >= need:
                    break
            log.info("auto-release on OST %d: %d bytes free after %.2fs", self.store.index,
                     have, time.monotonic() - now)
            return have

    def _watermark_loop(self):
        while not self._stop.wait(1.0):
            total = self.store.total_bytes()
            if self.store.free_bytes() < self.low * total:
                self.make_room(int(self.high * total))

    def _count(self, name: str, n: int = 1):
        with self.sf_lock:
            self.counters[name] += n

    # -- presence reports to the MDS --------------------------------------

    def _reporter(self):
        while not self._stop.is_set():
            try:
                first = self.reports.get(timeout=0.5)
            except queue.Empty:
                continue
            batch: dict[int, list[int]] = {}
            item = first
            while True:
                ino, s = item
                batch.setdefault(ino, []).append(s)
                try:
                    item = self.reports.get_nowait()
                except queue.Empty:
                    break
            for attempt in range(20):
                try:
                    self.mds.call("chunks_present", ost=self.store.index,
                                  chunks={str(k): v for k, v in batch.items()})
                    break
                except (OSError, RpcError) as e:
                    log.warning("cannot report chunks to the MDS (%s); retrying", e)
                    time.sleep(min(0.1 * 2 ** attempt, 2))

    # -- hydration ---------------------------------------------------------

    def _reserve(self, length: int, desc: dict, run: list[int]):
        """Room for ``length`` more bytes of chunks, auto-releasing older files if needed."""
        if self.store.reserve(length):
            return
        floor = int(self.high * self.store.total_bytes()) if self.high else 0
        self.make_room(length + floor)
        if not self.store.reserve(length):
            self._count("enospc")
            log.error("OST %d is full: no room for chunks %d-%d of inode %d (%s); nothing "
                      "eligible to release", self.store.index, run[0], run[-1], desc["ino"],
                      desc["s3_key"])
            raise RpcError(errno.ENOSPC, f"OST {self.store.index} is full")

    def _store_chunks(self, ino: int, lay: Layout, pieces: list,
                      aligned: bool = False) -> dict[int, tuple[int, int]]:
        """Write chunks ``[(s, bytes)]`` into this OST's object, then record them (only
        then are they present) and report them to the MDS. ``aligned``: every piece
        starts on a page (a row buffer), so it may go to disk with O_DIRECT."""
        fd = self.store.open(ino, create=True)
        fd_direct = self.store.open_direct(ino) if aligned else None
        try:
            for s, buf in pieces:
                try:
                    write_chunk(fd, fd_direct, memoryview(buf), lay.chunk_object_offset(s))
                except OSError as e:
                    if fd_direct is None or e.errno != errno.EINVAL:
                        raise
                    self.store.stop_direct(e)
                    os.close(fd_direct)
                    fd_direct = None
                    write_chunk(fd, None, memoryview(buf), lay.chunk_object_offset(s))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                log.error("OST %d is full: chunks of inode %d not stored", self.store.index, ino)
            raise
        finally:
            os.close(fd)
            if fd_direct is not None:
                os.close(fd_direct)
        entries = [(s, len(buf), checksum(buf)) for s, buf in pieces]
        self.store.record(ino, entries)
        self._count("chunks_hydrated", len(entries))
        self._count("bytes_hydrated", sum(n for _, n, _ in entries))
        for s, _, _ in entries:
            self.reports.put((ino, s))
        return {s: (n, x) for s, n, x in entries}

    def _fetch(self, desc: dict, run: list[int]) -> dict[int, tuple[int, int]]:
        """Fetch a run of chunks contiguous in the file with one GET. This OST's chunks
        of it are stored here; the others (a stripe row of a striped file) are handed
        to their OSTs. Returns the entries of every chunk of the run that landed."""
        ino = desc["ino"]
        lay = Layout.from_dict(desc["layout"])
        if self.repo is None:
            if not self.ready:  # still registering: the caller may try again
                raise RpcError(errno.EAGAIN, f"OST {self.store.index} is starting")
            raise RpcError(errno.EIO, "this OST has no S3 repository")
        lengths = [lay.chunk_length(s, desc["s3_size"]) for s in run]
        pieces, pos = [], 0
        for s, n in zip(run, lengths, strict=True):
            pieces.append((s, pos, n))
            pos += n
        mine = [(s, p, n) for s, p, n in pieces if lay.ost_of_chunk(s) == self.store.index]
        own = sum(n for _, _, n in mine)
        self._reserve(own, desc, run)
        with self.budget.hold(pos), self.rows.take(pos) as row:
            try:
                data = row.view[:pos]
                self._download(desc, run[0] * lay.stripe_size, data, run)
                got = self._store_chunks(ino, lay, [(s, data[p:p + n]) for s, p, n in mine],
                                         aligned=True)
            finally:
                self.store.unreserve(own)
            others: dict[int, dict[int, tuple[int, int]]] = {}
            for s, p, n in pieces:
                idx = lay.ost_of_chunk(s)
                if idx != self.store.index:
                    others.setdefault(idx, {})[s] = (p, n)
            for idx, spans in others.items():
                got.update(self._hand_over(idx, desc, row, spans))
            data.release()
        return got

    def _peer(self, idx: int) -> rpc.Client:
        peer = self.peers.get(idx)
        if peer is None:
            osts = self.mds.call("config")["osts"]
            addr = osts.get(str(idx)) or osts.get(idx)
            if not addr:
                raise RpcError(errno.EIO, f"OST {idx} is not registered")
            peer = self.peers[idx] = rpc.Client(addr, self.mds.secret, timeout=120)
        return peer

    def _hand_over(self, idx: int, desc: dict, row: RowBuffer,
                   spans: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        """Give OST ``idx`` its chunks ``{s: (offset, length)}`` of a row we fetched into
        ``row``. A same-host OST gets the row's descriptor and maps it: the bytes are
        not copied. On failure the chunks are simply not present there (the caller sees
        them missing and asks that OST itself)."""
        try:
            peer = self._peer(idx)
            if peer.address.startswith("unix:"):
                got = peer.call("install", desc=desc, spans=spans, send_fds=[row.fd])
            else:
                got = peer.call("install", desc=desc, chunks={
                    s: bytes(row.view[p:p + n]) for s, (p, n) in spans.items()})
            self._count("chunks_handed_over", len(spans))
            return {int(s): tuple(e) for s, e in got.items()}
        except (OSError, RpcError) as e:
            self.peers.pop(idx, None)  # it may have restarted elsewhere: ask the MDS again
            log.warning("cannot hand chunks %s of inode %d to OST %d: %s", sorted(spans),
                        desc["ino"], idx, e)
            return {}

    def _download(self, desc: dict, start: int, into: memoryview, run: list[int]):
        ino, key = desc["ino"], desc["s3_key"]
        try:
            self.repo.get_range_into(key, start, into, desc["etag"])
        except (StaleObject, NoSuchObject) as e:
            why = "changed since import" if isinstance(e, StaleObject) else "deleted"
            log.error("s3 key %r %s (ETag %s): chunks %d-%d of inode %d not fetched; the file "
                      "is marked lost_from_hsm", key, why, desc["etag"], run[0], run[-1], ino)
            self._count("hydrate_errors")
            try:  # the file's state says so, never a mix of two versions
                self.mds.call("mark_lost", ino=ino, etag=desc["etag"])
            except (OSError, RpcError) as err:
                log.warning("cannot mark inode %d lost: %s", ino, err)
            raise RpcError(errno.EIO, f"{key}: object {why}") from None
        except S3Error as e:
            log.error("fetching chunks %d-%d of s3 key %r failed: %s", run[0], run[-1], key, e)
            self._count("hydrate_errors")
            raise RpcError(errno.EIO, str(e)) from None

    def _hydrate_run(self, desc: dict, run: list[int]) -> dict[int, tuple[int, int]]:
        try:
            return self._fetch(desc, run)
        finally:
            with self.sf_lock:
                for s in run:
                    self.inflight.pop((desc["ino"], s), None)

    def hydrate(self, desc: dict, chunks: list[int], wait: bool = True,
                prefetch: bool = False) -> dict:
        """Make ``chunks`` present; returns ``{s: (length, xxh)}`` for those that are.

        Missing chunks that follow each other in the file are fetched together, up to
        GET_SPAN bytes per GET. Chunks of other OSTs may be asked for too (a stripe row
        of a striped file): they are fetched in the same GET and handed to their OST.
        """
        ino = desc["ino"]
        lay = Layout.from_dict(desc["layout"])
        futures: dict[int, Future] = {}
        with self.sf_lock:
            # read under the lock: a fetch that lands meanwhile is in the table or in flight
            have = self.store.table(ino)
            todo = []
            for s in sorted(set(chunks)):
                if s in have:
                    continue
                fut = self.inflight.get((ino, s))
                if fut is not None:
                    self.counters["single_flight_joins"] += 1
                    futures[s] = fut
                else:
                    todo.append(s)
            pool = self.prefetch_pool if prefetch else self.pool
            for run in lay.get_runs(todo, GET_SPAN):
                fut = pool.submit(self._hydrate_run, desc, run)
                for s in run:
                    self.inflight[(ino, s)] = fut
                    futures[s] = fut
        if not wait:
            return {}
        result = {s: have[s] for s in chunks if s in have}
        failed = None
        for s, fut in futures.items():  # all of them: a failed call leaves no GET behind
            try:
                got = fut.result()
            except Exception as e:
                failed = failed or e
                continue
            if s in got:  # a chunk handed to another OST that refused it is not there
                result[s] = got[s]
        if failed is not None:
            raise failed
        return result

    def h_install(self, peer, desc: dict, chunks: dict | None = None,
                  spans: dict | None = None):
        """Chunks of ours that another OST fetched in its GET of a stripe row: their
        bytes (``chunks``), or their ``spans`` ``{s: (offset, length)}`` in the memory
        file whose descriptor came with the request (same host). Only chunks we lack
        are written: a present chunk may be newer (written since)."""
        if chunks is not None:
            return self._install(desc, chunks, aligned=False)
        with self._mapped(peer, spans) as mapped:
            return self._install(desc, mapped, aligned=True)

    def _install(self, desc: dict, chunks: dict, aligned: bool):
        ino = desc["ino"]
        lay = Layout.from_dict(desc["layout"])
        chunks = {int(s): b for s, b in chunks.items()}
        for s, b in chunks.items():
            if lay.ost_of_chunk(s) != self.store.index or len(b) != lay.chunk_length(
                    s, desc.get("s3_size") or 0):
                raise RpcError(errno.EINVAL, f"chunk {s} of inode {ino} is not ours or not "
                               f"whole ({len(b)} bytes)")
        fut: Future = Future()
        with self.sf_lock:
            have = self.store.table(ino)
            todo = [s for s in sorted(chunks) if s not in have and (ino, s) not in self.inflight]
            for s in todo:
                self.inflight[(ino, s)] = fut
        try:
            self._touch(ino)
            got = {}
            if todo:
                length = sum(len(chunks[s]) for s in todo)
                self._reserve(length, desc, todo)
                try:
                    got = self._store_chunks(ino, lay, [(s, chunks[s]) for s in todo],
                                             aligned=aligned)
                finally:
                    self.store.unreserve(length)
            fut.set_result(got)
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self.sf_lock:
                for s in todo:
                    self.inflight.pop((ino, s), None)
        got.update({s: have[s] for s in chunks if s in have})
        return got

    @staticmethod
    @contextlib.contextmanager
    def _mapped(peer, spans: dict | None):
        """``{chunk: bytes}`` views of the memory file a same-host OST sent; each span
        starts on a page (a chunk's place in a stripe row)."""
        if not spans or len(peer.fds) != 1:
            raise RpcError(errno.EINVAL, "install needs chunks, or spans and one descriptor")
        spans = {int(s): (int(p), int(n)) for s, (p, n) in spans.items()}
        size = os.fstat(peer.fds[0]).st_size
        for s, (p, n) in spans.items():
            if p < 0 or n <= 0 or p + n > size or p % DIRECT_ALIGN:
                raise RpcError(errno.EINVAL, f"chunk {s} at {p}+{n} is not within the "
                               f"memory file ({size} bytes) or not on a page")
        with mmap.mmap(peer.fds[0], size, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            out = {s: view[p:p + n] for s, (p, n) in spans.items()}
            try:
                yield out
            finally:
                for v in out.values():
                    v.release()
                view.release()

    # -- RPC handlers --------------------------------------------------------

    def h_open_object(self, peer, ino: int, create: bool = False):
        """Hand the object's descriptor to a same-host client, with its chunk table."""
        self._touch(ino)
        table = self.store.table(ino)
        try:
            fd = self.store.open(ino, create)
        except FileNotFoundError:
            return rpc.Reply({"table": table, "fd": False})
        self._count("fds_handed")
        return rpc.Reply({"table": table, "fd": True}, [fd])

    def h_table(self, peer, ino: int):
        return self.store.table(ino)

    def h_hydrate(self, peer, desc: dict, chunks: list, wait: bool = True,
                  prefetch: bool = False):
        self._touch(desc["ino"])
        return self.hydrate(desc, [int(s) for s in chunks], wait, prefetch)

    def h_read(self, peer, ino: int, offset: int, length: int):
        """Read object bytes for a client without a local descriptor (remote hosts)."""
        try:
            fd = self.store.open(ino, False)
        except FileNotFoundError:
            return b""
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        self._count("bytes_served", len(data))
        return data

    def _pread(self, ino: int, offset: int, length: int) -> bytes:
        fd = self.store.open(ino, True)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data + bytes(length - len(data))  # holes at the object's end read short

    def h_verify(self, peer, desc: dict, s: int, refetch: bool):
        """Check one chunk against its checksum; refetch it from S3 when allowed."""
        ino = desc["ino"]
        row = self.store.has(ino, s)
        if row is not None:
            length, xxh = row
            lay = Layout.from_dict(desc["layout"])
            data = self._pread(ino, lay.chunk_object_offset(s), length)
            if len(data) == length and checksum(data) == xxh:
                return (length, xxh)
            pending = self.store.pending(ino, s)
            if pending:  # a write that landed just before a crash: its record did not
                n, x = pending
                data = self._pread(ino, lay.chunk_object_offset(s), n)
                if checksum(data) == x:
                    self.store.record(ino, [(s, n, x)])
                    log.info("inode %d chunk %d: completed an interrupted write", ino, s)
                    return (n, x)
            self._count("verify_failures")
            log.error("checksum mismatch: inode %d chunk %d on OST %d (object offset %d)",
                      ino, s, self.store.index, lay.chunk_object_offset(s))
            if not refetch:  # no clean copy: keep failing (EIO), never serve zeros instead
                raise RpcError(errno.EIO, f"chunk {s} of inode {ino} is corrupt and has no "
                               "clean copy in S3")
            self.store.forget(ino, [s])
        if not refetch:
            raise RpcError(errno.EIO, f"chunk {s} of inode {ino} is missing and has no "
                           "clean copy in S3")
        self._count("refetched")
        return self.hydrate(desc, [s])[s]

    def h_write(self, peer, desc: dict, s: int, offset: int, data: bytes):
        """Write into chunk ``s`` at object offset ``offset``; hydrate the chunk first
        when it still lives only in S3. Returns the chunk's new (length, xxh)."""
        ino = desc["ino"]
        lay = Layout.from_dict(desc["layout"])
        base = lay.chunk_object_offset(s)
        row = self.store.has(ino, s)
        if row is None and desc.get("s3_key") and lay.chunk_length(s, desc.get("s3_size") or 0):
            row = self.hydrate(desc, [s])[s]
        old_len = row[0] if row else 0
        growth = max(0, offset + len(data) - base - old_len)
        if growth and self.store.capacity and not self.store.reserve(growth):
            self.make_room(growth)
            if not self.store.reserve(growth):
                self._count("enospc")
                raise RpcError(errno.ENOSPC, f"OST {self.store.index} is full")
        if growth and self.store.capacity:
            self.store.unreserve(growth)  # the record below accounts for it
        self._touch(ino)
        length = max(old_len, offset + len(data) - base)
        fd = self.store.open(ino, True)
        try:
            # the chunk as it will be, checksummed before the write: if we die between the
            # write and the record, the chunk matches either the old or the pending checksum
            chunk = bytearray(os.pread(fd, old_len, base))
            chunk.extend(bytes(length - len(chunk)))  # holes read short
            chunk[offset - base:offset - base + len(data)] = data
            entry = (s, length, checksum(chunk))
            if row is not None:
                self.store.set_pending(ino, s, length, entry[2])
            pwrite_all(fd, data, offset)
        finally:
            os.close(fd)
        self.store.record(ino, [entry])
        self._count("bytes_written", len(data))
        return entry[1:]

    def h_truncate(self, peer, desc: dict, size: int):
        """Cut this OST's object of a file to the new file ``size``; rehash the edge chunk."""
        ino = desc["ino"]
        lay = Layout.from_dict(desc["layout"])
        pos = lay.osts.index(self.store.index) if self.store.index in lay.osts else None
        table = self.store.table(ino)
        gone = [s for s in table if s * lay.stripe_size >= size]
        self.store.forget(ino, gone)
        result = {}
        if pos is not None:
            try:
                fd = self.store.open(ino, False)
            except FileNotFoundError:
                return {}
            try:
                keep = lay.object_size(pos, size)
                if os.fstat(fd).st_size > keep:  # only cut: growth is a hole, read as zeros
                    os.ftruncate(fd, keep)
                edge = size // lay.stripe_size
                if edge in table and size % lay.stripe_size:
                    n = min(table[edge][0], size % lay.stripe_size)
                    data = os.pread(fd, n, lay.chunk_object_offset(edge))
                    data += bytes(n - len(data))
                    self.store.record(ino, [(edge, n, checksum(data))])
                    result[edge] = (n, checksum(data))
            finally:
                os.close(fd)
        return result

    def h_fsync(self, peer, ino: int):
        try:
            fd = self.store.open(ino, False)
        except FileNotFoundError:
            return None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def h_punch(self, peer, ino: int):
        return self.store.punch(ino)

    def h_punch_many(self, peer, inos: list):
        return self.store.punch_many([int(i) for i in inos])

    def h_destroy(self, peer, ino: int):
        return self.store.destroy(ino)

    def h_statfs(self, peer):
        return self.store.statfs()

    def h_stats(self, peer):
        c = dict(self.counters)
        if self.repo is not None:
            c.update({"s3_" + k: v for k, v in self.repo.counters.as_dict().items()})
        return c

    def h_ping(self, peer):
        return {"ost": self.store.index, "pid": os.getpid()}

    def handlers(self) -> dict:
        return {name[2:]: getattr(self, name) for name in dir(self) if name.startswith("h_")}

    def close(self):
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.prefetch_pool.shutdown(wait=False, cancel_futures=True)
        self.rows.close()
