"""Chunk checksums: xxh3-64, stored as signed 64-bit integers (SQLite's integer type)."""

import xxhash


def checksum(data) -> int:
    v = xxhash.xxh3_64_intdigest(data)
    return v - (1 << 64) if v >= 1 << 63 else v
