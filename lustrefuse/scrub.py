"""``lustrefuse scrub``: verify every local stripe chunk against its checksum.

Each OST keeps one row per present chunk in ``ost.db`` (length and xxh3-64 of
the bytes). The scrub reads every chunk back from its object file and compares.
The object offset of a chunk comes from the file's layout in ``mds.db``, so
the MDS database is opened too (read-only: SQLite's WAL lets us read while the
MDS runs). Nothing is written without ``--repair``, so a scrub is safe on a
live filesystem.

``--repair`` deletes the row of a bad chunk of an archived, clean file: the
next read fetches it again from S3. It is only safe while the OST that holds
the chunk is not running (the OST caches nothing, but a write racing with the
scrub could be mistaken for corruption and its new row dropped), so repair
refuses an OST whose socket answers. When the MDS is not running either, the
chunk's presence bit is cleared as well; otherwise the MDS keeps listing the
chunk as present until a read fetches it again (``lustrefuse fsck`` tidies
that up offline). Bad chunks of dirty or never-archived files are the only
copy of their data and are never touched.

This module also holds the chunk verification and the small environment
helpers that ``fsck`` shares.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import stat
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import xxhash

from . import hsm
from .integrity import checksum
from .layout import Layout, format_fid
from .namespace import Namespace
from .protocol import RpcError

# chunk verdicts
OK = "ok"
CORRUPT = "checksum mismatch"
SHORT = "object file too short"
NOFILE = "object file missing"

WHOLE_READ_LIMIT = 256 * 1024 * 1024  # larger chunks are hashed in pieces
PIECE = 16 * 1024 * 1024


class EnvError(Exception):
    """The data directory cannot be checked as asked (exit code 2)."""


# -- environment --------------------------------------------------------------

def load_config(data_dir: str) -> dict:
    path = os.path.join(data_dir, "fs.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise EnvError(f"{data_dir} holds no lustrefuse filesystem (fs.json missing)") from None
    except (OSError, ValueError) as e:
        raise EnvError(f"cannot read {path}: {e}") from None
    if not isinstance(config.get("osts"), int) or config["osts"] < 1:
        raise EnvError(f"{path} does not say how many OSTs the filesystem has")
    if not os.path.exists(os.path.join(data_dir, "mds.db")):
        raise EnvError(f"{data_dir} has no MDS database (mds.db missing)")
    return config


def open_ro(path: str) -> sqlite3.Connection:
    """A read-only connection; fine next to a running writer (WAL)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA busy_timeout=10000")
    return db


