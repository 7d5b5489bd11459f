"""`lustrefuse up`/`down`: bad input and process hygiene (issue #2, "What must hold", 6-7).

Bad input must give one clear line on stderr, a non-zero exit, and leave nothing
behind: no mount, no process naming the data directory, no half-created filesystem.
Every way of stopping (down, umount, fusermount3 -u, SIGTERM to a foreground up)
must stop every process; a killed OST makes reads that need it fail with EIO
quickly, and `up` again brings it back with state and hydrated data kept.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import (
    FS,
    LUSTREFUSE,
    MiB,
    big_data,
    env,
    is_mounted,
    lfs,
    lustrefuse,
    pid_alive,
    pread_uncached,
    procs_mentioning,
    read_file,
    unique,
    wait_for,
)

from lustrefuse import hsm

# -- bad input ----------------------------------------------------------------------


def assert_nothing_left(mnt, data_dir):
    assert not is_mounted(mnt), f"{mnt} is mounted"
    assert procs_mentioning(str(data_dir)) == [], "a process for the data dir is running"
    assert not os.path.exists(os.path.join(data_dir, "fs.json")), "a filesystem was created"
    assert not os.path.exists(os.path.join(data_dir, "up.json"))


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1, f"want one line on stderr, got:\n{r.stderr}"
    assert r.stdout.strip() == "", r.stdout
    return lines[0]


def usage_error(r: subprocess.CompletedProcess, needle: str) -> str:
    """click/argparse usage errors: exit 2 and exactly one line that says what is wrong."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if needle in ln]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture
