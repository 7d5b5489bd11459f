"""``lustrefuse fsck``: check the MDS and the OSTs against each other, offline.

Three steps, so that the judging is pure and testable without disks:

- ``gather`` (I/O) reads a ``Snapshot``: the inodes and directory entries of
  ``mds.db``, every OST's chunk rows and object files, and a verdict for each
  chunk a file places on an OST (its bytes read back and hashed);
- ``check`` (pure) turns a snapshot into ``Problem`` s, each with the repair
  that is safe for it, or none and the reason;
- ``Repairer`` (I/O) applies those repairs through the real ``Namespace`` and
  ``ObjectStore`` classes.

The rule for repairs: nothing that may be the only copy of some data is ever
dropped. A chunk of a clean archived file can go (the next read fetches it
again from S3, pinned to the recorded ETag); a chunk of a dirty or
never-archived file stays, even when it is unreachable or damaged, and damage
to one is reported as DATA LOSS for a person to look at. Objects of inodes the
MDS no longer has hold nothing anyone can read and are removed.

A released file with some chunks present is normal (a read hydrated them; the
MDS clears RELEASED when the last chunk lands), so only a released file that
the MDS marks wholly present is flagged, and any presence bit of a released
file that its OST cannot back is a missing chunk like any other.

fsck refuses to run while an MDS holds ``mds.lock`` or an OST answers on its
socket, and holds the lock itself so no MDS starts while it works.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections import Counter
from dataclasses import asdict, dataclass, field

from . import hsm
from .layout import Layout, format_fid
from .namespace import ROOT, Namespace, bitmap_count, bitmap_has
from .scrub import (
    CORRUPT,
    OK,
    EnvError,
    chunk_verdict,
    clean_archived,
    clear_presence,
    load_config,
    open_object,
    open_ost_db,
    open_ro,
    ost_dir,
    ost_running,
    refetchable,
    try_mds_lock,
)

LOST_FOUND = b"lost+found"


# -- the snapshot ---------------------------------------------------------------

@dataclass
class Inode:
    ino: int
    mode: int
    nlink: int
    size: int
    hsm: int
    s3_key: str | None = None
    s3_size: int | None = None
    present: bytes | None = None
    layout: Layout | None = None
    layout_error: str = ""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass
class Dentry:
    id: int
    parent: int
    name: bytes
    ino: int


@dataclass
class Snapshot:
    ost_count: int
    inodes: dict[int, Inode] = field(default_factory=dict)
    dentries: list[Dentry] = field(default_factory=list)
    # ost -> ino -> chunk -> (length, xxh), as in each ost.db
    rows: dict[int, dict[int, dict[int, tuple[int, int]]]] = field(default_factory=dict)
    # ost -> inodes that have an object file there
    objects: dict[int, set[int]] = field(default_factory=dict)
    # (ost, ino, chunk) -> scrub verdict, for chunks a file places on that OST
    verdicts: dict[tuple[int, int, int], str] = field(default_factory=dict)
    # (ost, path) of files under objects/ that are not named like an object
    strays: list[tuple[int, str]] = field(default_factory=list)

    def row(self, ost: int, ino: int, s: int):
        return self.rows.get(ost, {}).get(ino, {}).get(s)


def layout_of(raw: str | None, ost_count: int) -> tuple[Layout | None, str]:
    if not raw:
        return None, "no layout"
    try:
        lay = Layout.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        return None, f"unreadable layout ({e})"
    if lay.stripe_size <= 0 or not lay.osts:
        return None, f"impossible layout {raw}"
    bad = [o for o in lay.osts if not 0 <= o < ost_count]
    if bad:
        return None, f"layout names OST {bad[0]}, the filesystem has {ost_count}"
    return lay, ""


def placed(rec: Inode | None, ost: int, s: int) -> bool:
    """Whether the file's layout puts chunk ``s``, inside the file, on ``ost``."""
    return (rec is not None and rec.layout is not None and s < rec.layout.chunk_count(rec.size)
            and rec.layout.ost_of_chunk(s) == ost)


