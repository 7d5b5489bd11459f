"""Lustre HSM and lfs striping parity on a real mount (ports of sanity-hsm.sh).

Every test runs the real ``lfs`` and ``lustrefuse`` commands against a
filesystem brought up with ``lustrefuse up`` over a real moto server, and
compares what they print with Lustre's format strings (reference
``lustre_fsx.md`` §1 and §2). The sanity-hsm test each one ports is named in
its docstring; the behaviour is ported, not the script.

One module-scoped filesystem serves every test (each works on its own files
and directory); the coordinator-restart test, last, restarts its MDS. Ordinary
user steps run ``lfs`` as uid/gid 65534 through ``setpriv`` (several commands
per process). Root's ``lfs`` calls go through the console script's entry point
(``lustrefuse.lfs.main``) in this process, a few through the script itself:
the same code, without a Python start per call.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FsFactory, new_bucket
from helpers import LFS, LUSTREFUSE, MiB, data, env, pid_alive, read_file, run, wait_for

from lustrefuse import hsm, rpc
from lustrefuse.cli import main as cli_main
from lustrefuse.layout import Layout
from lustrefuse.lfs import main as lfs_main
from lustrefuse.protocol import RpcError

USER = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NOBODY = 65534

NEW = "(0x00000000)"
ARCHIVED = "(0x00000009) exists archived, archive_id:1"
DIRTY = "(0x0000000b) exists dirty archived, archive_id:1"
RELEASED = "(0x0000000d) released exists archived, archive_id:1"

EPERM_TEXT = "Operation not permitted"
EINVAL_TEXT = "Invalid argument"

QUEUE_FILES = 12  # more than the coordinator's workers, so some requests wait

OBJECTS = {
    "imp/small.txt": b"imported small file\n",
    "imp/two.bin": data(2 * MiB + 4321, "imp-two"),  # 2 stripes with 1M import chunks
    "imp/lost.bin": data(300_000, "imp-lost"),
    "imp/remove.bin": data(200_000, "imp-remove"),
    "imp/user.bin": data(150_000, "imp-user"),
    "imp/setfattr.bin": data(120_000, "imp-setfattr"),
    "imp/dup.bin": data(110_000, "imp-dup"),
    "imp/restart.bin": data(2 * MiB + 10, "imp-restart"),
    "find/": b"",
    "find/a.bin": data(3 * MiB, "find-a"),
    "find/sub/b.txt": b"b" * 1000,
    "find/sub/deep/c.txt": b"c" * 10,
    **{f"q/f{i:02d}.bin": data(100_000 + i, f"q{i}") for i in range(QUEUE_FILES)},
}


# -- helpers -------------------------------------------------------------------

def lfs(*args, user: bool = False, proc: bool = False) -> subprocess.CompletedProcess:
    """Run ``lfs``: as uid 65534 or with ``proc`` in a real process (the console
    script), else the same entry point (lustrefuse.lfs.main) in this process,
    which spares a Python start per call on a loaded machine."""
    if user or proc:
        return run([*(USER if user else []), LFS, *args])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = lfs_main([str(a) for a in args])
    return subprocess.CompletedProcess(["lfs", *args], rc, out.getvalue(), err.getvalue())


def lustrefuse_cmd(*args, proc: bool = False) -> subprocess.CompletedProcess:
    """``lustrefuse ARGS``: a real process with ``proc``, else click's runner."""
    if proc:
        return run([LUSTREFUSE, *args])
    r = CliRunner().invoke(cli_main, [str(a) for a in args])
    return subprocess.CompletedProcess(["lustrefuse", *args], r.exit_code, r.stdout, "")


AS_USER = """
import contextlib, io, json, sys
from lustrefuse.lfs import main
out = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(argv)
    out.append([rc, o.getvalue(), e.getvalue()])
print(json.dumps(out))
"""


def as_user(*cmds: list[str]) -> list[subprocess.CompletedProcess]:
    """Several ``lfs`` commands in one process running as uid/gid 65534."""
    r = run([*USER, sys.executable, "-c", AS_USER, json.dumps(cmds)])
    assert r.returncode == 0, r.stderr
    return [subprocess.CompletedProcess(["lfs", *c], rc, out, err)
            for c, (rc, out, err) in zip(cmds, json.loads(r.stdout), strict=True)]


def flags_of(r: subprocess.CompletedProcess) -> str:
    """test-framework's get_hsm_flags on an hsm_state result."""
    ok(r)
    return re.sub(r"[(),]", "", r.stdout.split(" ")[1]).strip()


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def hsm_state(path: str) -> str:
    return ok(lfs("hsm_state", path)).stdout


def get_hsm_flags(path: str) -> str:
    """test-framework's get_hsm_flags: field 2 of hsm_state without '(),'."""
    return flags_of(lfs("hsm_state", path))


def assert_state(path: str, expected: str):
    assert hsm_state(path) == f"{path}: {expected}\n"


def hsm_action(path: str) -> str:
    return ok(lfs("hsm_action", path)).stdout


def wait_noop(path: str, timeout: float = 30):
    wait_for(lambda: hsm_action(path) == f"{path}: NOOP\n", timeout, 0.1, f"NOOP on {path}")


def archive(path: str):
    """lfs hsm_archive, then wait for the coordinator to finish (NOOP, 0x9)."""
    ok(lfs("hsm_archive", path))
    wait_noop(path)
    assert_state(path, ARCHIVED)


def write(path: str, body: bytes, mode: int = 0o644):
    with open(path, "wb") as f:
        f.write(body)
    os.chmod(path, mode)


