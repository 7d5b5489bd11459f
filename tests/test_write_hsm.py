"""HSM on the write path: dirty tracking, archive to S3, release and re-read (issue #3)."""

from __future__ import annotations

import errno
import os
import time

import pytest
from helpers import FS, MiB, data, unique, wait_for
from s3fault import FaultProxy


def wait_noop(fs: FS, rel: str, timeout: float = 60):
    wait_for(lambda: fs.info(rel)["action"]["action"] == "NOOP", timeout, 0.05,
             f"{rel} to have no HSM action")


def archive(fs: FS, rel: str):
    r = fs.lfs("hsm_archive", fs.path(rel))
    assert r.returncode == 0, r.stderr
    wait_noop(fs, rel)


def state(fs: FS, rel: str) -> str:
    r = fs.lfs("hsm_state", fs.path(rel))
    assert r.returncode == 0, r.stderr
    return r.stdout.split(": ", 1)[1].strip()


def s3_object(fs: FS, key: str):
    return fs.s3.get_object(Bucket=fs.bucket, Key=key)


@pytest.fixture(scope="module")
def wfs(make_module_fs, s3):
    from conftest import new_bucket

    return make_module_fs(new_bucket(s3), osts=2, stripe_size="1M")


def test_new_file_archive_release_reread(wfs):
    body = data(20 * MiB + 5, "arch")  # several multipart parts
    with open(wfs.path("ckpt.bin"), "wb") as f:
        f.write(body)
    os.chmod(wfs.path("ckpt.bin"), 0o640)
    assert state(wfs, "ckpt.bin") == "(0x00000000)"
    r = wfs.lfs("hsm_release", wfs.path("ckpt.bin"))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    archive(wfs, "ckpt.bin")
    assert state(wfs, "ckpt.bin") == "(0x00000009) exists archived, archive_id:1"
    obj = s3_object(wfs, "ckpt.bin")
    assert obj["Body"].read() == body
    meta = obj["Metadata"]
    assert meta["file-permissions"] == "0100640" and meta["file-owner"] == "0"
    assert meta["file-mtime"].endswith("ns") and meta["user-agent"] == "aws-fsx-lustre"
    assert obj["ETag"].endswith('-3"')  # 20 MiB in 8 MiB parts: a multipart upload
    before = wfs.ost_objects_du()
    r = wfs.lfs("hsm_release", wfs.path("ckpt.bin"))
    assert r.returncode == 0, r.stderr
    assert state(wfs, "ckpt.bin") == "(0x0000000d) released exists archived, archive_id:1"
    assert wfs.ost_objects_du() <= before - 20 * MiB
    gets = wfs.total("s3_gets")
    with open(wfs.path("ckpt.bin"), "rb") as f:
        assert f.read() == body
    assert wfs.total("s3_gets") > gets  # really fetched again, not served from old pages


def test_write_after_archive_is_dirty_until_archived_again(wfs):
    with open(wfs.path("log.txt"), "wb") as f:
        f.write(b"line 1\n")
    archive(wfs, "log.txt")
    with open(wfs.path("log.txt"), "ab") as f:
        f.write(b"line 2\n")
    assert state(wfs, "log.txt") == "(0x0000000b) exists dirty archived, archive_id:1"
    r = wfs.lfs("hsm_release", wfs.path("log.txt"))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    archive(wfs, "log.txt")
    assert state(wfs, "log.txt") == "(0x00000009) exists archived, archive_id:1"
    assert s3_object(wfs, "log.txt")["Body"].read() == b"line 1\nline 2\n"
    os.truncate(wfs.path("log.txt"), 3)  # a size change dirties too
    assert state(wfs, "log.txt") == "(0x0000000b) exists dirty archived, archive_id:1"


def test_write_into_released_file_hydrates_only_what_it_needs(make_fs, bucket):
    body = data(5 * MiB, "rel")
    fs = make_fs(bucket, objects={"big.bin": body}, osts=1)
    before = fs.stats()["total"]["s3_bytes_in"]
    with open(fs.path("big.bin"), "r+b") as f:
        f.seek(2 * MiB + 100)
        f.write(b"PATCH")
    fetched = fs.stats()["total"]["s3_bytes_in"] - before
    assert fetched == MiB  # the one stripe around the write, nothing else
    assert state(fs, "big.bin") == "(0x0000000b) exists dirty archived, archive_id:1"
    want = bytearray(body)
    want[2 * MiB + 100:2 * MiB + 105] = b"PATCH"
    with open(fs.path("big.bin"), "rb") as f:
        assert f.read() == bytes(want)  # untouched stripes still come from S3