def gather(data_dir: str, config: dict, cache: dict | None = None) -> Snapshot:
    """Read everything fsck judges. ``cache`` maps (ost, ino, s, length, xxh) to a
    verdict already computed, so a second pass does not read every chunk again."""
    cache = {} if cache is None else cache
    snap = Snapshot(config["osts"])
    mds = open_ro(os.path.join(data_dir, "mds.db"))
    try:
        for (ino, mode, nlink, size, flags, lay, key, s3_size, present) in mds.execute(
                "SELECT ino, mode, nlink, size, hsm, layout, s3_key, s3_size, present FROM inodes"):
            rec = Inode(ino, mode, nlink, size, flags, key, s3_size, present)
            if rec.is_reg:
                rec.layout, rec.layout_error = layout_of(lay, snap.ost_count)
            snap.inodes[ino] = rec
        snap.dentries = [Dentry(*r) for r in mds.execute(
            "SELECT id, parent, name, ino FROM dentries ORDER BY id")]
    except sqlite3.DatabaseError as e:
        raise EnvError(f"cannot read the MDS database: {e}") from None
    finally:
        mds.close()
    for i in range(snap.ost_count):
        root = ost_dir(data_dir, i)
        rows: dict[int, dict[int, tuple[int, int]]] = {}
        db = open_ost_db(root, i)
        if db is not None:
            try:
                for ino, s, length, xxh in db.execute("SELECT ino, s, length, xxh FROM chunks"):
                    rows.setdefault(ino, {})[s] = (length, xxh)
            except sqlite3.DatabaseError as e:
                raise EnvError(f"cannot read {root}/ost.db: {e}") from None
            finally:
                db.close()
        snap.rows[i] = rows
        snap.objects[i] = objs = set()
        objdir = os.path.join(root, "objects")
        if os.path.isdir(objdir):
            for sub in sorted(os.scandir(objdir), key=lambda e: e.name):
                if not sub.is_dir(follow_symlinks=False):
                    snap.strays.append((i, sub.path))
                    continue
                for ent in os.scandir(sub.path):
                    try:
                        ino = int(ent.name, 16)
                    except ValueError:
                        ino = -1
                    if ino < 0 or f"{ino & 0xFF:02x}" != sub.name or f"{ino:x}" != ent.name \
                            or not ent.is_file(follow_symlinks=False):
                        snap.strays.append((i, ent.path))
                        continue
                    objs.add(ino)
        for ino, chunks in rows.items():
            rec = snap.inodes.get(ino)
            todo = [s for s in chunks if placed(rec, i, s)
                    and (i, ino, s, *chunks[s]) not in cache]
            for s in chunks:
                if (i, ino, s, *chunks[s]) in cache:
                    snap.verdicts[(i, ino, s)] = cache[(i, ino, s, *chunks[s])]
            if not todo:
                continue
            fd = open_object(root, ino)
            try:
                for s in sorted(todo):
                    length, xxh = chunks[s]
                    v = chunk_verdict(fd, rec.layout.chunk_object_offset(s), length, xxh)
                    snap.verdicts[(i, ino, s)] = cache[(i, ino, s, length, xxh)] = v
            finally:
                if fd is not None:
                    os.close(fd)
    return snap


# -- judging (pure) -----------------------------------------------------------------

@dataclass
class Problem:
    kind: str
    message: str
    ino: int | None = None
    ost: int | None = None
    chunk: int | None = None
    fix: tuple | None = None  # the safe repair, None when there is none
    why_not: str = ""  # why there is none
    data_loss: bool = False

    def line(self) -> str:
        return f"{'DATA LOSS: ' if self.data_loss else ''}{self.kind}: {self.message}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fix"] = list(self.fix) if self.fix else None
        return d


def _paths(snap: Snapshot):
    first: dict[int, Dentry] = {}
    for d in snap.dentries:
        first.setdefault(d.ino, d)

    def path(ino: int) -> str:
        parts = []
        seen = set()
        while ino != ROOT:
            d = first.get(ino)
            if d is None or ino in seen:
                return ("?/" + "/".join(reversed(parts))) if parts else "(no name)"
            seen.add(ino)
            parts.append(d.name.decode(errors="replace"))
            ino = d.parent
        return "/" + "/".join(reversed(parts))
    return path


