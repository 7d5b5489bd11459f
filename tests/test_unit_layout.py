"""Layout math (lustrefuse/layout.py) against a byte-by-byte brute-force model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lustrefuse.layout import (
    FID_SEQ_NORMAL,
    KiB,
    Layout,
    LayoutError,
    MiB,
    StripeSpec,
    fid_of,
    format_fid,
    fsx_stripe_count,
    ino_of_fid,
    make_layout,
    parse_fid,
    parse_size,
    validate_spec,
)


def model_byte(lay: Layout, o: int) -> tuple[int, int, int]:
    """(chunk, ost, object offset) of file byte ``o``, straight from the definition."""
    s = o // lay.stripe_size
    return s, lay.osts[s % len(lay.osts)], (s // len(lay.osts)) * lay.stripe_size + o % lay.stripe_size


layouts = st.builds(
    lambda size, osts: Layout(size, tuple(osts)),
    st.integers(1, 48),
    st.lists(st.integers(0, 7), min_size=1, max_size=6, unique=True),
)


@settings(max_examples=150, deadline=None)
@given(lay=layouts, offset=st.integers(0, 600), length=st.integers(0, 400))
def test_pieces_match_brute_force(lay, offset, length):
    got = []
    pos = offset
    for s, ost, obj_off, n in lay.pieces(offset, length):
        assert n > 0
        assert ost == lay.ost_of_chunk(s)
        for k in range(n):
            got.append((s, ost, obj_off + k))
            assert (pos // lay.stripe_size) == s  # a piece never crosses a chunk
            pos += 1
    assert got == [model_byte(lay, o) for o in range(offset, offset + length)]


@settings(max_examples=80, deadline=None)
@given(lay=layouts, size=st.integers(0, 700))
def test_chunk_helpers_match_brute_force(lay, size):
    chunks = sorted({model_byte(lay, o)[0] for o in range(size)})
    assert lay.chunk_count(size) == len(chunks)
    assert list(range(lay.chunk_count(size))) == chunks
    for s in range(lay.chunk_count(size) + 2):
        assert lay.chunk_length(s, size) == sum(1 for o in range(size) if o // lay.stripe_size == s)
        assert lay.chunk_object_offset(s) == model_byte(lay, s * lay.stripe_size)[2]
    for ost in set(lay.osts) | {99}:
        assert lay.chunks_on_ost(ost, size) == sorted(
            {model_byte(lay, o)[0] for o in range(size) if model_byte(lay, o)[1] == ost})
    for pos, ost in enumerate(lay.osts):
        # the object holds bytes up to the last byte mapped to it
        ends = [model_byte(lay, o)[2] + 1 for o in range(size) if model_byte(lay, o)[1] == ost]
        assert lay.object_size(pos, size) == (max(ends) if ends else 0)
    for o in range(0, size, 7):
        assert lay.chunk_of(o) == model_byte(lay, o)[0]
        assert lay.object_offset(o) == model_byte(lay, o)[2]


def test_pieces_real_sizes():
    lay = Layout(1 * MiB, (2, 0, 1))
    ps = list(lay.pieces(MiB - 10, 2 * MiB + 20))
    assert ps == [(0, 2, MiB - 10, 10), (1, 0, 0, MiB), (2, 1, 0, MiB), (3, 2, MiB, 10)]
    assert list(lay.pieces(5, 0)) == []
    # byte o lives in stripe o // size, on osts[s % count], at (s // count) * size + o % size
    o = 7 * MiB + 12345
    assert lay.chunk_of(o) == 7
    assert lay.ost_of_chunk(7) == (2, 0, 1)[7 % 3]
    assert lay.object_offset(o) == (7 // 3) * MiB + 12345


def test_layout_dict_roundtrip():
    lay = Layout(4 * MiB, (1, 3), gen=5)
    assert Layout.from_dict(lay.to_dict()) == lay
    assert lay.stripe_count == 2 and lay.stripe_offset == 1
    assert Layout.from_dict(lay.to_dict(), released=True).released


@pytest.mark.parametrize("size,chunk,osts,want", [
    (0, MiB, 4, 1),
    (1, MiB, 4, 1),
    (MiB - 1, MiB, 4, 1),
    (MiB, MiB, 4, 2),          # size // chunk + 1
    (3 * MiB + 1, MiB, 4, 4),
    (4 * MiB, MiB, 4, 4),      # 5 capped at the 4 OSTs
    (100 * MiB, MiB, 3, 3),
    (5 * MiB, MiB, 1, 1),
    (2 * 1024 * MiB, 1024 * MiB, 8, 3),  # FSx default 1 GiB chunks
])
def test_fsx_stripe_count(size, chunk, osts, want):
    assert fsx_stripe_count(size, chunk, osts) == want


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 1 << 40), chunk=st.integers(1, 1 << 32), osts=st.integers(1, 64))
def test_fsx_stripe_count_formula(size, chunk, osts):
    assert fsx_stripe_count(size, chunk, osts) == min(size // chunk + 1, osts)


@pytest.mark.parametrize("text,want", [
    ("4M", 4 * MiB), ("4m", 4 * MiB), ("64k", 64 * KiB), ("64K", 64 * KiB), ("1048576", MiB),
    ("1G", 1024 * MiB), ("2T", 2 * 1024 * 1024 * MiB), ("1MiB", MiB), ("1MB", MiB), ("0", 0),
    (" 8M ", 8 * MiB), (65536, 65536),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "M", "abc", "1.5M", "-1", "1X", "4 M", "0x10", "1e3"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_bare_unit():
    assert parse_size("4", bare_unit=KiB) == 4 * KiB
    assert parse_size("4M", bare_unit=KiB) == 4 * MiB


def test_fid_format():
    assert format_fid(1) == "[0x200000400:0x1:0x0]"
    assert format_fid(0x2A) == "[0x200000400:0x2a:0x0]"
    assert format_fid((3 << 32) | 7) == "[0x200000403:0x7:0x0]"
    assert fid_of(5) == (FID_SEQ_NORMAL, 5, 0)


@settings(max_examples=300, deadline=None)
@given(ino=st.integers(1, (1 << 48) - 1))
def test_fid_roundtrip(ino):
    text = format_fid(ino)
    assert parse_fid(text) == ino
    assert parse_fid(text[1:-1]) == ino  # brackets are optional
    assert parse_fid(f"  {text} ") == ino
    assert ino_of_fid(*fid_of(ino)) == ino


@pytest.mark.parametrize("text", ["", "[]", "[0x200000400:0x1]", "0x200000400:0x1:0x0:0x0",
                                  "[0x2000004zz:0x1:0x0]", "[0x1:0x1:0x0]", "[foo]",
                                  "[0x200000400::0x0]"])
def test_parse_fid_rejects(text):
    with pytest.raises(ValueError):
        parse_fid(text)


def test_validate_spec():
    validate_spec(StripeSpec(MiB, 2, 1, ()), 4)
    validate_spec(StripeSpec(0, -1, -1, ()), 4)
    for bad in (StripeSpec(MiB + 1), StripeSpec(stripe_count=5), StripeSpec(stripe_count=-2),
                StripeSpec(stripe_offset=4), StripeSpec(stripe_offset=-2),
                StripeSpec(ost_list=(0, 4)), StripeSpec(ost_list=(1, 1))):
        with pytest.raises(LayoutError):
            validate_spec(bad, 4)


def test_make_layout():
    assert make_layout(StripeSpec(), 4, 6) == Layout(MiB, (2,))
    assert make_layout(StripeSpec(stripe_count=-1), 3, 1) == Layout(MiB, (1, 2, 0))
    assert make_layout(StripeSpec(4 * MiB, 2, 3), 4, 0) == Layout(4 * MiB, (3, 0))
    assert make_layout(StripeSpec(ost_list=(2, 0)), 4, 1) == Layout(MiB, (2, 0))
    spec = StripeSpec(stripe_count=2).merged_over(StripeSpec(2 * MiB, 4, 1))
    assert spec == StripeSpec(2 * MiB, 2, 1, ())



def test_get_runs_group_adjacent_chunks_up_to_the_span():
    lay = Layout(MiB, (0, 1))
    assert lay.get_runs([], 8 * MiB) == []
    assert lay.get_runs([3, 1, 2, 2], 8 * MiB) == [[1, 2, 3]]  # sorted, deduplicated
    assert lay.get_runs(range(20), 8 * MiB) == [list(range(8)), list(range(8, 16)),
                                                 list(range(16, 20))]
    assert lay.get_runs([0, 1, 3, 4, 9], 8 * MiB) == [[0, 1], [3, 4], [9]]
    # a stripe larger than the span: one chunk a GET
    assert Layout(16 * MiB, (0,)).get_runs([0, 1, 2], 8 * MiB) == [[0], [1], [2]]


def test_fetcher_of_run_rotates_over_the_layout():
    lay = Layout(MiB, (2, 0, 1))
    runs = lay.get_runs(range(48), 8 * MiB)
    assert [lay.fetcher_of_run(r, 8 * MiB) for r in runs] == [2, 0, 1, 2, 0, 1]
    assert Layout(MiB, (5,)).fetcher_of_run([7, 8], 8 * MiB) == 5


@given(st.sets(st.integers(0, 300), max_size=80), st.sampled_from([64 * KiB, MiB, 4 * MiB]))
def test_get_runs_cover_each_chunk_once_and_stay_within_the_span(chunks, stripe):
    lay = Layout(stripe, (0, 1, 2))
    runs = lay.get_runs(chunks, 8 * MiB)
    assert sorted(s for r in runs for s in r) == sorted(chunks)
    for r in runs:
        assert r == list(range(r[0], r[0] + len(r)))  # adjacent in the file: one range
        assert len(r) * stripe <= max(8 * MiB, stripe)
