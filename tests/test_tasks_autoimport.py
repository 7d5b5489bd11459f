"""FSx data-repository behaviour on a real mount: tasks, auto-import, auto-export.

The bucket is changed underneath a mounted filesystem (reference §4.3-4.6):
``lustrefuse task import|export|release`` and ``task list`` on one filesystem
without automatic policies; then one filesystem started with both
``--auto-import new,changed,deleted --auto-import-interval 1`` and
``--auto-export new,changed,deleted`` (FSx allows both on one association).
Every wait is a bounded poll.
"""

from __future__ import annotations

import csv
import os
import re
import stat
import subprocess
import time

import pytest
from conftest import new_bucket
from helpers import LFS, LUSTREFUSE, MiB, data, read_file, run, unique, wait_for

from lustrefuse import hsm

AUTO_INTERVAL = 1  # seconds between auto-import sweeps
SWEEP_TIMEOUT = 20  # bound for anything auto-import or auto-export must do

TASK_LINE = re.compile(r"^task (?P<id>\d+) (?P<type>import|export|release) (?P<state>[A-Z]+): "
                       r"(?P<total>\d+) files, (?P<ok>\d+) succeeded, (?P<failed>\d+) failed"
                       r"(?:, (?P<released>[\d,]+) bytes released)?; report (?P<report>\S+)$")


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def task(fs, kind: str, *args) -> re.Match:
    """Run ``lustrefuse task KIND MNT ARGS`` (it waits) and parse its summary line."""
    r = ok(run([LUSTREFUSE, "task", kind, fs.path(), *args], timeout=120))
    assert re.fullmatch(rf"task \d+ \({kind}\) started\n", r.stderr), r.stderr
    m = TASK_LINE.match(r.stdout.strip())
    assert m and m["type"] == kind, r.stdout
    return m


