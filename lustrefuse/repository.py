"""FSx data-repository behaviour: auto-export policy and import/export/release tasks.

Exports follow FSx's object conventions: a file is an object at its path
under the linked prefix with the POSIX metadata headers, a directory is a
``key/`` marker, a symlink is an object whose body is its target. A rename
of an exported file is a server-side copy to the new key plus (with the
``deleted`` policy) a delete of the old one. Tasks run in the MDS, have ids
and states, can be listed and cancelled, and write FSx's CSV report
(``FilePath,FileStatus,ErrorCode``) for the files that failed.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import stat
import threading
import time

from . import hsm, keys
from .namespace import ROOT
from .protocol import RpcError
from .s3 import S3Error

log = logging.getLogger(__name__)

POLICY_EVENTS = ("new", "changed", "deleted")
TASK_TYPES = ("import", "export", "release")
TASK_STATES = ("PENDING", "EXECUTING", "SUCCEEDED", "FAILED", "CANCELED", "CANCELING")


def parse_policy(text: str | None) -> frozenset:
    if not text or text.lower() == "none":
        return frozenset()
    events = {e.strip().lower() for e in text.split(",") if e.strip()}
    bad = events - set(POLICY_EVENTS)
    if bad:
        raise ValueError(f"unknown policy event(s) {sorted(bad)}; use new,changed,deleted")
    return frozenset(events)


class DataRepository:
    """Export hooks and tasks for one MDS."""

    def __init__(self, mds):
        self.mds = mds
        self.ns = mds.ns
        self.export_policy = parse_policy(mds.config.get("auto_export"))
        self.tasks: dict[int, dict] = {}
        self._ids = iter(range(1, 1 << 62))
        self.lock = threading.Lock()
        self.reports = os.path.join(mds.data_dir, "reports")

    @property
    def repo(self):
        return self.mds.repo

    def key_of(self, ino: int, is_dir: bool = False) -> str:
        return keys.key_for(self.ns.path_of(ino).split(b"/"), self.mds.prefix, is_dir)

    # -- export of one inode -------------------------------------------------

    def export_inode(self, ino: int) -> str | None:
        """Export a directory or symlink now; queue an archive for a file.

        Returns None on success or no-op, else an FSx error code.
        """
        st = self.ns.file_state(ino)
        mode = st["mode"]
        if ino == ROOT:
            return None
        path_key = self.key_of(ino, stat.S_ISDIR(mode))
        if len(path_key.encode()) > keys.KEY_MAX:
            return keys.PATH_TOO_LONG
        meta = keys.format_metadata(mode, st["uid"], st["gid"], st["atime_ns"], st["mtime_ns"])
        try:
            if stat.S_ISDIR(mode):
                self.ns.set_exported(ino, path_key, self.repo.put_object(path_key, b"", meta))
            elif stat.S_ISLNK(mode):
                etag = self.repo.put_object(path_key, self.ns.readlink(ino), meta)
                self.ns.set_exported(ino, path_key, etag)
            elif stat.S_ISREG(mode):
                if st["hsm"] & hsm.NOARCHIVE:
                    return None
                self.mds.coordinator.request("archive", [ino], 0)
        except S3Error as e:
            log.error("export of %s failed: %s", path_key, e)
            return e.code if e.code.startswith("S3") else "S3Error"
        except RpcError as e:
            return "ResourceBusy" if e.errno == errno.EBUSY else "InternalError"
        return None

    # -- auto-export hooks -------------------------------------------------

    def _async(self, fn, *args):
        if self.export_policy and self.repo is not None:
            self.mds.bg.submit(self._guarded, fn, *args)

    def _guarded(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:
            log.error("auto-export %s%s failed: %s", fn.__name__, args, e)

    def on_closed_after_write(self, ino: int):
        st = self.ns.file_state(ino)
        event = "changed" if st["hsm"] & hsm.EXISTS else "new"
        if event in self.export_policy:
            self._async(self.export_inode, ino)

    def on_created(self, ino: int):
        """mkdir and symlink are complete when they return: export them then."""
        if "new" in self.export_policy:
            self._async(self.export_inode, ino)

    def on_metadata_changed(self, ino: int):
        if "changed" not in self.export_policy:
            return
        st = self.ns.file_state(ino)
        if stat.S_ISREG(st["mode"]):
            if st["hsm"] & hsm.ARCHIVED and not st["hsm"] & hsm.DIRTY and st["s3_key"]:
                self._async(self._refresh_metadata, ino)
        else:
            self._async(self.export_inode, ino)

    def _refresh_metadata(self, ino: int):
        st = self.ns.file_state(ino)
        meta = keys.format_metadata(st["mode"], st["uid"], st["gid"], st["atime_ns"],
                                    st["mtime_ns"])
        etag = self.repo.copy_object(st["s3_key"], st["s3_key"], meta)
        self.ns.set_archived(ino, st["s3_key"], etag, st["s3_size"] or st["size"],
                             st["data_version"])

    def on_removed(self, key: str | None):
        if key and "deleted" in self.export_policy:
            self._async(self.repo.delete_object, key)

    def on_renamed(self, ino: int, old_key: str):
        """Rename = copy to the new key + delete of the old one (FSx), for the whole subtree."""
        if not ("new" in self.export_policy or "changed" in self.export_policy):
            return
        self._async(self._move_tree, ino, old_key)

    def _move_tree(self, ino: int, old_key: str):
        st = self.ns.file_state(ino)
        mode = st["mode"]
        if stat.S_ISDIR(mode):
            self.export_inode(ino)
            if "deleted" in self.export_policy:
                self.repo.delete_object(old_key if old_key.endswith("/") else old_key + "/")
            children = self.ns.db.execute("SELECT ino, name FROM dentries WHERE parent=?",
                                          (ino,)).fetchall()
            base = old_key.rstrip("/") + "/"
            for child, name in children:
                self._move_tree(child, base + name.decode("utf-8", "surrogateescape"))
            return
        new_key = self.key_of(ino)
        if stat.S_ISREG(mode) and st["s3_key"] and st["hsm"] & hsm.ARCHIVED \
                and not st["hsm"] & hsm.DIRTY:
            meta = keys.format_metadata(mode, st["uid"], st["gid"], st["atime_ns"],
                                        st["mtime_ns"])
            etag = self.repo.copy_object(st["s3_key"], new_key, meta)
            self.ns.set_archived(ino, new_key, etag, st["s3_size"] or st["size"],
                                 st["data_version"])
        else:
            with self.ns.tx() as db:  # the next archive goes to the new path
                db.execute("UPDATE inodes SET s3_key=NULL WHERE ino=? AND (hsm & ?)=0",
                           (ino, hsm.RELEASED))
            self.export_inode(ino)
        if "deleted" in self.export_policy and old_key != new_key:
            self.repo.delete_object(old_key)

    # -- tasks ---------------------------------------------------------------

    def start_task(self, kind: str, paths: list[str], older_than_days: float | None) -> dict:
        if kind not in TASK_TYPES:
            raise RpcError(errno.EINVAL, f"unknown task type '{kind}'")
        if self.repo is None:
            raise RpcError(errno.EINVAL, "no S3 repository is linked")
        if len(paths) > 32:
            raise RpcError(errno.EINVAL, "a task takes at most 32 paths")
        roots = []
        for p in paths or [""]:
            parts = [x.encode("utf-8", "surrogateescape") for x in p.strip("/").split("/") if x]
            ino = self.ns.resolve(parts)
            if ino is None:
                raise RpcError(errno.ENOENT, f"path '{p}' does not exist")
            roots.append(ino)
        tid = next(self._ids)
        task = {"id": tid, "type": kind, "paths": paths, "state": "PENDING",
                "total": 0, "succeeded": 0, "failed": 0, "released_bytes": 0,
                "created": time.time(), "updated": time.time(), "report": None, "error": "",
                "older_than_days": older_than_days}
        with self.lock:
            self.tasks[tid] = task
        threading.Thread(target=self._run_task, args=(task, roots), name=f"task-{tid}",
                         daemon=True).start()
        return dict(task)

    def cancel_task(self, tid: int) -> dict:
        with self.lock:
            task = self.tasks.get(tid)
            if task is None:
                raise RpcError(errno.ENOENT, f"no task {tid}")
            if task["state"] in ("PENDING", "EXECUTING"):
                task["state"] = "CANCELING"
            return dict(task)

    def list_tasks(self) -> list[dict]:
        with self.lock:
            return [dict(t) for t in self.tasks.values()]

    def _walk(self, ino: int):
        """Every inode under ``ino`` (itself included), depth first, without recursion."""
        stack = [ino]
        while stack:
            cur = stack.pop()
            yield cur
            stack.extend(r[0] for r in self.ns.db.execute(
                "SELECT ino FROM dentries WHERE parent=? ORDER BY id DESC", (cur,)))

    def _run_task(self, task: dict, roots: list[int]):
        task["state"] = "EXECUTING"
        failures: list[tuple[str, str, str]] = []
        final = "FAILED"  # unless the work below says otherwise
        try:
            if task["type"] == "import":
                self._import_task(task, failures)
            else:
                for root in roots:
                    for ino in self._walk(root):
                        if task["state"] == "CANCELING":
                            break
                        code = (self._export_one(ino) if task["type"] == "export"
                                else self._release_one(task, ino))
                        if code is False:
                            continue  # not part of this task
                        task["total"] += 1
                        if code:
                            task["failed"] += 1
                            failures.append((self._path(ino), "failed", code))
                        else:
                            task["succeeded"] += 1
                        task["updated"] = time.time()
                if task["type"] == "export":
                    self._wait_archives(task)
            final = "CANCELED" if task["state"] == "CANCELING" else (
                "FAILED" if task["failed"] and not task["succeeded"] else "SUCCEEDED")
        except Exception as e:
            log.exception("task %d failed", task["id"])
            final, task["error"] = "FAILED", str(e)
        finally:
            # the report first: whoever waits for a final state reads the report's path next
            try:
                task["report"] = self._write_report(task, failures)
            except OSError as e:
                log.error("task %d: cannot write its report: %s", task["id"], e)
                final, task["error"] = "FAILED", f"cannot write the report: {e}"
            task["updated"] = time.time()
            task["state"] = final
            log.info("task %d (%s) %s: %d succeeded, %d failed", task["id"], task["type"],
                     task["state"], task["succeeded"], task["failed"])

    def _path(self, ino: int) -> str:
        try:
            return self.ns.path_of(ino).decode("utf-8", "surrogateescape")
        except RpcError:
            return f"<inode {ino}>"

    def _export_one(self, ino: int):
        st = self.ns.file_state(ino)
        if ino == ROOT:
            return False
        if stat.S_ISREG(st["mode"]):
            flags = st["hsm"]
            if flags & hsm.ARCHIVED and not flags & hsm.DIRTY or flags & hsm.NOARCHIVE:
                return False  # only what changed since the last export
        elif stat.S_ISDIR(st["mode"]) or stat.S_ISLNK(st["mode"]):
            if st["s3_key"] == self.key_of(ino, stat.S_ISDIR(st["mode"])):
                return False  # exported (or imported) at this path already
        else:
            return False
        return self.export_inode(ino)

    def _wait_archives(self, task: dict, timeout: float = 3600):
        """An export task ends when the archives it queued have ended."""
        deadline = time.time() + timeout
        while time.time() < deadline and task["state"] != "CANCELING":
            row = self.ns.db.execute("SELECT count(*) FROM hsm_requests WHERE action='ARCHIVE' "
                                     "AND state IN ('WAITING','STARTED')").fetchone()
            if not row[0]:
                break
            time.sleep(0.1)
        for ino, err in self.ns.db.execute(
                "SELECT ino, error FROM hsm_requests WHERE action='ARCHIVE' AND state='FAILED' "
                "AND created >= ?", (task["created"],)).fetchall():
            task["failed"] += 1
            task["succeeded"] = max(0, task["succeeded"] - 1)
            log.warning("export of inode %d failed: %s", ino, err)

    def _release_one(self, task: dict, ino: int):
        st = self.ns.file_state(ino)
        if not stat.S_ISREG(st["mode"]):
            return False
        flags = st["hsm"]
        if not flags & hsm.ARCHIVED or flags & (hsm.DIRTY | hsm.RELEASED | hsm.NORELEASE
                                                | hsm.LOST):
            return False  # only exported, resident files are released
        days = task["older_than_days"] or 0
        last = max(st["atime_ns"], st["ctime_ns"], st["mtime_ns"]) / 1e9
        if days and last > task["created"] - days * 86400:
            return False
        try:
            task["released_bytes"] += self.mds.release(ino, wait_open=0)
        except RpcError as e:
            return "ResourceBusy" if e.errno == errno.EBUSY else "InternalError"
        return None

    def _import_task(self, task: dict, failures: list):
        from .importer import Importer

        imp = Importer(self.ns, self.repo, self.mds.prefix,
                       self.mds.config["imported_file_chunk_size"],
                       self.mds.config["stripe_size"], True, self.mds.on_object_changed,
                       drop_data=self.mds.drop_data)
        st = imp.run(deletions=True)
        task["total"] = st.listed
        task["succeeded"] = st.new + st.changed + st.unchanged
        task["failed"] = st.skipped
        task["new"], task["changed"], task["deleted"] = st.new, st.changed, st.deleted
        for key, code in st.failures:
            failures.append((key, "failed", code))
        if st.state == "failed":
            raise RuntimeError(st.error)

    def _write_report(self, task: dict, failures: list) -> str:
        """FSx's REPORT_CSV_20191124, scope FAILED_FILES_ONLY."""
        os.makedirs(self.reports, exist_ok=True)
        name = "report.csv" if task["type"] == "import" else "failures.csv"
        path = os.path.join(self.reports, f"task-{task['id']}-{name}")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["FilePath", "FileStatus", "ErrorCode"])
            w.writerows(failures)
        return path
