"""The HSM coordinator: a persisted queue of RESTORE/ARCHIVE/REMOVE requests.

Requests are rows of ``hsm_requests`` (a restart loses none: STARTED ones go
back to WAITING). Duplicates of an active request are merged. A pool of
workers runs them; restores ask each OST of the layout to hydrate the missing
chunks (OSTs fetch in parallel and share the single-flight table with lazy
reads, so no chunk is fetched twice); archives stream the file from the OSTs
into a multipart upload; RELEASE is synchronous and never queued (as Lustre).
"""

from __future__ import annotations

import errno
import logging
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import hsm, keys
from .layout import GET_SPAN, Layout
from .namespace import bitmap_has
from .protocol import RpcError

log = logging.getLogger(__name__)

ACTIVE = ("WAITING", "STARTED")
PART_SIZE = 8 * 1024 * 1024
OST_WAIT = 60.0  # seconds a request waits for an unreachable OST before failing


class Coordinator:
    def __init__(self, mds, workers: int = 8):
        self.mds = mds
        self.ns = mds.ns
        self.workers = workers
        self.wake = threading.Condition()
        self.canceled: set[int] = set()
        self.running: dict[int, int] = {}  # request id -> bytes moved so far
        self.counters = {"restores_done": 0, "archives_done": 0, "requests_failed": 0}
        self._stop = threading.Event()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="coordinator")
        self._claim_lock = threading.Lock()
        self.swept = 0.0  # when finished requests were last cleared out
        for _ in range(workers):
            self.pool.submit(self._worker)

    # -- requests --------------------------------------------------------

    def request(self, action: str, inos: list[int], uid: int, archive_id: int = 0):
        """Check every file first (all or nothing, as one Lustre request), then queue."""
        action = action.lower()
        if action == "release":  # synchronous, one batch: checks, punches, one transaction
            return {"freed": self.mds.release_many(inos, uid)}
        if action == "cancel":
            return {"canceled": self.cancel(inos)}
        todo = []
        for ino in inos:
            st = self.ns.file_state(ino)
            if not stat.S_ISREG(st["mode"]):
                raise RpcError(errno.EINVAL, "not a regular file")
            try:
                if action == "restore":
                    needed = hsm.restore_check(st["hsm"])
                elif action == "archive":
                    if uid != 0:
                        raise RpcError(errno.EPERM, "only root may archive")
                    if archive_id and st["hsm"] & hsm.EXISTS and st["archive_id"] not in (
                            0, archive_id):
                        raise RpcError(errno.EPERM, "archived under another archive id")
                    needed = hsm.archive_check(st["hsm"])
                elif action == "remove":
                    if uid != 0:
                        raise RpcError(errno.EPERM, "only root may remove archive copies")
                    needed = hsm.remove_check(st["hsm"])
                else:
                    raise RpcError(errno.EINVAL, f"unknown HSM action '{action}'")
            except hsm.HsmError as e:
                raise RpcError(e.errno, str(e)) from None
            if needed:
                todo.append(ino)
        t = time.time()
        queued = 0
        with self.ns.tx() as db:
            for ino in todo:
                if db.execute("SELECT 1 FROM hsm_requests WHERE ino=? AND action=? AND state IN "
                              "('WAITING','STARTED')", (ino, action.upper())).fetchone():
                    continue  # merged with the active one
                db.execute("INSERT INTO hsm_requests(ino, action, state, archive_id, created, "
                           "updated) VALUES (?,?,'WAITING',?,?,?)",
                           (ino, action.upper(), archive_id or hsm.DEFAULT_ARCHIVE_ID, t, t))
                queued += 1
        with self.wake:
            self.wake.notify_all()
        return {"queued": queued}

    def cancel(self, inos: list[int]) -> int:
        n = 0
        with self.ns.tx() as db:
            for ino in inos:
                for (rid, state) in db.execute(
                        "SELECT id, state FROM hsm_requests WHERE ino=? AND state IN "
                        "('WAITING','STARTED')", (ino,)).fetchall():
                    self.canceled.add(rid)
                    if state == "WAITING":
                        db.execute("UPDATE hsm_requests SET state='CANCELED', updated=? "
                                   "WHERE id=?", (time.time(), rid))
                    n += 1
        return n

    def current_action(self, ino: int, st: dict) -> dict:
        row = self.ns.db.execute(
            "SELECT id, action, state FROM hsm_requests WHERE ino=? AND state IN "
            "('WAITING','STARTED') ORDER BY id LIMIT 1", (ino,)).fetchone()
        if row is None:
            return {"action": "NOOP"}
        rid, action, state = row
        if state == "WAITING":
            return {"action": action, "state": "waiting", "offset": 0, "length": -1}
        moved = self.running.get(rid, 0)
        if action == "RESTORE" and st.get("layout"):
            lay = Layout.from_dict(st["layout"])
            moved = sum(lay.chunk_length(s, st["size"]) for s in range(lay.chunk_count(st["size"]))
                        if bitmap_has(st["present"], s))
        return {"action": action, "state": "running", "bytes": moved}

    def list(self, include_done: bool = False) -> list[dict]:
        q = "SELECT id, ino, action, state, bytes, error, created, updated FROM hsm_requests"
        if not include_done:
            q += " WHERE state IN ('WAITING','STARTED')"
        rows = self.ns.db.execute(q + " ORDER BY id").fetchall()
        out = []
        for rid, ino, action, state, moved, err, created, updated in rows:
            out.append({"id": rid, "ino": ino, "action": action, "state": state,
                        "bytes": self.running.get(rid, moved), "error": err,
                        "created": created, "updated": updated})
        return out

    def recover(self):
        with self.ns.tx() as db:
            n = db.execute("UPDATE hsm_requests SET state='WAITING' WHERE state='STARTED'").rowcount
        if n:
            log.info("re-queued %d interrupted HSM requests", n)
        with self.wake:
            self.wake.notify_all()

    def stop(self):
        self._stop.set()
        with self.wake:
            self.wake.notify_all()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- workers -----------------------------------------------------------

    def _claim(self):
        with self._claim_lock, self.ns.tx() as db:
            row = db.execute("SELECT id, ino, action FROM hsm_requests WHERE state='WAITING' "
                             "ORDER BY id LIMIT 1").fetchone()
            if row:
                db.execute("UPDATE hsm_requests SET state='STARTED', updated=? WHERE id=?",
                           (time.time(), row[0]))
            return row

    def _finish(self, rid: int, state: str, error: str = "", moved: int = 0):
        now = time.time()
        with self.ns.tx() as db:
            db.execute("UPDATE hsm_requests SET state=?, error=?, bytes=?, updated=? WHERE id=?",
                       (state, error, moved, now, rid))
            # finished requests are kept for an hour for `lustrefuse hsm list --all`; the
            # sweep scans the table, so once a minute, not once a request
            if now - self.swept > 60:
                self.swept = now
                db.execute("DELETE FROM hsm_requests WHERE state NOT IN ('WAITING','STARTED') "
                           "AND updated < ?", (now - 3600,))
        self.running.pop(rid, None)
        self.canceled.discard(rid)

    def _worker(self):
        while not self._stop.is_set():
            try:
                job = self._claim()
            except Exception:
                log.exception("coordinator cannot read its queue")
                job = None
            if job is None:
                with self.wake:
                    self.wake.wait(timeout=1.0)
                continue
            rid, ino, action = job
            self.running[rid] = 0
            try:
                if action == "RESTORE":
                    moved = self._restore(rid, ino)
                    self.counters["restores_done"] += 1
                elif action == "ARCHIVE":
                    moved = self._archive(rid, ino)
                    self.counters["archives_done"] += 1
                elif action == "REMOVE":
                    moved = self._remove(ino)
                else:
                    raise RpcError(errno.EINVAL, action)
                state = "CANCELED" if rid in self.canceled else "SUCCEED"
                self._finish(rid, state, moved=moved)
            except Exception as e:
                if self._stop.is_set():  # shutting down: recover() re-queues it next time
                    log.info("HSM %s of inode %d interrupted by shutdown", action, ino)
                    continue
                self.counters["requests_failed"] += 1
                log.error("HSM %s of inode %d failed: %s", action, ino, e)
                self._finish(rid, "FAILED", str(e))

    def ost_call(self, idx: int, op: str, **args):
        """Call an OST, waiting out a restart (after an MDS restart the OSTs may still be
        coming back): connection failures are retried for up to OST_WAIT seconds."""
        deadline = time.monotonic() + OST_WAIT
        while True:
            try:
                return self.mds.ost(idx).call(op, **args)
            except (ConnectionError, FileNotFoundError) as e:
                err = e
            except RpcError as e:
                if e.errno != errno.EAGAIN and "has not registered" not in str(e):
                    raise  # the OST answered: its error stands
                err = e
            if time.monotonic() > deadline or self._stop.is_set():
                raise RpcError(errno.EIO, f"OST {idx} unreachable: {err}")
            time.sleep(0.5)

    def _desc(self, ino: int, st: dict) -> dict:
        return {"ino": ino, "layout": st["layout"], "s3_key": st["s3_key"],
                "etag": st["etag"], "s3_size": st["s3_size"] or 0, "size": st["size"]}

    def _restore(self, rid: int, ino: int) -> int:
        st = self.ns.file_state(ino)
        if not st["hsm"] & hsm.RELEASED:
            return 0
        lay = Layout.from_dict(st["layout"])
        desc = self._desc(ino, st)
        missing = [s for s in range(lay.chunk_count(st["size"])) if not bitmap_has(st["present"], s)]
        # Stripe rows in one GET each, the fetcher rotating over the layout's OSTs; then
        # whatever did not land (an OST that refused a handed-over chunk) by its own OST.
        by_fetcher: dict[int, list[int]] = {}
        for run in lay.get_runs(missing, GET_SPAN):
            by_fetcher.setdefault(lay.fetcher_of_run(run, GET_SPAN), []).extend(run)
        landed = self._hydrate_all(ino, desc, by_fetcher)
        left: dict[int, list[int]] = {}
        for s in missing:
            if s not in landed:
                left.setdefault(lay.ost_of_chunk(s), []).append(s)
        if left:
            self._hydrate_all(ino, desc, left, raise_errors=True)
        return st["size"]

    def _hydrate_all(self, ino: int, desc: dict, by_ost: dict[int, list[int]],
                     raise_errors: bool = False) -> set[int]:
        """Ask each OST for its list of chunks, in parallel; returns the chunks that landed."""
        errors, landed = [], set()

        def one(idx, chunks):
            try:
                got = [int(s) for s in self.ost_call(idx, "hydrate", desc=desc, chunks=chunks)]
                self.ns.mark_present(ino, got)
                landed.update(got)
            except (OSError, RpcError) as e:
                errors.append(f"OST {idx}: {e}")

        if len(by_ost) == 1:  # most files: no thread to start
            one(*next(iter(by_ost.items())))
        else:
            threads = [threading.Thread(target=one, args=item) for item in by_ost.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors and raise_errors:  # an OST that found the object changed marked it lost
            raise RpcError(errno.EIO, "; ".join(errors))
        if errors:
            log.info("restore of inode %d: %s; those chunks are asked of their own OSTs", ino,
                     "; ".join(errors))
        return landed

    def read_file(self, ino: int, st: dict):
        """Yield a file's bytes in parts of PART_SIZE, hydrating what is not local."""
        lay = Layout.from_dict(st["layout"])
        size = st["size"]
        desc = self._desc(ino, st)
        buf = bytearray()
        for s in range(lay.chunk_count(size)):
            idx = lay.ost_of_chunk(s)
            if desc["s3_key"] and not bitmap_has(st["present"], s):
                self.ost_call(idx, "hydrate", desc=desc, chunks=[s])
            want = lay.chunk_length(s, size)
            data = self.ost_call(idx, "read", ino=ino, offset=lay.chunk_object_offset(s),
                                 length=want)
            if len(data) < want:  # holes at an object's end read short
                data += bytes(want - len(data))
            buf += data
            while len(buf) >= PART_SIZE:
                yield bytes(buf[:PART_SIZE])
                del buf[:PART_SIZE]
        yield bytes(buf)

    def _archive(self, rid: int, ino: int) -> int:
        st = self.ns.file_state(ino)
        if self.mds.repo is None:
            raise RpcError(errno.EINVAL, "no S3 repository is linked")
        version = st["data_version"]
        key = st["s3_key"]
        if not key:
            key = keys.key_for(self.ns.path_of(ino).split(b"/"), self.mds.prefix)
        meta = keys.format_metadata(st["mode"], st["uid"], st["gid"], st["atime_ns"],
                                    st["mtime_ns"])
        moved = 0

        def parts():
            nonlocal moved
            for part in self.read_file(ino, st):
                if rid in self.canceled:
                    raise RpcError(errno.ECANCELED, "archive canceled")
                moved += len(part)
                self.running[rid] = moved
                yield part

        flags, _aid = self.ns.hsm_state(ino)
        self.ns.set_hsm(ino, flags | hsm.EXISTS)
        etag = self.mds.repo.upload_parts(key, parts(), meta)
        if not self.ns.set_archived(ino, key, etag, st["size"], version):
            log.info("inode %d changed while being archived; it stays dirty", ino)
        return moved

    def _remove(self, ino: int) -> int:
        st = self.ns.file_state(ino)
        if st["s3_key"] and self.mds.repo is not None:
            self.mds.repo.delete_object(st["s3_key"])
        self.ns.set_hsm(ino, hsm.after_remove(st["hsm"]))
        return 0