def test_truncating_a_released_file_to_zero_fetches_nothing(make_fs, bucket):
    fs = make_fs(bucket, objects={"gone.bin": data(3 * MiB, "gone")}, osts=1)
    gets = fs.total("s3_gets")
    with open(fs.path("gone.bin"), "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert fs.total("s3_gets") == gets
    assert open(fs.path("gone.bin"), "rb").read() == b"new"
    os.truncate(fs.path("gone.bin"), 0)
    assert fs.total("s3_gets") == gets
    assert os.stat(fs.path("gone.bin")).st_size == 0


def test_extending_after_a_truncate_reads_zeros_not_old_bytes(make_fs, bucket):
    fs = make_fs(bucket, objects={"f.bin": data(3 * MiB, "ext")}, osts=1)
    os.truncate(fs.path("f.bin"), MiB + 10)
    os.truncate(fs.path("f.bin"), 3 * MiB)
    got = open(fs.path("f.bin"), "rb").read()
    assert got == data(3 * MiB, "ext")[:MiB + 10] + bytes(2 * MiB - 10)


def test_file_modified_while_archiving_stays_dirty(s3_server, s3, bucket, tmp_path):
    with FaultProxy(s3_server) as proxy:
        fs = FS(root=tmp_path / unique("fs"), bucket=bucket, prefix="", endpoint=proxy.url,
                s3=s3, osts=1, stripe_size="1M")
        try:
            fs.up()
            with open(fs.path("model.pt"), "wb") as f:
                f.write(data(3 * MiB, "v1"))
            # uploads take 2 s, so the write below lands while the archive is running
            proxy.add("latency", method="PUT", delay=2.0)
            assert fs.lfs("hsm_archive", fs.path("model.pt")).returncode == 0
            wait_for(lambda: fs.info("model.pt")["action"].get("state") == "running", 10, 0.02,
                     "the archive to start")
            with open(fs.path("model.pt"), "r+b") as f:
                f.write(b"v2")
            wait_noop(fs, "model.pt")
            assert state(fs, "model.pt") == "(0x0000000b) exists dirty archived, archive_id:1"
            r = fs.lfs("hsm_release", fs.path("model.pt"))
            assert r.returncode != 0
            assert open(fs.path("model.pt"), "rb").read()[:2] == b"v2"
        finally:
            for note in fs.cleanup():
                print(note)


def test_two_clients_see_each_others_closed_files(wfs, tmp_path):
    import subprocess
    import sys

    mnt2 = tmp_path / "client2"
    mnt2.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lustrefuse", "mount",
                             f"unix:{wfs.data_dir / 'mds.sock'}", str(mnt2), "--log-file",
                             str(tmp_path / "client2.log")])
    try:
        wait_for(lambda: os.path.ismount(mnt2), 20, 0.05, "the second client to mount")
        with open(wfs.path("shared.txt"), "w") as f:
            f.write("first version")
        assert open(mnt2 / "shared.txt").read() == "first version"
        with open(wfs.path("shared.txt"), "w") as f:
            f.write("second, longer version")
        assert open(mnt2 / "shared.txt").read() == "second, longer version"
        with open(mnt2 / "shared.txt", "a") as f:
            f.write(" + client 2")
        assert open(wfs.path("shared.txt")).read() == "second, longer version + client 2"
        os.mkdir(mnt2 / "made-by-2")
        assert os.path.isdir(wfs.path("made-by-2"))
        os.rename(wfs.path("shared.txt"), wfs.path("made-by-2/moved.txt"))
        assert open(mnt2 / "made-by-2" / "moved.txt").read().endswith("client 2")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt2)], capture_output=True)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


def test_auto_export_new_changed_deleted(make_fs, bucket, s3):
    fs = make_fs(bucket, extra_args=("--auto-export", "new,changed,deleted"))
    os.makedirs(fs.path("out/run1"))
    with open(fs.path("out/run1/metrics.json"), "w") as f:
        f.write('{"loss": 0.1}')
    os.symlink("run1/metrics.json", fs.path("out/latest"))

    def keys():
        return {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}

    wait_for(lambda: {"out/", "out/run1/", "out/run1/metrics.json", "out/latest"} <= set(keys()),
             30, 0.1, "auto-export of new entries")
    assert s3.get_object(Bucket=bucket, Key="out/latest")["Body"].read() == b"run1/metrics.json"
    wait_noop(fs, "out/run1/metrics.json")
    assert state(fs, "out/run1/metrics.json") == "(0x00000009) exists archived, archive_id:1"
    with open(fs.path("out/run1/metrics.json"), "a") as f:
        f.write("\n")
    wait_for(lambda: s3.get_object(Bucket=bucket, Key="out/run1/metrics.json")["Body"].read()
             == b'{"loss": 0.1}\n', 30, 0.1, "auto-export of a change")
    os.rename(fs.path("out/run1"), fs.path("out/run2"))
    wait_for(lambda: "out/run2/metrics.json" in keys() and "out/run1/metrics.json" not in keys(),
             30, 0.1, "rename exported as delete + new")
    os.unlink(fs.path("out/latest"))
    wait_for(lambda: "out/latest" not in keys(), 30, 0.1, "unlink exported")
    assert time.time()  # keep the module's imports honest


def test_release_of_a_file_open_for_write_elsewhere_is_busy(wfs):
    with open(wfs.path("busy.bin"), "wb") as f:
        f.write(b"x" * 1000)
    archive(wfs, "busy.bin")
    fd = os.open(wfs.path("busy.bin"), os.O_RDONLY)
    try:
        r = wfs.lfs("hsm_release", wfs.path("busy.bin"))
        assert r.returncode != 0 and "busy" in r.stderr.lower()
    finally:
        os.close(fd)
    assert wfs.lfs("hsm_release", wfs.path("busy.bin")).returncode == 0
    assert errno.EBUSY  # the errno lfs reported above