def _unique_data_reason(rec: Inode) -> str:
    if rec.hsm & hsm.DIRTY:
        return "the file is dirty"
    if rec.hsm & hsm.LOST:
        return "the file's S3 copy is lost"
    return "the file has never been archived"


def check(snap: Snapshot) -> list[Problem]:
    """Every inconsistency in ``snap``, each with its safe repair (or why there is none)."""
    problems: list[Problem] = []
    path = _paths(snap)

    def who(ino: int) -> str:
        return f"inode {ino} {format_fid(ino)} ({path(ino)})"

    doomed, broken_flags = _check_namespace(snap, problems.append, path, who)
    _check_files(snap, problems.append, who, doomed, broken_flags)
    _check_leftovers(snap, problems.append, who, doomed)
    for ost, p in snap.strays:
        problems.append(Problem("stray_file", f"{p} on OST{ost} is not an object file", ost=ost,
                                why_not="not ours to delete"))
    return problems


def _check_namespace(snap: Snapshot, add, path, who) -> tuple[set, set]:
    """Entries, link counts, HSM flags, layouts. Returns the inodes to be freed (orphans)
    and those whose HSM flags are broken."""
    inodes = snap.inodes
    names: Counter = Counter()
    subdirs: Counter = Counter()
    for d in snap.dentries:
        child = inodes.get(d.ino)
        parent = inodes.get(d.parent)
        if child is None:
            add(Problem("dangling_dentry", f"entry {path(d.parent)}/{d.name.decode(errors='replace')}"
                        f" names inode {d.ino}, which does not exist", d.ino,
                        fix=("drop_dentry", d.id)))
            continue
        names[d.ino] += 1
        if parent is None or not parent.is_dir:
            add(Problem("bad_parent", f"{who(d.ino)} is listed in inode {d.parent}, which "
                        f"{'does not exist' if parent is None else 'is not a directory'}", d.ino,
                        fix=("move_dentry", d.id)))
            continue
        if child.is_dir:
            subdirs[d.parent] += 1
    doomed = set()
    for ino, rec in sorted(inodes.items()):
        n = names[ino]
        if ino == ROOT:
            want = 2 + subdirs[ino]
        elif n == 0:
            if rec.nlink <= 0:
                doomed.add(ino)
                osts = sorted({o for o in snap.rows if ino in snap.rows[o]}
                              | {o for o in snap.objects if ino in snap.objects[o]}
                              | set(rec.layout.osts if rec.layout else ()))
                add(Problem("orphan_inode", f"inode {ino} {format_fid(ino)} has nlink "
                            f"{rec.nlink} and no name (unlinked while open); the MDS would free it",
                            ino, fix=("destroy_inode", ino, tuple(osts))))
            else:
                add(Problem("disconnected_inode", f"inode {ino} {format_fid(ino)} has nlink "
                            f"{rec.nlink} but no directory entry names it", ino,
                            fix=("lost_found", ino)))
            continue
        elif rec.is_dir:
            want = 2 + subdirs[ino]
            if n > 1:
                add(Problem("dir_hardlink", f"directory {who(ino)} has {n} names", ino,
                            why_not="pick the right parent by hand"))
        else:
            want = n
        if rec.nlink != want:
            add(Problem("nlink", f"{who(ino)} has nlink {rec.nlink}, its entries say {want}", ino,
                        fix=("nlink", ino)))
    broken_flags = set()
    for ino, rec in sorted(inodes.items()):
        try:
            hsm.check_invariants(rec.hsm)
        except hsm.HsmError as e:
            broken_flags.add(ino)
            add(Problem("hsm_invariant", f"{who(ino)} has HSM flags {rec.hsm:#x}: {e}", ino,
                        why_not="which flag is wrong cannot be told from here; see "
                                "lfs hsm_set/hsm_clear"))
        if rec.is_reg and rec.layout is None and (rec.layout_error != "no layout" or rec.size):
            add(Problem("bad_layout", f"{who(ino)}: {rec.layout_error}", ino,
                        why_not="its chunks cannot be located; they are left alone"))
    return doomed, broken_flags


