"""RAID0 striping math, as Lustre's lov_offset.c does it. Pure: no I/O.

A file is cut into stripe units of ``stripe_size`` bytes. Unit ``s`` (the
"stripe chunk", also the unit of hydration, presence and checksums) lives on
``osts[s % stripe_count]`` at object offset ``(s // stripe_count) * stripe_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MIN_STRIPE_SIZE = 64 * KiB  # LOV_MIN_STRIPE_SIZE
MAX_STRIPE_SIZE = 4 * GiB - MIN_STRIPE_SIZE
MAX_STRIPE_COUNT = 2000  # LOV_MAX_STRIPE_COUNT
DEFAULT_STRIPE_SIZE = 1 * MiB  # Lustre <= 2.15 and FSx
DEFAULT_IMPORTED_CHUNK_SIZE = 1 * GiB  # FSx ImportedFileChunkSize default
# The most one hydration GET fetches: adjacent chunks (of one OST or of several: a
# stripe row) come in one ranged GET, since an object store's cost is per request
# (and so is botocore's: a 1 GiB restore cost the OSTs 1.1 s of CPU in 8 MiB GETs,
# 0.8 s in 16 MiB ones, and the endpoint 0.73 s against 0.5 s).
GET_SPAN = 16 * MiB

# Lustre's FID sequence for normal files on MDT0 starts here.
FID_SEQ_NORMAL = 0x200000400


class LayoutError(ValueError):
    """A layout parameter that Lustre would refuse (EINVAL)."""


@dataclass(frozen=True)
class Layout:
    stripe_size: int
    osts: tuple[int, ...]  # OST index of each stripe object, in stripe order
    gen: int = 0
    released: bool = False  # Lustre's LOV_PATTERN_F_RELEASED (only for display)

    @property
    def stripe_count(self) -> int:
        return len(self.osts)

    @property
    def stripe_offset(self) -> int:
        return self.osts[0]

    def chunk_count(self, size: int) -> int:
        return (size + self.stripe_size - 1) // self.stripe_size

    def chunk_of(self, offset: int) -> int:
        return offset // self.stripe_size

    def ost_of_chunk(self, s: int) -> int:
        return self.osts[s % self.stripe_count]

    def object_offset(self, offset: int) -> int:
        s = offset // self.stripe_size
        return (s // self.stripe_count) * self.stripe_size + offset % self.stripe_size

    def chunk_object_offset(self, s: int) -> int:
        return (s // self.stripe_count) * self.stripe_size

    def chunk_length(self, s: int, size: int) -> int:
        start = s * self.stripe_size
        return max(0, min(self.stripe_size, size - start))

    def pieces(self, offset: int, length: int):
        """Split the file range [offset, offset+length) into per-chunk pieces.

        Yields ``(chunk, ost, object_offset, length)`` in file order.
        """
        end = offset + length
        while offset < end:
            s = offset // self.stripe_size
            within = offset % self.stripe_size
            n = min(self.stripe_size - within, end - offset)
            yield s, self.ost_of_chunk(s), self.chunk_object_offset(s) + within, n
            offset += n

    def chunks_on_ost(self, ost: int, size: int) -> list[int]:
        """Every chunk of a file of ``size`` bytes that lives on OST ``ost``."""
        return [s for s in range(self.chunk_count(size)) if self.ost_of_chunk(s) == ost]

    def object_size(self, pos: int, size: int) -> int:
        """Bytes held by the object at stripe position ``pos`` for a file of ``size``
        (lov_stripe_size inverted; O(1) so a truncate to 1 PB is as cheap as to 1 KB)."""
        row = self.stripe_size * self.stripe_count
        full, rest = divmod(size, row)
        return full * self.stripe_size + min(self.stripe_size, max(0, rest - pos * self.stripe_size))

    def get_runs(self, chunks, span: int) -> list[list[int]]:
        """Group chunk numbers into runs that one ranged GET of at most ``span`` bytes
        fetches: chunks that follow each other in the file, whichever OST holds them."""
        per_get = max(1, span // self.stripe_size)
        runs: list[list[int]] = []
        for s in sorted(set(chunks)):
            if runs and s == runs[-1][-1] + 1 and len(runs[-1]) < per_get:
                runs[-1].append(s)
            else:
                runs.append([s])
        return runs

    def fetcher_of_run(self, run: list[int], span: int) -> int:
        """The OST that fetches a run (and hands the other OSTs their chunks of it):
        rotated run by run so that every OST of the layout does its share of the GETs."""
        per_get = max(1, span // self.stripe_size)
        return self.osts[(run[0] // per_get) % self.stripe_count]

    def to_dict(self) -> dict:
        return {"stripe_size": self.stripe_size, "osts": list(self.osts), "gen": self.gen}

    @classmethod
    def from_dict(cls, d: dict, released: bool = False) -> Layout:
        return cls(d["stripe_size"], tuple(d["osts"]), d.get("gen", 0), released)


@dataclass(frozen=True)
class StripeSpec:
    """A requested layout, as ``lfs setstripe`` takes it (0/-1 mean 'default')."""

    stripe_size: int = 0  # 0: inherit/default
    stripe_count: int = 0  # 0: inherit/default, -1: all OSTs
    stripe_offset: int = -1  # -1: the MDS picks round-robin
    ost_list: tuple[int, ...] = field(default=())  # -o: explicit OSTs

    def to_dict(self) -> dict:
        return {
            "stripe_size": self.stripe_size,
            "stripe_count": self.stripe_count,
            "stripe_offset": self.stripe_offset,
            "ost_list": list(self.ost_list),
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> StripeSpec:
        if not d:
            return cls()
        return cls(d.get("stripe_size", 0), d.get("stripe_count", 0),
                   d.get("stripe_offset", -1), tuple(d.get("ost_list", ())))

    def merged_over(self, parent: StripeSpec) -> StripeSpec:
        """This spec with unset fields taken from ``parent`` (directory inheritance)."""
        return StripeSpec(
            self.stripe_size or parent.stripe_size,
            self.stripe_count or parent.stripe_count,
            self.stripe_offset if self.stripe_offset != -1 else parent.stripe_offset,
            self.ost_list or parent.ost_list,
        )


def validate_spec(spec: StripeSpec, ost_count: int) -> None:
    if spec.stripe_size:
        if spec.stripe_size % MIN_STRIPE_SIZE or not 0 < spec.stripe_size <= MAX_STRIPE_SIZE:
            raise LayoutError(f"stripe size {spec.stripe_size} is not a multiple of 64 KiB")
    if spec.stripe_count < -1 or spec.stripe_count > MAX_STRIPE_COUNT:
        raise LayoutError(f"stripe count {spec.stripe_count} out of range")
    if spec.stripe_count > ost_count:
        raise LayoutError(f"stripe count {spec.stripe_count} exceeds the {ost_count} OSTs")
    if spec.stripe_offset < -1 or spec.stripe_offset >= ost_count:
        raise LayoutError(f"stripe index {spec.stripe_offset} is not an OST of this filesystem")
    for o in spec.ost_list:
        if not 0 <= o < ost_count:
            raise LayoutError(f"OST index {o} is not an OST of this filesystem")
    if len(set(spec.ost_list)) != len(spec.ost_list):
        raise LayoutError("an OST appears twice in the OST list")


def make_layout(spec: StripeSpec, ost_count: int, next_start: int,
                default_size: int = DEFAULT_STRIPE_SIZE) -> Layout:
    """The concrete layout for a new file. ``next_start`` is the round-robin cursor."""
    validate_spec(spec, ost_count)
    size = spec.stripe_size or default_size
    if spec.ost_list:
        return Layout(size, tuple(spec.ost_list))
    count = spec.stripe_count or 1
    if count == -1:
        count = ost_count
    first = spec.stripe_offset if spec.stripe_offset != -1 else next_start % ost_count
    return Layout(size, tuple((first + i) % ost_count for i in range(count)))


def fsx_stripe_count(size: int, imported_chunk_size: int, ost_count: int) -> int:
    """Imported files are striped the FSx way: size // chunk + 1, capped at the OSTs."""
    return max(1, min(size // imported_chunk_size + 1, ost_count))


def fid_of(ino: int) -> tuple[int, int, int]:
    return (FID_SEQ_NORMAL + (ino >> 32), ino & 0xFFFFFFFF, 0)


def ino_of_fid(seq: int, oid: int, ver: int = 0) -> int:
    if seq < FID_SEQ_NORMAL:
        raise ValueError("not a FID of this filesystem")
    return ((seq - FID_SEQ_NORMAL) << 32) | oid


def format_fid(ino: int) -> str:
    seq, oid, ver = fid_of(ino)
    return f"[{seq:#x}:{oid:#x}:{ver:#x}]"


def parse_fid(text: str) -> int:
    """``[0x200000400:0x1:0x0]`` (brackets optional) -> inode number."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    parts = t.split(":")
    if len(parts) != 3:
        raise ValueError(f"invalid FID '{text}'")
    try:
        seq, oid, ver = (int(p, 0) for p in parts)
    except ValueError:
        raise ValueError(f"invalid FID '{text}'") from None
    return ino_of_fid(seq, oid, ver)


_SUFFIXES = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str, bare_unit: int = 1) -> int:
    """Parse ``4M``, ``64k``, ``1048576``. ``bare_unit`` scales suffix-less numbers."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    suffix = t[-1:] if t[-1:] in "KMGT" else ""
    num = t[: len(t) - len(suffix)]
    if not num.isdigit():
        raise ValueError(f"invalid size '{text}'")
    value = int(num)
    return value * (_SUFFIXES[suffix] if suffix else bare_unit)