def spot(tmp_path):
    """An empty mountpoint and a data directory path that does not exist yet."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return mnt, tmp_path / "data"


def up(source, mnt, data_dir, endpoint, *extra, timeout=120):
    return lustrefuse("up", source, mnt, "--endpoint-url", endpoint, "--data-dir", data_dir,
                      *extra, timeout=timeout)


def test_up_bucket_that_does_not_exist(spot, s3_server):
    mnt, dd = spot
    name = unique("missing")
    r = up(f"s3://{name}", mnt, dd, s3_server)
    line = one_line(r)
    assert name in line, line
    assert_nothing_left(mnt, dd)


def test_up_bucket_that_does_not_exist_says_so(spot, s3_server):
    """It used to say 'no such object', without the lustrefuse: prefix (fixed in a3d3895)."""
    mnt, dd = spot
    name = unique("missing")
    line = one_line(up(f"s3://{name}", mnt, dd, s3_server))
    assert line.startswith("lustrefuse: ") and "does not exist" in line, line


def test_up_endpoint_that_does_not_answer(spot, bucket):
    mnt, dd = spot
    t = time.monotonic()
    r = up(f"s3://{bucket}", mnt, dd, "http://127.0.0.1:1")
    took = time.monotonic() - t
    line = one_line(r)
    assert bucket in line or "127.0.0.1:1" in line, line
    assert took < 60, f"gave up only after {took:.0f}s"
    assert_nothing_left(mnt, dd)


def test_up_mountpoint_missing(tmp_path, bucket, s3_server):
    mnt, dd = tmp_path / "nowhere", tmp_path / "data"
    line = one_line(up(f"s3://{bucket}", mnt, dd, s3_server))
    assert "does not exist" in line and str(mnt) in line, line
    assert not mnt.exists()
    assert_nothing_left(mnt, dd)


def test_up_mountpoint_not_empty(spot, bucket, s3_server):
    mnt, dd = spot
    (mnt / "precious.txt").write_text("keep me")
    line = one_line(up(f"s3://{bucket}", mnt, dd, s3_server))
    assert "not empty" in line, line
    assert (mnt / "precious.txt").read_text() == "keep me"
    assert_nothing_left(mnt, dd)


def test_up_mountpoint_is_a_file(tmp_path, bucket, s3_server):
    f, dd = tmp_path / "file", tmp_path / "data"
    f.write_text("x")
    line = one_line(up(f"s3://{bucket}", f, dd, s3_server))
    assert "not a directory" in line, line
    assert f.read_text() == "x"
    assert_nothing_left(f, dd)


@pytest.mark.parametrize("source", ["just-a-bucket", "http://bucket/x", "s3://"])
def test_up_bad_source(spot, s3_server, source):
    mnt, dd = spot
    line = one_line(up(source, mnt, dd, s3_server))
    assert "s3://" in line or "bucket" in line, line
    assert_nothing_left(mnt, dd)


def test_up_stripe_size_not_multiple_of_64k(spot, bucket, s3_server):
    mnt, dd = spot
    line = one_line(up(f"s3://{bucket}", mnt, dd, s3_server, "--stripe-size", "100K"))
    assert "64K" in line, line
    assert_nothing_left(mnt, dd)


@pytest.mark.parametrize("extra,needle", [
    (("--bogus",), "--bogus"),
    (("--osts", "0"), "--osts"),
    (("--stripe-size", "12Q"), "--stripe-size"),
    (("--imported-file-chunk-size", "lots"), "--imported-file-chunk-size"),
])
def test_up_bad_options(spot, bucket, s3_server, extra, needle):
    mnt, dd = spot
    usage_error(up(f"s3://{bucket}", mnt, dd, s3_server, *extra), needle)
    assert_nothing_left(mnt, dd)


@pytest.mark.parametrize("args", [
    ("hsm_state",), ("hsm_action",), ("hsm_restore",), ("hsm_release",), ("getstripe",),
    ("path2fid",),
])
def test_lfs_outside_a_lustrefuse_mount(tmp_path, args):
    f = tmp_path / "plain.txt"
    f.write_text("not on lustre")
    r = lfs(*args, f)
    line = one_line(r)
    assert str(f) in line or "plain.txt" in line, line
    assert f.read_text() == "not on lustre"


def test_lfs_unknown_option_and_command(tmp_path):
    usage_error(lfs("hsm_state", "--bogus", tmp_path), "--bogus")
    r = lfs("no_such_command", tmp_path)
    assert r.returncode != 0 and "no_such_command" in r.stderr


def test_down_and_stats_on_a_plain_directory(tmp_path):
    line = one_line(lustrefuse("down", tmp_path))
    assert "not a lustrefuse mount" in line, line
    line = one_line(lustrefuse("stats", tmp_path))
    assert "lustrefuse mount" in line, line


# -- process hygiene ------------------------------------------------------------------

def all_dead(pids) -> bool:
    return not any(pid_alive(p) for p in pids)


def assert_all_stopped(fs: FS, pids: dict, timeout: float = 30):
    wait_for(lambda: all_dead(pids.values()), timeout, 0.1,
             f"every process to stop (alive: {[n for n, p in pids.items() if pid_alive(p)]})")
    assert not fs.mounted()
    assert procs_mentioning(str(fs.data_dir)) == []
    assert not (fs.data_dir / "up.json").exists()


def test_down_stops_every_process(fs):
    pids = fs.pids()
    assert {"supervisor", "mds", "ost0", "ost1", "mount"} <= set(pids), pids
    assert all(pid_alive(p) for p in pids.values())
    assert read_file(fs.path("hello.txt")) == b"hello, lustrefuse\n"
    r = fs.down()
    assert "is down" in r.stdout
    assert_all_stopped(fs, pids, timeout=15)
    assert os.listdir(fs.mnt) == []


@pytest.mark.parametrize("how", ["umount", "fusermount3"])
def test_plain_unmount_stops_every_process(make_fs, bucket, how):
    fs = make_fs(bucket, objects={"f.txt": b"data"})
    pids = fs.pids()
    assert read_file(fs.path("f.txt")) == b"data"
    cmd = ["umount", str(fs.mnt)] if how == "umount" else ["fusermount3", "-u", str(fs.mnt)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert_all_stopped(fs, pids, timeout=30)


def read_lines(stream, q: queue.Queue):
    for line in stream:
        q.put(line)
    q.put(None)


def test_sigterm_to_foreground_up_stops_everything(make_fs, bucket):
    fs = make_fs(bucket, objects={"f.txt": b"fg"}, up=False)
    proc = subprocess.Popen([LUSTREFUSE, *fs.up_args(["--foreground"])], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env=env())
    fs.foreground = proc
    q: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, q), daemon=True).start()
    out = []
    deadline = time.monotonic() + 120
    while not any("is mounted on" in ln for ln in out):
        assert time.monotonic() < deadline, "".join(out)
        try:
            line = q.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "".join(out)
            continue
        assert line is not None, f"up --foreground exited ({proc.poll()}):\n{''.join(out)}"
        out.append(line)
    assert fs.mounted()
    assert read_file(fs.path("f.txt")) == b"fg"
    pids = fs.pids()
    assert pids["supervisor"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    assert_all_stopped(fs, pids, timeout=15)
    print(f"up --foreground exited with {rc} after SIGTERM")


# A reader in its own process, so that a hang cannot wedge pytest.
READER = textwrap.dedent("""
    import errno, json, os, sys, time
    path, off, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    t = time.monotonic()
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        got = len(os.pread(fd, n, off))
        os.close(fd)
        res = {"ok": got}
    except OSError as e:
        res = {"errno": errno.errorcode.get(e.errno, e.errno)}
    res["took"] = time.monotonic() - t
    print(json.dumps(res))