def _check_files(snap: Snapshot, add, who, doomed: set, broken_flags: set):
    """Each file's chunks: MDS presence against the OSTs' rows and the bytes themselves."""
    for ino, rec in sorted(snap.inodes.items()):
        if ino in doomed or not rec.is_reg or rec.layout is None:
            continue
        lay = rec.layout
        nchunks = lay.chunk_count(rec.size)
        released = bool(rec.hsm & hsm.RELEASED)
        for s in range(nchunks):
            ost = lay.ost_of_chunk(s)
            bit = bitmap_has(rec.present, s)
            row = snap.row(ost, ino, s)
            verdict = snap.verdicts.get((ost, ino, s), OK) if row else None
            refetch = refetchable(rec.hsm, rec.s3_key, rec.s3_size, lay, s, rec.size)
            at = f"chunk {s} of {who(ino)} on OST{ost}"
            if row is None:
                if not bit:
                    continue
                msg = f"{at}: the MDS marks it present{' (file is released)' if released else ''}" \
                      ", the OST has no such chunk"
                if refetch:
                    add(Problem("missing_chunk", msg + "; it can be fetched again from S3", ino, ost,
                                s, fix=("clear_bit", ino, s)))
                else:
                    add(Problem("missing_chunk", msg + f"; {_unique_data_reason(rec)}, so its data "
                                "is gone (reads would give zeros or the old S3 bytes)", ino, ost, s,
                                why_not="no copy to restore from", data_loss=True))
                continue
            if verdict != OK:
                kind = "corrupt_chunk" if verdict == CORRUPT else "missing_object"
                msg = f"{at} (object offset {lay.chunk_object_offset(s)}, {row[0]} bytes): {verdict}"
                if refetch:
                    add(Problem(kind, msg + "; it can be fetched again from S3", ino, ost, s,
                                fix=("drop_chunk", ost, ino, s)))
                else:
                    add(Problem(kind, msg + f"; {_unique_data_reason(rec)} and this was its only "
                                "copy (reads fail with EIO)", ino, ost, s,
                                why_not="no copy to restore from", data_loss=True))
                continue
            if not bit:
                add(Problem("unrecorded_chunk", f"{at}: the OST holds it (checksum good) but the "
                            "MDS does not mark it present", ino, ost, s, fix=("set_bit", ino, s)))
        if released and nchunks and bitmap_count(rec.present, nchunks) == nchunks \
                and ino not in broken_flags:
            add(Problem("released_resident", f"{who(ino)} is released but the MDS marks every "
                        "chunk present", ino, fix=("restore_flags", ino)))


def _check_leftovers(snap: Snapshot, add, who, doomed: set):
    """What the OSTs hold that no file places there."""
    inodes = snap.inodes
    for ost in sorted(set(snap.rows) | set(snap.objects)):
        rows = snap.rows.get(ost, {})
        objs = snap.objects.get(ost, set())
        for ino in sorted(set(rows) | objs):
            rec = inodes.get(ino)
            chunks = rows.get(ino, {})
            what = (f"object of inode {ino} on OST{ost} ({len(chunks)} chunk(s)"
                    f"{', object file' if ino in objs else ', no object file'})")
            if rec is None:
                add(Problem("orphan_object", f"{what}: the MDS has no such inode", ino, ost,
                            fix=("destroy_object", ost, ino)))
                continue
            if ino in doomed or (rec.is_reg and rec.layout is None):
                continue  # freed with its inode / cannot be judged
            if not rec.is_reg or ost not in rec.layout.osts:
                msg = (f"{what}: {who(ino)} is not a regular file" if not rec.is_reg else
                       f"{what}: the layout of {who(ino)} has no stripe on OST{ost}")
                if not chunks or not rec.is_reg or clean_archived(rec.hsm, rec.s3_key):
                    add(Problem("orphan_object", msg, ino, ost, fix=("destroy_object", ost, ino)))
                else:
                    add(Problem("orphan_object", msg, ino, ost,
                                why_not=f"{_unique_data_reason(rec)}: kept in case it holds "
                                        "the only copy of some data"))
                continue
            nchunks = rec.layout.chunk_count(rec.size)
            for s in sorted(chunks):
                if rec.layout.ost_of_chunk(s) != ost:
                    kind, msg = "misplaced_chunk", (f"chunk {s} of {who(ino)} is on OST{ost}, its "
                                                    f"layout puts it on OST{rec.layout.ost_of_chunk(s)}")
                elif s >= nchunks:
                    kind, msg = "beyond_eof", (f"chunk {s} of {who(ino)} on OST{ost} lies past the "
                                               f"end of the file ({rec.size} bytes)")
                else:
                    continue
                if clean_archived(rec.hsm, rec.s3_key):
                    add(Problem(kind, msg, ino, ost, s, fix=("forget", ost, ino, s)))
                else:
                    add(Problem(kind, msg, ino, ost, s,
                                why_not=f"{_unique_data_reason(rec)}: kept in case it holds the "
                                        "only copy of some data"))


