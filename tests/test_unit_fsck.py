"""fsck and scrub on small hand-built data directories (real Namespace and ObjectStore, no mounts)."""

from __future__ import annotations

import fcntl
import json
import os
import stat

import pytest
from click.testing import CliRunner

from lustrefuse import fsck, hsm, scrub
from lustrefuse.cli import main
from lustrefuse.integrity import checksum
from lustrefuse.layout import Layout
from lustrefuse.namespace import ROOT, Namespace, bitmap_has, bitmap_set
from lustrefuse.ost import ObjectStore

SS = 64 * 1024  # stripe size
REG = stat.S_IFREG | 0o644


class FS:
    """A DATA_DIR built by hand: fs.json, mds.db and two OSTs."""

    def __init__(self, root, osts: int = 2):
        self.dir = str(root)
        with open(os.path.join(self.dir, "fs.json"), "w") as f:
            json.dump({"bucket": "b", "prefix": "", "osts": osts, "stripe_size": SS}, f)
        self.ns = Namespace(os.path.join(self.dir, "mds.db"), osts, SS)
        self.stores = [ObjectStore(os.path.join(self.dir, f"ost{i}"), i) for i in range(osts)]

    def close(self):
        for s in self.stores:
            s.db.close()
        self.ns.close()

    def file(self, name: bytes, data: bytes, osts=(0, 1), flags=hsm.RESIDENT, key="k",
             parent=ROOT, chunks=None, bits=None) -> int:
        """A file of ``data`` striped over ``osts``; ``chunks`` of it stored on the OSTs
        (default all), ``bits`` marked present in the MDS (default: those stored)."""
        ino = self.ns.create(parent, name, REG, 0, 0)["ino"]
        lay = Layout(SS, tuple(osts))
        self.ns.set_layout(ino, lay)
        n = lay.chunk_count(len(data))
        chunks = range(n) if chunks is None else chunks
        for s in chunks:
            self.put(ino, lay, s, data[s * SS:(s + 1) * SS])
        bits = chunks if bits is None else bits
        archived = bool(flags & hsm.ARCHIVED)
        with self.ns.tx() as db:
            db.execute("UPDATE inodes SET size=?, hsm=?, present=?, s3_key=?, etag=?, s3_size=? "
                       "WHERE ino=?", (len(data), flags, bitmap_set(None, bits, n),
                                       key if archived else None, "e" if archived else None,
                                       len(data) if archived else None, ino))
        return ino

    def put(self, ino: int, lay: Layout, s: int, data: bytes, ost: int | None = None):
        store = self.stores[lay.ost_of_chunk(s) if ost is None else ost]
        fd = store.open(ino, True)
        try:
            os.pwrite(fd, data, lay.chunk_object_offset(s))
        finally:
            os.close(fd)
        store.record(ino, [(s, len(data), checksum(data))])

    def obj(self, ost: int, ino: int) -> str:
        return self.stores[ost].path(ino)

    def flip(self, ost: int, ino: int, offset: int):
        with open(self.obj(ost, ino), "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0xFF]))

    def sql(self, q: str, *args):
        with self.ns.tx() as db:
            return db.execute(q, args).fetchall()

    def present(self, ino: int, s: int) -> bool:
        (bits,) = self.ns.db.execute("SELECT present FROM inodes WHERE ino=?", (ino,)).fetchone()
        return bitmap_has(bits, s)

    def flags(self, ino: int) -> int:
        return self.ns.hsm_state(ino)[0]


@pytest.fixture
def fs(tmp_path):
    f = FS(tmp_path)
    yield f
    f.close()


def data(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def kinds(problems) -> list[str]:
    return sorted(p.kind for p in problems)


def run_fsck(fs: FS, repair: bool = False):
    return fsck.fsck(fs.dir, repair=repair)


# -- clean filesystems ----------------------------------------------------------------------


def test_clean_filesystem_has_no_problems(fs):
    d = fs.ns.mkdir(ROOT, b"d", 0o755, 0, 0)["ino"]
    fs.file(b"a", data(3 * SS + 5))  # resident, archived, clean
    fs.file(b"b", data(SS), flags=hsm.IMPORTED, chunks=[])  # a released stub
    fs.file(b"c", data(4 * SS), flags=hsm.IMPORTED, chunks=[1])  # partly hydrated: fine
    fs.file(b"e", data(2 * SS), flags=0, parent=d)  # never archived
    fs.file(b"f", data(2 * SS), flags=hsm.EXISTS | hsm.ARCHIVED | hsm.DIRTY)
    fs.ns.create(ROOT, b"empty", REG, 0, 0)
    fs.ns.symlink(d, b"l", b"../a", 0, 0)
    r = run_fsck(fs)
    assert r.problems == []
    assert r.counts["chunks"] == r.counts["chunks_verified"] == 4 + 0 + 1 + 2 + 2
    out = []
    assert fsck.run(fs.dir, False, False, echo=out.append) == 0
    assert out[-1].startswith("fsck: ") and "0 problem(s)" in out[-1]


def test_short_object_tail_that_reads_as_zeros_is_fine(fs):
    # the OST records a chunk whose last bytes are a hole at the object's end
    ino = fs.file(b"a", b"", flags=0)
    lay = Layout(SS, (0, 1))
    fd = fs.stores[0].open(ino, True)
    os.pwrite(fd, b"xy", 0)
    os.close(fd)
    fs.stores[0].record(ino, [(0, 10, checksum(b"xy" + bytes(8)))])
    fs.sql("UPDATE inodes SET size=10, present=? WHERE ino=?", bitmap_set(None, [0], 1), ino)
    assert lay.chunk_count(10) == 1
    assert run_fsck(fs).problems == []


# -- chunks: corrupt, missing, unrecorded --------------------------------------------------------


def test_corrupt_chunk_of_clean_file_is_dropped_and_refetchable(fs):
    ino = fs.file(b"a", data(3 * SS))
    fs.flip(1, ino, 10)  # chunk 1 lives on OST1 at object offset 0
    r = run_fsck(fs)
    assert kinds(r.problems) == ["corrupt_chunk"]
    p = r.problems[0]
    assert (p.ino, p.ost, p.chunk, p.fix) == (ino, 1, 1, ("drop_chunk", 1, ino, 1))
    assert "checksum mismatch" in p.line() and "/a" in p.line()
    r = run_fsck(fs, repair=True)
    assert [p.kind for p, _ in r.fixed] == ["corrupt_chunk"] and r.remaining == []
    assert fs.stores[1].has(ino, 1) is None and not fs.present(ino, 1)
    assert fs.present(ino, 0) and fs.present(ino, 2)
    assert run_fsck(fs).problems == []


@pytest.mark.parametrize("flags", [hsm.EXISTS | hsm.ARCHIVED | hsm.DIRTY, 0,
                                   hsm.EXISTS | hsm.ARCHIVED | hsm.LOST])
def test_corrupt_chunk_with_no_other_copy_is_never_deleted(fs, flags):
    ino = fs.file(b"a", data(2 * SS), flags=flags)
    fs.flip(0, ino, 3)
    with open(fs.obj(0, ino), "rb") as f:
        before = f.read()
    r = run_fsck(fs, repair=True)
    assert kinds(r.problems) == ["corrupt_chunk"] and r.fixed == []
    assert r.problems[0].data_loss and r.problems[0].line().startswith("DATA LOSS")
    assert kinds(r.remaining) == ["corrupt_chunk"]
    assert fs.stores[0].has(ino, 0) is not None and fs.present(ino, 0)
    with open(fs.obj(0, ino), "rb") as f:
        assert f.read() == before
    out = []
    assert fsck.run(fs.dir, True, False, echo=out.append) == 1
    assert "DATA LOSS" in out[-1]


def test_deleted_object_file_of_clean_file(fs):
    ino = fs.file(b"a", data(2 * SS + 1))
    os.unlink(fs.obj(0, ino))  # chunks 0 and 2
    r = run_fsck(fs)
    assert kinds(r.problems) == ["missing_object", "missing_object"]
    assert all("missing" in p.message for p in r.problems)
    r = run_fsck(fs, repair=True)
    assert len(r.fixed) == 2 and r.remaining == []
    assert fs.stores[0].table(ino) == {} and fs.stores[1].table(ino) != {}
    assert [fs.present(ino, s) for s in range(3)] == [False, True, False]


def test_truncated_object_file_is_short(fs):
    ino = fs.file(b"a", data(SS), osts=(0,))
    os.truncate(fs.obj(0, ino), 100)
    (p,) = run_fsck(fs).problems
    assert p.kind == "missing_object" and "too short" in p.message


def test_presence_bit_without_chunk(fs):
    clean = fs.file(b"clean", data(2 * SS), chunks=[0], bits=[0, 1])
    dirty = fs.file(b"dirty", data(2 * SS), flags=hsm.EXISTS | hsm.ARCHIVED | hsm.DIRTY,
                    chunks=[0], bits=[0, 1])
    r = run_fsck(fs)
    assert kinds(r.problems) == ["missing_chunk", "missing_chunk"]
    by = {p.ino: p for p in r.problems}
    assert by[clean].fix == ("clear_bit", clean, 1) and not by[clean].data_loss
    assert by[dirty].fix is None and by[dirty].data_loss
    r = run_fsck(fs, repair=True)
    assert not fs.present(clean, 1) and fs.present(clean, 0)
    assert fs.present(dirty, 1)  # left for a person: nothing invented
    assert [p.ino for p in r.remaining] == [dirty]


def test_chunk_the_mds_does_not_know_about(fs):
    ino = fs.file(b"a", data(3 * SS), chunks=[0, 1, 2], bits=[0])
    stub = fs.file(b"stub", data(2 * SS), flags=hsm.IMPORTED, chunks=[0, 1], bits=[1])
    r = run_fsck(fs)
    assert kinds(r.problems) == ["unrecorded_chunk"] * 3
    r = run_fsck(fs, repair=True)
    assert r.remaining == [] and len(r.fixed) == 3
    assert all(fs.present(ino, s) for s in range(3))
    # the last chunk of a released stub made it whole: no longer released
    assert fs.flags(stub) == hsm.RESIDENT
    assert any("no longer released" in what for _p, what in r.fixed)


def test_bad_unrecorded_chunk_is_not_marked_present(fs):
    ino = fs.file(b"a", data(SS), osts=(0,), bits=[])
    fs.flip(0, ino, 0)
    r = run_fsck(fs, repair=True)
    assert kinds(r.problems) == ["corrupt_chunk"] and r.remaining == []
    assert not fs.present(ino, 0) and fs.stores[0].table(ino) == {}


def test_released_file_marked_fully_present(fs):
    ino = fs.file(b"a", data(2 * SS), flags=hsm.IMPORTED)
    r = run_fsck(fs)
    assert kinds(r.problems) == ["released_resident"]
    run_fsck(fs, repair=True)
    assert fs.flags(ino) == hsm.RESIDENT


def test_released_file_marked_present_but_punched(fs):
    # the release punched the objects, the MDS still lists the chunks: clear, stay released
    ino = fs.file(b"a", data(2 * SS), flags=hsm.IMPORTED, chunks=[], bits=[0, 1])
    r = run_fsck(fs)
    assert kinds(r.problems) == ["missing_chunk", "missing_chunk", "released_resident"]
    r = run_fsck(fs, repair=True)
    assert r.remaining == []
    assert fs.flags(ino) == hsm.IMPORTED and not fs.present(ino, 0) and not fs.present(ino, 1)


# -- OST objects no file places ----------------------------------------------------------------


def test_orphan_object_of_a_deleted_inode(fs):
    lay = Layout(SS, (1,))
    fs.put(999, lay, 0, data(100))
    fd = fs.stores[0].open(998, True)  # an empty object file, no rows
    os.close(fd)
    r = run_fsck(fs)
    assert kinds(r.problems) == ["orphan_object", "orphan_object"]
    r = run_fsck(fs, repair=True)
    assert r.remaining == []
    assert not os.path.exists(fs.obj(1, 999)) and fs.stores[1].table(999) == {}
    assert not os.path.exists(fs.obj(0, 998))


def test_object_on_an_ost_outside_the_layout(fs):
    clean = fs.file(b"clean", data(SS), osts=(0,))
    dirty = fs.file(b"dirty", data(SS), osts=(0,), flags=hsm.EXISTS | hsm.ARCHIVED | hsm.DIRTY)
    for ino in (clean, dirty):
        fs.put(ino, Layout(SS, (1,)), 0, data(SS, 9))
    r = run_fsck(fs)
    assert kinds(r.problems) == ["orphan_object", "orphan_object"]
    r = run_fsck(fs, repair=True)
    assert fs.stores[1].table(clean) == {} and not os.path.exists(fs.obj(1, clean))
    assert fs.stores[1].table(dirty) != {} and os.path.exists(fs.obj(1, dirty))  # never deleted
    (left,) = r.remaining
    assert left.ino == dirty and "dirty" in left.why_not
    assert fs.stores[0].table(clean) and fs.stores[0].table(dirty)  # the real data untouched


def test_misplaced_and_beyond_eof_chunks(fs):
    clean = fs.file(b"clean", data(2 * SS))
    dirty = fs.file(b"dirty", data(2 * SS), flags=hsm.EXISTS | hsm.ARCHIVED | hsm.DIRTY)
    for ino in (clean, dirty):
        fs.put(ino, Layout(SS, (0,)), 1, data(SS, 3), ost=0)  # chunk 1 belongs on OST1
        fs.put(ino, Layout(SS, (0, 1)), 3, data(SS, 4))  # past the 2-chunk end
    r = run_fsck(fs)
    assert kinds(r.problems) == ["beyond_eof", "beyond_eof", "misplaced_chunk", "misplaced_chunk"]
    r = run_fsck(fs, repair=True)
    assert kinds(r.remaining) == ["beyond_eof", "misplaced_chunk"]
    assert {p.ino for p in r.remaining} == {dirty}
    assert 1 not in fs.stores[0].table(clean) and 3 not in fs.stores[1].table(clean)
    assert 1 in fs.stores[0].table(dirty) and 3 in fs.stores[1].table(dirty)
    assert fs.stores[1].has(clean, 1) is not None  # the real chunk 1 stays


def test_objects_of_a_directory_inode(fs):
    d = fs.ns.mkdir(ROOT, b"d", 0o755, 0, 0)["ino"]
    fs.put(d, Layout(SS, (0,)), 0, data(10))
    r = run_fsck(fs, repair=True)
    assert kinds(r.problems) == ["orphan_object"] and r.remaining == []


def test_stray_file_in_objects(fs):
    with open(os.path.join(fs.dir, "ost0", "objects", "junk"), "w") as f:
        f.write("x")
    r = run_fsck(fs, repair=True)
    assert kinds(r.remaining) == ["stray_file"]
    assert os.path.exists(os.path.join(fs.dir, "ost0", "objects", "junk"))


# -- namespace ------------------------------------------------------------------------------


def test_orphan_inode_is_freed_with_its_objects(fs):
    ino = fs.file(b"a", data(2 * SS))
    fs.ns.unlink(ROOT, b"a")  # unlinked while open, then everything stopped
    r = run_fsck(fs)
    assert kinds(r.problems) == ["orphan_inode"]  # its chunks are not reported one by one
    r = run_fsck(fs, repair=True)
    assert r.remaining == []
    assert fs.ns.nlink(ino) == -1
    assert fs.stores[0].table(ino) == {} and fs.stores[1].table(ino) == {}
    assert not os.path.exists(fs.obj(0, ino))


def test_dangling_entry_and_directory_link_counts(fs):
    d = fs.ns.mkdir(ROOT, b"d", 0o755, 0, 0)["ino"]
    sub = fs.ns.mkdir(d, b"sub", 0o755, 0, 0)["ino"]
    fs.sql("INSERT INTO dentries(parent, name, ino) VALUES (?,?,?)", d, b"ghost", 4242)
    fs.sql("UPDATE inodes SET nlink=7 WHERE ino=?", d)
    fs.sql("UPDATE inodes SET nlink=5 WHERE ino=?", ROOT)
    f = fs.file(b"f", data(10), osts=(0,))
    fs.ns.link(f, d, b"f2")
    fs.sql("UPDATE inodes SET nlink=1 WHERE ino=?", f)
    r = run_fsck(fs)
    assert kinds(r.problems) == ["dangling_dentry", "nlink", "nlink", "nlink"]
    r = run_fsck(fs, repair=True)
    assert r.remaining == []
    assert fs.ns.nlink(d) == 3 and fs.ns.nlink(ROOT) == 3 and fs.ns.nlink(f) == 2
    assert fs.ns.nlink(sub) == 2
    assert fs.ns.resolve([b"d", b"ghost"]) is None


def test_disconnected_inode_goes_to_lost_found(fs):
    ino = fs.file(b"a", data(SS), flags=0)  # never archived: must not be lost
    d = fs.ns.mkdir(ROOT, b"d", 0o755, 0, 0)["ino"]
    fs.ns.mkdir(d, b"inner", 0o755, 0, 0)
    fs.sql("DELETE FROM dentries WHERE ino IN (?, ?)", ino, d)
    r = run_fsck(fs)
    assert kinds(r.problems) == ["disconnected_inode", "disconnected_inode", "nlink"]
    r = run_fsck(fs, repair=True)
    assert r.remaining == [], [p.line() for p in r.remaining]
    lf = fs.ns.resolve([b"lost+found"])
    names = {n: i for _id, n, a in fs.ns.readdir(lf, 0, 100) for i in [a["ino"]]}
    assert set(names.values()) == {ino, d}
    assert fs.ns.nlink(lf) == 3 and fs.ns.nlink(ROOT) == 3
    assert fs.stores[0].table(ino)  # its data kept
    assert run_fsck(fs).problems == []


def test_entry_in_a_missing_directory_is_moved_to_lost_found(fs):
    ino = fs.file(b"a", data(10), osts=(0,))
    fs.sql("UPDATE dentries SET parent=777 WHERE ino=?", ino)
    r = run_fsck(fs, repair=True)
    assert kinds(r.problems) == ["bad_parent"] and r.remaining == []
    assert fs.ns.path_of(ino).startswith(b"lost+found/")


def test_broken_hsm_flags_are_reported_not_guessed(fs):
    ino = fs.file(b"a", data(10), osts=(0,), flags=hsm.RELEASED | hsm.EXISTS)
    r = run_fsck(fs, repair=True)
    assert kinds(r.problems) == ["hsm_invariant"] and kinds(r.remaining) == ["hsm_invariant"]
    assert fs.flags(ino) == hsm.RELEASED | hsm.EXISTS


def test_layout_naming_a_missing_ost(fs):
    ino = fs.file(b"a", data(10), osts=(0,))
    fs.sql("UPDATE inodes SET layout=? WHERE ino=?", json.dumps({"stripe_size": SS, "osts": [5]}),
           ino)
    r = run_fsck(fs, repair=True)
    assert kinds(r.problems) == ["bad_layout"]
    assert fs.stores[0].table(ino)  # cannot be judged: left alone


# -- the pure check on a snapshot ---------------------------------------------------------------


def test_check_is_pure():
    lay = Layout(SS, (0, 1))
    snap = fsck.Snapshot(2)
    snap.inodes[ROOT] = fsck.Inode(ROOT, stat.S_IFDIR | 0o755, 2, 0, 0)
    snap.inodes[5] = fsck.Inode(5, REG, 1, 2 * SS, hsm.RESIDENT, "k", 2 * SS,
                                bitmap_set(None, [0, 1], 2), lay)
    snap.dentries = [fsck.Dentry(1, ROOT, b"x", 5)]
    snap.rows = {0: {5: {0: (SS, 1)}}, 1: {5: {1: (SS, 2)}}}
    snap.objects = {0: {5}, 1: {5}}
    snap.verdicts = {(0, 5, 0): scrub.OK, (1, 5, 1): scrub.CORRUPT}
    (p,) = fsck.check(snap)
    assert p.kind == "corrupt_chunk" and p.fix == ("drop_chunk", 1, 5, 1) and "/x" in p.message
    snap.inodes[5].hsm |= hsm.DIRTY
    (p,) = fsck.check(snap)
    assert p.fix is None and p.data_loss


# -- environment and the command line -----------------------------------------------------------


def test_refuses_while_an_mds_holds_the_lock(fs):
    fd = os.open(os.path.join(fs.dir, "mds.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r = CliRunner().invoke(main, ["fsck", fs.dir])
        assert r.exit_code == 2 and "MDS is running" in r.output
    finally:
        os.close(fd)
    assert CliRunner().invoke(main, ["fsck", fs.dir]).exit_code == 0


def test_not_a_data_dir(tmp_path):
    r = CliRunner().invoke(main, ["fsck", str(tmp_path)])
    assert r.exit_code == 2 and "fs.json" in r.output
    r = CliRunner().invoke(main, ["scrub", str(tmp_path)])
    assert r.exit_code == 2 and "fs.json" in r.output


def test_cli_repair_and_json(fs):
    ino = fs.file(b"a", data(2 * SS))
    fs.flip(0, ino, 0)
    r = CliRunner().invoke(main, ["fsck", fs.dir, "--json"])
    assert r.exit_code == 1
    out = json.loads(r.output)
    assert out["summary"]["problems"] == 1 and out["problems"][0]["kind"] == "corrupt_chunk"
    r = CliRunner().invoke(main, ["fsck", fs.dir, "--repair"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("corrupt_chunk:") and lines[1].startswith("  fixed: dropped bad chunk 0")
    assert "1 fixed, 0 remaining" in lines[-1]
    assert CliRunner().invoke(main, ["fsck", fs.dir]).exit_code == 0


# -- scrub ------------------------------------------------------------------------------------


def test_scrub_reports_the_bad_chunk(fs):
    fs.ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    d = fs.ns.resolve([b"d"])
    ino = fs.file(b"a", data(4 * SS + 3), parent=d)
    fs.file(b"b", data(3 * SS))
    fs.flip(1, ino, SS + 7)  # OST1 object offset SS: chunk 3
    r = CliRunner().invoke(main, ["scrub", fs.dir])
    assert r.exit_code == 1, r.output
    bad = [ln for ln in r.output.splitlines() if ln.startswith("BAD")]
    assert len(bad) == 1
    assert f"chunk 3 of inode {ino}" in bad[0] and "OST1" in bad[0] and f"offset {SS}" in bad[0]
    assert "/d/a" in bad[0]
    assert "8 chunks" in r.output.splitlines()[-1]
    r = CliRunner().invoke(main, ["scrub", fs.dir, "--ost", "0", "--json"])
    assert r.exit_code == 0
    out = json.loads(r.output)
    assert out["osts"] == [0] and out["bad"] == [] and out["chunks"] == 5
    r = CliRunner().invoke(main, ["scrub", fs.dir, "--ost", "1", "--json"])
    out = json.loads(r.output)
    assert r.exit_code == 1 and [(b["ino"], b["chunk"], b["ost"], b["object_offset"], b["path"])
                                 for b in out["bad"]] == [(ino, 3, 1, SS, "/d/a")]
    assert CliRunner().invoke(main, ["scrub", fs.dir, "--ost", "7"]).exit_code == 2


def test_scrub_repair(fs):
    clean = fs.file(b"clean", data(2 * SS))
    dirty = fs.file(b"dirty", data(2 * SS), flags=hsm.EXISTS | hsm.ARCHIVED | hsm.DIRTY)
    fs.flip(0, clean, 1)
    fs.flip(0, dirty, 1)
    r = CliRunner().invoke(main, ["scrub", fs.dir, "--repair"])
    assert r.exit_code == 1, r.output  # the dirty one cannot be repaired
    assert "only" in r.output and "fetched again from S3" in r.output
    assert fs.stores[0].has(clean, 0) is None and not fs.present(clean, 0)
    assert fs.stores[0].has(dirty, 0) is not None and fs.present(dirty, 0)
    r = CliRunner().invoke(main, ["scrub", fs.dir, "--json"])
    assert [b["ino"] for b in json.loads(r.output)["bad"]] == [dirty]


def test_scrub_skips_orphans_and_plain_progress(fs, capsys):
    fs.put(999, Layout(SS, (0,)), 0, data(10))
    rep = scrub.ScrubReport(fs.dir, [0, 1])
    sc = scrub.Scrubber(fs.dir)
    try:
        seen = []
        sc.scrub(rep, seen.append)
    finally:
        sc.close()
    assert rep.chunks == 0 and len(rep.skipped) == 1 and sum(seen) == 10
    prog = scrub.PlainProgress(100, every=0)
    prog.update(50)
    assert "50%" in capsys.readouterr().err


def test_chunk_verdicts(tmp_path):
    p = tmp_path / "o"
    p.write_bytes(b"abc")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert scrub.chunk_verdict(fd, 0, 3, checksum(b"abc")) == scrub.OK
        assert scrub.chunk_verdict(fd, 0, 5, checksum(b"abc\0\0")) == scrub.OK
        assert scrub.chunk_verdict(fd, 0, 5, checksum(b"abcde")) == scrub.SHORT
        assert scrub.chunk_verdict(fd, 0, 3, checksum(b"abd")) == scrub.CORRUPT
        old = scrub.WHOLE_READ_LIMIT
        scrub.WHOLE_READ_LIMIT, scrub.PIECE = 0, 2  # the piecewise path gives the same answers
        try:
            assert scrub.chunk_verdict(fd, 0, 5, checksum(b"abc\0\0")) == scrub.OK
            assert scrub.chunk_verdict(fd, 0, 3, checksum(b"abd")) == scrub.CORRUPT
            assert scrub.chunk_verdict(fd, 0, 5, checksum(b"abcde")) == scrub.SHORT
        finally:
            scrub.WHOLE_READ_LIMIT, scrub.PIECE = old, 16 * 1024 * 1024
    finally:
        os.close(fd)
    assert scrub.chunk_verdict(None, 0, 3, 0) == scrub.NOFILE


def test_refuses_while_an_ost_answers(fs):
    import socket

    ino = fs.file(b"a", data(SS), osts=(0,))
    fs.flip(0, ino, 0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(os.path.join(fs.dir, "ost0", "ost.sock"))
        srv.listen()
        r = CliRunner().invoke(main, ["fsck", fs.dir, "--repair"])
        assert r.exit_code == 2 and "OST 0" in r.output
        r = CliRunner().invoke(main, ["scrub", fs.dir])  # checking is fine online
        assert r.exit_code == 1
        r = CliRunner().invoke(main, ["scrub", fs.dir, "--repair"])
        assert r.exit_code == 2 and "stopped" in r.output
    assert fs.stores[0].has(ino, 0) is not None
    # a stale socket file left by a killed OST does not count
    assert CliRunner().invoke(main, ["scrub", fs.dir, "--repair"]).exit_code == 0
    assert fs.stores[0].has(ino, 0) is None
