"""The MDS namespace: inodes, directory entries, layouts, HSM state, in SQLite (WAL).

Only the MDS process opens this database. Every public method is one
transaction under one lock, so a SIGKILL leaves either all or none of an
operation. Errors are raised as RpcError with the errno a local filesystem
would give.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import stat
import threading
import time

from . import hsm
from .layout import Layout, StripeSpec, make_layout
from .protocol import RpcError

ROOT = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a FID names one file forever
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL DEFAULT 0,
    gid INTEGER NOT NULL DEFAULT 0,
    nlink INTEGER NOT NULL DEFAULT 1,
    size INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    ctime_ns INTEGER NOT NULL DEFAULT 0,
    rdev INTEGER NOT NULL DEFAULT 0,
    target BLOB,                       -- symlink target
    hsm INTEGER NOT NULL DEFAULT 0,    -- Lustre HSM flag bits
    archive_id INTEGER NOT NULL DEFAULT 0,
    layout TEXT,                       -- JSON Layout (regular files)
    dir_spec TEXT,                     -- JSON StripeSpec default (directories)
    s3_key TEXT,                       -- the object this file was imported from / archived to
    etag TEXT,
    s3_size INTEGER,
    present BLOB,                      -- bitmap of hydrated/written stripe chunks
    data_version INTEGER NOT NULL DEFAULT 0,
    arch_version INTEGER NOT NULL DEFAULT 0,
    import_gen INTEGER NOT NULL DEFAULT 0  -- last import sweep that saw the object
);
CREATE TABLE IF NOT EXISTS dentries (
    id INTEGER PRIMARY KEY,            -- stable readdir cookie
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS dentries_ino ON dentries(ino);
-- readdir pages walk (parent, id) in order: without it each page of a directory read
-- and sorted every entry of the directory (a temp B-tree), quadratic in its size
CREATE INDEX IF NOT EXISTS dentries_parent_id ON dentries(parent, id);
CREATE INDEX IF NOT EXISTS inodes_key ON inodes(s3_key);
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS writers (ino INTEGER PRIMARY KEY);  -- open for write, for recovery
CREATE TABLE IF NOT EXISTS hsm_requests (
    id INTEGER PRIMARY KEY,
    ino INTEGER NOT NULL,
    action TEXT NOT NULL,              -- RESTORE / ARCHIVE / REMOVE
    state TEXT NOT NULL,               -- WAITING STARTED SUCCEED FAILED CANCELED
    archive_id INTEGER NOT NULL DEFAULT 1,
    bytes INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS hsm_requests_state ON hsm_requests(state, ino);
-- the coordinator's claim (oldest WAITING first) without sorting the whole queue
CREATE INDEX IF NOT EXISTS hsm_requests_claim ON hsm_requests(state, id);
"""

ATTR_COLS = "ino, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev, data_version, hsm"
READDIR_SQL = (f"SELECT d.id, d.name, {', '.join('i.' + c.strip() for c in ATTR_COLS.split(','))} "
               "FROM dentries d INDEXED BY dentries_parent_id JOIN inodes i ON i.ino = d.ino "
               "WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?")
# What clients may cache under a lease (see leases.py): a change of any of these, or a
# name of the inode removed or moved (a new name changes nlink), is noted in a TEMP
# table (this connection's only, not in the database file), with whether a name went,
# and reported to ``on_change`` when the transaction ends. Not by a Python function
# called from the trigger: SQLite would call it holding the connection's mutex, and
# another thread holding the GIL and waiting for that mutex deadlocks it.
WATCHED_COLS = ("mode", "uid", "gid", "nlink", "size", "atime_ns", "mtime_ns", "ctime_ns", "rdev",
                "target", "hsm", "archive_id", "layout", "s3_key", "etag", "s3_size",
                "data_version")
_NOTE = "INSERT OR IGNORE INTO lease_changes(ino) VALUES ({});"
_NOTE_NAME = ("INSERT INTO lease_changes(ino, names) VALUES ({}, 1) "
              "ON CONFLICT(ino) DO UPDATE SET names=1;")
