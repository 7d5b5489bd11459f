"""HSM rules (lustrefuse/hsm.py) against reference §1.1 (bits, invariants) and §1.5
(the request table: no-op / refused / needed)."""

from __future__ import annotations

import errno
import itertools

import pytest

from lustrefuse import hsm
from lustrefuse.hsm import (
    ARCHIVED,
    DIRTY,
    EXISTS,
    LOST,
    NOARCHIVE,
    NORELEASE,
    RELEASED,
    HsmError,
)

ALL = range(0x80)


def invariant_ok(f: int) -> bool:
    """§1.1: DIRTY needs EXISTS; RELEASED excludes DIRTY and needs ARCHIVED; LOST needs ARCHIVED."""
    if f & DIRTY and not f & EXISTS:
        return False
    if f & RELEASED and (f & DIRTY or not f & ARCHIVED):
        return False
    return not (f & LOST and not f & ARCHIVED)


VALID = [f for f in ALL if invariant_ok(f)]
CHECKS = (hsm.archive_check, hsm.restore_check, hsm.release_check, hsm.remove_check)


def outcome(fn, flags):
    try:
        return fn(flags)
    except HsmError as e:
        return errno.errorcode[e.errno]


# -- §1.1 bits and words --------------------------------------------------------

def test_bit_values():
    assert (EXISTS, DIRTY, RELEASED, ARCHIVED, NORELEASE, NOARCHIVE, LOST) == (
        0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40)
    assert hsm.USER_MASK == NORELEASE | NOARCHIVE | DIRTY
    assert hsm.IMPORTED == 0xD and hsm.RESIDENT == 0x9


@pytest.mark.parametrize("flags,words", [
    (0x0, []),
    (0x9, ["exists", "archived"]),
    (0xD, ["released", "exists", "archived"]),
    (0xB, ["exists", "dirty", "archived"]),
    (0x7F, ["released", "exists", "dirty", "archived", "never_release", "never_archive",
            "lost_from_hsm"]),
    (0x4D, ["released", "exists", "archived", "lost_from_hsm"]),
])
def test_state_words_fixed_order(flags, words):
    assert hsm.state_words(flags) == words


def test_check_invariants_every_combination():
    for flags in ALL:
        if invariant_ok(flags):
            hsm.check_invariants(flags)
        else:
            with pytest.raises(HsmError) as e:
                hsm.check_invariants(flags)
            assert e.value.errno == errno.EINVAL, hex(flags)


def test_unknown_bits_are_einval():
    for bad in (0x80, 0x100, 0x9 | 0x200):
        with pytest.raises(HsmError) as e:
            hsm.check_invariants(bad)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(HsmError) as e:
            hsm.change_flags(0x9, bad & ~0x9, 0, True)
        assert e.value.errno == errno.EINVAL


# -- hsm_set / hsm_clear --------------------------------------------------------

@pytest.mark.parametrize("bit", [EXISTS, DIRTY, ARCHIVED, NORELEASE, NOARCHIVE, LOST])
@pytest.mark.parametrize("setting", [True, False])
@pytest.mark.parametrize("is_root", [True, False])
def test_change_flags_rules(bit, setting, is_root):
    for flags in VALID:
        setmask, clearmask = (bit, 0) if setting else (0, bit)
        new = (flags | bit) if setting else (flags & ~bit)
        try:
            got = hsm.change_flags(flags, setmask, clearmask, is_root)
        except HsmError as e:
            got = errno.errorcode[e.errno]
        if not is_root and bit not in (NORELEASE, NOARCHIVE, DIRTY):
            assert got == "EPERM", (hex(flags), bit, setting)  # outside HSM_USER_MASK
        elif setting and bit == NORELEASE and flags & RELEASED:
            assert got == "EINVAL"  # manual: never_release cannot be set on a released file
        elif not invariant_ok(new):
            assert got == "EINVAL", (hex(flags), bit, setting)
        else:
            assert got == new, (hex(flags), bit, setting)


def test_released_is_not_a_settable_flag():
    for setmask, clearmask in ((RELEASED, 0), (0, RELEASED)):
        with pytest.raises(HsmError) as e:
            hsm.change_flags(0x9, setmask, clearmask, True)
        assert e.value.errno == errno.EINVAL


def test_typical_hsm_set_sequences():
    f = hsm.change_flags(0x0, EXISTS | ARCHIVED, 0, True)
    assert f == 0x9
    assert hsm.change_flags(f, DIRTY, 0, False) == 0xB  # users may set dirty
    assert hsm.change_flags(0x1, DIRTY, 0, False) == 0x3
    with pytest.raises(HsmError):
        hsm.change_flags(0x0, DIRTY, 0, True)  # dirty requires exists


