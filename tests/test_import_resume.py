"""A killed import continues where it stopped (issue #4): no object twice, none missed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import put_many_small, wait_for

from lustrefuse import rpc
from lustrefuse.protocol import RpcError

N = 1500  # with a HEAD per object this imports in seconds: long enough to be killed mid-way


def test_killed_import_resumes_from_its_cursor(make_fs, bucket, s3_server):
    keys = [f"d{i % 7}/obj{i:05d}" for i in range(N)]
    put_many_small(s3_server, bucket, keys, body_of=lambda k: k.encode())
    fs = make_fs(bucket, up=False)
    proc = subprocess.Popen([sys.executable, "-m", "lustrefuse", *fs.up_args()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mds = rpc.Client(f"unix:{fs.data_dir / 'mds.sock'}", timeout=5)

    def committed():
        try:
            return mds.call("import_status").get("new", 0)
        except (OSError, RpcError):
            return 0

    try:
        wait_for(lambda: committed() >= 1000, 120, 0.02, "the first page to be committed")
        assert committed() < N, "the import finished before it could be interrupted"
        os.kill(fs.pids()["mds"], signal.SIGKILL)
        proc.wait(60)
        assert proc.returncode != 0  # up reports the failed import
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    fs.cleanup()
    fs.up()  # same data dir: the import resumes after the last committed page
    log = fs.log("mds")
    assert "resuming the import after key" in log
    assert f"import done: {N - 1000} listed, {N - 1000} new" in log  # only the rest
    names = []
    for d in range(7):
        names += [f"d{d}/{n}" for n in os.listdir(fs.path(f"d{d}"))]
    assert sorted(names) == sorted(keys)  # each object exactly once
    assert open(fs.path(keys[-1]), "rb").read() == keys[-1].encode()