# -- repairing (I/O) --------------------------------------------------------------------

PHASES = {"drop_dentry": 0, "move_dentry": 0, "lost_found": 0, "destroy_inode": 0, "nlink": 1,
          "destroy_object": 2, "forget": 2, "drop_chunk": 2, "clear_bit": 3, "set_bit": 4,
          "restore_flags": 5}


class Repairer:
    """Applies fixes through the real Namespace and ObjectStore (the MDS lock is held)."""

    def __init__(self, data_dir: str, config: dict):
        self.data_dir = data_dir
        self.config = config
        self.ns = Namespace(os.path.join(data_dir, "mds.db"), config["osts"],
                            config.get("stripe_size") or 1 << 20)
        self.stores: dict = {}
        self._lost_found: int | None = None

    def close(self):
        for store in self.stores.values():
            store.db.close()
        self.ns.close()

    def store(self, index: int):
        from .ost import ObjectStore

        if index not in self.stores:
            self.stores[index] = ObjectStore(ost_dir(self.data_dir, index), index)
        return self.stores[index]

    def apply(self, fix: tuple) -> str:
        return getattr(self, "fix_" + fix[0])(*fix[1:])

    # -- namespace

    def _recount(self, db, ino: int) -> tuple[int, int] | None:
        row = db.execute("SELECT mode, nlink FROM inodes WHERE ino=?", (ino,)).fetchone()
        if row is None:
            return None
        mode, old = row
        if stat.S_ISDIR(mode):
            (n,) = db.execute(
                "SELECT count(*) FROM dentries d JOIN inodes i ON i.ino = d.ino "
                "WHERE d.parent=? AND (i.mode & ?) = ?", (ino, stat.S_IFMT(0o177777), stat.S_IFDIR)
            ).fetchone()
            n += 2
        else:
            (n,) = db.execute("SELECT count(*) FROM dentries WHERE ino=?", (ino,)).fetchone()
            if n == 0:
                return None  # a nameless file is the orphan check's business
        if n != old:
            db.execute("UPDATE inodes SET nlink=? WHERE ino=?", (n, ino))
        return old, n

    def lost_found(self) -> int:
        if self._lost_found is None:
            ino = self.ns.resolve([LOST_FOUND])
            if ino is None:
                ino = self.ns.mkdir(ROOT, LOST_FOUND, 0o700, 0, 0)["ino"]
            elif not stat.S_ISDIR(self.ns.getattr(ino)["mode"]):
                raise EnvError("/lost+found exists and is not a directory")
            self._lost_found = ino
        return self._lost_found

    def _free_name(self, db, parent: int, ino: int) -> bytes:
        base = format_fid(ino).encode()
        name, k = base, 0
        while db.execute("SELECT 1 FROM dentries WHERE parent=? AND name=?",
                         (parent, name)).fetchone():
            k += 1
            name = base + f"-{k}".encode()
        return name

    def fix_drop_dentry(self, dentry_id: int) -> str:
        with self.ns.tx() as db:
            row = db.execute("SELECT parent, name, ino FROM dentries WHERE id=?",
                             (dentry_id,)).fetchone()
            if row is None:
                return "entry already gone"
            db.execute("DELETE FROM dentries WHERE id=?", (dentry_id,))
            self._recount(db, row[0])
        return f"removed the entry {row[1].decode(errors='replace')!r} (in inode {row[0]}) " \
               f"that named missing inode {row[2]}"

    def fix_move_dentry(self, dentry_id: int) -> str:
        lf = self.lost_found()
        with self.ns.tx() as db:
            row = db.execute("SELECT parent, name, ino FROM dentries WHERE id=?",
                             (dentry_id,)).fetchone()
            if row is None:
                return "entry already gone"
            name = self._free_name(db, lf, row[2])
            db.execute("UPDATE dentries SET parent=?, name=? WHERE id=?", (lf, name, dentry_id))
            self._recount(db, lf)
            self._recount(db, row[2])
        return f"moved inode {row[2]} to /lost+found/{name.decode()}"

    def fix_lost_found(self, ino: int) -> str:
        lf = self.lost_found()
        with self.ns.tx() as db:
            if db.execute("SELECT 1 FROM dentries WHERE ino=?", (ino,)).fetchone():
                return f"inode {ino} has a name again"
            name = self._free_name(db, lf, ino)
            db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?,?,?)", (lf, name, ino))
            self._recount(db, ino)
            self._recount(db, lf)
        return f"linked inode {ino} as /lost+found/{name.decode()}"

    def fix_destroy_inode(self, ino: int, osts: tuple) -> str:
        self.ns.destroy(ino)  # only removes it while nlink <= 0
        if self.ns.nlink(ino) != -1:
            return f"inode {ino} kept: it has links again"
        freed = sum(self.store(o).destroy(ino) for o in osts
                    if os.path.isdir(ost_dir(self.data_dir, o)))
        return f"freed orphan inode {ino} and its objects on {len(osts)} OST(s) ({freed} bytes)"

    def fix_nlink(self, ino: int) -> str:
        with self.ns.tx() as db:
            r = self._recount(db, ino)
        if r is None:
            return f"inode {ino}: nothing to count"
        return f"set nlink of inode {ino} from {r[0]} to {r[1]}"

    # -- OSTs

    def fix_destroy_object(self, ost: int, ino: int) -> str:
        store = self.store(ost)
        n = len(store.table(ino))
        freed = store.destroy(ino)
        return f"removed the object of inode {ino} on OST{ost} ({n} chunk(s), {freed} bytes freed)"

    def fix_forget(self, ost: int, ino: int, s: int) -> str:
        self.store(ost).forget(ino, [s])
        return f"dropped chunk {s} of inode {ino} from OST{ost} (its data is in S3)"

    def fix_drop_chunk(self, ost: int, ino: int, s: int) -> str:
        self.store(ost).forget(ino, [s])
        with self.ns.tx() as db:
            clear_presence(db, ino, [s])
        return f"dropped bad chunk {s} of inode {ino} on OST{ost}; the next read fetches it from S3"

    # -- presence

    def fix_clear_bit(self, ino: int, s: int) -> str:
        with self.ns.tx() as db:
            clear_presence(db, ino, [s])
        return f"cleared the presence of chunk {s} of inode {ino}; the next read fetches it from S3"

    def fix_set_bit(self, ino: int, s: int) -> str:
        before = self.ns.hsm_state(ino)[0]
        self.ns.mark_present(ino, [s])
        after = self.ns.hsm_state(ino)[0]
        extra = "; every chunk is now present, no longer released" if before != after else ""
        return f"marked chunk {s} of inode {ino} present{extra}"

    def fix_restore_flags(self, ino: int) -> str:
        before = self.ns.hsm_state(ino)[0]
        self.ns.mark_present(ino, [])  # clears RELEASED when every chunk is present
        after = self.ns.hsm_state(ino)[0]
        if before == after:
            return f"inode {ino} stays released: not every chunk is present"
        return f"inode {ino} is no longer released (HSM flags {before:#x} -> {after:#x})"


