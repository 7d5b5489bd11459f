"""S3 key <-> POSIX path mapping and FSx POSIX metadata headers (lustrefuse/keys.py)."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lustrefuse import keys
from lustrefuse.keys import NOT_POSIX, PATH_TOO_LONG, KeyError_, MappedKey


@pytest.mark.parametrize("key,parts,is_dir", [
    ("a", (b"a",), False),
    ("a/b/c.bin", (b"a", b"b", b"c.bin"), False),
    ("d/", (b"d",), True),
    ("d/e/", (b"d", b"e"), True),
    ("sp ace/fïlé 名前.txt", (b"sp ace", "fïlé 名前.txt".encode()), False),
    ("x" * 255, (b"x" * 255,), False),
    ("é" * 127 + "x", (("é" * 127 + "x").encode(),), False),  # 255 bytes
    ("...", (b"...",), False),
    (".hidden/..x", (b".hidden", b"..x"), False),
    ("a b/ c ", (b"a b", b" c "), False),
])
def test_map_key_accepts(key, parts, is_dir):
    assert keys.map_key(key) == MappedKey(parts, is_dir)


@pytest.mark.parametrize("key,code", [
    ("a//b", NOT_POSIX),
    ("//a", NOT_POSIX),
    ("/a", NOT_POSIX),
    ("./x", NOT_POSIX),
    ("../x", NOT_POSIX),
    ("a/./b", NOT_POSIX),
    ("a/../b", NOT_POSIX),
    ("a/..", NOT_POSIX),
    ("a/.", NOT_POSIX),
    (".", NOT_POSIX),
    ("..", NOT_POSIX),
    ("a//", NOT_POSIX),
    ("../", NOT_POSIX),
    ("x" * 256, NOT_POSIX),
    ("d/" + "é" * 128, NOT_POSIX),  # 256 bytes in UTF-8, 128 characters
    ("a/b\0c", NOT_POSIX),
    ("a/" * 600 + "x", PATH_TOO_LONG),  # over 1,024 bytes
])
def test_map_key_rejects(key, code):
    with pytest.raises(KeyError_) as e:
        keys.map_key(key)
    assert e.value.code == code


def test_map_key_prefix():
    assert keys.map_key("p/a/b", "p/") == MappedKey((b"a", b"b"), False)
    assert keys.map_key("p/", "p/") is None  # the prefix's own marker
    assert keys.map_key("", "") is None
    with pytest.raises(KeyError_):
        keys.map_key("q/a", "p/")
    with pytest.raises(KeyError_):
        keys.map_key("p//a", "p/")


@pytest.mark.parametrize("url,bucket,prefix", [
    ("s3://b", "b", ""),
    ("s3://b/", "b", ""),
    ("s3://b/p", "b", "p/"),
    ("s3://b/p/", "b", "p/"),
    ("s3://b/p/q", "b", "p/q/"),
    ("s3://my.bucket-1/data/", "my.bucket-1", "data/"),
])
def test_parse_s3_url(url, bucket, prefix):
    assert keys.parse_s3_url(url) == (bucket, prefix)


@pytest.mark.parametrize("url", ["", "b", "s3:/b", "s3://", "s3:///p", "http://b/p", "S3b"])
def test_parse_s3_url_rejects(url):
    with pytest.raises(ValueError):
        keys.parse_s3_url(url)


segment = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                  min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(segment, min_size=1, max_size=5), is_dir=st.booleans(),
       prefix=st.sampled_from(["", "pre/", "a/b/"]))
def test_key_for_roundtrip(parts, is_dir, prefix):
    raw = tuple(p.encode() for p in parts)
    key = keys.key_for(raw, prefix, is_dir)
    assert key.startswith(prefix)
    assert keys.map_key(key, prefix) == MappedKey(raw, is_dir)


@settings(max_examples=300, deadline=None)
@given(key=st.text(max_size=40))
def test_map_key_never_yields_unsafe_parts(key):
    """Whatever the key, an accepted mapping has only safe path components."""
    try:
        mk = keys.map_key(key)
    except KeyError_:
        return
    if mk is None:
        return
    for p in mk.parts:
        assert p and p not in (b".", b"..") and b"/" not in p and b"\0" not in p
        assert len(p) <= 255


@pytest.mark.parametrize("value,ns", [
    ("1595002920000000000ns", 1595002920000000000),
    ("1600000000123456789ns", 1600000000123456789),
    ("1600000000123", 1600000000123 * 1_000_000),  # no ns suffix: milliseconds
    ("0", 0),
    (" 5ns ", 5),
    (None, None),
    ("", None),
    ("abc", None),
    ("12.5", None),
    ("ns", None),
])
def test_parse_time(value, ns):
    assert keys.parse_time(value) == ns


def test_parse_metadata_full():
    m = keys.parse_metadata({"file-permissions": "0100640", "file-owner": "1000",
                             "file-group": "1001", "file-atime": "1595002920000000000ns",
                             "file-mtime": "1600000000123", "user-agent": "aws-fsx-lustre"})
    assert (m.mode, m.uid, m.gid) == (0o640, 1000, 1001)
    assert m.atime_ns == 1595002920000000000
    assert m.mtime_ns == 1600000000123 * 1_000_000


@pytest.mark.parametrize("perms,mode", [
    ("0100664", 0o664),
    ("040750", 0o750),       # a directory mode
    ("0104755", 0o755),      # setuid is not imported (FSx)
    ("0102755", 0o755),      # nor setgid
    ("041777", 0o1777),      # sticky is kept
    ("644", 0o644),
    ("rwxr-xr-x", None),
    ("0100689", None),       # not octal
    ("", None),
])
def test_parse_metadata_permissions(perms, mode):
    assert keys.parse_metadata({"file-permissions": perms}).mode == mode


def test_parse_metadata_bad_values_fall_back_field_by_field():
    m = keys.parse_metadata({"file-owner": "-1", "file-group": "abc", "file-mtime": "soon",
                             "file-permissions": "0100600"})
    assert (m.uid, m.gid, m.mtime_ns, m.mode) == (None, None, None, 0o600)
    assert keys.parse_metadata({}) == keys.PosixMeta()
    assert keys.parse_metadata(None) == keys.PosixMeta()


def test_parse_metadata_is_case_insensitive():
    m = keys.parse_metadata({"File-Owner": "7", "FILE-GROUP": "8"})
    assert (m.uid, m.gid) == (7, 8)


@settings(max_examples=200, deadline=None)
@given(perm=st.integers(0, 0o777), uid=st.integers(0, 2**31), gid=st.integers(0, 2**31),
       atime=st.integers(0, 2**62), mtime=st.integers(0, 2**62), is_dir=st.booleans())
def test_format_metadata_roundtrip(perm, uid, gid, atime, mtime, is_dir):
    mode = (stat.S_IFDIR if is_dir else stat.S_IFREG) | perm
    meta = keys.format_metadata(mode, uid, gid, atime, mtime)
    assert meta["user-agent"] == "aws-fsx-lustre"
    assert meta["file-permissions"] == (f"{mode:06o}" if is_dir else f"{mode:07o}")
    assert meta["file-mtime"].endswith("ns")
    m = keys.parse_metadata(meta)
    assert (m.mode, m.uid, m.gid, m.atime_ns, m.mtime_ns) == (perm, uid, gid, atime, mtime)


def test_format_metadata_examples():
    meta = keys.format_metadata(stat.S_IFREG | 0o664, 500, 500, 1595002920000000000,
                                1595002920000000000)
    assert meta == {"file-permissions": "0100664", "file-owner": "500", "file-group": "500",
                    "file-atime": "1595002920000000000ns", "file-mtime": "1595002920000000000ns",
                    "user-agent": "aws-fsx-lustre"}
    assert keys.format_metadata(stat.S_IFDIR | 0o755, 0, 0, 0, 0)["file-permissions"] == "040755"