WATCH_SQL = f"""
CREATE TEMP TABLE lease_changes (ino INTEGER PRIMARY KEY, names INTEGER NOT NULL DEFAULT 0);
CREATE TEMP TRIGGER watch_inode AFTER UPDATE ON inodes
WHEN {" OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in WATCHED_COLS)}
BEGIN {_NOTE.format("NEW.ino")} END;
CREATE TEMP TRIGGER watch_inode_gone AFTER DELETE ON inodes
BEGIN {_NOTE_NAME.format("OLD.ino")} END;
CREATE TEMP TRIGGER watch_name_gone AFTER DELETE ON dentries
BEGIN {_NOTE_NAME.format("OLD.ino")} END;
CREATE TEMP TRIGGER watch_name_moved AFTER UPDATE ON dentries
BEGIN {_NOTE_NAME.format("OLD.ino")} {_NOTE_NAME.format("NEW.ino")} END;
"""
IN_BATCH = 500  # inodes per "WHERE ino IN (...)" (SQLite caps bound parameters)


def now_ns() -> int:
    return time.time_ns()


def bitmap_set(bits: bytes | None, chunks, nchunks: int) -> bytes:
    b = bytearray(bits or b"")
    need = (nchunks + 7) // 8
    if len(b) < need:
        b.extend(b"\0" * (need - len(b)))
    for s in chunks:
        if 0 <= s < nchunks:
            b[s >> 3] |= 1 << (s & 7)
    return bytes(b)


def bitmap_count(bits: bytes | None, nchunks: int) -> int:
    if not bits:
        return 0
    full = nchunks >> 3
    n = sum(bin(x).count("1") for x in bits[:full])
    rem = nchunks & 7
    if rem and len(bits) > full:
        n += bin(bits[full] & ((1 << rem) - 1)).count("1")
    return n


def bitmap_has(bits: bytes | None, s: int) -> bool:
    return bool(bits) and (s >> 3) < len(bits) and bool(bits[s >> 3] & (1 << (s & 7)))


def attr_of(row) -> dict:
    ino, mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, dv, flags = row[:12]
    return {"ino": ino, "mode": mode, "uid": uid, "gid": gid, "nlink": nlink, "size": size,
            "atime_ns": atime, "mtime_ns": mtime, "ctime_ns": ctime, "rdev": rdev, "dv": dv,
            "hsm": flags}


def check_name(name: bytes):
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise RpcError(errno.EINVAL, "invalid name")
    if len(name) > 255:
        raise RpcError(errno.ENAMETOOLONG, "name too long")