def hsm_requests(fs, fid: str | None = None, all_: bool = True, proc: bool = False) -> list[str]:
    r = ok(lustrefuse_cmd("hsm", "list", fs.path(), *(["--all"] if all_ else []), proc=proc))
    return [ln for ln in r.stdout.splitlines() if fid is None or f"fid={fid} " in ln]


def path2fid(path: str) -> str:
    return ok(lfs("path2fid", path)).stdout.strip()


def refused(r: subprocess.CompletedProcess, line: str):
    """A per-file failure: exit 1 and Lustre's message on stderr."""
    assert r.returncode == 1, f"rc={r.returncode} stdout={r.stdout!r} stderr={r.stderr!r}"
    assert line in r.stderr, f"{line!r} not in {r.stderr!r}"


def request_refused(cmd: str, path: str, text: str, user: bool = False):
    # lfs.c lfs_hsm_request: "Cannot send HSM request (use of %s): %s"
    refused(lfs(cmd, path, user=user), f"Cannot send HSM request (use of {path}): {text}")


def flags_refused(cmd: str, path: str, text: str, *flags, user: bool = False):
    refused(lfs(cmd, *flags, path, user=user), f"change hsm flags for '{path}' failed: {text}")


@contextlib.contextmanager
def osts_stopped(fs):
    """SIGSTOP every OST of ``fs`` (requests then stay STARTED or WAITING)."""
    pids = [pid for name, pid in fs.pids().items() if name.startswith("ost")]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def pfs(s3_server, s3):
    """The shared filesystem. It lives in its own 0711 directory, not under
    pytest's 0700 temp root (which any pytest session starting meanwhile resets),
    so that uid 65534 can reach the mount."""
    top = Path(tempfile.mkdtemp(prefix="lfs-parity-"))
    os.chmod(top, 0o711)
    factory = FsFactory(top, s3_server, s3)
    try:
        fs = factory(new_bucket(s3), objects=OBJECTS,
                     extra_args=("--imported-file-chunk-size", "1M"))
        yield fs
    finally:
        notes = factory.cleanup()
        if notes:
            print("cleanup notes:\n" + "\n".join(notes))
        if not any(f.mounted() for f in factory.made):
            shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def d(pfs, request):
    """A fresh directory of the shared filesystem, named after the test."""
    path = Path(pfs.path(request.node.name.replace("[", "_").replace("]", "")))
    path.mkdir()
    os.chmod(path, 0o777)
    return path


# -- states, archive, release, restore -----------------------------------------

def test_new_file_archive_exports_identical_object_with_fsx_headers(pfs, d):
    """sanity-hsm 8 / 10a / 10b: a new file is 0x0; hsm_archive gives 0x9 with
    archive id 1; the archive copy is byte-identical; archiving it again is a
    no-op that queues nothing."""
    f = str(d / "new.bin")
    body = data(1_500_000, "new-archive")
    write(f, body, 0o640)
    assert ok(lfs("hsm_state", f, proc=True)).stdout == f"{f}: {NEW}\n"  # the console script
    assert get_hsm_flags(f) == "0x00000000"
    fid = path2fid(f)
    archive(f)
    key = f"{d.name}/new.bin"
    obj = pfs.s3.get_object(Bucket=pfs.bucket, Key=key)
    assert obj["Body"].read() == body
    headers = obj["ResponseMetadata"]["HTTPHeaders"]
    st = os.stat(f)
    assert headers["x-amz-meta-file-permissions"] == "0100640"
    assert headers["x-amz-meta-file-owner"] == "0"
    assert headers["x-amz-meta-file-group"] == "0"
    assert abs(int(headers["x-amz-meta-file-mtime"][:-2]) - st.st_mtime_ns) < 2e9
    assert re.fullmatch(r"\d+ns", headers["x-amz-meta-file-atime"])
    assert headers["x-amz-meta-user-agent"] == "aws-fsx-lustre"
    assert len(hsm_requests(pfs, fid)) == 1
    ok(lfs("hsm_archive", f))  # 10b: archived and clean -> no request
    assert len(hsm_requests(pfs, fid)) == 1
    assert_state(f, ARCHIVED)


