"""Wire format between the client, MDS and OSTs. Pure: no sockets here.

A frame is an 8-byte header (magic ``LF``, version, flags, body length) and a
msgpack body. Requests are ``{"op": str, "a": dict}``; replies are
``{"r": result}`` or ``{"e": errno, "m": message}``. Binary data travels as
msgpack ``bin`` inside the body.
"""

from __future__ import annotations

import errno
import struct

import msgpack

CTL_NAME = b".lustrefuse_ctl"  # the hidden control file at a mount's root

MAGIC = b"LF"
VERSION = 1
HEADER = struct.Struct(">2sBBI")
MAX_BODY = 80 * 1024 * 1024  # a 64 MiB stripe plus headroom


class ProtocolError(Exception):
    """A frame that is malformed, oversized or of an unknown version."""


class RpcError(OSError):
    """An error a handler raises (or a reply carries), with a POSIX errno."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(err, message or errno.errorcode.get(err, "error"))


def encode(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_BODY:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(MAGIC, VERSION, 0, len(body)) + body


def parse_header(raw: bytes) -> int:
    """Validate a header, return the body length."""
    magic, version, _flags, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError("bad magic")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if length > MAX_BODY:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_BODY}")
    return length


def decode(body: bytes):
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for garbage
        raise ProtocolError(f"undecodable body: {e}") from None


def request(op: str, args: dict) -> bytes:
    return encode({"op": op, "a": args})


def parse_request(msg) -> tuple[str, dict]:
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("request without an op")
    args = msg.get("a", {})
    if not isinstance(args, dict):
        raise ProtocolError("request arguments are not a map")
    return msg["op"], args


def reply_ok(result) -> bytes:
    return encode({"r": result})


def reply_err(err: int, message: str) -> bytes:
    return encode({"e": int(err), "m": str(message)})


def parse_reply(msg):
    if not isinstance(msg, dict):
        raise ProtocolError("reply is not a map")
    if "e" in msg:
        raise RpcError(msg["e"], msg.get("m", ""))
    return msg.get("r")
