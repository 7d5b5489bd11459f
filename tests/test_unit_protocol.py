"""Wire format (lustrefuse/protocol.py): frames, limits, malformed input."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lustrefuse import protocol, rpc
from lustrefuse.protocol import HEADER, MAGIC, MAX_BODY, VERSION, ProtocolError, RpcError

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=50) | st.binary(max_size=200),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.integers(0, 1000), children, max_size=5),
    max_leaves=20,
)


def split(frame: bytes):
    length = protocol.parse_header(frame[:HEADER.size])
    body = frame[HEADER.size:]
    assert len(body) == length
    return protocol.decode(body)


def normalize(v):
    """msgpack gives lists for tuples; nothing else changes."""
    if isinstance(v, (list, tuple)):
        return [normalize(x) for x in v]
    if isinstance(v, dict):
        return {k: normalize(x) for k, x in v.items()}
    return v


@settings(max_examples=150, deadline=None)
@given(obj=values)
def test_encode_decode_roundtrip(obj):
    frame = protocol.encode(obj)
    magic, version, flags, length = HEADER.unpack(frame[:HEADER.size])
    assert (magic, version, flags) == (MAGIC, VERSION, 0)
    assert split(frame) == normalize(obj)


def test_binary_stays_binary():
    got = split(protocol.encode({"data": b"\x00\xff" * 10, "name": "é"}))
    assert got == {"data": b"\x00\xff" * 10, "name": "é"}
    assert isinstance(got["data"], bytes)


def test_request_and_reply_roundtrip():
    op, args = protocol.parse_request(split(protocol.request("lookup", {"parent": 1, "name": b"x"})))
    assert (op, args) == ("lookup", {"parent": 1, "name": b"x"})
    assert protocol.parse_reply(split(protocol.reply_ok({"ino": 5}))) == {"ino": 5}
    assert protocol.parse_reply(split(protocol.reply_ok(None))) is None
    with pytest.raises(RpcError) as e:
        protocol.parse_reply(split(protocol.reply_err(errno.ENOENT, "no such file")))
    assert e.value.errno == errno.ENOENT
    assert "no such file" in str(e.value)


def test_oversize_encode_is_refused():
    with pytest.raises(ProtocolError):
        protocol.encode(b"x" * (MAX_BODY + 1))
    assert len(protocol.encode(b"x" * (MAX_BODY - 16))) <= HEADER.size + MAX_BODY


def test_oversize_header_is_refused():
    with pytest.raises(ProtocolError):
        protocol.parse_header(HEADER.pack(MAGIC, VERSION, 0, MAX_BODY + 1))
    with pytest.raises(ProtocolError):
        protocol.parse_header(HEADER.pack(MAGIC, VERSION, 0, 2**32 - 1))
    assert protocol.parse_header(HEADER.pack(MAGIC, VERSION, 0, MAX_BODY)) == MAX_BODY


@pytest.mark.parametrize("magic", [b"XX", b"lf", b"FL", b"\0\0"])
def test_bad_magic(magic):
    with pytest.raises(ProtocolError, match="magic"):
        protocol.parse_header(HEADER.pack(magic, VERSION, 0, 10))


@pytest.mark.parametrize("version", [0, VERSION + 1, 255])
def test_bad_version(version):
    with pytest.raises(ProtocolError, match="version"):
        protocol.parse_header(HEADER.pack(MAGIC, version, 0, 10))


@pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01", b"\xdb\xff\xff\xff\xff", b"\x81"])
def test_undecodable_body(body):
    with pytest.raises(ProtocolError):
        protocol.decode(body)


@pytest.mark.parametrize("msg", [None, 5, "op", [1, 2], {}, {"op": 5}, {"op": None},
                                 {"op": "x", "a": [1]}, {"op": "x", "a": "s"}])
def test_bad_requests(msg):
    with pytest.raises(ProtocolError):
        protocol.parse_request(msg)


def test_request_without_args_is_empty():
    assert protocol.parse_request({"op": "ping"}) == ("ping", {})


@pytest.mark.parametrize("msg", [None, 3, [1], "x"])
def test_bad_replies(msg):
    with pytest.raises(ProtocolError):
        protocol.parse_reply(msg)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=HEADER.size, max_size=64))
def test_garbage_never_escapes_as_other_errors(raw):
    """Any bytes are either a valid frame or a ProtocolError, never another exception."""
    try:
        length = protocol.parse_header(raw[:HEADER.size])
    except ProtocolError:
        return
    assert 0 <= length <= MAX_BODY
    try:
        protocol.decode(raw[HEADER.size:])
    except ProtocolError:
        pass


def test_read_frame_over_a_socket():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(protocol.request("ping", {}))
        assert rpc.read_frame(b) == {"op": "ping", "a": {}}
        a.sendall(HEADER.pack(b"ZZ", VERSION, 0, 3) + b"abc")
        with pytest.raises(ProtocolError):
            rpc.read_frame(b)


def test_msgpack_body_is_plain_msgpack():
    """Other implementations can speak the protocol with any msgpack library."""
    frame = protocol.request("getattr", {"ino": 7})
    assert msgpack.unpackb(frame[HEADER.size:], raw=False) == {"op": "getattr", "a": {"ino": 7}}


@contextlib.contextmanager
def sending(sock: socket.socket, data: bytes):
    """Send ``data`` from a thread while the block reads it."""
    t = threading.Thread(target=sock.sendall, args=(data,))
    t.start()
    try:
        yield
    finally:
        t.join(timeout=10)


def test_frame_reader_small_large_pieces_and_pipelined():
    """The server's reader: whole small frames, a frame larger than its buffer, a frame
    sent in pieces, and two frames sent back to back all come out as sent."""
    big = {"op": "write", "a": {"data": bytes(range(256)) * 1024}}  # 256 KiB > CHUNK
    a, b = socket.socketpair()
    with a, b:
        reader = rpc.FrameReader(b)
        a.sendall(protocol.request("ping", {}))
        assert reader.read() == {"op": "ping", "a": {}}
        with sending(a, protocol.encode(big)):  # more than a socket buffer holds
            assert reader.read() == big
        frame = protocol.request("lookup", {"parent": 1, "name": b"x"})
        for i in range(len(frame)):  # one byte at a time, header included
            a.sendall(frame[i:i + 1])
        assert reader.read() == {"op": "lookup", "a": {"parent": 1, "name": b"x"}}
        with sending(a, protocol.request("one", {}) + protocol.request("two", {})
                     + protocol.encode(big)):
            assert [reader.read()["op"] for _ in range(3)] == ["one", "two", "write"]
        assert b.gettimeout() is None  # back to waiting for ever between frames


def test_frame_reader_gives_up_on_a_half_sent_frame(monkeypatch):
    monkeypatch.setattr(rpc, "FRAME_TIMEOUT", 0.2)
    a, b = socket.socketpair()
    with a, b:
        reader = rpc.FrameReader(b)
        a.sendall(protocol.request("ping", {})[:5])
        with pytest.raises(TimeoutError):
            reader.read()
        assert b.gettimeout() is None


def test_frame_reader_takes_descriptors_with_the_frame():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        with a, b:
            frame = protocol.request("install", {})
            socket.send_fds(a, [frame[:1]], [r])
            a.sendall(frame[1:])
            fds: list[int] = []
            assert rpc.FrameReader(b).read(fds)["op"] == "install"
            assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(r).st_ino
            os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)
