"""fsck and scrub on a real filesystem: damage an OST behind its back, find it, heal it."""

from __future__ import annotations

import json
import os
import sqlite3

from helpers import MiB, data, lustrefuse, read_file, wait_for

from lustrefuse import hsm
from lustrefuse.layout import Layout
from lustrefuse.namespace import ROOT


def file_info(fs, name: str) -> tuple[int, Layout]:
    """(inode, layout) of a file in the root, read from mds.db (read-only)."""
    db = sqlite3.connect(f"file:{fs.data_dir / 'mds.db'}?mode=ro", uri=True)
    try:
        (ino,) = db.execute("SELECT ino FROM dentries WHERE parent=? AND name=?",
                            (ROOT, name.encode())).fetchone()
        (lay,) = db.execute("SELECT layout FROM inodes WHERE ino=?", (ino,)).fetchone()
    finally:
        db.close()
    return ino, Layout.from_dict(json.loads(lay))


def object_file(fs, ost: int, ino: int):
    return fs.data_dir / f"ost{ost}" / "objects" / f"{ino & 0xFF:02x}" / f"{ino:x}"


def hydrate(fs, objects: dict):
    for name, body in objects.items():
        assert read_file(fs.path(name)) == body
    for name in objects:  # every chunk reported to the MDS: the file is resident
        wait_for(lambda n=name: fs.hsm_flags(n) == hsm.RESIDENT, 30, 0.1, f"{name} resident")


def test_scrub_and_fsck_find_and_heal_damaged_chunks(make_fs, bucket):
    objects = {"a.bin": data(3 * MiB + 123, "a"), "b.bin": data(2 * MiB + 5, "b")}
    fs = make_fs(bucket, osts=2, stripe_size="1M", objects=objects,
                 extra_args=("--imported-file-chunk-size", "1M"))
    hydrate(fs, objects)

    # online: scrub works on the mount point (read-only), fsck refuses
    r = lustrefuse("scrub", fs.mnt)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "7 chunks" in r.stdout and ": 0 bad" in r.stdout
    r = lustrefuse("fsck", fs.data_dir)
    assert r.returncode == 2 and "MDS is running" in r.stderr

    fs.down()
    ino, lay = file_info(fs, "a.bin")
    assert lay.stripe_count == 2
    ost, off = lay.ost_of_chunk(1), lay.chunk_object_offset(1)
    with open(object_file(fs, ost, ino), "r+b") as f:
        f.seek(off + 4321)
        b = f.read(1)
        f.seek(off + 4321)
        f.write(bytes([b[0] ^ 0x5A]))

    r = lustrefuse("scrub", fs.data_dir, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["chunks"] == 7
    assert [(b["ino"], b["chunk"], b["ost"], b["object_offset"], b["path"]) for b in report["bad"]] \
        == [(ino, 1, ost, off, "/a.bin")]
    r = lustrefuse("scrub", fs.data_dir)
    bad = [ln for ln in r.stdout.splitlines() if ln.startswith("BAD")]
    assert r.returncode == 1 and len(bad) == 1 and f"chunk 1 of inode {ino}" in bad[0]

    r = lustrefuse("fsck", fs.data_dir)
    assert r.returncode == 1, r.stdout + r.stderr
    problems = [ln for ln in r.stdout.splitlines() if not ln.startswith("fsck:")]
    assert len(problems) == 1 and problems[0].startswith("corrupt_chunk: chunk 1 of inode")
    r = lustrefuse("fsck", fs.data_dir, "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fixed: dropped bad chunk 1" in r.stdout and "1 fixed, 0 remaining" in r.stdout
    assert lustrefuse("fsck", fs.data_dir).returncode == 0

    fs.up_again()
    gets = fs.total("s3_gets")
    assert read_file(fs.path("a.bin")) == objects["a.bin"]  # chunk 1 fetched again from S3
    assert fs.total("s3_gets") > gets
    wait_for(lambda: fs.hsm_flags("a.bin") == hsm.RESIDENT, 30, 0.1, "a.bin resident again")

    # an object file deleted by hand
    fs.down()
    ino, lay = file_info(fs, "b.bin")
    gone = object_file(fs, lay.ost_of_chunk(0), ino)
    os.unlink(gone)
    r = lustrefuse("fsck", fs.data_dir)
    assert r.returncode == 1
    missing = [ln for ln in r.stdout.splitlines() if "missing" in ln]
    assert len(missing) == 2, r.stdout  # chunks 0 and 2 lived in that object
    r = lustrefuse("fsck", fs.data_dir, "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("fixed:") == 2
    assert lustrefuse("fsck", fs.data_dir).returncode == 0
    assert lustrefuse("scrub", fs.data_dir).returncode == 0

    fs.up_again()
    assert read_file(fs.path("b.bin")) == objects["b.bin"]
    assert read_file(fs.path("a.bin")) == objects["a.bin"]
    wait_for(lambda: fs.hsm_flags("b.bin") == hsm.RESIDENT, 30, 0.1, "b.bin resident again")
