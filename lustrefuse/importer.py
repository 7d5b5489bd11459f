"""Import a bucket listing as inode stubs: metadata only, never object data.

Runs inside the MDS. Pages of 1,000 keys are listed, POSIX metadata is read
with parallel HEADs (unless disabled), and each page is committed in one
transaction together with the resume cursor, so a killed import continues
where it stopped. A second import applies FSx's rules: new objects appear,
changed ones (ETag or size) become released stubs of the new version, deleted
ones disappear unless they hold local changes.
"""

from __future__ import annotations

import json
import logging
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import hsm, keys
from .layout import Layout, fsx_stripe_count
from .namespace import ROOT, Namespace, now_ns
from .s3 import Repository, S3Error

log = logging.getLogger(__name__)

HEAD_THREADS = 32


@dataclass
class ImportStatus:
    state: str = "idle"  # idle, running, done, failed, canceled
    listed: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0
    started: float = 0.0
    finished: float = 0.0
    error: str = ""
    failures: list = field(default_factory=list)  # (path, code) for the report, bounded

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["failures"] = self.failures[:1000]
        d["elapsed"] = (self.finished or time.time()) - self.started if self.started else 0.0
        return d


def _ns_of(dt) -> int:
    return int(dt.timestamp() * 1e9)


class Importer:
    def __init__(self, ns: Namespace, repo: Repository, prefix: str, chunk_size: int,
                 stripe_size: int, posix_metadata: bool = True, on_changed=None,
                 events: frozenset = frozenset({"new", "changed", "deleted"}), drop_data=None):
        self.ns = ns
        self.repo = repo
        self.prefix = prefix
        self.chunk_size = chunk_size
        self.stripe_size = stripe_size
        self.posix_metadata = posix_metadata
        self.on_changed = on_changed  # callback(ino) when an object's data changed in S3
        self.events = events  # which FSx import events apply (auto-import policy)
        # drop_data(ino) empties a file's stripes on the OSTs, synchronously: called before
        # a changed object's new ETag is committed, so no reader mixes two versions
        self.drop_data = drop_data
        self.status = ImportStatus()
        self._cancel = threading.Event()
        self._dirs: dict[tuple, int] = {(): ROOT}
        self._rr = 0

    def cancel(self):
        self._cancel.set()

    def run(self, deletions: bool = True) -> ImportStatus:
        st = self.status
        st.state, st.started = "running", time.time()
        try:
            gen = self.ns.meta_get("import_gen", 0)
            cursor = self.ns.meta_get("import_cursor")
            if cursor is None:  # a fresh sweep
                gen += 1
                self.ns.meta_set("import_gen", gen)
                cursor = ""
            else:
                log.info("resuming the import after key %r", cursor)
            with ThreadPoolExecutor(HEAD_THREADS, thread_name_prefix="head") as pool:
                for page in self.repo.list_pages(self.prefix, start_after=cursor):
                    if self._cancel.is_set():
                        st.state = "canceled"
                        return st
                    st.listed += len(page)
                    heads = self._heads(pool, page)
                    self._commit_page(page, heads, gen)
            if deletions and "deleted" in self.events:
                self._sweep_deleted(gen)
            self.ns.meta_set("import_cursor", None)
            with self.ns.tx() as db:
                db.execute("DELETE FROM meta WHERE key='import_cursor'")
            self.ns.meta_set("last_import", time.time())
            st.state = "done"
        except S3Error as e:
            st.state, st.error = "failed", str(e)
            log.error("import failed: %s", e)
        except Exception as e:
            st.state, st.error = "failed", f"{type(e).__name__}: {e}"
            log.exception("import failed")
        finally:
            st.finished = time.time()
            log.info("import %s: %d listed, %d new, %d changed, %d deleted, %d skipped",
                     st.state, st.listed, st.new, st.changed, st.deleted, st.skipped)
        return st

    def _heads(self, pool, page) -> dict:
        if not self.posix_metadata:
            return {}

        def head(key):
            try:
                return key, self.repo.head(key).get("Metadata", {})
            except S3Error as e:
                log.warning("HEAD %s failed (%s); default POSIX metadata used", key, e)
                return key, {}

        return dict(pool.map(head, [o["Key"] for o in page]))

    def _skip(self, key: str, code: str, why: str):
        self.status.skipped += 1
        if len(self.status.failures) < 100_000:
            self.status.failures.append((key, code))
        log.warning("skipped key %r: %s (%s)", key, why, code)

    def _ensure_dir(self, db, parts: tuple, meta: keys.PosixMeta | None, t: int,
                    gen: int) -> int | None:
        """The inode of directory ``parts``, creating missing ones; None on a type clash."""
        ino = self._dirs.get(parts)
        if ino is not None:
            if meta is not None:
                self._apply_dir_meta(db, ino, meta, gen)
            return ino
        parent = self._ensure_dir(db, parts[:-1], None, t, gen)
        if parent is None:
            return None
        row = db.execute("SELECT d.ino, i.mode FROM dentries d JOIN inodes i ON i.ino=d.ino "
                         "WHERE d.parent=? AND d.name=?", (parent, parts[-1])).fetchone()
        if row:
            if not stat.S_ISDIR(row[1]):
                return None
            ino = row[0]
            if meta is not None:
                self._apply_dir_meta(db, ino, meta, gen)
        else:
            m = meta or keys.PosixMeta()
            mode = stat.S_IFDIR | (m.mode & 0o7777 if m.mode is not None else 0o755)
            mt = m.mtime_ns or t
            cur = db.execute(
                "INSERT INTO inodes(mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns, "
                "import_gen, dir_spec) VALUES (?,?,?,?,?,?,?,?,(SELECT dir_spec FROM inodes "
                "WHERE ino=?))",
                (mode, m.uid or 0, m.gid or 0, 2, m.atime_ns or mt, mt, t,
                 gen if meta is not None else 0, parent))
            ino = cur.lastrowid
            db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?,?,?)",
                       (parent, parts[-1], ino))
            db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (parent,))
        self._dirs[parts] = ino
        return ino

    def _apply_dir_meta(self, db, ino: int, m: keys.PosixMeta, gen: int):
        sets = {"import_gen": gen}
        if m.mode is not None:
            sets["mode"] = stat.S_IFDIR | (m.mode & 0o7777)
        for k in ("uid", "gid", "atime_ns", "mtime_ns"):
            if getattr(m, k) is not None:
                sets[k] = getattr(m, k)
        db.execute(f"UPDATE inodes SET {', '.join(k + '=?' for k in sets)} WHERE ino=?",
                   (*sets.values(), ino))

    def _layout_for(self, size: int) -> Layout:
        osts = self.ns.ost_count
        count = fsx_stripe_count(size, self.chunk_size, osts)
        first = self._rr % osts
        self._rr += count
        return Layout(self.stripe_size, tuple((first + i) % osts for i in range(count)))

    def _commit_page(self, page, heads: dict, gen: int):
        st = self.status
        t = now_ns()
        changed = []
        with self.ns.tx() as db:
            for obj in page:
                key = obj["Key"]
                try:
                    mk = keys.map_key(key, self.prefix)
                except keys.KeyError_ as e:
                    self._skip(key, e.code, str(e))
                    continue
                if mk is None:
                    continue
                meta = keys.parse_metadata(heads.get(key, {}))
                if mk.is_dir:
                    ino = self._ensure_dir(db, mk.parts, meta, t, gen)
                    if ino is None:
                        self._skip(key, keys.TYPE_MISMATCH, "a file has this directory's name")
                    else:  # the marker stands for this directory (deleting it removes an empty one)
                        db.execute("UPDATE inodes SET s3_key=?, etag=?, import_gen=? WHERE ino=?",
                                   (key, obj.get("ETag"), gen, ino))
                    continue
                parent = self._ensure_dir(db, mk.parts[:-1], None, t, gen)
                if parent is None:
                    self._skip(key, keys.TYPE_MISMATCH, "a parent path is a file")
                    continue
                try:
                    outcome = self._upsert_file(db, parent, mk.parts[-1], key, obj, meta, t, gen)
                except (keys.KeyError_, S3Error) as e:
                    self._skip(key, getattr(e, "code", "S3Error"), str(e))
                    continue
                if outcome is None:
                    self._skip(key, keys.TYPE_MISMATCH, "a directory has this file's name")
                elif outcome == "new":
                    st.new += 1
                elif outcome == "unchanged":
                    st.unchanged += 1
                else:
                    st.changed += 1
                    changed.append(outcome)
            if page:
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('import_cursor', ?)",
                           (json.dumps(page[-1]["Key"]),))
        for ino in changed:
            if self.on_changed:
                self.on_changed(ino)

    def _upsert_file(self, db, parent: int, name: bytes, key: str, obj: dict,
                     meta: keys.PosixMeta, t: int, gen: int):
        size = int(obj["Size"])
        etag = obj.get("ETag")
        mtime = meta.mtime_ns or _ns_of(obj["LastModified"])
        mode = stat.S_IFREG | (meta.mode & 0o7777 if meta.mode is not None else 0o755)
        row = db.execute("SELECT d.ino, i.mode, i.etag, i.s3_size, i.hsm FROM dentries d "
                         "JOIN inodes i ON i.ino=d.ino WHERE d.parent=? AND d.name=?",
                         (parent, name)).fetchone()
        if row is None:
            # a file renamed in the mount still owns its object (archives follow the FID)
            row = db.execute("SELECT ino, mode, etag, s3_size, hsm FROM inodes WHERE s3_key=? "
                             "AND nlink>0 LIMIT 1", (key,)).fetchone()
        if row is None:
            if "new" not in self.events:
                return "unchanged"
            if meta.is_symlink:
                return self._new_symlink(db, parent, name, key, etag, meta, mtime, t, gen)
            lay = self._layout_for(size)
            cur = db.execute(
                "INSERT INTO inodes(mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, "
                "hsm, archive_id, layout, s3_key, etag, s3_size, import_gen) "
                "VALUES (?,?,?,1,?,?,?,?,?,?,?,?,?,?,?)",
                (mode, meta.uid or 0, meta.gid or 0, size, meta.atime_ns or mtime, mtime, t,
                 hsm.IMPORTED, hsm.DEFAULT_ARCHIVE_ID, json.dumps(lay.to_dict()), key, etag,
                 size, gen))
            db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?,?,?)",
                       (parent, name, cur.lastrowid))
            return "new"
        ino, old_mode, old_etag, old_size, flags = row
        if stat.S_ISLNK(old_mode) and old_etag == etag:
            db.execute("UPDATE inodes SET import_gen=? WHERE ino=?", (gen, ino))
            return "unchanged"  # a symlink we exported
        if not stat.S_ISREG(old_mode):
            return None
        if old_etag == etag and old_size == size or "changed" not in self.events:
            db.execute("UPDATE inodes SET import_gen=? WHERE ino=?", (gen, ino))
            return "unchanged"
        if flags & hsm.EXISTS and not old_etag:
            return "unchanged"  # our own export in flight: not a change made in S3
        # S3 wins conflicts (FSx): the local copy becomes a released stub of the new object.
        if self.drop_data:
            self.drop_data(ino)
        lay = self._layout_for(size)
        sets = {"size": size, "etag": etag, "s3_size": size, "s3_key": key, "import_gen": gen,
                "hsm": hsm.IMPORTED | (flags & (hsm.NORELEASE | hsm.NOARCHIVE)),
                "present": None, "mtime_ns": mtime, "ctime_ns": t,
                "layout": json.dumps(lay.to_dict())}
        if meta.mode is not None:
            sets["mode"] = mode
        for k in ("uid", "gid"):
            if getattr(meta, k) is not None:
                sets[k] = getattr(meta, k)
        db.execute(f"UPDATE inodes SET {', '.join(k + '=?' for k in sets)}, "
                   "data_version=data_version+1 WHERE ino=?", (*sets.values(), ino))
        return ino

    def _new_symlink(self, db, parent, name, key, etag, meta, mtime, t, gen) -> str:
        """FSx stores a symlink as an object whose body is the target (reference §4.7)."""
        target = self.repo.get_object(key)
        if not target or len(target) > 4096 or b"\0" in target:
            raise keys.KeyError_(keys.NOT_POSIX, "symlink object with an unusable target")
        cur = db.execute(
            "INSERT INTO inodes(mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, "
            "target, s3_key, etag, import_gen) VALUES (?,?,?,1,?,?,?,?,?,?,?,?)",
            (stat.S_IFLNK | 0o777, meta.uid or 0, meta.gid or 0, len(target),
             meta.atime_ns or mtime, mtime, t, target, key, etag, gen))
        db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?,?,?)",
                   (parent, name, cur.lastrowid))
        return "new"

    def _sweep_deleted(self, gen: int):
        """Objects gone from S3: remove clean imported files; empty dirs whose marker went."""
        like = self.prefix.replace("%", "\\%").replace("_", "\\_") + "%"
        for (ino,) in self.ns.db.execute(
                "SELECT ino FROM inodes WHERE s3_key IS NOT NULL AND import_gen<? AND "
                "(mode & 0xF000)=0x4000 AND s3_key LIKE ? ESCAPE '\\' ORDER BY ino DESC",
                (gen, like)).fetchall():
            with self.ns.tx() as db:
                if db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (ino,)).fetchone():
                    continue  # FSx deletes a directory only when it is empty
                row = db.execute("SELECT parent FROM dentries WHERE ino=?", (ino,)).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM dentries WHERE ino=?", (ino,))
                db.execute("DELETE FROM inodes WHERE ino=?", (ino,))
                db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (row[0],))
            self.status.deleted += 1
        gone = self.ns.db.execute(
            "SELECT ino FROM inodes WHERE s3_key IS NOT NULL AND import_gen<? AND "
            "(hsm & ?)=0 AND (mode & 0xF000)=0x8000 AND s3_key LIKE ? ESCAPE '\\'",
            (gen, hsm.DIRTY, like)).fetchall()
        for (ino,) in gone:
            with self.ns.tx() as db:
                for parent, name in db.execute("SELECT parent, name FROM dentries WHERE ino=?",
                                                (ino,)).fetchall():
                    db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
                db.execute("UPDATE inodes SET nlink=0 WHERE ino=?", (ino,))
            self.status.deleted += 1
            if self.on_changed:
                self.on_changed(ino)
