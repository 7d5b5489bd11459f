"""Differential test in the style of JuiceFS's fsrand: the same random operations on the
mount and on a local directory must give the same results, errno for errno.

CI runs a bounded number of examples; a longer run is one variable away:
``LUSTREFUSE_FSRAND_EXAMPLES=500 .venv/bin/python -m pytest tests/test_differential.py``.
HSM operations (archive, release, restore) run on the mount only: they must never
change what a reader sees.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat

import pytest
from helpers import wait_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

EXAMPLES = int(os.environ.get("LUSTREFUSE_FSRAND_EXAMPLES", "12"))
STEPS = int(os.environ.get("LUSTREFUSE_FSRAND_STEPS", "30"))

NAMES = st.sampled_from(["a", "b", "c", "d d", "é"])
DIRS = st.sampled_from(["", "x", "x/y"])
OFFSETS = st.integers(0, 3 * 65536 + 7)
PAYLOADS = st.binary(min_size=0, max_size=70_000)
_counter = itertools.count()


def outcome(fn, *args):
    """What a syscall did: ("ok", value) or ("err", errno name)."""
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def snapshot(root: str) -> dict:
    """Everything a user can observe, relative to ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            s = os.lstat(p)
            entry = {"mode": stat.S_IMODE(s.st_mode), "type": stat.S_IFMT(s.st_mode),
                     "nlink": s.st_nlink if not stat.S_ISDIR(s.st_mode) else None}
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    entry["data"] = f.read()
                entry["size"] = s.st_size
                entry["xattrs"] = sorted((n, os.getxattr(p, n)) for n in os.listxattr(p))
            elif stat.S_ISLNK(s.st_mode):
                entry["target"] = os.readlink(p)
            out[rel] = entry
    return out


@pytest.fixture(scope="module")
def difffs(make_module_fs, s3):
    from conftest import new_bucket

    return make_module_fs(new_bucket(s3), osts=3, stripe_size="64K")


