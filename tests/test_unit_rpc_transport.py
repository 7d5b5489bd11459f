"""The RPC transport between a threaded Server and the trio client the mount uses:
small and large replies, many calls at once, descriptors, errors and timeouts."""

from __future__ import annotations

import errno
import os
import time

import pytest
import trio

from lustrefuse import rpc
from lustrefuse.protocol import RpcError


def handlers():
    def echo(peer, data=b"", n=0):
        return {"data": data, "big": bytes(range(256)) * (n // 256)}

    def pipe_fd(peer):
        r, w = os.pipe()
        os.write(w, b"through the socket")
        os.close(w)
        return rpc.Reply({"ok": True}, [r])

    def slow(peer, secs):
        time.sleep(secs)
        return secs

    def fail(peer):
        raise RpcError(errno.ENOENT, "no such thing")

    return {"echo": echo, "pipe_fd": pipe_fd, "slow": slow, "fail": fail}


@pytest.fixture
def server(tmp_path):
    address = f"unix:{tmp_path / 'rpc.sock'}"
    srv = rpc.Server(address, handlers())
    srv.start()
    yield srv
    srv.shutdown()


def test_small_large_and_concurrent_replies(server):
    async def main():
        client = rpc.TrioClient(server.address, timeout=10)
        assert await client.call("echo", data=b"x") == {"data": b"x", "big": b""}
        for n in (60 * 1024, 64 * 1024, 3 * 1024 * 1024):  # around and far past FIRST_RECV
            got = await client.call("echo", n=n)
            assert got["big"] == bytes(range(256)) * (n // 256)
        results = []

        async def one(i):
            results.append((await client.call("echo", data=bytes([i]), n=i * 4096))["data"])

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
        assert sorted(results) == [bytes([i]) for i in range(40)]
        client.close()

    trio.run(main)


def test_descriptors_errors_and_timeouts(server):
    async def main():
        client = rpc.TrioClient(server.address, timeout=10)
        res, fds = await client.call("pipe_fd", want_fds=True)
        assert res == {"ok": True} and len(fds) == 1
        assert os.read(fds[0], 100) == b"through the socket"
        os.close(fds[0])
        with pytest.raises(RpcError) as e:
            await client.call("fail")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(RpcError) as e:
            await client.call("slow", secs=1.0, timeout=0.2)
        assert e.value.errno == errno.ETIMEDOUT
        assert await client.call("slow", secs=0.0) == 0.0  # the timed-out socket is gone
        client.close()

    trio.run(main)

