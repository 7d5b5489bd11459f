"""Lustre HSM state bits and the rules for changing them. Pure: no I/O.

Bits, words, invariants and the per-request no-op/refusal rules follow
lustre_user.h, mdt_hsm.c and mdt_hsm_cdt_client.c (reference §1.1, §1.5).
"""

from __future__ import annotations

import errno
from enum import IntEnum

EXISTS = 0x1
DIRTY = 0x2
RELEASED = 0x4
ARCHIVED = 0x8
NORELEASE = 0x10
NOARCHIVE = 0x20
LOST = 0x40

FLAGS_MASK = EXISTS | DIRTY | RELEASED | ARCHIVED | NORELEASE | NOARCHIVE | LOST
USER_MASK = NORELEASE | NOARCHIVE | DIRTY  # bits an ordinary user may set/clear

IMPORTED = EXISTS | ARCHIVED | RELEASED  # 0xd: a stub imported from S3
RESIDENT = EXISTS | ARCHIVED  # 0x9: archived and every stripe local

# hsm_state prints the set bits in this fixed order (lfs.c lfs_hsm_state).
_WORDS = (
    (RELEASED, "released"),
    (EXISTS, "exists"),
    (DIRTY, "dirty"),
    (ARCHIVED, "archived"),
    (NORELEASE, "never_release"),
    (NOARCHIVE, "never_archive"),
    (LOST, "lost_from_hsm"),
)

DEFAULT_ARCHIVE_ID = 1


class Action(IntEnum):
    """hsm_user_action values, as hsm_action prints their names."""

    NOOP = 1
    ARCHIVE = 10
    RESTORE = 11
    RELEASE = 12
    REMOVE = 13
    CANCEL = 14


class Progress(IntEnum):
    WAITING = 1
    RUNNING = 2
    DONE = 3


class HsmError(Exception):
    def __init__(self, err: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


def state_words(flags: int) -> list[str]:
    return [word for bit, word in _WORDS if flags & bit]


def check_invariants(flags: int) -> None:
    """mdt_hsm_state_set's consistency rules; EINVAL when broken."""
    if flags & ~FLAGS_MASK:
        raise HsmError(errno.EINVAL, "unknown HSM flag")
    if flags & DIRTY and not flags & EXISTS:
        raise HsmError(errno.EINVAL, "dirty requires exists")
    if flags & RELEASED and flags & DIRTY:
        raise HsmError(errno.EINVAL, "released excludes dirty")
    if flags & RELEASED and not flags & ARCHIVED:
        raise HsmError(errno.EINVAL, "released requires archived")
    if flags & LOST and not flags & ARCHIVED:
        raise HsmError(errno.EINVAL, "lost requires archived")


def change_flags(flags: int, setmask: int, clearmask: int, is_root: bool) -> int:
    """``lfs hsm_set/hsm_clear``: the new flags, or HsmError (EPERM/EINVAL)."""
    if (setmask | clearmask) & ~FLAGS_MASK:
        raise HsmError(errno.EINVAL, "unknown HSM flag")
    if (setmask | clearmask) & RELEASED:
        raise HsmError(errno.EINVAL, "released is changed by release and restore only")
    if not is_root and (setmask | clearmask) & ~USER_MASK:
        raise HsmError(errno.EPERM, "only root may change this flag")
    if setmask & NORELEASE and flags & RELEASED:
        raise HsmError(errno.EINVAL, "never_release cannot be set on a released file")
    new = (flags | setmask) & ~clearmask
    check_invariants(new)
    return new


def archive_check(flags: int) -> bool:
    """True when an archive is needed, False for a no-op; HsmError when refused."""
    if flags & NOARCHIVE:
        raise HsmError(errno.EPERM, "file is never_archive")
    if flags & ARCHIVED and not flags & DIRTY:
        return False
    return True


def restore_check(flags: int) -> bool:
    """True when a restore is needed, False for a no-op; HsmError when refused."""
    if flags & DIRTY:  # sanity-hsm 12e: local changes would be overwritten
        raise HsmError(errno.EPERM, "file is dirty")
    if not flags & RELEASED:
        # sanity-hsm 12d: a resident file "must work without doing request"
        return False
    if flags & LOST or not flags & ARCHIVED:
        raise HsmError(errno.EPERM, "file cannot be restored")
    return True


def release_check(flags: int) -> bool:
    """True when a release is needed, False when already released; else EPERM."""
    if flags & RELEASED:
        return False
    if not flags & ARCHIVED or flags & (DIRTY | NORELEASE | LOST):
        raise HsmError(errno.EPERM, "file is not archived, or dirty, never_release or lost")
    return True


def remove_check(flags: int) -> bool:
    """True when the archive copy should be removed; EPERM on a released file."""
    if not flags & (ARCHIVED | EXISTS):
        return False
    if flags & RELEASED:
        raise HsmError(errno.EPERM, "remove on a released file would lose its data")
    return True


def after_write(flags: int) -> int:
    """A data change of a file with an archive copy makes it dirty.

    Lustre restores a released file whole before the write; we hydrate only the
    chunks the write touches, so the file stops being "released" (RELEASED and
    DIRTY exclude each other) while its other chunks still come from S3.
    """
    if flags & EXISTS:
        return (flags | DIRTY) & ~RELEASED
    return flags


def after_archive(flags: int, archive_id: int = DEFAULT_ARCHIVE_ID) -> int:
    return (flags | EXISTS | ARCHIVED) & ~(DIRTY | LOST)


def after_restore(flags: int) -> int:
    return flags & ~(RELEASED | DIRTY)


def after_release(flags: int) -> int:
    return flags | RELEASED


def after_remove(flags: int) -> int:
    return flags & ~(ARCHIVED | EXISTS | LOST)