def try_mds_lock(data_dir: str) -> int | None:
    """Take ``mds.lock`` without waiting: a descriptor holding it, or None while an MDS runs.

    Holding it keeps an MDS from starting while we change the databases.
    """
    fd = os.open(os.path.join(data_dir, "mds.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def socket_answers(path: str) -> bool:
    """Whether a daemon listens on the Unix socket ``path`` (a stale file does not count)."""
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def ost_dir(data_dir: str, index: int) -> str:
    return os.path.join(data_dir, f"ost{index}")


def ost_running(data_dir: str, index: int) -> bool:
    return socket_answers(os.path.join(ost_dir(data_dir, index), "ost.sock"))


def open_ost_db(root: str, index: int) -> sqlite3.Connection | None:
    """The OST's chunk table, read-only; None when the OST never stored anything."""
    path = os.path.join(root, "ost.db")
    if not os.path.exists(path):
        return None
    db = open_ro(path)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='index'").fetchone()
    except sqlite3.DatabaseError as e:
        db.close()
        raise EnvError(f"cannot read {path}: {e}") from None
    if row is not None and int(row[0]) != index:
        db.close()
        raise EnvError(f"{root} holds OST {row[0]}, not OST {index}")
    return db


def object_path(root: str, ino: int) -> str:
    # the same naming as ObjectStore.path, without opening the store read-write
    return os.path.join(root, "objects", f"{ino & 0xFF:02x}", f"{ino:x}")


class ReadOnlyNames:
    """Path lookups on a read-only MDS connection, with Namespace's own code."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.lock = threading.RLock()

    path_of = Namespace.path_of

    def path(self, ino: int) -> str | None:
        try:
            return "/" + self.path_of(ino).decode(errors="surrogateescape")
        except (RpcError, sqlite3.Error):
            return None


# -- verification -------------------------------------------------------------

def chunk_verdict(fd: int | None, offset: int, length: int, xxh: int) -> str:
    """Check ``length`` bytes at ``offset`` of an object against ``xxh``.

    A read that ends early is padded with zeros, as the client and the OST do
    (a sparse object's tail reads short); it is bad only if the padded bytes
    still do not match.
    """
    if fd is None:
        return NOFILE
    if length <= WHOLE_READ_LIMIT:
        data = os.pread(fd, length, offset)
        short = len(data) < length
        if short:
            data += bytes(length - len(data))
        ok = checksum(data) == xxh
    else:  # hash a huge chunk in pieces rather than hold it in memory
        h = xxhash.xxh3_64()
        got = 0
        while got < length:
            piece = os.pread(fd, min(PIECE, length - got), offset + got)
            if not piece:
                break
            h.update(piece)
            got += len(piece)
        short = got < length
        while got < length:
            n = min(PIECE, length - got)
            h.update(bytes(n))
            got += n
        ok = h.intdigest() == xxh & 0xFFFFFFFFFFFFFFFF  # rows hold it signed
    if ok:
        return OK
    return SHORT if short else CORRUPT


def open_object(root: str, ino: int) -> int | None:
    try:
        return os.open(object_path(root, ino), os.O_RDONLY)
    except FileNotFoundError:
        return None


# -- the scrub ----------------------------------------------------------------

@dataclass
class BadChunk:
    ino: int
    fid: str
    chunk: int
    ost: int
    object_offset: int
    length: int
    reason: str
    path: str | None
    hsm: int | None
    refetchable: bool
    repaired: str = ""

    def line(self) -> str:
        where = self.path or "(no path)"
        return (f"BAD chunk {self.chunk} of inode {self.ino} {self.fid} on OST{self.ost} at object "
                f"offset {self.object_offset} ({self.length} bytes): {self.reason}; {where}")


@dataclass
class ScrubReport:
    data_dir: str
    osts: list[int]
    chunks: int = 0
    bytes: int = 0
    bad: list[BadChunk] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # rows we cannot place (no layout)
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bad_count"] = len(self.bad)
        return d


def clean_archived(flags: int, s3_key) -> bool:
    """The S3 copy holds all of this file's data: a local chunk can be fetched again."""
    return bool(s3_key) and bool(flags & hsm.ARCHIVED) and not flags & (hsm.DIRTY | hsm.LOST)


def refetchable(flags: int, s3_key, s3_size, lay: Layout, s: int, size: int) -> bool:
    if not clean_archived(flags, s3_key) or s3_size is None:
        return False
    n = lay.chunk_length(s, size)
    return n > 0 and lay.chunk_length(s, s3_size) == n


class Scrubber:
    """Verify the chunks of some OSTs. ``progress(nbytes)`` is called as bytes are checked."""

    def __init__(self, data_dir: str, osts: list[int] | None = None):
        self.data_dir = os.path.abspath(data_dir)
        self.config = load_config(self.data_dir)
        count = self.config["osts"]
        if osts is not None:
            for i in osts:
                if not 0 <= i < count:
                    raise EnvError(f"OST {i} is not an OST of this filesystem (0..{count - 1})")
        self.osts = list(range(count)) if osts is None else list(osts)
        self.mds = open_ro(os.path.join(self.data_dir, "mds.db"))
        self.names = ReadOnlyNames(self.mds)
        self._inode: tuple[int, tuple | None] = (-1, None)

    def close(self):
        self.mds.close()

    def totals(self) -> tuple[int, int]:
        chunks = nbytes = 0
        for i in self.osts:
            db = open_ost_db(ost_dir(self.data_dir, i), i)
            if db is None:
                continue
            n, b = db.execute("SELECT count(*), coalesce(sum(length), 0) FROM chunks").fetchone()
            db.close()
            chunks += n
            nbytes += b
        return chunks, nbytes

    def inode(self, ino: int):
        """(Layout, size, hsm, s3_key, s3_size) of a regular file, else None."""
        if self._inode[0] != ino:
            row = self.mds.execute("SELECT mode, layout, size, hsm, s3_key, s3_size FROM inodes "
                                   "WHERE ino=?", (ino,)).fetchone()
            info = None
            if row is not None and stat.S_ISREG(row[0]) and row[1]:
                try:
                    info = (Layout.from_dict(json.loads(row[1])), *row[2:])
                except (ValueError, KeyError, TypeError):
                    info = None
            self._inode = (ino, info)
        return self._inode[1]

    def scrub(self, report: ScrubReport, progress=None):
        t0 = time.monotonic()
        for i in self.osts:
            self.scrub_ost(i, report, progress)
        report.elapsed = time.monotonic() - t0

    def scrub_ost(self, index: int, report: ScrubReport, progress=None):
        root = ost_dir(self.data_dir, index)
        db = open_ost_db(root, index)
        if db is None:
            report.notes.append(f"OST{index}: no chunk table (nothing stored yet)")
            return
        online = ost_running(self.data_dir, index)  # then a bad verdict may be a racing write
        try:
            rows = db.execute("SELECT ino, s, length, xxh FROM chunks ORDER BY ino, s").fetchall()
            fd, fd_ino = None, -1
            try:
                for ino, s, length, xxh in rows:
                    info = self.inode(ino)
                    if info is None or info[0].ost_of_chunk(s) != index:
                        report.skipped.append({"ino": ino, "chunk": s, "ost": index,
                                               "why": "no file of this filesystem places it here "
                                                      "(see lustrefuse fsck)"})
                        if progress:
                            progress(length)
                        continue
                    if fd_ino != ino:
                        if fd is not None:
                            os.close(fd)
                        fd, fd_ino = open_object(root, ino), ino
                    lay = info[0]
                    off = lay.chunk_object_offset(s)
                    verdict = chunk_verdict(fd, off, length, xxh)
                    if verdict != OK and online:
                        verdict = self._recheck(db, root, ino, s, off) or OK
                    report.chunks += 1
                    report.bytes += length
                    if progress:
                        progress(length)
                    if verdict == OK:
                        continue
                    size, flags, key, s3_size = info[1:]
                    report.bad.append(BadChunk(
                        ino, format_fid(ino), s, index, off, length, verdict, self.names.path(ino),
                        flags, refetchable(flags, key, s3_size, lay, s, size)))
            finally:
                if fd is not None:
                    os.close(fd)
        finally:
            db.close()

    def _recheck(self, db, root: str, ino: int, s: int, off: int) -> str | None:
        """A bad verdict seen online may be a write racing with us: look again once."""
        time.sleep(0.05)
        row = db.execute("SELECT length, xxh FROM chunks WHERE ino=? AND s=?", (ino, s)).fetchone()
        if row is None:
            return None  # dropped meanwhile (released, refetched, truncated)
        fd = open_object(root, ino)
        try:
            v = chunk_verdict(fd, off, row[0], row[1])
        finally:
            if fd is not None:
                os.close(fd)
        return None if v == OK else v


def clear_presence(db: sqlite3.Connection, ino: int, chunks) -> bool:
    """Clear presence bits in the MDS (the inverse of namespace.bitmap_set). True if any was set."""
    row = db.execute("SELECT present FROM inodes WHERE ino=?", (ino,)).fetchone()
    if row is None or not row[0]:
        return False
    bits = bytearray(row[0])
    changed = False
    for s in chunks:
        if 0 <= s >> 3 < len(bits) and bits[s >> 3] & (1 << (s & 7)):
            bits[s >> 3] &= ~(1 << (s & 7)) & 0xFF
            changed = True
    if changed:
        db.execute("UPDATE inodes SET present=? WHERE ino=?", (bytes(bits), ino))
    return changed


def repair_bad(data_dir: str, report: ScrubReport) -> int:
    """Drop the rows of bad chunks that S3 can give back. Returns how many remain bad."""
    from .ost import ObjectStore

    remaining = 0
    todo = [b for b in report.bad if b.refetchable]
    for b in report.bad:
        if not b.refetchable:
            b.repaired = ("not repaired: the file is dirty or not archived, this chunk is its only "
                          "copy")
            remaining += 1
    if not todo:
        return remaining
    running = sorted({b.ost for b in todo if ost_running(data_dir, b.ost)})
    if running:
        raise EnvError("--repair needs the OSTs holding bad chunks stopped (OST "
                       f"{', '.join(map(str, running))} running); run `lustrefuse down` first")
    lock = try_mds_lock(data_dir)
    ns = None
    try:
        if lock is not None:
            config = load_config(data_dir)
            ns = Namespace(os.path.join(data_dir, "mds.db"), config["osts"],
                           config.get("stripe_size") or 1 << 20)
        else:
            report.notes.append("the MDS is running: its presence map still lists the dropped "
                                "chunks until a read fetches them again (`lustrefuse fsck` "
                                "offline tidies that)")
        stores: dict[int, ObjectStore] = {}
        for b in todo:
            store = stores.get(b.ost) or stores.setdefault(
                b.ost, ObjectStore(ost_dir(data_dir, b.ost), b.ost))
            store.forget(b.ino, [b.chunk])
            b.repaired = "dropped: it will be fetched again from S3 on the next read"
            if ns is not None:
                with ns.tx() as db:
                    clear_presence(db, b.ino, [b.chunk])
        for store in stores.values():
            store.db.close()
    finally:
        if ns is not None:
            ns.close()
        if lock is not None:
            os.close(lock)
    return remaining


# -- presentation -------------------------------------------------------------

def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class PlainProgress:
    """Periodic progress lines on stderr when it is not a terminal."""

    def __init__(self, total: int, every: float = 5.0, out=None):
        self.total = total
        self.done = 0
        self.every = every
        self.last = time.monotonic()
        self.out = out or sys.stderr

    def update(self, n: int):
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"scrub: {human(self.done)} of {human(self.total)} checked ({pct:.0f}%)",
                  file=self.out, flush=True)


def run(target: str, ost: int | None, as_json: bool, repair: bool, echo=print) -> int:
    """The ``lustrefuse scrub`` command. Returns the exit code."""
    import click

    from . import services

    data_dir = os.path.abspath(target)
    if services.is_mounted(data_dir):
        dd = services.mount_data_dir(data_dir)
        if dd is None:
            raise EnvError(f"{target} is a mount point but not a lustrefuse mount")
        data_dir = dd
    scrubber = Scrubber(data_dir, None if ost is None else [ost])
    report = ScrubReport(scrubber.data_dir, scrubber.osts)
    try:
        _chunks, total = scrubber.totals()
        if sys.stderr.isatty() and not as_json:
            with click.progressbar(length=total, label="scrub", file=sys.stderr,
                                   show_pos=False, show_percent=True, show_eta=True) as bar:
                scrubber.scrub(report, bar.update)
        else:
            plain = PlainProgress(total)
            scrubber.scrub(report, plain.update)
    finally:
        scrubber.close()
    remaining = len(report.bad)
    if repair and report.bad:
        remaining = repair_bad(scrubber.data_dir, report)
    if as_json:
        d = report.as_dict()
        d["remaining"] = remaining
        echo(json.dumps(d, indent=1))
    else:
        for b in report.bad:
            echo(b.line())
            if b.repaired:
                echo(f"  {b.repaired}")
        if report.skipped:
            echo(f"scrub: {len(report.skipped)} chunk(s) skipped: no file places them on their OST "
                 "(orphans; `lustrefuse fsck` checks and removes them)")
        for note in report.notes:
            echo(f"scrub: {note}")
        rate = report.bytes / report.elapsed if report.elapsed else 0.0
        osts = ", ".join(f"OST{i}" for i in report.osts)
        echo(f"scrub: {report.chunks} chunks, {report.bytes} bytes ({human(report.bytes)}) checked on "
             f"{osts} in {report.elapsed:.1f}s ({human(rate)}/s): {len(report.bad)} bad"
             + (f", {len(report.bad) - remaining} repaired" if repair else ""))
    return 1 if remaining else 0

