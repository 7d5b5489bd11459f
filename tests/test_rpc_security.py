"""The RPC listeners against hostile peers: fuzzed frames, missing secrets, socket modes.

A real MDS process is started on a data directory with no S3 repository; it
must keep answering a well-behaved client after thousands of bad frames.
"""

import json
import os
import random
import socket
import stat
import struct
import subprocess
import sys
import time

import pytest

from lustrefuse import protocol, rpc
from lustrefuse.protocol import RpcError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mds(data_dir, *extra, env=None):
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "fs.json"), "w") as f:
        json.dump({"osts": 1, "stripe_size": 1 << 20, "imported_file_chunk_size": 1 << 30}, f)
    log = open(os.path.join(data_dir, "mds.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lustrefuse", "mds", "--data-dir", str(data_dir),
                             *extra], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    log.close()
    return proc


def _wait(client: rpc.Client, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the MDS exited"
        try:
            return client.call("ping", timeout=2)
        except (OSError, RpcError):
            time.sleep(0.05)
    pytest.fail("the MDS did not answer")


@pytest.fixture
def mds(tmp_path):
    proc = _start_mds(tmp_path / "dd")
    client = rpc.Client(f"unix:{tmp_path / 'dd' / 'mds.sock'}", timeout=5)
    _wait(client, proc)
    yield proc, client, str(tmp_path / "dd" / "mds.sock")
    proc.terminate()
    proc.wait(timeout=10)


def _frames(rng: random.Random):
    """Garbage of every shape: bad magic, versions, lengths, bodies, requests."""
    good = protocol.request("getattr", {"ino": 1})
    kinds = [
        lambda: rng.randbytes(rng.randint(1, 64)),
        lambda: b"XX" + good[2:],
        lambda: good[:2] + bytes([rng.randint(2, 255)]) + good[3:],
        lambda: struct.pack(">2sBBI", b"LF", 1, 0, protocol.MAX_BODY + rng.randint(1, 1 << 20)),
        lambda: struct.pack(">2sBBI", b"LF", 1, 0, 16) + rng.randbytes(16),
        lambda: protocol.encode(rng.choice([[], 5, "op", {"op": 7}, {"op": "x", "a": []}])),
        lambda: protocol.request(rng.choice(["getattr", "lookup", "readdir", "create", "nope"]),
                                 {rng.choice(["ino", "parent", "name", "zz"]):
                                  rng.choice([-1, 2**64 - 1, "a", b"\0" * 300, None, [1]])}),
        lambda: good[: rng.randint(1, len(good) - 1)],  # a frame cut short
    ]
    while True:
        yield rng.choice(kinds)()


def test_fuzzed_frames_do_not_crash_the_mds(mds):
    proc, client, path = mds
    rng = random.Random(1234)
    gen = _frames(rng)
    for _ in range(3000):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(path)
            try:
                s.sendall(next(gen))
                s.shutdown(socket.SHUT_WR)
                s.recv(4096)
            except OSError:
                pass
    assert proc.poll() is None
    assert client.call("ping")["pid"] == proc.pid
    assert client.call("getattr", ino=1)["ino"] == 1


def test_bad_arguments_get_errno_and_change_nothing(mds):
    _proc, client, _path = mds
    before = client.call("readdir", ino=1)
    with pytest.raises(RpcError) as e:
        client.call("create", parent=1, name=b"a/b", mode=0o100644, uid=0, gid=0)
    assert e.value.errno == 22
    with pytest.raises(RpcError) as e:
        client.call("lookup", parent=1)  # a missing argument
    assert e.value.errno == 22
    with pytest.raises(RpcError) as e:
        client.call("no_such_op")
    assert e.value.errno == 38
    assert client.call("readdir", ino=1) == before


def test_unix_socket_is_private(mds):
    _proc, _client, path = mds
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_tcp_listener_requires_the_shared_secret(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef")
    port = _free_port()
    proc = _start_mds(tmp_path / "dd", "--listen", f"tcp:127.0.0.1:{port}", "--secret-file",
                      str(secret))
    try:
        good = rpc.Client(f"tcp:127.0.0.1:{port}", secret.read_bytes(), timeout=5)
        assert _wait(good, proc)["pid"] == proc.pid
        for wrong in (None, b"not-the-secret-at-all"):
            bad = rpc.Client(f"tcp:127.0.0.1:{port}", wrong, timeout=5)
            with pytest.raises((OSError, RpcError, ConnectionError)):
                bad.call("ping")
        assert good.call("ping")["pid"] == proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tcp_listener_without_secret_is_refused(tmp_path):
    proc = _start_mds(tmp_path / "dd", "--listen", f"tcp:127.0.0.1:{_free_port()}")
    assert proc.wait(timeout=20) != 0
    assert b"secret" in (tmp_path / "dd" / "mds.log").read_bytes()


def test_second_mds_on_the_same_directory_refuses(mds, tmp_path):
    proc2 = subprocess.run([sys.executable, "-m", "lustrefuse", "mds", "--data-dir",
                            str(tmp_path / "dd")], capture_output=True, text=True, timeout=30)
    assert proc2.returncode != 0
    assert "another MDS is already running" in proc2.stderr + proc2.stdout


def test_socket_group_and_json_logs(tmp_path):
    import grp
    import json as json_mod

    proc = _start_mds(tmp_path / "dd", env={"LUSTREFUSE_SOCKET_GROUP": "nogroup",
                                             "LUSTREFUSE_LOG_FORMAT": "json"})
    try:
        sock = tmp_path / "dd" / "mds.sock"
        _wait(rpc.Client(f"unix:{sock}", timeout=5), proc)
        log = tmp_path / "dd" / "mds.log"
        deadline = time.monotonic() + 20  # the line is written just after the socket answers
        while b"MDS serving" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam("nogroup").gr_gid
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    lines = [ln for ln in (tmp_path / "dd" / "mds.log").read_text().splitlines() if ln.strip()]
    records = [json_mod.loads(ln) for ln in lines]
    assert any("MDS serving" in r["message"] and r["level"] == "info" for r in records)