# -- §1.5 request table -----------------------------------------------------------

# (flags, expected): True = a request is queued, False = no-op, "EPERM" = refused
ARCHIVE_ROWS = [
    (0x0, True),            # new file
    (0x1, True),            # exists, not archived
    (0x9, False),           # archived and not dirty: no-op
    (0xB, True),            # dirty: archive again
    (0xD, False),           # released (archived, not dirty): no-op
    (0x20, "EPERM"),        # never_archive
    (0x21, "EPERM"),
    (0x23, "EPERM"),
]

RESTORE_ROWS = [
    (0xD, True),            # released stub: restore
    (0x1D, True),
    (0x9, False),           # resident: no-op (sanity-hsm 12d)
    (0x0, False),           # never archived, not released, not dirty: no-op
    (0x1, False),
    (0x4D, "EPERM"),        # released + lost
]

RELEASE_ROWS = [
    (0x9, True),
    (0x29, True),           # never_archive does not block release
    (0xD, False),           # already released: returns 0
    (0x4D, False),
    (0x0, "EPERM"),         # never archived
    (0x1, "EPERM"),
    (0xB, "EPERM"),         # dirty
    (0x19, "EPERM"),        # never_release
    (0x49, "EPERM"),        # lost
]

REMOVE_ROWS = [
    (0x0, False),           # neither archived nor exists
    (0x10, False),
    (0x1, True),
    (0x9, True),
    (0xB, True),
    (0x49, True),
    (0xD, "EPERM"),         # released: removing the archive copy would lose data
    (0x4D, "EPERM"),
]


@pytest.mark.parametrize("flags,want", ARCHIVE_ROWS)
def test_archive_rule(flags, want):
    assert outcome(hsm.archive_check, flags) == want


@pytest.mark.parametrize("flags,want", RESTORE_ROWS)
def test_restore_rule(flags, want):
    assert outcome(hsm.restore_check, flags) == want


@pytest.mark.parametrize("flags", [0x3, 0xB, 0x1B])
def test_restore_of_dirty_file_is_eperm(flags):
    assert outcome(hsm.restore_check, flags) == "EPERM"


@pytest.mark.parametrize("flags,want", RELEASE_ROWS)
def test_release_rule(flags, want):
    assert outcome(hsm.release_check, flags) == want


@pytest.mark.parametrize("flags,want", REMOVE_ROWS)
def test_remove_rule(flags, want):
    assert outcome(hsm.remove_check, flags) == want


def test_refusals_are_eperm_never_other():
    for flags, fn in itertools.product(VALID, CHECKS):
        got = outcome(fn, flags)
        assert got in (True, False, "EPERM"), (fn.__name__, hex(flags), got)


# -- transitions keep the invariants ------------------------------------------------

@pytest.mark.parametrize("flags", VALID)
def test_transitions(flags):
    a = hsm.after_archive(flags)
    assert a & (EXISTS | ARCHIVED) == EXISTS | ARCHIVED and not a & (DIRTY | LOST)
    r = hsm.after_restore(flags)
    assert not r & (RELEASED | DIRTY)
    assert hsm.after_release(flags) & RELEASED
    m = hsm.after_remove(flags)
    assert not m & (ARCHIVED | EXISTS | LOST)
    w = hsm.after_write(flags)
    if flags & EXISTS:
        assert w & DIRTY and not w & RELEASED
    else:
        assert w == flags
    # each transition applied where Lustre allows it yields a consistent state
    if outcome(hsm.release_check, flags) is True:
        hsm.check_invariants(hsm.after_release(flags))
    if outcome(hsm.restore_check, flags) is True:
        hsm.check_invariants(hsm.after_restore(flags))
    if not a & RELEASED:
        hsm.check_invariants(a)
    hsm.check_invariants(r)
    if flags & EXISTS and not flags & RELEASED:
        hsm.check_invariants(w)


def test_lifecycle():
    f = hsm.IMPORTED                       # 0xd: imported stub
    assert hsm.restore_check(f) is True
    f = hsm.after_restore(f)
    assert f == hsm.RESIDENT               # 0x9
    assert hsm.release_check(f) is True
    assert hsm.after_release(f) == 0xD
    f = hsm.after_write(f)
    assert f == 0xB                        # exists dirty archived
    with pytest.raises(HsmError):
        hsm.release_check(f)
    assert hsm.archive_check(f) is True
    assert hsm.after_archive(f) == 0x9
