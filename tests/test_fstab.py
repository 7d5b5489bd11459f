"""``mount -t fuse.lustrefuse`` and an fstab line, through mount.fuse3 (issue #6)."""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import MiB, data, wait_for

from lustrefuse import rpc
from lustrefuse.protocol import RpcError

LINK = "/usr/local/bin/lustrefuse"  # mount.fuse3 finds the helper on the system PATH


def answers(address: str) -> bool:
    try:
        return rpc.Client(address, timeout=2).call("ping") is not None
    except (OSError, RpcError):
        return False


@pytest.fixture
def on_system_path():
    if os.path.lexists(LINK):
        yield
        return
    os.symlink(os.path.join(os.path.dirname(sys.executable), "lustrefuse"), LINK)
    try:
        yield
    finally:
        os.unlink(LINK)


def test_mount_through_mount_fuse3_and_fstab(make_fs, bucket, tmp_path, on_system_path):
    if not shutil.which("mount.fuse3"):
        pytest.skip("mount.fuse3 is not installed")
    body = data(2 * MiB + 3, "fstab")
    fs = make_fs(bucket, objects={"f.bin": body}, osts=1)
    fs.down()  # keep the data dir; run the services by hand, as systemd units would
    dd = str(fs.data_dir)
    procs = [subprocess.Popen([sys.executable, "-m", "lustrefuse", "mds", "--data-dir", dd,
                               "--log-file", f"{dd}/mds-by-hand.log"])]
    try:
        wait_for(lambda: answers(f"unix:{dd}/mds.sock"), 30, 0.1, "the MDS")
        procs.append(subprocess.Popen([sys.executable, "-m", "lustrefuse", "ost", "--index", "0",
                                       "--dir", f"{dd}/ost0", "--mds", f"unix:{dd}/mds.sock",
                                       "--log-file", f"{dd}/ost-by-hand.log"]))
        wait_for(lambda: answers(f"unix:{dd}/ost0/ost.sock"), 30, 0.1, "the OST")
        r = subprocess.run(["mount", "-t", "fuse.lustrefuse", dd, str(fs.mnt), "-o",
                            "allow_other,_netdev,attr_timeout=5"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert open(fs.path("f.bin"), "rb").read() == body
        assert subprocess.run(["umount", str(fs.mnt)], timeout=30).returncode == 0
        tab = tmp_path / "fstab"
        tab.write_text(f"{dd} {fs.mnt} fuse.lustrefuse _netdev,allow_other,noauto 0 0\n")
        r = subprocess.run(["mount", "-T", str(tab), str(fs.mnt)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert open(fs.path("f.bin"), "rb").read() == body
        assert subprocess.run(["umount", str(fs.mnt)], timeout=30).returncode == 0
        r = subprocess.run(["mount", "-t", "fuse.lustrefuse", dd, str(fs.mnt), "-o", "bogus=1"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "unknown mount option 'bogus=1'" in r.stderr
        assert not os.path.ismount(fs.mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(fs.mnt)], capture_output=True)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