def report_rows(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def flags(fs, rel: str) -> int:
    return fs.hsm_flags(rel)


def hsm_state_line(fs, rel: str) -> str:
    return ok(run([LFS, "hsm_state", fs.path(rel)])).stdout


def keys(fs, prefix: str = "") -> dict[str, int]:
    out = {}
    for page in fs.s3.get_paginator("list_objects_v2").paginate(Bucket=fs.bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def body(fs, key: str) -> bytes:
    return fs.s3.get_object(Bucket=fs.bucket, Key=key)["Body"].read()


def meta(fs, key: str) -> dict:
    return fs.s3.head_object(Bucket=fs.bucket, Key=key)["Metadata"]


# -- data repository tasks (no automatic policies) ----------------------------------

TASK_OBJECTS = {
    "keep.txt": b"keep\n",
    "chg.bin": data(2 * MiB + 3, "chg-v1"),
    "gone.txt": b"gone soon\n",
    "dirty.txt": b"dirty v1\n",
    "dd/": b"",
    "dd/x.txt": b"x\n",
}


@pytest.fixture(scope="module")
def tfs(make_module_fs, s3):
    return make_module_fs(new_bucket(s3), objects=TASK_OBJECTS)


def test_import_task_applies_new_changed_deleted_and_reports_bad_keys(tfs):
    """FSx import task (§4.2, §4.4, §4.6): new objects appear as released stubs;
    a changed object (other ETag and size) turns the local file into a released
    stub of the new version and its stale stripes go; a deleted object removes a
    clean file but keeps one with local changes; an impossible key is in the
    CSV report as S3ObjectPathNotPosixCompliant."""
    s3, b = tfs.s3, tfs.bucket
    old = TASK_OBJECTS["chg.bin"]
    assert read_file(tfs.path("chg.bin")) == old
    wait_for(lambda: flags(tfs, "chg.bin") == hsm.RESIDENT, 30, 0.1, "chg.bin resident")
    held_before = tfs.ost_objects_du()
    assert held_before >= len(old)
    with open(tfs.path("dirty.txt"), "ab") as f:
        f.write(b"local change\n")
    assert flags(tfs, "dirty.txt") == hsm.RESIDENT | hsm.DIRTY

    new = data(3 * MiB + 7, "chg-v2")
    s3.put_object(Bucket=b, Key="chg.bin", Body=new)
    s3.put_object(Bucket=b, Key="newdir/new.txt", Body=b"brand new\n",
                  Metadata={"file-permissions": "0100640", "file-owner": "1234",
                            "file-group": "99", "file-mtime": "1595002920000000000ns"})
    s3.put_object(Bucket=b, Key="newdir/ms.txt", Body=b"ms\n",  # times without "ns": ms
                  Metadata={"file-mtime": "1595002920123", "file-atime": "1595002920456"})
    s3.put_object(Bucket=b, Key="x//y", Body=b"bad key")
    s3.delete_object(Bucket=b, Key="gone.txt")
    s3.delete_object(Bucket=b, Key="dirty.txt")

    m = task(tfs, "import")
    assert m["state"] == "SUCCEEDED" and int(m["failed"]) == 1
    assert os.path.basename(m["report"]) == f"task-{m['id']}-report.csv"
    assert report_rows(m["report"]) == [["FilePath", "FileStatus", "ErrorCode"],
                                        ["x//y", "failed", "S3ObjectPathNotPosixCompliant"]]

    # new: a stub with the object's POSIX metadata
    st = os.stat(tfs.path("newdir/new.txt"))
    assert (oct(st.st_mode), st.st_uid, st.st_gid) == ("0o100640", 1234, 99)
    assert st.st_mtime_ns == 1595002920000000000
    assert hsm_state_line(tfs, "newdir/new.txt") == (
        f"{tfs.path('newdir/new.txt')}: (0x0000000d) released exists archived, archive_id:1\n")
    assert read_file(tfs.path("newdir/new.txt")) == b"brand new\n"
    ms = os.stat(tfs.path("newdir/ms.txt"))
    assert (ms.st_mtime_ns, ms.st_atime_ns) == (1595002920123_000_000, 1595002920456_000_000)
    assert (oct(ms.st_mode), ms.st_uid) == ("0o100755", 0)  # FSx defaults: root 755

    # changed: a released stub of the new version, old stripes dropped
    assert flags(tfs, "chg.bin") == hsm.IMPORTED
    assert os.stat(tfs.path("chg.bin")).st_size == len(new)
    assert tfs.info("chg.bin")["present"] == 0
    wait_for(lambda: tfs.ost_objects_du() < held_before - MiB, 20, 0.1, "stale stripes dropped")
    assert read_file(tfs.path("chg.bin")) == new

    # deleted: the clean file is gone, the dirty one is kept with its data
    assert not os.path.exists(tfs.path("gone.txt"))
    assert read_file(tfs.path("dirty.txt")) == b"dirty v1\nlocal change\n"
    assert flags(tfs, "dirty.txt") & hsm.DIRTY
    assert "x" not in os.listdir(tfs.path())  # the bad key made nothing


def test_export_task_uploads_files_directories_and_symlinks(tfs):
    """FSx export task (§4.6, §4.7): new and changed files as objects with the
    POSIX headers, directories as ``key/`` markers, symlinks as objects whose
    body is the target; unchanged files are not exported again."""
    os.makedirs(tfs.path("exp/sub"))
    a = data(1_100_000, "export-a")
    with open(tfs.path("exp/a.bin"), "wb") as f:
        f.write(a)
    os.chmod(tfs.path("exp/a.bin"), 0o600)
    os.symlink("a.bin", tfs.path("exp/link"))
    with open(tfs.path("keep.txt"), "ab") as f:  # a change to an imported file
        f.write(b"changed here\n")
    m = task(tfs, "export")
    assert m["state"] == "SUCCEEDED" and int(m["failed"]) == 0
    assert os.path.basename(m["report"]) == f"task-{m['id']}-failures.csv"
    assert report_rows(m["report"]) == [["FilePath", "FileStatus", "ErrorCode"]]
    k = keys(tfs)
    assert k["exp/"] == 0 and k["exp/sub/"] == 0
    assert body(tfs, "exp/a.bin") == a
    assert body(tfs, "exp/link") == b"a.bin"
    assert body(tfs, "keep.txt") == b"keep\nchanged here\n"
    ma = meta(tfs, "exp/a.bin")
    assert ma["file-permissions"] == "0100600" and ma["user-agent"] == "aws-fsx-lustre"
    assert int(meta(tfs, "exp/sub/")["file-permissions"], 8) == stat.S_IFDIR | 0o755
    assert stat.S_ISLNK(int(meta(tfs, "exp/link")["file-permissions"], 8))
    assert flags(tfs, "exp/a.bin") == hsm.RESIDENT
    assert flags(tfs, "keep.txt") == hsm.RESIDENT


def test_second_export_task_exports_nothing(tfs):
    """FSx export tasks process only what changed since the last export."""
    os.makedirs(tfs.path("exp2/sub"))
    os.symlink("sub", tfs.path("exp2/link"))
    with open(tfs.path("exp2/f.txt"), "wb") as f:
        f.write(b"once\n")
    first = task(tfs, "export")
    assert first["state"] == "SUCCEEDED" and int(first["total"]) >= 4
    before = {k: tfs.s3.head_object(Bucket=tfs.bucket, Key=k)["LastModified"]
              for k in ("exp2/", "exp2/sub/", "exp2/link", "exp2/f.txt")}
    time.sleep(1.1)  # S3 LastModified has 1 s resolution
    second = task(tfs, "export")
    after = {k: tfs.s3.head_object(Bucket=tfs.bucket, Key=k)["LastModified"] for k in before}
    assert after == before
    assert second["state"] == "SUCCEEDED" and int(second["total"]) == 0


def test_import_after_export_keeps_symlinks_without_failures(tfs):
    """A symlink's own object (exported here) is not a conflict on import."""
    os.mkdir(tfs.path("ln1"))
    os.symlink("../keep.txt", tfs.path("ln1/link"))
    task(tfs, "export")
    assert body(tfs, "ln1/link") == b"../keep.txt"
    m = task(tfs, "import")
    assert os.readlink(tfs.path("ln1/link")) == "../keep.txt"
    assert [row for row in report_rows(m["report"])[1:] if row[0] == "ln1/link"] == []


def test_import_makes_symlinks_from_symlink_objects(tfs):
    """FSx POSIX metadata (§4.7): a symlink is an object whose body is its target
    and whose metadata is the link's."""
    tfs.s3.put_object(Bucket=tfs.bucket, Key="sym/ln", Body=b"../keep.txt",
                      Metadata={"file-permissions": "0120777", "file-owner": "0",
                                "file-group": "0"})
    task(tfs, "import")
    assert os.path.islink(tfs.path("sym/ln"))
    assert os.readlink(tfs.path("sym/ln")) == "../keep.txt"


def test_release_task_releases_exported_files(tfs):
    """FSx release task (§4.3): only exported, clean files; ``--older-than N``
    skips files used in the last N days; 0 releases regardless of age."""
    r1 = data(900_000, "release-1")
    with open(tfs.path("rel1.bin"), "wb") as f:
        f.write(r1)
    with open(tfs.path("local-only.txt"), "wb") as f:
        f.write(b"never exported\n")
    ok(run([LFS, "hsm_archive", tfs.path("rel1.bin")]))
    wait_for(lambda: flags(tfs, "rel1.bin") == hsm.RESIDENT, 30, 0.1, "rel1 archived")
    m = task(tfs, "release", "--older-than", "1")
    assert flags(tfs, "rel1.bin") == hsm.RESIDENT  # used today: too young
    m = task(tfs, "release", "rel1.bin", "local-only.txt", "--older-than", "0")
    assert m["state"] == "SUCCEEDED" and m["total"] == "1" and m["ok"] == "1"
    assert int(m["released"].replace(",", "")) >= len(r1)
    assert flags(tfs, "rel1.bin") == hsm.IMPORTED
    assert flags(tfs, "local-only.txt") == 0
    assert read_file(tfs.path("rel1.bin")) == r1


def test_task_list_shows_finished_tasks(tfs):
    m = task(tfs, "import")
    r = ok(run([LUSTREFUSE, "task", "list", tfs.path()]))
    lines = r.stdout.splitlines()
    parsed = [TASK_LINE.match(ln) for ln in lines]
    assert all(parsed), lines
    ids = [int(p["id"]) for p in parsed]
    assert ids == sorted(ids) and int(m["id"]) in ids
    mine = next(p for p in parsed if p["id"] == m["id"])
    assert (mine["type"], mine["state"]) == ("import", "SUCCEEDED")


# -- automatic import and export ---------------------------------------------------

AUTO_OBJECTS = {
    "a.txt": b"version 1\n",
    "gone.txt": b"to be deleted\n",
    "emptyd/": b"",
    "fulld/": b"",
    "fulld/k.txt": b"k\n",
}


@pytest.fixture(scope="module")
def afs(make_module_fs, s3):
    return make_module_fs(new_bucket(s3), objects=AUTO_OBJECTS, extra_args=(
        "--auto-import", "new,changed,deleted", "--auto-import-interval", str(AUTO_INTERVAL),
        "--auto-export", "new,changed,deleted"))


def sweep(fs, n: int = 2):
    """Wait for ``n`` auto-import sweeps: each puts a fresh object and waits for it."""
    for _ in range(n):
        key = f"sweep/{unique('s')}"
        fs.s3.put_object(Bucket=fs.bucket, Key=key, Body=b"")
        wait_for(lambda k=key: os.path.exists(fs.path(k)), SWEEP_TIMEOUT, 0.1, f"sweep {key}")


def test_auto_import_new_object_appears(afs):
    key = f"new-{unique('o')}.bin"
    content = data(700_000, key)
    afs.s3.put_object(Bucket=afs.bucket, Key=key, Body=content)
    t0 = time.monotonic()
    wait_for(lambda: os.path.exists(afs.path(key)), SWEEP_TIMEOUT, 0.1, "the new object")
    assert time.monotonic() - t0 < SWEEP_TIMEOUT
    assert flags(afs, key) == hsm.IMPORTED
    assert read_file(afs.path(key)) == content


def test_auto_import_changed_and_deleted_objects(afs):
    """S3 wins: a changed object replaces the local copy; a deleted object
    removes the clean file."""
    assert read_file(afs.path("a.txt")) == b"version 1\n"
    afs.s3.put_object(Bucket=afs.bucket, Key="a.txt", Body=b"version 2, longer\n")
    afs.s3.delete_object(Bucket=afs.bucket, Key="gone.txt")
    # an open revalidates (close-to-open); a bare stat may be served from the
    # kernel's attribute cache for --attr-timeout seconds
    wait_for(lambda: read_file(afs.path("a.txt")) == b"version 2, longer\n", SWEEP_TIMEOUT, 0.1,
             "the change")
    assert os.stat(afs.path("a.txt")).st_size == 18
    wait_for(lambda: "gone.txt" not in os.listdir(afs.path()), SWEEP_TIMEOUT, 0.1, "deletion")


def test_auto_import_deleted_marker_keeps_non_empty_directory(afs):
    afs.s3.delete_object(Bucket=afs.bucket, Key="fulld/")
    sweep(afs)
    assert os.listdir(afs.path("fulld")) == ["k.txt"]


def test_auto_import_deleted_marker_removes_empty_directory(afs):
    """FSx: deleting an S3 "folder" deletes the directory if it is empty."""
    assert os.path.isdir(afs.path("emptyd"))
    afs.s3.delete_object(Bucket=afs.bucket, Key="emptyd/")
    sweep(afs)
    assert "emptyd" not in os.listdir(afs.path())  # readdir: not the kernel's dentry cache


def test_auto_export_on_close_not_before(afs):
    """FSx auto-export: a file is exported once written and closed, with the
    POSIX headers; a new directory and symlink too."""
    name = f"w-{unique('f')}.bin"
    content = data(1_300_000, name)
    fd = os.open(afs.path(name), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, content)
        sweep(afs, 1)
        assert name not in keys(afs)  # still open: not propagated
    finally:
        os.close(fd)
    wait_for(lambda: name in keys(afs), SWEEP_TIMEOUT, 0.1, "export after close")
    wait_for(lambda: flags(afs, name) == hsm.RESIDENT, SWEEP_TIMEOUT, 0.1, "archived")
    assert body(afs, name) == content
    m = meta(afs, name)
    assert m["file-permissions"] == "0100644" and m["file-owner"] == "0"
    os.mkdir(afs.path("nd"))
    os.symlink(f"../{name}", afs.path("nd/ln"))
    wait_for(lambda: {"nd/", "nd/ln"} <= set(keys(afs, "nd/")), SWEEP_TIMEOUT, 0.1, "dir+link")
    assert body(afs, "nd/ln") == f"../{name}".encode()


def test_auto_export_rename_and_unlink(afs):
    """Rename = the new key with the same bytes, the old key gone; unlink deletes
    the object."""
    old, new = f"r-{unique('a')}.bin", f"r-{unique('b')}.bin"
    content = data(800_000, old)
    with open(afs.path(old), "wb") as f:
        f.write(content)
    wait_for(lambda: flags(afs, old) == hsm.RESIDENT, SWEEP_TIMEOUT, 0.1, "exported")
    assert body(afs, old) == content
    os.chmod(afs.path(old), 0o600)  # metadata changes propagate too
    wait_for(lambda: meta(afs, old)["file-permissions"] == "0100600", SWEEP_TIMEOUT, 0.1, "chmod")
    assert body(afs, old) == content
    os.rename(afs.path(old), afs.path(new))
    wait_for(lambda: new in keys(afs) and old not in keys(afs), SWEEP_TIMEOUT, 0.1, "rename")
    assert body(afs, new) == content
    sweep(afs, 1)  # auto-import sees the move as nothing new
    assert os.path.exists(afs.path(new)) and not os.path.exists(afs.path(old))
    assert read_file(afs.path(new)) == content
    os.unlink(afs.path(new))
    wait_for(lambda: new not in keys(afs), SWEEP_TIMEOUT, 0.1, "unlink")
    sweep(afs, 1)
    assert not os.path.exists(afs.path(new))