""")


def read_in_subprocess(path, off=0, n=4096, timeout=30) -> dict:
    r = subprocess.run([sys.executable, "-c", READER, str(path), str(off), str(n)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def ost_of(fs: FS, rel: str) -> list[int]:
    return fs.info(rel)["layout"]["osts"]


def test_killed_ost_gives_eio_and_up_recovers(make_fs, bucket, tmp_path):
    objs = {"a.bin": big_data(6 * MiB, "a"), "b.bin": big_data(6 * MiB, "b")}
    objs.update({f"solo{i}.txt": f"solo {i}\n".encode() for i in range(4)})
    fs = make_fs(bucket, osts=2, objects=objs, extra_args=("--imported-file-chunk-size", "1M"))
    assert sorted(ost_of(fs, "a.bin")) == [0, 1] and sorted(ost_of(fs, "b.bin")) == [0, 1]
    on_ost0 = next(f"solo{i}.txt" for i in range(4) if ost_of(fs, f"solo{i}.txt") == [0])

    # a.bin fully local, b.bin one stripe (a chunk on OST 1) local
    assert read_file(fs.path("a.bin")) == objs["a.bin"]
    wait_for(lambda: fs.hsm_flags("a.bin") == hsm.RESIDENT, 30, 0.1, "a.bin resident")
    osts_b = fs.info("b.bin")["layout"]["osts"]
    local, missing = [s for s in range(6) if osts_b[s % 2] == 1][-2:]
    b3 = local * MiB
    assert pread_uncached(fs.path("b.bin"), b3 + 100, 1000) == objs["b.bin"][b3 + 100:b3 + 1100]
    wait_for(lambda: fs.info("b.bin")["present"] == 1, 15, 0.1, "b.bin chunk 3 present")

    pids = fs.pids()
    os.kill(pids["ost1"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(pids["ost1"]), 10, 0.05, "OST 1 to die")

    # a read that needs OST 1 fails with EIO, quickly; the rest keeps working
    res = read_in_subprocess(fs.path("b.bin"), missing * MiB, 4096)
    assert res.get("errno") == "EIO", res
    assert res["took"] < 10, res
    assert read_in_subprocess(fs.path(on_ost0)) == {"ok": len(objs[on_ost0]),
                                                    "took": pytest.approx(0, abs=10)}
    assert fs.mounted()
    assert all(pid_alive(p) for n, p in pids.items() if n != "ost1")

    # `up` again restarts what died; reads work again, state and data are kept
    r = fs.up_again()
    assert "already up" in r.stdout, r.stdout
    new = wait_for(lambda: (p := fs.pids()).get("ost1") not in (None, pids["ost1"])
                   and pid_alive(p["ost1"]) and p, 30, 0.1, "OST 1 restarted")
    assert {n: new[n] for n in new if n != "ost1"} == {n: pids[n] for n in pids if n != "ost1"}
    wait_for(lambda: "OST 1 serving" in fs.log("ost1").split("OST 1 stopping")[-1]
             and fs.log("ost1").count("OST 1 serving") >= 2, 30, 0.1, "OST 1 serving again")

    def reads_b():
        return read_in_subprocess(fs.path("b.bin"), missing * MiB, 4096).get("ok") == 4096

    wait_for(reads_b, 30, 0.2, "reads that need OST 1 to work again")
    assert read_file(fs.path("b.bin")) == objs["b.bin"]
    assert fs.hsm_flags("a.bin") == hsm.RESIDENT

    # the data directory is in use: `up` elsewhere is refused
    other = tmp_path / "other-mnt"
    other.mkdir()
    r = lustrefuse("up", fs.source, other, "--endpoint-url", fs.endpoint, "--data-dir",
                   fs.data_dir, timeout=60)
    assert "in use" in one_line(r)
    assert not is_mounted(other)

    # a full restart keeps HSM state and hydrated chunks: no GET for local data
    pids = fs.pids()
    fs.down()
    assert_all_stopped(fs, pids, timeout=15)
    fs.up_again()
    st = fs.stats()
    assert st["total"]["s3_gets"] == 0, st["total"]
    assert fs.hsm_flags("a.bin") == hsm.RESIDENT
    assert read_file(fs.path("a.bin")) == objs["a.bin"]
    assert pread_uncached(fs.path("b.bin"), b3, 4096) == objs["b.bin"][b3:b3 + 4096]
    assert fs.stats()["total"]["s3_gets"] == 0
    assert fs.info("b.bin")["present"] >= 1


def test_first_read_after_ost_restart_works(make_fs, bucket):
    """Pooled connections to a restarted OST are stale; the first reads after `up` brought
    the OST back must not fail because of them."""
    objs = {f"f{i}.bin": big_data(4 * MiB, f"f{i}") for i in range(3)}
    fs = make_fs(bucket, osts=2, objects=objs, extra_args=("--imported-file-chunk-size", "1M"))
    for k in objs:  # concurrent hydration leaves several idle connections to each OST
        assert read_file(fs.path(k)) == objs[k]
    pids = fs.pids()
    os.kill(pids["ost1"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(pids["ost1"]), 10, 0.05, "OST 1 to die")
    fs.up_again()
    wait_for(lambda: fs.log("ost1").count("OST 1 serving") >= 2, 30, 0.1, "OST 1 serving again")
    for k in objs:
        res = read_in_subprocess(fs.path(k), 0, 4096)
        assert res.get("ok") == 4096, (k, res)