def test_dirty_after_write_and_release_refusals(pfs, d):
    """sanity-hsm 3 (a write after archive sets dirty: 0xb) and 20 (release of a
    never-archived or dirty file is refused with EPERM)."""
    never = str(d / "never.txt")
    write(never, b"never archived\n")
    r = lfs("hsm_release", never, proc=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.endswith(f"Cannot send HSM request (use of {never}): {EPERM_TEXT}\n")
    assert_state(never, NEW)

    f = str(d / "f.txt")
    write(f, b"version one\n")
    archive(f)
    with open(f, "ab") as fh:
        fh.write(b"appended\n")
    assert_state(f, DIRTY)
    request_refused("hsm_release", f, EPERM_TEXT)
    assert_state(f, DIRTY)
    assert read_file(f) == b"version one\nappended\n"


def test_chmod_does_not_dirty_truncate_does(pfs, d):
    """sanity-hsm 2: with EXISTS set, chmod/chown keep 0x1, truncate makes 0x3;
    hsm_clear --dirty goes back to 0x1. sanity-hsm 3: reading or opening for
    write without writing does not set dirty."""
    f = str(d / "f")
    write(f, b"x" * 100)
    ok(lfs("hsm_set", "--exists", f))
    assert get_hsm_flags(f) == "0x00000001"
    os.chmod(f, 0o600)
    os.chown(f, NOBODY, NOBODY)
    assert get_hsm_flags(f) == "0x00000001"
    read_file(f)
    os.close(os.open(f, os.O_WRONLY))
    assert get_hsm_flags(f) == "0x00000001"
    os.truncate(f, 1)
    assert get_hsm_flags(f) == "0x00000003"
    ok(lfs("hsm_clear", "--dirty", f))
    assert get_hsm_flags(f) == "0x00000001"


def test_release_then_read_restores_identical_content(pfs, d):
    """sanity-hsm 12m / 21: release gives 0xd with the size kept, a second
    release is fine, a read restores the file implicitly (0x9) with the same
    bytes; a resident file's hsm_restore queues nothing (12d)."""
    f = str(d / "rel.bin")
    body = data(2 * MiB + 99, "release-me")
    write(f, body)
    fid = path2fid(f)
    ok(lfs("hsm_restore", f))  # 12d: not archived -> nothing to do
    assert not [r for r in hsm_requests(pfs, fid) if "action=RESTORE" in r]
    archive(f)
    ok(lfs("hsm_restore", f))  # 12d: archived, resident -> nothing to do
    assert not [r for r in hsm_requests(pfs, fid) if "action=RESTORE" in r]
    ok(lfs("hsm_release", f))
    assert_state(f, RELEASED)
    assert os.stat(f).st_size == len(body)
    ok(lfs("hsm_release", f))  # 21: releasing a released file succeeds
    assert_state(f, RELEASED)
    assert read_file(f) == body
    wait_for(lambda: get_hsm_flags(f) == "0x00000009", 30, 0.1, "restored after read")
    assert_state(f, ARCHIVED)


def test_released_file_has_no_blocks(pfs, d):
    """sanity-hsm 21: after hsm_release, ``stat -c %b`` is at most 5 and the size
    is unchanged (du shows what is really local)."""
    f = str(d / "blocks.bin")
    body = data(MiB + 1, "blocks")
    write(f, body)
    archive(f)
    before = os.stat(f)
    assert before.st_blocks >= len(body) // 512
    ok(lfs("hsm_release", f))
    after = os.stat(f)
    assert after.st_size == len(body)
    assert after.st_blocks <= 5, f"{after.st_blocks} blocks after release"


def test_explicit_restore_of_released_file(pfs, d):
    """sanity-hsm 12f: archive, release, hsm_restore -> 0x9 and identical data."""
    f = str(d / "r.bin")
    body = data(700_000, "restore-explicit")
    write(f, body)
    archive(f)
    ok(lfs("hsm_release", f))
    ok(lfs("hsm_restore", f))
    wait_noop(f)
    wait_for(lambda: get_hsm_flags(f) == "0x00000009", 30, 0.1, "restored")
    assert read_file(f) == body


def test_restore_of_dirty_file_is_refused(pfs, d):
    """sanity-hsm 12e "Check forbidden restore": restore a dirty file must fail."""
    f = str(d / "dirty.txt")
    write(f, b"clean\n")
    archive(f)
    with open(f, "ab") as fh:
        fh.write(b"dirty\n")
    assert_state(f, DIRTY)
    request_refused("hsm_restore", f, EPERM_TEXT)


def test_truncate_released_file(pfs, d):
    """sanity-hsm 58: truncate 0 of a released file gives 0xb without a restore;
    sanity-hsm 59: truncate to half keeps the first half's bytes and gives 0xb."""
    zero, half = str(d / "zero.bin"), str(d / "half.bin")
    body = data(1_200_000, "trunc")
    for f in (zero, half):
        write(f, body)
        archive(f)
        ok(lfs("hsm_release", f))
    fid = path2fid(zero)
    os.truncate(zero, 0)
    assert os.stat(zero).st_size == 0
    assert_state(zero, DIRTY)
    assert not [r for r in hsm_requests(pfs, fid) if "action=RESTORE" in r]
    os.truncate(half, len(body) // 2)
    assert_state(half, DIRTY)
    assert read_file(half) == body[: len(body) // 2]


def test_release_keeps_times(pfs, d):
    """sanity-hsm 23: release does not change atime/mtime."""
    f = str(d / "times")
    write(f, b"times\n")
    archive(f)
    os.utime(f, ns=(978261179_000_000_000, 978261179_000_000_000))
    ok(lfs("hsm_release", f))
    assert_state(f, RELEASED)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (978261179_000_000_000,) * 2


def test_release_of_a_file_open_elsewhere_is_busy(pfs, d):
    """Release needs a write lease: a file someone holds open gives EBUSY
    (mdt_open lease checks, reference §1.5)."""
    f = str(d / "busy")
    write(f, b"busy\n")
    archive(f)
    fd = os.open(f, os.O_WRONLY)
    try:
        request_refused("hsm_release", f, "Device or resource busy")
        assert_state(f, ARCHIVED)
    finally:
        os.close(fd)
    wait_for(lambda: lfs("hsm_release", f).returncode == 0, 10, 0.2, "release after close")
    assert_state(f, RELEASED)


def test_archive_under_another_archive_id_is_refused(pfs, d):
    """An archived file (exists, archive_id 1) cannot be archived to archive 2:
    EPERM (mdt_hsm_is_action_compat)."""
    f = str(d / "aid2")
    write(f, b"archive one\n")
    archive(f)
    refused(lfs("hsm_archive", "--archive", "2", f),
            f"Cannot send HSM request (use of {f}): {EPERM_TEXT}")
    assert_state(f, ARCHIVED)


# -- hsm_set / hsm_clear ---------------------------------------------------------

def test_user_and_root_flags(pfs, d):
    """sanity-hsm 1: an ordinary user sets and clears norelease (and noarchive,
    dirty: HSM_USER_MASK) on their own file but may not set exists, archived or
    lost (EPERM); root may."""
    f = str(d / "users")
    write(f, b"")
    os.chown(f, NOBODY, NOBODY)  # $RUNAS touch $f
    r = as_user(["hsm_state", f],
                ["hsm_set", "--norelease", f], ["hsm_state", f],
                ["hsm_clear", "--norelease", f], ["hsm_state", f],
                ["hsm_set", "--noarchive", "--norelease", f], ["hsm_state", f],
                ["hsm_clear", "--noarchive", "--norelease", f],
                ["hsm_set", "--exists", f], ["hsm_set", "--archived", f],
                ["hsm_set", "--lost", f], ["hsm_state", f])
    assert [flags_of(x) for x in (r[0], r[2], r[4], r[6], r[11])] == [
        "0x00000000", "0x00000010", "0x00000000", "0x00000030", "0x00000000"]
    assert [x.returncode for x in (r[1], r[3], r[5], r[7])] == [0, 0, 0, 0]
    for x in r[8:11]:
        refused(x, f"change hsm flags for '{f}' failed: {EPERM_TEXT}")
    ok(lfs("hsm_set", "--exists", f))  # ...but root can
    r = as_user(["hsm_state", f], ["hsm_set", "--dirty", f], ["hsm_state", f],
                ["hsm_clear", "--dirty", f], ["hsm_clear", "--exists", f], ["hsm_state", f])
    assert [flags_of(x) for x in (r[0], r[2], r[5])] == ["0x00000001", "0x00000003",
                                                         "0x00000001"]
    assert (r[1].returncode, r[3].returncode) == (0, 0)
    refused(r[4], f"change hsm flags for '{f}' failed: {EPERM_TEXT}")
    ok(lfs("hsm_clear", "--exists", f))
    assert get_hsm_flags(f) == "0x00000000"


def test_user_cannot_change_flags_of_a_file_they_cannot_write(pfs, d):
    """Lustre opens the file O_WRONLY for hsm_set: a root-owned 0644 file is not
    the user's to flag."""
    f = str(d / "roots")
    write(f, b"root's\n", 0o644)
    refused(lfs("hsm_set", "--norelease", f, user=True), "change hsm flags for")
    assert get_hsm_flags(f) == "0x00000000"


def test_flag_invariants_are_einval(pfs, d):
    """mdt_hsm_state_set: DIRTY needs EXISTS, LOST needs ARCHIVED, RELEASED
    excludes DIRTY; NORELEASE cannot be set on a released file (manual)."""
    f = str(d / "inv")
    write(f, b"invariants\n")
    flags_refused("hsm_set", f, EINVAL_TEXT, "--dirty")
    flags_refused("hsm_set", f, EINVAL_TEXT, "--lost")
    ok(lfs("hsm_set", "--exists", f))
    flags_refused("hsm_set", f, EINVAL_TEXT, "--lost")
    assert get_hsm_flags(f) == "0x00000001"
    r = pfs.path("imp/small.txt")
    assert get_hsm_flags(r) == "0x0000000d"
    flags_refused("hsm_set", r, EINVAL_TEXT, "--dirty")
    flags_refused("hsm_set", r, EINVAL_TEXT, "--norelease")
    flags_refused("hsm_clear", r, EINVAL_TEXT, "--archived")
    assert get_hsm_flags(r) == "0x0000000d"


def test_archive_id_is_recorded(pfs, d):
    """sanity-hsm 1c: hsm_set --archive-id with --exists records the id."""
    f = str(d / "aid")
    write(f, b"id\n")
    ok(lfs("hsm_set", "--exists", "--archive-id", "5", f))
    assert_state(f, "(0x00000001) exists, archive_id:5")
    ok(lfs("hsm_clear", "--exists", f))


def test_norelease_and_noarchive_block_requests(pfs, d):
    """sanity-hsm 20 (never_release blocks release) and 10c (never_archive blocks
    archive), both EPERM."""
    nr, na = str(d / "nr"), str(d / "na")
    write(nr, b"keep me\n")
    archive(nr)
    ok(lfs("hsm_set", "--norelease", nr))
    assert_state(nr, "(0x00000019) exists archived never_release, archive_id:1")
    request_refused("hsm_release", nr, EPERM_TEXT)
    ok(lfs("hsm_clear", "--norelease", nr))
    ok(lfs("hsm_release", nr))
    assert_state(nr, RELEASED)

    write(na, b"do not archive\n")
    ok(lfs("hsm_set", "--noarchive", na))
    assert_state(na, "(0x00000020) never_archive")
    request_refused("hsm_archive", na, EPERM_TEXT)
    assert get_hsm_flags(na) == "0x00000020"


# -- remove, lost -----------------------------------------------------------------

def test_remove_of_released_is_refused_and_of_resident_works(pfs):
    """sanity-hsm 27a (remove of an imported, released file: EPERM) and 26 (remove
    of an archived resident file clears exists/archived and deletes the copy)."""
    f = pfs.path("imp/remove.bin")
    body = OBJECTS["imp/remove.bin"]
    assert get_hsm_flags(f) == "0x0000000d"
    request_refused("hsm_remove", f, EPERM_TEXT)
    assert get_hsm_flags(f) == "0x0000000d"
    assert read_file(f) == body
    wait_for(lambda: get_hsm_flags(f) == "0x00000009", 30, 0.1, "resident")
    ok(lfs("hsm_remove", f))
    wait_noop(f)
    wait_for(lambda: get_hsm_flags(f) == "0x00000000", 30, 0.1, "archive copy removed")
    keys = [o["Key"] for o in pfs.s3.list_objects_v2(Bucket=pfs.bucket,
                                                     Prefix="imp/").get("Contents", [])]
    assert "imp/remove.bin" not in keys
    request_refused("hsm_release", f, EPERM_TEXT)  # no archive copy any more
    assert read_file(f) == body


def test_lost_released_file_cannot_be_read(pfs):
    """sanity-hsm 25a: an imported file flagged lost: reading it must fail."""
    f = pfs.path("imp/lost.bin")
    ok(lfs("hsm_set", "--lost", f))
    assert_state(f, "(0x0000004d) released exists archived lost_from_hsm, archive_id:1")
    request_refused("hsm_restore", f, EPERM_TEXT)
    with pytest.raises(OSError):
        read_file(f)


# -- the coordinator queue ------------------------------------------------------

def test_action_queue_merge_and_cancel(pfs, d):
    """sanity-hsm 112 (hsm_action shows the recorded request), 201 (register and
    cancel a restore), duplicate restores merged (cdt_restore_handle_add), 4
    (a useless cancel is not registered); then everything ends in NOOP."""
    files = [pfs.path(f"q/f{i:02d}.bin") for i in range(QUEUE_FILES)]
    new = str(d / "to-archive.bin")
    write(new, data(300_000, "queue-archive"))
    assert all(get_hsm_flags(f) == "0x0000000d" for f in files)
    useless = str(d / "useless")
    write(useless, b"nothing queued\n")
    ok(lfs("hsm_cancel", useless))
    assert hsm_requests(pfs, path2fid(useless)) == []

    fids = [path2fid(f) for f in files]
    with osts_stopped(pfs):
        ok(lfs("hsm_restore", *files))
        ok(lfs("hsm_restore", files[0], files[-1]))  # duplicates: merged
        active = hsm_requests(pfs, all_=False)
        for fid in fids:
            mine = [r for r in active if f"fid={fid} " in r]
            assert len(mine) == 1 and "action=RESTORE" in mine[0], active
        lines = ok(lfs("hsm_action", *files)).stdout.splitlines()
        waiting = [f"{f}: RESTORE waiting (from 0 to EOF)" for f in files]
        running = [f"{f}: RESTORE running (0 bytes moved)" for f in files]
        for i, line in enumerate(lines):
            assert line in (waiting[i], running[i]), line
        assert any(ln in waiting for ln in lines) and any(ln in running for ln in lines)
        last = files[-1]
        assert lines[-1] == waiting[-1]
        ok(lfs("hsm_cancel", last))
        assert hsm_action(last) == f"{last}: NOOP\n"
        assert any("status=CANCELED" in r for r in hsm_requests(pfs, fids[-1]))
        ok(lfs("hsm_archive", new))
        assert re.fullmatch(re.escape(new) + r": ARCHIVE (waiting \(from 0 to EOF\)|"
                            r"running \(0 bytes moved\))\n", hsm_action(new))
    for f in files[:-1]:
        wait_noop(f)
    wait_noop(new)
    assert [get_hsm_flags(f) for f in files[:-1]] == ["0x00000009"] * (QUEUE_FILES - 1)
    assert_state(files[-1], RELEASED)
    assert_state(new, ARCHIVED)
    for i, f in enumerate(files):
        assert read_file(f) == OBJECTS[f"q/f{i:02d}.bin"]


def test_filelist_archive_release_restore(pfs, d):
    """sanity-hsm 90: archive, release and restore a file list."""
    files = [str(d / f"l{i}") for i in range(5)]
    bodies = [data(50_000 + i, f"list{i}") for i in range(5)]
    for f, b in zip(files, bodies, strict=True):
        write(f, b)
    flist = d.parent.parent / f"filelist-{d.name}.txt"  # outside the mount
    flist.write_text("".join(f + "\n" for f in files))
    try:
        ok(lfs("hsm_archive", "--filelist", str(flist)))
        for f in files:
            wait_noop(f)
            assert_state(f, ARCHIVED)
        ok(lfs("hsm_release", "--filelist", str(flist)))
        assert all(get_hsm_flags(f) == "0x0000000d" for f in files)
        ok(lfs("hsm_restore", "--filelist", str(flist)))
        for f in files:
            wait_noop(f)
        wait_for(lambda: all(get_hsm_flags(f) == "0x00000009" for f in files), 30, 0.1,
                 "all restored")
        assert [read_file(f) for f in files] == bodies
    finally:
        flist.unlink()


def test_user_may_restore_a_readable_file_but_not_archive(pfs, d):
    """sanity-hsm 24c: the default request mask lets an ordinary user RESTORE a
    file they can read (root-owned 0644) and nothing else."""
    f = pfs.path("imp/user.bin")
    os.chmod(f, 0o644)
    assert os.stat(f).st_uid == 0
    r = as_user(["hsm_state", f], ["hsm_restore", f])
    assert flags_of(r[0]) == "0x0000000d"
    ok(r[1])
    wait_noop(f)
    wait_for(lambda: get_hsm_flags(f) == "0x00000009", 30, 0.1, "restored by the user")
    own = str(d / "mine")
    write(own, b"mine\n")
    os.chown(own, NOBODY, NOBODY)
    r = as_user(["hsm_archive", own], ["hsm_archive", f], ["hsm_release", f],
                ["hsm_remove", f])
    for path, x in zip((own, f, f, f), r, strict=True):
        refused(x, f"Cannot send HSM request (use of {path}): {EPERM_TEXT}")
    assert get_hsm_flags(own) == "0x00000000"
    assert get_hsm_flags(f) == "0x00000009"
    assert read_file(f) == OBJECTS["imp/user.bin"]


# -- xattrs -------------------------------------------------------------------

def test_trusted_hsm_and_lustre_lov_xattrs(pfs):
    """getfattr -n trusted.hsm (struct hsm_attrs, 24 bytes) and -n lustre.lov
    (struct lov_user_md_v1) on an imported file (sanity-hsm 607 reads trusted.hsm)."""
    f = pfs.path("imp/two.bin")
    r = ok(run(["getfattr", "--absolute-names", "-e", "hex", "-n", "trusted.hsm", f]))
    m = re.search(r"^trusted\.hsm=0x([0-9a-f]+)$", r.stdout, re.M)
    raw = bytes.fromhex(m[1])
    assert len(raw) == 24
    _compat, flags, arch_id, _arch_ver = struct.unpack("<IIQQ", raw)
    assert (flags, arch_id) == (hsm.IMPORTED, 1)
    r = ok(run(["getfattr", "--absolute-names", "-e", "hex", "-n", "lustre.lov", f]))
    lov = bytes.fromhex(re.search(r"^lustre\.lov=0x([0-9a-f]+)$", r.stdout, re.M)[1])
    magic, pattern, _oid, _seq, size, count, _gen = struct.unpack("<IIQQIHH", lov[:32])
    assert magic == 0x0BD10BD0
    assert pattern == 0x80000001  # LOV_PATTERN_RAID0 | LOV_PATTERN_F_RELEASED
    assert (size, count) == (MiB, 2)
    info = pfs.info("imp/two.bin")
    assert info["layout"]["stripe_count"] == 2


def test_setfattr_hsm_request_restores(pfs):
    """The xattr road for requests: setfattr -n lustrefuse.hsm_request -v restore."""
    f = pfs.path("imp/setfattr.bin")
    assert get_hsm_flags(f) == "0x0000000d"
    ok(run(["setfattr", "-n", "lustrefuse.hsm_request", "-v", "restore", f]))
    wait_noop(f)
    wait_for(lambda: get_hsm_flags(f) == "0x00000009", 30, 0.1, "restored via setfattr")
    assert read_file(f) == OBJECTS["imp/setfattr.bin"]


def test_restore_requests_merge_via_hsm_list(pfs):
    """Two restores of one file while the first waits: one queue entry."""
    f = pfs.path("imp/dup.bin")
    fid = path2fid(f)
    with osts_stopped(pfs):
        ok(lfs("hsm_restore", f))
        ok(lfs("hsm_restore", f))
        ok(run(["setfattr", "-n", "lustrefuse.hsm_request", "-v", "restore", f]))
        active = hsm_requests(pfs, fid, all_=False, proc=True)  # `lustrefuse hsm list`
        assert len(active) == 1 and "action=RESTORE" in active[0], active
        assert re.fullmatch(r"id=\d+ fid=" + re.escape(fid) + r" action=RESTORE "
                            r"status=(WAITING|STARTED) bytes=0", active[0])
    wait_noop(f)
    assert len(hsm_requests(pfs, fid)) == 1


# -- getstripe, setstripe ---------------------------------------------------------

def object_row(ost: int, objid: int, group: int = 0) -> str:
    # liblustreapi lov_dump_user_lmm_v1v3: "\t%6u\t%14llu\t%#13llx\t%14llu"
    return f"\t{ost:6d}\t{objid:14d}\t{hex(objid):>13}\t{group:14d}\n"


def test_getstripe_plain_file_and_single_fields(pfs, d):
    """lfs setstripe -c 2 -S 2M -i 1 on a new file, then lfs getstripe in Lustre's
    format (lov_dump_user_lmm_header), and each single-field option."""
    f = str(d / "striped")
    ok(lfs("setstripe", "-c", "2", "-S", "2M", "-i", "1", f))
    assert os.stat(f).st_size == 0
    body = data(5 * MiB + 3, "striped")
    with open(f, "r+b") as fh:
        fh.write(body)
    ino = os.stat(f).st_ino
    fid = path2fid(f)
    expected = (f"{f}\n"
                "lmm_stripe_count:  2\n"
                "lmm_stripe_size:   2097152\n"
                "lmm_pattern:       raid0\n"
                "lmm_layout_gen:    0\n"
                "lmm_stripe_offset: 1\n"
                "\tobdidx\t\t objid\t\t objid\t\t group\n"
                + object_row(1, ino) + object_row(0, ino) + "\n")
    assert ok(lfs("getstripe", f)).stdout == expected
    for opt, value in (("-c", "2"), ("-S", "2097152"), ("-i", "1"), ("-L", "raid0"),
                       ("-g", "0"), ("-F", fid)):
        # the value alone (2.15 ends it with one newline, 2.17 with a blank line too)
        assert ok(lfs("getstripe", opt, f)).stdout.rstrip("\n") == value, opt
    q = ok(lfs("getstripe", "-q", f)).stdout
    assert object_row(1, ino) in q and object_row(0, ino) in q and "lmm_" not in q
    y = ok(lfs("getstripe", "-y", f)).stdout
    assert y.startswith("lmm_stripe_count:  2\nlmm_stripe_size:   2097152\n")
    assert "lmm_objects:\n      - l_ost_idx: 1\n" in y
    assert f"        l_fid:     0x100010000:{ino:#x}:0x0\n" in y
    assert read_file(f) == body
    # a file that has data cannot get another layout
    refused(lfs("setstripe", "-c", "1", f), f"setstripe error for '{f}': stripe already set")
    assert ok(lfs("getstripe", "-c", f)).stdout.rstrip("\n") == "2"


def test_getstripe_released_file_has_no_objects(pfs):
    """A released (imported) file: pattern ``released`` and no object table."""
    f = pfs.path("find/a.bin")
    assert get_hsm_flags(f) == "0x0000000d"
    out = ok(lfs("getstripe", f)).stdout
    lines = out.splitlines()
    assert lines[0] == f
    assert lines[1:5] == ["lmm_stripe_count:  2", "lmm_stripe_size:   1048576",
                          "lmm_pattern:       released", "lmm_layout_gen:    0"]
    assert re.fullmatch(r"lmm_stripe_offset: \d+", lines[5])
    assert "obdidx" not in out and "l_ost_idx" not in out
    assert ok(lfs("getstripe", "-L", f)).stdout.rstrip("\n") == "released"
    assert get_hsm_flags(f) == "0x0000000d"  # getstripe does not restore


def test_setstripe_directory_default_is_inherited(pfs, d):
    """lfs setstripe -c/-S/-i on a directory: getstripe -d shows it on one line,
    new files (and new subdirectories) inherit it; -d on an unset directory shows
    the filesystem defaults."""
    plain = d / "plain"
    plain.mkdir()
    assert ok(lfs("getstripe", "-d", str(plain))).stdout.rstrip("\n") == (
        "stripe_count:  1 stripe_size:   1048576 pattern:       0 stripe_offset: -1")
    sd = d / "striped"
    sd.mkdir()
    ok(lfs("setstripe", "-c", "2", "-S", "128K", "-i", "0", str(sd)))
    line = "stripe_count:  2 stripe_size:   131072 pattern:       raid0 stripe_offset: 0\n"
    assert ok(lfs("getstripe", "-d", str(sd))).stdout.rstrip("\n") == line.rstrip("\n")
    assert ok(lfs("getstripe", "-d", "-c", str(sd))).stdout.rstrip("\n") == "2"
    assert ok(lfs("getstripe", "-d", "-S", str(sd))).stdout.rstrip("\n") == "131072"
    child = sd / "child.bin"
    write(str(child), data(300_000, "child"))
    out = ok(lfs("getstripe", str(child))).stdout
    assert "lmm_stripe_count:  2\nlmm_stripe_size:   131072\n" in out
    assert "lmm_stripe_offset: 0\n" in out
    (sd / "subdir").mkdir()
    assert ok(lfs("getstripe", "-d", str(sd / "subdir"))).stdout.rstrip("\n") == line.rstrip("\n")
    # getstripe DIR without -d: the directory line, then each entry's block
    listing = ok(lfs("getstripe", str(sd))).stdout
    assert listing.startswith(f"{sd}\n{line}\n{sd}/child.bin\nlmm_stripe_count:  2\n")


def test_getstripe_bad_path(pfs, d):
    missing = str(d / "missing")
    r = lfs("getstripe", missing)
    assert r.returncode != 0 and r.stdout == ""
    assert f"'{missing}'" in r.stderr and "No such file or directory" in r.stderr


# -- df, find, fids ---------------------------------------------------------------

NUM = r"[ \d]{10}\d"  # "%11llu"
COOKED = r"(?: {2}[ \d]{5}\d\.\d[KMGTPEZY]|[ \d]{10}\d)"  # "%8.1f%c" in "%11s", or "%11llu"


def df_row(cell: str, uuid: str, mnt: str) -> re.Pattern:
    # lfs.c showdf: UUF" "CSF" "CSF" "CSF" "RSF" %-s" with UUF "%-20s", RDF "%3d%%"
    return re.compile(re.escape(f"{uuid:<20} ") + rf"(?P<a>{cell}) (?P<b>{cell}) (?P<c>{cell}) "
                      rf"(?P<pct>[ \d]{{2}}\d)% " + re.escape(mnt) + "$")


def header(*cols) -> str:
    return "{:<20} {:>11} {:>11} {:>11} {:>4} {}".format(*cols)


def check_df(out: str, mnt: str, cell: str, head: str) -> list[re.Match]:
    """Header, MDT row, OST rows, blank, summary, blank (lfs.c mntdf)."""
    lines = out.split("\n")
    assert lines[0] == head
    targets = [("lustrefuse-MDT0000_UUID", f"{mnt}[MDT:0]"),
               ("lustrefuse-OST0000_UUID", f"{mnt}[OST:0]"),
               ("lustrefuse-OST0001_UUID", f"{mnt}[OST:1]"),
               ("filesystem_summary:", mnt)]
    assert lines[4] == "" and lines[6:] == ["", ""], lines
    rows = [df_row(cell, uuid, where).match(ln)
            for (uuid, where), ln in zip(targets, lines[1:4] + lines[5:6], strict=True)]
    assert all(rows), lines
    return rows


def test_df_rows_and_summary(pfs):
    """lfs df / -h / -i: header, one row per MDT and OST in showdf's columns,
    a blank line, filesystem_summary (space: the OSTs' sum), a blank line."""
    mnt = pfs.path()
    mdt, ost0, ost1, total = check_df(ok(lfs("df", mnt)).stdout, mnt, NUM,
                                      header("UUID", "1K-blocks", "Used", "Available", "Use%",
                                             "Mounted on"))
    for col in "ac":  # summary space is the OSTs' alone
        assert int(total[col]) == int(ost0[col]) + int(ost1[col])
    for r in (mdt, ost0, ost1, total):
        used, avail = int(r["b"]), int(r["c"])
        pct = -(-100 * used // (used + avail)) if used + avail else 0  # rounded up, like df
        assert abs(int(r["pct"]) - pct) <= 1

    check_df(ok(lfs("df", "-h", mnt)).stdout, mnt, COOKED,
             header("UUID", "bytes", "Used", "Available", "Use%", "Mounted on"))

    imdt, _o0, _o1, isum = check_df(ok(lfs("df", "-i", mnt)).stdout, mnt, NUM,
                                    header("UUID", "Inodes", "IUsed", "IFree", "IUse%",
                                           "Mounted on"))
    assert int(imdt["b"]) >= len(OBJECTS)  # every imported inode is counted
    assert (isum["a"], isum["b"]) == (imdt["a"], imdt["b"])  # inodes: the MDT's


def test_find_filters(pfs):
    """lfs find --layout released, --size, --type, --stripe-count, --name,
    --maxdepth: one path per line."""
    top = pfs.path("find")

    def find(*args):
        return sorted(ok(lfs("find", top, *args)).stdout.splitlines())

    a, b, c = (pfs.path(p) for p in ("find/a.bin", "find/sub/b.txt", "find/sub/deep/c.txt"))
    sub, deep = pfs.path("find/sub"), pfs.path("find/sub/deep")
    assert find() == sorted([top, a, sub, b, deep, c])
    assert find("--type", "f") == sorted([a, b, c])
    assert find("-t", "d") == sorted([top, sub, deep])
    assert find("--name", "*.txt") == sorted([b, c])
    assert find("--maxdepth", "1") == sorted([top, a, sub])
    assert find("--size", "+1M") == [a]
    assert find("--size", "-2k", "--type", "f") == sorted([b, c])  # rounded up to 1k
    assert find("--stripe-count", "2") == [a]
    assert find("--stripe-count", "1") == sorted([b, c])
    assert find("--layout", "released", "--type", "f") == sorted([a, b, c])
    assert read_file(c) == OBJECTS["find/sub/deep/c.txt"]
    wait_for(lambda: get_hsm_flags(c) == "0x00000009", 30, 0.1, "c resident")
    assert find("--layout", "released") == sorted([a, b])
    assert find("!", "--layout", "released", "--type", "f") == [c]


def test_path2fid_fid2path_round_trip(pfs):
    """lfs path2fid prints [0x...:0x...:0x0]; fid2path by mount path and by
    fsname gives the path back."""
    mnt = pfs.path()
    for rel in ("imp/small.txt", "find/sub/deep/c.txt", "find/sub"):
        p = pfs.path(rel)
        fid = path2fid(p)
        assert re.fullmatch(r"\[0x[0-9a-f]+:0x[0-9a-f]+:0x0\]", fid)
        assert ok(lfs("fid2path", mnt, fid)).stdout == p + "\n"
    two = ok(lfs("path2fid", pfs.path("imp/small.txt"), pfs.path("find"))).stdout
    assert two.splitlines()[0].startswith(pfs.path("imp/small.txt") + ": [0x")


# -- coordinator restart: last, it restarts the shared filesystem's MDS ------------

def test_restore_request_survives_mds_restart(pfs):
    """sanity-hsm 105 "Restart of coordinator" (and 300: coordinator state kept
    across an MDT umount/mount): a restore the MDS had handed out when it was
    killed is still queued when ``lustrefuse up`` restarts the MDS (the OSTs,
    like Lustre's copytool, stay up), and completes under the same request id."""
    f = pfs.path("imp/restart.bin")
    body = OBJECTS["imp/restart.bin"]
    assert get_hsm_flags(f) == "0x0000000d"
    fid = path2fid(f)
    mds = pfs.pids()["mds"]
    with osts_stopped(pfs):
        ok(lfs("hsm_restore", f))
        before = hsm_requests(pfs, fid, all_=False)
        assert len(before) == 1 and "action=RESTORE" in before[0]
        rid = before[0].split()[0]
        os.kill(mds, signal.SIGKILL)  # the queue row in mds.db is all that is left
        wait_for(lambda: not pid_alive(mds), 10, 0.05, "the MDS gone")
    r = pfs.up_again()  # the supervisor restarts what died
    assert "already up" in r.stdout
    wait_for(lambda: pfs.pids()["mds"] != mds, 30, 0.2, "a new MDS")
    wait_noop(f, 60)
    after = hsm_requests(pfs, fid)
    assert [r.split()[0] for r in after] == [rid]
    assert "status=SUCCEED" in after[0], after
    wait_for(lambda: get_hsm_flags(f) == "0x00000009", 30, 0.2, "restored")
    assert read_file(f) == body


def test_an_ost_takes_no_work_before_it_knows_its_repository(tmp_path):
    """A freshly started OST that cannot reach its MDS yet must not take a
    hydrate (refuse the connection, or answer a retryable EAGAIN): otherwise
    Coordinator.ost_call stops waiting and the request fails with EIO."""
    d = tmp_path / "ost0"
    proc = subprocess.Popen([LUSTREFUSE, "ost", "--index", "0", "--dir", str(d), "--mds",
                             f"unix:{tmp_path}/no-mds.sock", "--log-file", str(tmp_path / "log")],
                            env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        sock = d / "ost.sock"
        wait_for(sock.exists, 30, 0.05, "the OST socket")
        desc = {"ino": 5, "layout": Layout(MiB, (0,)).to_dict(), "s3_key": "k.bin",
                "etag": '"0"', "s3_size": 10, "size": 10}
        try:
            rpc.Client(f"unix:{sock}", timeout=10).call("hydrate", desc=desc, chunks=[0])
        except RpcError as e:
            assert e.errno == errno.EAGAIN, f"hydrate before registration: {e}"
        except OSError:
            pass  # not accepting connections yet: fine
        else:
            pytest.fail("hydrate succeeded without a repository")
    finally:
        proc.kill()
        proc.wait(10)
