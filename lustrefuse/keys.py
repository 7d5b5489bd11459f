"""S3 key <-> POSIX path mapping and FSx POSIX metadata headers. Pure: no I/O.

A key ``a/b/c.bin`` under the linked prefix is the file ``a/b/c.bin``; a key
ending in ``/`` is a directory marker. Keys that cannot be POSIX names are
refused with the FSx error code that names why.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

NAME_MAX = 255
KEY_MAX = 1024

# FSx error codes (reference §4.4, §4.6)
NOT_POSIX = "S3ObjectPathNotPosixCompliant"
TYPE_MISMATCH = "S3ImportObjectTypeMismatch"
PATH_TOO_LONG = "PathSizeTooLong"

DEFAULT_FILE_MODE = stat.S_IFREG | 0o755  # FSx: root:root 755 without headers
DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755


class KeyError_(ValueError):
    def __init__(self, code: str, why: str):
        super().__init__(why)
        self.code = code


@dataclass(frozen=True)
class MappedKey:
    parts: tuple[bytes, ...]  # path components below the linked directory
    is_dir: bool


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix with a trailing '/' or '')."""
    if not url.startswith("s3://"):
        raise ValueError(f"'{url}' is not an s3:// URL")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"'{url}' names no bucket")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def map_key(key: str, prefix: str = "") -> MappedKey | None:
    """Map an object key to path components, or raise KeyError_ with an FSx code.

    Returns None for the prefix's own directory marker (``prefix/``).
    """
    if not key.startswith(prefix):
        raise KeyError_(NOT_POSIX, "key is outside the linked prefix")
    rel = key[len(prefix):]
    if rel == "":
        return None
    if len(key.encode("utf-8", "surrogateescape")) > KEY_MAX:
        raise KeyError_(PATH_TOO_LONG, f"key is over {KEY_MAX} bytes")
    is_dir = rel.endswith("/")
    if is_dir:
        rel = rel[:-1]
    parts = []
    for seg in rel.split("/"):
        if seg in ("", ".", ".."):
            raise KeyError_(NOT_POSIX, f"key has an empty, '.' or '..' segment: {key!r}")
        raw = seg.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            raise KeyError_(NOT_POSIX, "key contains NUL")
        if len(raw) > NAME_MAX:
            raise KeyError_(NOT_POSIX, f"a segment is over {NAME_MAX} bytes")
        parts.append(raw)
    return MappedKey(tuple(parts), is_dir)


def key_for(parts: list[bytes] | tuple[bytes, ...], prefix: str, is_dir: bool = False) -> str:
    """Path components -> object key under ``prefix``."""
    rel = "/".join(p.decode("utf-8", "surrogateescape") for p in parts)
    return prefix + rel + ("/" if is_dir else "")


def parse_time(value: str | None) -> int | None:
    """FSx time header -> nanoseconds. ``<n>ns`` is ns; a bare number is ms."""
    if not value:
        return None
    v = value.strip()
    try:
        if v.endswith("ns"):
            return int(v[:-2])
        return int(v) * 1_000_000
    except ValueError:
        return None


def format_time(ns: int) -> str:
    return f"{int(ns)}ns"


@dataclass
class PosixMeta:
    mode: int | None = None  # permission bits only (type comes from the key)
    is_symlink: bool = False  # file-permissions says 0120xxx: the body is the target
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


def parse_metadata(meta: dict[str, str]) -> PosixMeta:
    """Object user metadata (boto3's ``Metadata``, keys without x-amz-meta-) -> PosixMeta.

    Bad values are ignored field by field, as FSx keeps defaults for them.
    """
    m = {k.lower(): v for k, v in (meta or {}).items()}
    out = PosixMeta()
    perms = m.get("file-permissions")
    if perms:
        try:
            value = int(perms, 8)
            out.mode = value & 0o1777  # setuid/setgid are not imported (FSx)
            out.is_symlink = stat.S_ISLNK(value)
        except ValueError:
            pass
    for name, attr in (("file-owner", "uid"), ("file-group", "gid")):
        v = m.get(name)
        if v is not None and v.strip().isdigit():
            setattr(out, attr, int(v))
    out.atime_ns = parse_time(m.get("file-atime"))
    out.mtime_ns = parse_time(m.get("file-mtime"))
    return out


def format_metadata(mode: int, uid: int, gid: int, atime_ns: int, mtime_ns: int) -> dict:
    """The FSx export headers for an inode (boto3 ``Metadata`` form)."""
    return {
        "file-permissions": f"{mode:07o}" if stat.S_IFMT(mode) >= 0o100000 else f"{mode:06o}",
        "file-owner": str(uid),
        "file-group": str(gid),
        "file-atime": format_time(atime_ns),
        "file-mtime": format_time(mtime_ns),
        "user-agent": "aws-fsx-lustre",
    }
