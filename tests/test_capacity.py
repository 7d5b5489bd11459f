"""OST capacity and LRU auto-release on a real mount.

One filesystem: ``up --osts 1 --ost-capacity 8M --low-watermark 0.2
--high-watermark 0.5`` over 2-3 MiB objects. Reading more than fits makes the
OST release the least recently used archived, clean, closed files (0xd again)
and it never holds more than its capacity; files that are never_release, dirty
or open are never released; when nothing is eligible a read fails with ENOSPC
and the OST log says why. Content read back is always right.

The tests share the filesystem and run in file order: LRU, then the protected
files, then the full OST.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time

import pytest
from conftest import new_bucket
from helpers import LFS, LUSTREFUSE, KiB, MiB, data, read_file, run, wait_for

from lustrefuse import hsm

CAPACITY = 8 * MiB
LOW, HIGH = 0.2, 0.5
STRIPE = MiB

LRU = [f"c{i}.bin" for i in range(6)]
OBJECTS = {
    **{name: data(5 * MiB // 2 + i * 1000, name) for i, name in enumerate(LRU)},
    "p-norelease.bin": data(900 * KiB, "p-norelease"),
    "p-dirty.bin": data(900 * KiB, "p-dirty"),
    "p-open.bin": data(900 * KiB, "p-open"),
    "r.bin": data(5 * MiB // 2, "r"),
}


@pytest.fixture(scope="module")
def cfs(make_module_fs, s3):
    return make_module_fs(new_bucket(s3), osts=1, objects=OBJECTS, extra_args=(
        "--ost-capacity", "8M", "--low-watermark", str(LOW), "--high-watermark", str(HIGH)))


def ok(r):
    assert r.returncode == 0, f"rc={r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def ost_df(fs) -> dict:
    """OST 0 as the MDS reports it to ``lfs df`` (bytes)."""
    return json.loads(os.getxattr(fs.ctl, "lustrefuse.df"))["osts"][0]


def lfs_df_ost_row(fs) -> tuple[int, int, int]:
    """(1K-blocks, Used, Available) of the OST0000 row of ``lfs df``."""
    out = ok(run([LFS, "df", fs.path()])).stdout
    m = re.search(r"^lustrefuse-OST0000_UUID +(\d+) +(\d+) +(\d+) +\d+% ", out, re.M)
    assert m, out
    return int(m[1]), int(m[2]), int(m[3])


def flags(fs, name: str) -> int:
    return fs.hsm_flags(name)


def check_within_capacity(fs):
    total, used, avail = lfs_df_ost_row(fs)
    assert total == CAPACITY // KiB
    assert used <= total and used + avail <= total
    st = ost_df(fs)
    assert 0 <= st["used"] <= CAPACITY
    assert fs.ost_objects_du() <= CAPACITY + 64 * KiB  # what is really on disk


def test_lru_files_are_released_to_stay_under_capacity(cfs):
    """Reading 6 x 2.5 MiB through an 8 MiB OST: earlier files go back to
    released (0xd), the last ones stay (0x9), the OST never overflows."""
    for name in LRU:
        assert read_file(cfs.path(name)) == OBJECTS[name]
        check_within_capacity(cfs)
    wait_for(lambda: ost_df(cfs)["bavail"] >= LOW * CAPACITY, 15, 0.2,
             "free space back over the low watermark")
    states = [flags(cfs, n) for n in LRU]
    assert states[-1] == hsm.RESIDENT and states[0] == hsm.IMPORTED, states
    # least recently used first: the released files are a prefix of the read order
    first_resident = states.index(hsm.RESIDENT)
    assert states[first_resident:] == [hsm.RESIDENT] * (len(LRU) - first_resident), states
    assert states[:first_resident] == [hsm.IMPORTED] * first_resident, states
    stats = json.loads(ok(run([LUSTREFUSE, "stats", cfs.path(), "--json"])).stdout)
    assert stats["osts"]["0"]["auto_released_files"] >= first_resident
    assert stats["osts"]["0"]["enospc"] == 0
    assert "auto-release on OST 0" in cfs.log("ost0")
    # a released file reads back whole (and pushes others out in turn)
    assert read_file(cfs.path(LRU[0])) == OBJECTS[LRU[0]]
    check_within_capacity(cfs)


def test_norelease_dirty_and_open_files_are_never_released(cfs):
    nr, dirty, held = "p-norelease.bin", "p-dirty.bin", "p-open.bin"
    assert read_file(cfs.path(nr)) == OBJECTS[nr]
    wait_for(lambda: flags(cfs, nr) == hsm.RESIDENT, 30, 0.1, "resident")
    ok(run([LFS, "hsm_set", "--norelease", cfs.path(nr)]))
    with open(cfs.path(dirty), "ab") as f:
        f.write(b"local change")
    assert flags(cfs, dirty) == hsm.RESIDENT | hsm.DIRTY
    fd = os.open(cfs.path(held), os.O_RDONLY)
    try:
        assert os.pread(fd, len(OBJECTS[held]) + 1, 0) == OBJECTS[held]
        wait_for(lambda: flags(cfs, held) == hsm.RESIDENT, 30, 0.1, "resident")
        for _round in range(2):  # every LRU file twice: far more than fits
            for name in LRU:
                assert read_file(cfs.path(name)) == OBJECTS[name]
                check_within_capacity(cfs)
        assert flags(cfs, nr) == hsm.RESIDENT | hsm.NORELEASE
        assert flags(cfs, dirty) == hsm.RESIDENT | hsm.DIRTY
        assert flags(cfs, held) == hsm.RESIDENT
        assert os.pread(fd, len(OBJECTS[held]) + 1, 0) == OBJECTS[held]
    finally:
        os.close(fd)
    assert read_file(cfs.path(nr)) == OBJECTS[nr]
    assert read_file(cfs.path(dirty)) == OBJECTS[dirty] + b"local change"
    assert sum(flags(cfs, n) == hsm.IMPORTED for n in LRU) >= 3


def test_read_fails_with_enospc_when_nothing_can_be_released(cfs):
    """Fill the OST with data that cannot be released (a new, never archived
    file, on top of the never_release and dirty ones), then read a released
    file: ENOSPC, and the OST log names the chunk it had no room for."""
    assert flags(cfs, "r.bin") == hsm.IMPORTED
    fill = cfs.path("fill.bin")
    written = 0
    fd = os.open(fill, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        # each write takes room at once; eligible files are released to make it, by
        # the write itself or by the watermark thread (every second): write until
        # less than a stripe is free and stays so
        while written < CAPACITY:
            while ost_df(cfs)["bavail"] >= STRIPE and written < CAPACITY:
                os.write(fd, data(256 * KiB, written))
                written += 256 * KiB
            time.sleep(1.5)
            if ost_df(cfs)["bavail"] < STRIPE:
                break
    finally:
        os.close(fd)
    assert ost_df(cfs)["bavail"] < STRIPE
    check_within_capacity(cfs)
    assert all(flags(cfs, n) == hsm.IMPORTED for n in LRU)  # everything eligible went
    with pytest.raises(OSError) as e:
        read_file(cfs.path("r.bin"))
    assert e.value.errno == errno.ENOSPC
    ino = os.stat(cfs.path("r.bin")).st_ino
    assert re.search(rf"ERROR OST 0 is full: no room for chunks? [\d-]+ of inode {ino}\b",
                     cfs.log("ost0"))
    assert cfs.stats()["osts"]["0"]["enospc"] >= 1
    assert flags(cfs, "r.bin") == hsm.IMPORTED
    check_within_capacity(cfs)
    os.unlink(fill)  # room again: the same read now works
    wait_for(lambda: ost_df(cfs)["bavail"] >= 3 * MiB, 15, 0.1, "the filler's space freed")
    assert read_file(cfs.path("r.bin")) == OBJECTS["r.bin"]