class Namespace:
    def __init__(self, path: str, ost_count: int, default_stripe_size: int, on_change=None):
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-65536")
        self.db.executescript(SCHEMA)
        self.on_change = on_change
        if on_change is not None:
            self.db.executescript(WATCH_SQL)
        self.lock = threading.RLock()
        self.ost_count = ost_count
        self.default_stripe_size = default_stripe_size
        self._rr = 0  # round-robin cursor for new layouts
        with self.tx():
            if not self.db.execute("SELECT 1 FROM inodes WHERE ino=?", (ROOT,)).fetchone():
                t = now_ns()
                self.db.execute(
                    "INSERT INTO inodes(ino, mode, nlink, atime_ns, mtime_ns, ctime_ns) "
                    "VALUES (?,?,?,?,?,?)", (ROOT, stat.S_IFDIR | 0o755, 2, t, t, t))

    # -- plumbing ----------------------------------------------------------

    class _Tx:
        def __init__(self, ns):
            self.ns = ns

        def __enter__(self):
            self.ns.lock.acquire()
            self.ns.db.execute("BEGIN IMMEDIATE")
            return self.ns.db

        def __exit__(self, kind, value, tb):
            try:
                changed = []
                try:
                    changed = self.ns._take_changes()
                finally:
                    self.ns.db.execute("COMMIT" if kind is None else "ROLLBACK")
                # once the transaction is over, a rollback too: this connection is
                # shared, so another thread may have read what the rollback undid
                for ino, names in changed:
                    self.ns.on_change(ino, bool(names))
            finally:
                self.ns.lock.release()

    def _take_changes(self) -> list[tuple[int, int]]:
        """(inode, whether one of its names went) for each change of the transaction."""
        if self.on_change is None:
            return []
        rows = self.db.execute("SELECT ino, names FROM temp.lease_changes").fetchall()
        if rows:
            self.db.execute("DELETE FROM temp.lease_changes")
        return rows

    def tx(self):
        return Namespace._Tx(self)

    def meta_get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def meta_set(self, key: str, value):
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?,?)",
                       (key, json.dumps(value)))

    def _row(self, ino: int, cols: str = ATTR_COLS):
        row = self.db.execute(f"SELECT {cols} FROM inodes WHERE ino=?", (ino,)).fetchone()
        if row is None:
            raise RpcError(errno.ENOENT, f"no inode {ino}")
        return row

    def _child(self, parent: int, name: bytes):
        row = self.db.execute("SELECT ino FROM dentries WHERE parent=? AND name=?",
                              (parent, name)).fetchone()
        return row[0] if row else None

    def _dir(self, ino: int) -> int:
        (mode,) = self._row(ino, "mode")
        if not stat.S_ISDIR(mode):
            raise RpcError(errno.ENOTDIR, "not a directory")
        return mode

    def _touch_dir(self, db, ino: int, t: int):
        db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE ino=?", (t, t, ino))

    # -- lookups -----------------------------------------------------------

    def getattr(self, ino: int) -> dict:
        return attr_of(self._row(ino))

    def lookup(self, parent: int, name: bytes) -> dict:
        with self.lock:
            if name == b".":
                return self.getattr(parent)
            if name == b"..":
                row = self.db.execute("SELECT parent FROM dentries WHERE ino=? LIMIT 1",
                                      (parent,)).fetchone()
                return self.getattr(row[0] if row else ROOT)
            ino = self._child(parent, name)
            if ino is None:
                raise RpcError(errno.ENOENT, "no such entry")
            return self.getattr(ino)

    def readdir(self, ino: int, after: int, limit: int) -> list:
        """One page of a directory: (cookie, name, attributes) of up to ``limit`` entries
        whose cookie is above ``after`` (keyset pagination on the (parent, id) index: a
        page costs its own size, never the directory's)."""
        return [(r[0], r[1], attr_of(r[2:])) for r in self.readdir_rows(ino, after, limit)]

    def readdir_rows(self, ino: int, after: int, limit: int) -> list:
        """``readdir`` as flat rows: (cookie, name, *ATTR_COLS); a third of the bytes
        on the wire and no dict per entry."""
        with self.lock:
            self._dir(ino)
            return self.db.execute(READDIR_SQL, (ino, after, limit)).fetchall()

    def readlink(self, ino: int) -> bytes:
        (target,) = self._row(ino, "target")
        if target is None:
            raise RpcError(errno.EINVAL, "not a symlink")
        return target

    def path_of(self, ino: int) -> bytes:
        parts = []
        with self.lock:
            while ino != ROOT:
                row = self.db.execute("SELECT parent, name FROM dentries WHERE ino=? LIMIT 1",
                                      (ino,)).fetchone()
                if row is None:
                    raise RpcError(errno.ENOENT, "inode has no name")
                parts.append(row[1])
                ino = row[0]
                if len(parts) > 4096:
                    raise RpcError(errno.ELOOP, "path too deep")
        return b"/".join(reversed(parts))

    def resolve(self, parts) -> int | None:
        ino = ROOT
        for p in parts:
            ino = self._child(ino, p)
            if ino is None:
                return None
        return ino

    # -- creation ----------------------------------------------------------

    def _next_layout(self, parent: int) -> Layout:
        spec = self.dir_spec(parent)
        lay = make_layout(spec, self.ost_count, self._rr, self.default_stripe_size)
        # the next file starts after this one's last OST (full-width files still rotate)
        step = lay.stripe_count + (1 if lay.stripe_count % self.ost_count == 0 else 0)
        self._rr = (self._rr + step) % self.ost_count
        return lay

    def dir_spec(self, ino: int) -> StripeSpec:
        (raw,) = self._row(ino, "dir_spec")
        return StripeSpec.from_dict(json.loads(raw)) if raw else StripeSpec()

    def _insert(self, db, parent: int, name: bytes, mode: int, uid: int, gid: int,
                t: int, **extra) -> int:
        check_name(name)
        pmode = self._dir(parent)
        if self._child(parent, name) is not None:
            raise RpcError(errno.EEXIST, "entry exists")
        if pmode & stat.S_ISGID:  # BSD group semantics under a setgid directory
            (gid,) = self._row(parent, "gid")
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        cols = {"mode": mode, "uid": uid, "gid": gid, "nlink": 2 if stat.S_ISDIR(mode) else 1,
                "atime_ns": t, "mtime_ns": t, "ctime_ns": t, **extra}
        cur = db.execute(
            f"INSERT INTO inodes({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            tuple(cols.values()))
        ino = cur.lastrowid
        db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?,?,?)", (parent, name, ino))
        if stat.S_ISDIR(mode):
            db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (parent,))
        self._touch_dir(db, parent, t)
        return ino

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
               rdev: int = 0) -> dict:
        t = now_ns()
        with self.tx() as db:
            extra = {"rdev": rdev}
            if stat.S_ISREG(mode):
                extra["layout"] = json.dumps(self._next_layout(parent).to_dict())
            ino = self._insert(db, parent, name, mode, uid, gid, t, **extra)
            return self.getattr(ino)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> dict:
        t = now_ns()
        with self.tx() as db:
            (spec,) = self._row(parent, "dir_spec")
            ino = self._insert(db, parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid, t,
                               dir_spec=spec)
            return self.getattr(ino)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> dict:
        t = now_ns()
        with self.tx() as db:
            ino = self._insert(db, parent, name, stat.S_IFLNK | 0o777, uid, gid, t,
                               target=target, size=len(target))
            return self.getattr(ino)

    def link(self, ino: int, parent: int, name: bytes) -> dict:
        t = now_ns()
        with self.tx() as db:
            check_name(name)
            self._dir(parent)
            (mode,) = self._row(ino, "mode")
            if stat.S_ISDIR(mode):
                raise RpcError(errno.EPERM, "hard link to a directory")
            if self._child(parent, name) is not None:
                raise RpcError(errno.EEXIST, "entry exists")
            db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?,?,?)",
                       (parent, name, ino))
            db.execute("UPDATE inodes SET nlink=nlink+1, ctime_ns=? WHERE ino=?", (t, ino))
            self._touch_dir(db, parent, t)
            return self.getattr(ino)

    # -- removal -----------------------------------------------------------

    def unlink(self, parent: int, name: bytes) -> int:
        """Remove a non-directory entry; returns its inode (nlink may now be 0)."""
        t = now_ns()
        with self.tx() as db:
            ino = self._child(parent, name)
            if ino is None:
                raise RpcError(errno.ENOENT, "no such entry")
            (mode,) = self._row(ino, "mode")
            if stat.S_ISDIR(mode):
                raise RpcError(errno.EISDIR, "is a directory")
            db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
            db.execute("UPDATE inodes SET nlink=nlink-1, ctime_ns=? WHERE ino=?", (t, ino))
            self._touch_dir(db, parent, t)
            return ino

    def rmdir(self, parent: int, name: bytes) -> int:
        t = now_ns()
        with self.tx() as db:
            ino = self._child(parent, name)
            if ino is None:
                raise RpcError(errno.ENOENT, "no such entry")
            self._dir(ino)
            if db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (ino,)).fetchone():
                raise RpcError(errno.ENOTEMPTY, "directory not empty")
            db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
            db.execute("UPDATE inodes SET nlink=0, ctime_ns=? WHERE ino=?", (t, ino))
            db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (parent,))
            self._touch_dir(db, parent, t)
            return ino

    def nlink(self, ino: int) -> int:
        row = self.db.execute("SELECT nlink FROM inodes WHERE ino=?", (ino,)).fetchone()
        return row[0] if row else -1

    def destroy(self, ino: int):
        with self.tx() as db:
            db.execute("DELETE FROM inodes WHERE ino=? AND nlink<=0", (ino,))
            db.execute("DELETE FROM xattrs WHERE ino=?", (ino,))
            db.execute("DELETE FROM hsm_requests WHERE ino=? AND state IN ('WAITING','STARTED')",
                       (ino,))

    def note_writer(self, ino: int, open_: bool):
        with self.tx() as db:
            if open_:
                db.execute("INSERT OR IGNORE INTO writers(ino) VALUES (?)", (ino,))
            else:
                db.execute("DELETE FROM writers WHERE ino=?", (ino,))

    def writers(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT ino FROM writers")]

    def orphans(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT ino FROM inodes WHERE nlink<=0")]

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        while ino != ROOT:
            if ino == anc:
                return True
            row = self.db.execute("SELECT parent FROM dentries WHERE ino=? LIMIT 1",
                                  (ino,)).fetchone()
            if row is None:
                return False
            ino = row[0]
        return anc == ROOT

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int = 0) -> int | None:
        """Atomic rename; returns the inode replaced at the target (for cleanup), if any."""
        RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
        t = now_ns()
        with self.tx() as db:
            check_name(newname)
            ino = self._child(parent, name)
            if ino is None:
                raise RpcError(errno.ENOENT, "no such entry")
            self._dir(newparent)
            (mode,) = self._row(ino, "mode")
            is_dir = stat.S_ISDIR(mode)
            if is_dir and self._is_ancestor(ino, newparent):
                raise RpcError(errno.EINVAL, "cannot move a directory into itself")
            old = self._child(newparent, newname)
            if old == ino:
                return None
            if flags & RENAME_EXCHANGE:
                if old is None:
                    raise RpcError(errno.ENOENT, "no target to exchange")
                (omode,) = self._row(old, "mode")
                if stat.S_ISDIR(omode) and self._is_ancestor(old, parent):
                    raise RpcError(errno.EINVAL, "cannot move a directory into itself")
                db.execute("UPDATE dentries SET ino=? WHERE parent=? AND name=?",
                           (old, parent, name))
                db.execute("UPDATE dentries SET ino=? WHERE parent=? AND name=?",
                           (ino, newparent, newname))
                if parent != newparent and stat.S_ISDIR(omode) != is_dir:
                    d = 1 if is_dir else -1
                    db.execute("UPDATE inodes SET nlink=nlink+? WHERE ino=?", (d, newparent))
                    db.execute("UPDATE inodes SET nlink=nlink-? WHERE ino=?", (d, parent))
                for i in (ino, old):
                    db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (t, i))
                self._touch_dir(db, parent, t)
                self._touch_dir(db, newparent, t)
                return None
            if old is not None:
                if flags & RENAME_NOREPLACE:
                    raise RpcError(errno.EEXIST, "target exists")
                (omode,) = self._row(old, "mode")
                if stat.S_ISDIR(omode):
                    if not is_dir:
                        raise RpcError(errno.EISDIR, "target is a directory")
                    if db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1",
                                  (old,)).fetchone():
                        raise RpcError(errno.ENOTEMPTY, "target directory not empty")
                    db.execute("UPDATE inodes SET nlink=0, ctime_ns=? WHERE ino=?", (t, old))
                    db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (newparent,))
                elif is_dir:
                    raise RpcError(errno.ENOTDIR, "target is not a directory")
                else:
                    db.execute("UPDATE inodes SET nlink=nlink-1, ctime_ns=? WHERE ino=?",
                               (t, old))
                db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (newparent, newname))
            db.execute("UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
                       (newparent, newname, parent, name))
            if is_dir and parent != newparent:
                db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (parent,))
                db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (newparent,))
            db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (t, ino))
            self._touch_dir(db, parent, t)
            self._touch_dir(db, newparent, t)
            return old

    # -- attributes --------------------------------------------------------

    def setattr(self, ino: int, fields: dict) -> dict:
        """Apply chmod/chown/utimens/truncate fields; size changes are the caller's data job."""
        allowed = {"mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns"}
        bad = set(fields) - allowed
        if bad:
            raise RpcError(errno.EINVAL, f"cannot set {sorted(bad)}")
        with self.tx() as db:
            row = self._row(ino, "mode, hsm, size")
            sets = dict(fields)
            if "mode" in sets:
                sets["mode"] = (row[0] & ~0o7777) | (sets["mode"] & 0o7777)
            sets.setdefault("ctime_ns", now_ns())
            if "size" in sets and sets["size"] != row[2]:
                sets["hsm"] = hsm.after_write(row[1])
                # the S3 copy stays valid only for the bytes that survive the cut
                db.execute("UPDATE inodes SET s3_size=min(s3_size, ?) WHERE ino=? AND "
                           "s3_size IS NOT NULL", (sets["size"], ino))
                sets.setdefault("mtime_ns", sets["ctime_ns"])
                db.execute("UPDATE inodes SET data_version=data_version+1 WHERE ino=?", (ino,))
            db.execute(f"UPDATE inodes SET {', '.join(k + '=?' for k in sets)} WHERE ino=?",
                       (*sets.values(), ino))
            return self.getattr(ino)

    def file_state(self, ino: int) -> dict:
        """Everything a client needs to open a regular file."""
        row = self._row(ino, ATTR_COLS + ", archive_id, layout, s3_key, etag, s3_size, present")
        a = attr_of(row)
        a["data_version"] = a["dv"]
        (a["archive_id"], lay, a["s3_key"], a["etag"], a["s3_size"], a["present"]) = row[12:]
        a["layout"] = json.loads(lay) if lay else None
        return a

    def note_written(self, ino: int, size: int, chunks: list[int], mtime_ns: int | None):
        """A client wrote data: new size, chunks now present, DIRTY if archived."""
        with self.tx() as db:
            row = self._row(ino, "hsm, layout, present, size")
            lay = Layout.from_dict(json.loads(row[1]))
            n = max(lay.chunk_count(size), lay.chunk_count(row[3]))
            t = mtime_ns or now_ns()
            db.execute(
                "UPDATE inodes SET size=?, hsm=?, present=?, mtime_ns=?, ctime_ns=?, "
                "data_version=data_version+1 WHERE ino=?",
                (size, hsm.after_write(row[0]), bitmap_set(row[2], chunks, n), t, t, ino))

    # -- xattrs ------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        row = self.db.execute("SELECT value FROM xattrs WHERE ino=? AND name=?",
                              (ino, name)).fetchone()
        if row is None:
            raise RpcError(errno.ENODATA, "no such attribute")
        return row[0]

    def listxattr(self, ino: int) -> list[bytes]:
        return [r[0] for r in self.db.execute("SELECT name FROM xattrs WHERE ino=?", (ino,))]

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0):
        XATTR_CREATE, XATTR_REPLACE = 1, 2
        with self.tx() as db:
            self._row(ino, "ino")
            exists = db.execute("SELECT 1 FROM xattrs WHERE ino=? AND name=?",
                                (ino, name)).fetchone()
            if flags & XATTR_CREATE and exists:
                raise RpcError(errno.EEXIST, "attribute exists")
            if flags & XATTR_REPLACE and not exists:
                raise RpcError(errno.ENODATA, "no such attribute")
            db.execute("INSERT OR REPLACE INTO xattrs(ino, name, value) VALUES (?,?,?)",
                       (ino, name, value))
            db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (now_ns(), ino))

    def removexattr(self, ino: int, name: bytes):
        with self.tx() as db:
            cur = db.execute("DELETE FROM xattrs WHERE ino=? AND name=?", (ino, name))
            if cur.rowcount == 0:
                raise RpcError(errno.ENODATA, "no such attribute")

    # -- HSM and layout state ---------------------------------------------

    def hsm_state(self, ino: int) -> tuple[int, int]:
        return self._row(ino, "hsm, archive_id")

    def set_hsm(self, ino: int, flags: int, archive_id: int | None = None):
        with self.tx() as db:
            if archive_id is None:
                db.execute("UPDATE inodes SET hsm=? WHERE ino=?", (flags, ino))
            else:
                db.execute("UPDATE inodes SET hsm=?, archive_id=? WHERE ino=?",
                           (flags, archive_id, ino))

    def mark_present(self, ino: int, chunks: list[int]) -> bool:
        """Record hydrated chunks. Returns True when this made the file fully resident."""
        with self.tx() as db:
            row = db.execute("SELECT hsm, layout, present, size FROM inodes WHERE ino=?",
                             (ino,)).fetchone()
            if row is None or row[1] is None:
                return False
            flags, lay, bits, size = row
            lay = Layout.from_dict(json.loads(lay))
            n = lay.chunk_count(size)
            bits = bitmap_set(bits, chunks, n)
            done = bitmap_count(bits, n) == n
            if done and flags & hsm.RELEASED:
                flags = hsm.after_restore(flags)
            db.execute("UPDATE inodes SET present=?, hsm=? WHERE ino=?", (bits, flags, ino))
            return done

    def mark_released(self, ino: int):
        with self.tx() as db:
            (flags,) = self._row(ino, "hsm")
            db.execute("UPDATE inodes SET present=NULL, hsm=? WHERE ino=?",
                       (hsm.after_release(flags), ino))

    def release_states(self, inos: list[int]) -> dict[int, tuple]:
        """(mode, uid, hsm, layout JSON, present) of many inodes in a few queries: what
        a release checks. ENOENT when one is gone."""
        out: dict[int, tuple] = {}
        with self.lock:
            for i in range(0, len(inos), IN_BATCH):
                part = inos[i:i + IN_BATCH]
                out.update((r[0], r[1:]) for r in self.db.execute(
                    "SELECT ino, mode, uid, hsm, layout, present FROM inodes WHERE ino IN "
                    f"({','.join('?' * len(part))})", part))
        for ino in inos:
            if ino not in out:
                raise RpcError(errno.ENOENT, f"no inode {ino}")
        return out

    def forget_present_many(self, inos: list[int]):
        """Step one of a release, before the OSTs punch: the MDS stops counting on the
        chunks, so a crash part-way never leaves it marking present what is gone."""
        with self.tx() as db:
            db.executemany("UPDATE inodes SET present=NULL WHERE ino=?", [(i,) for i in inos])

    def mark_released_many(self, inos: list[int]):
        """The last step of a release of many files: one transaction for all of them."""
        with self.tx() as db:
            rows = []
            for i in range(0, len(inos), IN_BATCH):
                part = inos[i:i + IN_BATCH]
                rows += db.execute(f"SELECT ino, hsm FROM inodes WHERE ino IN "
                                   f"({','.join('?' * len(part))})", part).fetchall()
            db.executemany("UPDATE inodes SET present=NULL, hsm=? WHERE ino=?",
                           [(hsm.after_release(flags), ino) for ino, flags in rows])

    def set_layout(self, ino: int, layout: Layout):
        with self.tx() as db:
            db.execute("UPDATE inodes SET layout=? WHERE ino=?", (json.dumps(layout.to_dict()), ino))

    def set_dir_spec(self, ino: int, spec: StripeSpec | None):
        with self.tx() as db:
            self._dir(ino)
            db.execute("UPDATE inodes SET dir_spec=? WHERE ino=?",
                       (json.dumps(spec.to_dict()) if spec else None, ino))

    def set_archived(self, ino: int, key: str, etag: str, size: int, data_version: int) -> bool:
        """Record a finished archive. Returns False if the file changed meanwhile: the
        object is then an archive copy of an older version and the file stays dirty."""
        with self.tx() as db:
            row = self._row(ino, "hsm, data_version")
            if row[1] != data_version:
                db.execute("UPDATE inodes SET hsm=?, archive_id=?, s3_key=?, etag=?, s3_size=? "
                           "WHERE ino=?", (hsm.after_archive(row[0]) | hsm.DIRTY,
                                           hsm.DEFAULT_ARCHIVE_ID, key, etag, size, ino))
                return False
            # seen by the current import sweep, so the sweep does not take it for deleted
            db.execute(
                "UPDATE inodes SET hsm=?, archive_id=?, s3_key=?, etag=?, s3_size=?, "
                "arch_version=?, import_gen=coalesce((SELECT CAST(value AS INTEGER) FROM meta "
                "WHERE key='import_gen'), 0) WHERE ino=?",
                (hsm.after_archive(row[0]), hsm.DEFAULT_ARCHIVE_ID, key, etag, size,
                 data_version, ino))
            return True

    def set_exported(self, ino: int, key: str, etag: str):
        """A directory marker or symlink object now stands for this inode in S3."""
        with self.tx() as db:
            db.execute("UPDATE inodes SET s3_key=?, etag=?, import_gen=coalesce((SELECT "
                       "CAST(value AS INTEGER) FROM meta WHERE key='import_gen'), 0) "
                       "WHERE ino=?", (key, etag, ino))

    def counts(self) -> dict:
        n = self.db.execute("SELECT count(*) FROM inodes").fetchone()[0]
        return {"inodes": n}

    def close(self):
        with self.lock:
            self.db.close()