# -- the command ------------------------------------------------------------------

@dataclass
class Result:
    problems: list[Problem]
    fixed: list[tuple[Problem, str]] = field(default_factory=list)
    failed: list[tuple[Problem, str]] = field(default_factory=list)
    remaining: list[Problem] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def counts_of(snap: Snapshot) -> dict:
    return {"inodes": len(snap.inodes), "entries": len(snap.dentries), "osts": snap.ost_count,
            "chunks": sum(len(c) for rows in snap.rows.values() for c in rows.values()),
            "chunks_verified": len(snap.verdicts)}


def fsck(data_dir: str, repair: bool = False, on_fix=None) -> Result:
    """Check (and repair) an offline filesystem. Raises EnvError when it cannot run."""
    data_dir = os.path.abspath(data_dir)
    config = load_config(data_dir)
    lock = try_mds_lock(data_dir)
    if lock is None:
        raise EnvError(f"an MDS is running on {data_dir} (mds.lock is held); fsck works offline "
                       "only: stop the filesystem first (lustrefuse down)")
    try:
        running = [i for i in range(config["osts"]) if ost_running(data_dir, i)]
        if running:
            raise EnvError(f"OST {', '.join(map(str, running))} of {data_dir} is running; fsck "
                           "works offline only: stop the filesystem first (lustrefuse down)")
        cache: dict = {}
        snap = gather(data_dir, config, cache)
        result = Result(check(snap), counts=counts_of(snap))
        if not repair:
            result.remaining = list(result.problems)
            return result
        todo = sorted((p for p in result.problems if p.fix), key=lambda p: PHASES[p.fix[0]])
        if todo:
            rep = Repairer(data_dir, config)
            try:
                for p in todo:
                    try:
                        what = rep.apply(p.fix)
                    except (OSError, sqlite3.Error, EnvError) as e:
                        result.failed.append((p, str(e)))
                        continue
                    result.fixed.append((p, what))
                    if on_fix:
                        on_fix(p, what)
            finally:
                rep.close()
        # look again: what is still wrong is what remains
        result.remaining = check(gather(data_dir, config, cache))
        return result
    finally:
        os.close(lock)