class FsRand(RuleBasedStateMachine):
    fs = None  # set by the test
    local_root = None

    @initialize()
    def setup(self):
        n = next(_counter)
        self.mnt = os.path.join(self.fs.path(), f"run{n}")
        self.loc = os.path.join(self.local_root, f"run{n}")
        for root in (self.mnt, self.loc):
            os.makedirs(os.path.join(root, "x", "y"))

    def both(self, fn, *rel_args, extra=()):
        """Run ``fn`` on both trees; results must match."""
        a = outcome(fn, *[os.path.join(self.mnt, r) for r in rel_args], *extra)
        b = outcome(fn, *[os.path.join(self.loc, r) for r in rel_args], *extra)
        if a[0] == "ok" and b[0] == "ok":
            return a
        assert a == b, f"{fn.__name__}{rel_args}: mount {a} vs local {b}"
        return a

    @rule(d=DIRS, name=NAMES, data=PAYLOADS)
    def create(self, d, name, data):
        def write(p, data):
            with open(p, "wb") as f:
                f.write(data)
        self.both(write, os.path.join(d, name), extra=(data,))

    @rule(d=DIRS, name=NAMES, off=OFFSETS, data=PAYLOADS)
    def pwrite(self, d, name, off, data):
        def w(p, off, data):
            fd = os.open(p, os.O_WRONLY)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self.both(w, os.path.join(d, name), extra=(off, data))

    @rule(d=DIRS, name=NAMES, data=PAYLOADS)
    def append(self, d, name, data):
        def a(p, data):
            with open(p, "ab") as f:
                f.write(data)
        self.both(a, os.path.join(d, name), extra=(data,))

    @rule(d=DIRS, name=NAMES, size=OFFSETS)
    def truncate(self, d, name, size):
        self.both(os.truncate, os.path.join(d, name), extra=(size,))

    @rule(d1=DIRS, n1=NAMES, d2=DIRS, n2=NAMES)
    def rename(self, d1, n1, d2, n2):
        self.both(os.rename, os.path.join(d1, n1), os.path.join(d2, n2))

    @rule(d1=DIRS, n1=NAMES, d2=DIRS, n2=NAMES)
    def link(self, d1, n1, d2, n2):
        self.both(os.link, os.path.join(d1, n1), os.path.join(d2, n2))

    @rule(d=DIRS, name=NAMES, dest=NAMES)
    def symlink(self, d, name, dest):
        self.both(lambda p: os.symlink(dest, p), os.path.join(d, name))

    @rule(d=DIRS, name=NAMES)
    def unlink(self, d, name):
        self.both(os.unlink, os.path.join(d, name))

    @rule(d=DIRS, name=NAMES)
    def mkdir(self, d, name):
        self.both(os.mkdir, os.path.join(d, name))

    @rule(d=DIRS, name=NAMES)
    def rmdir(self, d, name):
        self.both(os.rmdir, os.path.join(d, name))

    @rule(d=DIRS, name=NAMES, mode=st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o4755]))
    def chmod(self, d, name, mode):
        self.both(os.chmod, os.path.join(d, name), extra=(mode,))

    @rule(d=DIRS, name=NAMES, key=st.sampled_from(["user.a", "user.b"]),
          value=st.binary(max_size=64))
    def setxattr(self, d, name, key, value):
        self.both(lambda p: os.setxattr(p, key, value, follow_symlinks=False),
                  os.path.join(d, name))

    @rule(d=DIRS, name=NAMES, key=st.sampled_from(["user.a", "user.b"]))
    def removexattr(self, d, name, key):
        self.both(lambda p: os.removexattr(p, key, follow_symlinks=False), os.path.join(d, name))

    @rule(d=DIRS, name=NAMES, off=OFFSETS, n=st.integers(0, 70_000))
    def read(self, d, name, off, n):
        def r(p):
            with open(p, "rb") as f:
                f.seek(off)
                return f.read(n)
        self.both(r, os.path.join(d, name))

    def _regular(self, d, name):
        p = os.path.join(self.mnt, d, name)
        return os.path.isfile(p) and not os.path.islink(p), p

    @rule(d=DIRS, name=NAMES)
    def archive_then_release(self, d, name):
        """HSM round trip on the mount only: content must not change."""
        ok, p = self._regular(d, name)
        if not ok:
            return
        rel = os.path.relpath(p, self.fs.path())
        r = self.fs.lfs("hsm_archive", p)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: self.fs.info(rel)["action"]["action"] == "NOOP", 60, 0.05, "archive")
        if self.fs.info(rel)["hsm"]["flags"] & 0x2:
            return  # written while archiving elsewhere: nothing to release
        r = self.fs.lfs("hsm_release", p)
        assert r.returncode == 0, r.stderr

    @rule(d=DIRS, name=NAMES)
    def restore(self, d, name):
        ok, p = self._regular(d, name)
        if ok:
            r = self.fs.lfs("hsm_restore", p)
            assert r.returncode == 0 or "Operation not permitted" in r.stderr, r.stderr

    @invariant()
    def trees_match(self):
        if not hasattr(self, "mnt"):
            return
        a, b = snapshot(self.mnt), snapshot(self.loc)
        assert a.keys() == b.keys(), f"names differ: {sorted(a.keys() ^ b.keys())}"
        for k in a:
            assert a[k] == b[k], f"{k}: mount {a[k]!r:.200} vs local {b[k]!r:.200}"

    def teardown(self):
        if hasattr(self, "loc"):
            shutil.rmtree(self.loc, ignore_errors=True)


def test_mount_behaves_like_a_local_directory(difffs, tmp_path):
    FsRand.fs = difffs
    FsRand.local_root = str(tmp_path)
    run = FsRand.TestCase
    run.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                            suppress_health_check=list(HealthCheck), derandomize=not os.environ.get(
                                "LUSTREFUSE_FSRAND_RANDOM"), print_blob=True)
    run().runTest()