def run(data_dir: str, repair: bool, as_json: bool, echo=print) -> int:
    """The ``lustrefuse fsck`` command. Returns the exit code."""
    result = fsck(data_dir, repair)
    fixed = {id(p): what for p, what in result.fixed}
    failed = {id(p): why for p, why in result.failed}
    loss = [p for p in result.remaining if p.data_loss]
    summary = {**result.counts, "problems": len(result.problems), "fixed": len(result.fixed),
               "remaining": len(result.remaining), "data_loss": len(loss)}
    if as_json:
        probs = []
        for p in result.problems:
            d = p.as_dict()
            d["fixed"] = fixed.get(id(p))
            d["failed"] = failed.get(id(p))
            probs.append(d)
        echo(json.dumps({"data_dir": os.path.abspath(data_dir), "repair": repair,
                         "problems": probs, "remaining": [p.as_dict() for p in result.remaining],
                         "summary": summary}, indent=1))
    else:
        for p in result.problems:
            echo(p.line())
            if not repair:
                continue
            if id(p) in fixed:
                echo(f"  fixed: {fixed[id(p)]}")
            elif id(p) in failed:
                echo(f"  repair failed: {failed[id(p)]}")
            else:
                echo(f"  not repaired: {p.why_not or 'no safe repair'}")
        if repair:
            before = {(p.kind, p.ino, p.ost, p.chunk) for p in result.problems}
            for p in result.remaining:
                if (p.kind, p.ino, p.ost, p.chunk) not in before:
                    echo(f"still wrong after repair: {p.line()}")
        c = result.counts
        line = (f"fsck: {c['inodes']} inodes, {c['entries']} entries, {c['chunks']} chunks on "
                f"{c['osts']} OSTs ({c['chunks_verified']} verified): "
                f"{len(result.problems)} problem(s)")
        if repair:
            line += f", {len(result.fixed)} fixed, {len(result.remaining)} remaining"
        if loss:
            line += f", {len(loss)} with DATA LOSS"
        echo(line)
    return 1 if result.remaining else 0
