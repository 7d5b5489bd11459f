"""POSIX behaviour through a real mount, as root and as an ordinary user (issue #3)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from helpers import MiB, data

NOBODY = 65534


@pytest.fixture(scope="module")
def wfs(make_module_fs, s3):
    from conftest import new_bucket

    fs = make_module_fs(new_bucket(s3), osts=3, stripe_size="64K")
    os.chmod(fs.path(), 0o777)
    # an ordinary user must be able to reach the mount through pytest's private tmp dirs
    parent = os.path.dirname(fs.path())
    while parent not in ("/", "/tmp"):
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
        parent = os.path.dirname(parent)
    return fs


@pytest.fixture
def d(wfs, request):
    """A fresh directory per test inside the shared filesystem."""
    path = wfs.path(request.node.name.replace("[", "_").replace("]", ""))
    os.mkdir(path)
    os.chmod(path, 0o777)
    return path


def raises(err: int, fn, *args, **kw):
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno == err, f"{fn.__name__}{args}: {e.value}"


def test_open_flags(d):
    p = os.path.join(d, "f")
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"abc")
    os.close(fd)
    raises(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
    assert os.stat(p).st_size == 0
    for piece in (b"1", b"22", b"333"):
        with open(p, "ab") as f:
            f.write(piece)
    assert open(p, "rb").read() == b"122333"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.pwrite(fd, b"X", 0)  # Linux appends even for pwrite with O_APPEND
    os.close(fd)
    assert open(p, "rb").read() == b"122333X"


def test_writes_at_any_offset_keep_holes_and_span_stripes(wfs, d):
    p = os.path.join(d, "sparse")
    blob = data(300 * 1024, "blob")
    with open(p, "wb") as f:
        f.seek(5 * MiB + 123)
        f.write(blob)
        f.seek(70_000)
        f.write(b"middle")
    want = bytearray(5 * MiB + 123 + len(blob))
    want[5 * MiB + 123:] = blob
    want[70_000:70_006] = b"middle"
    assert open(p, "rb").read() == bytes(want)
    info = wfs.info(os.path.relpath(p, wfs.path()))
    assert info["layout"]["stripe_size"] == 64 * 1024
    # holes are not stored: the written chunks only
    assert info["present"] < info["chunks"]


def test_read_after_write_same_and_other_process(d):
    p = os.path.join(d, "raw")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"hello")
    assert os.pread(fd, 5, 0) == b"hello"
    out = subprocess.run([sys.executable, "-c", f"print(open({p!r}).read())"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "hello"
    os.close(fd)


def test_truncate_up_and_down(d):
    p = os.path.join(d, "t")
    with open(p, "wb") as f:
        f.write(data(200_000, "t"))
    os.truncate(p, 100_001)
    assert open(p, "rb").read() == data(200_000, "t")[:100_001]
    os.truncate(p, 300_000)
    assert open(p, "rb").read() == data(200_000, "t")[:100_001] + bytes(199_999)
    with open(p, "r+b") as f:
        f.truncate(0)
    assert os.stat(p).st_size == 0 and open(p, "rb").read() == b""


def test_fsync_and_close_make_data_durable(wfs, d):
    p = os.path.join(d, "durable")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x" * 100_000)
    os.fsync(fd)
    # the MDS knows the new size as soon as fsync returns
    assert wfs.info(os.path.relpath(p, wfs.path()))["size"] == 100_000
    os.close(fd)


def test_rename_atomic_over_target_files_and_dirs(d):
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    open(a, "w").write("A")
    open(b, "w").write("B")
    os.rename(a, b)
    assert open(b).read() == "A" and not os.path.exists(a)
    os.makedirs(os.path.join(d, "d1/x"))
    os.mkdir(os.path.join(d, "d2"))
    os.rename(os.path.join(d, "d2"), os.path.join(d, "d3"))
    raises(errno.ENOTEMPTY, os.rename, os.path.join(d, "d3"), os.path.join(d, "d1"))
    os.rename(os.path.join(d, "d1"), os.path.join(d, "d3"))  # over an empty dir
    assert os.listdir(os.path.join(d, "d3")) == ["x"]
    raises(errno.EINVAL, os.rename, os.path.join(d, "d3"), os.path.join(d, "d3/x/y"))
    raises(errno.EISDIR, os.rename, b, os.path.join(d, "d3"))
    raises(errno.ENOTDIR, os.rename, os.path.join(d, "d3"), b)


def test_unlinked_open_file_lives_until_last_close(wfs, d):
    p = os.path.join(d, "ghost")
    with open(p, "wb") as f:
        f.write(data(3 * 64 * 1024, "ghost"))
    fd = os.open(p, os.O_RDWR)
    os.unlink(p)
    raises(errno.ENOENT, os.stat, p)
    assert os.pread(fd, 10, 64 * 1024) == data(3 * 64 * 1024, "ghost")[64 * 1024:64 * 1024 + 10]
    os.pwrite(fd, b"still", 0)
    assert os.pread(fd, 5, 0) == b"still"
    os.close(fd)


def test_mkdir_rmdir_and_nlink(d):
    top = os.path.join(d, "top")
    os.mkdir(top)
    assert os.stat(top).st_nlink == 2
    os.mkdir(os.path.join(top, "s1"))
    os.mkdir(os.path.join(top, "s2"))
    assert os.stat(top).st_nlink == 4
    raises(errno.ENOTEMPTY, os.rmdir, top)
    raises(errno.EEXIST, os.mkdir, os.path.join(top, "s1"))
    os.rmdir(os.path.join(top, "s1"))
    assert os.stat(top).st_nlink == 3


def test_symlinks_and_hard_links(d):
    f = os.path.join(d, "file")
    open(f, "w").write("content")
    os.symlink("file", os.path.join(d, "sl"))
    assert os.readlink(os.path.join(d, "sl")) == "file"
    assert open(os.path.join(d, "sl")).read() == "content"
    assert stat.S_ISLNK(os.lstat(os.path.join(d, "sl")).st_mode)
    os.link(f, os.path.join(d, "hl"))
    assert os.stat(f).st_nlink == 2 and os.stat(f).st_ino == os.stat(os.path.join(d, "hl")).st_ino
    os.unlink(f)
    assert os.stat(os.path.join(d, "hl")).st_nlink == 1
    assert open(os.path.join(d, "hl")).read() == "content"
    raises(errno.EPERM, os.link, d, os.path.join(d, "dirlink"))


def test_chmod_chown_utimensat(d):
    f = os.path.join(d, "meta")
    open(f, "w").close()
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o4751
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(f, ns=(1_000_000_000_123_456_789, 1_100_000_000_987_654_321))
    st = os.stat(f)
    assert st.st_mtime_ns == 1_100_000_000_987_654_321
    assert st.st_atime_ns == 1_000_000_000_123_456_789


def test_user_xattrs(d):
    f = os.path.join(d, "x")
    open(f, "w").close()
    os.setxattr(f, "user.color", b"blue")
    assert os.getxattr(f, "user.color") == b"blue"
    raises(errno.EEXIST, os.setxattr, f, "user.color", b"red", os.XATTR_CREATE)
    raises(errno.ENODATA, os.setxattr, f, "user.other", b"1", os.XATTR_REPLACE)
    assert os.listxattr(f) == ["user.color"]  # control names are not listed
    os.removexattr(f, "user.color")
    raises(errno.ENODATA, os.getxattr, f, "user.color")
    raises(errno.ENODATA, os.removexattr, f, "user.color")


def test_statfs(wfs):
    st = os.statvfs(wfs.path())
    assert st.f_blocks > 0 and st.f_bavail <= st.f_blocks and st.f_namemax == 255
    assert st.f_files > 0


def test_mmap_reads_and_shared_writes(d):
    p = os.path.join(d, "mm")
    with open(p, "wb") as f:
        f.write(data(256 * 1024, "mm"))
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        assert m[100_000:100_010] == data(256 * 1024, "mm")[100_000:100_010]
        m[70_000:70_005] = b"HELLO"
        m.flush()
        m.close()
    with open(p, "rb") as f:
        assert f.read()[70_000:70_005] == b"HELLO"


def test_flock_and_fcntl_locks_within_one_mount(d):
    p = os.path.join(d, "lock")
    open(p, "w").close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({p!r}, "r+")
        fcntl.flock(f, fcntl.LOCK_EX)
        g = open({p!r}, "r+")
        fcntl.lockf(g, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(p, "r+") as f:
            raises(errno.EWOULDBLOCK, fcntl.flock, f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(OSError) as e:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert e.value.errno in (errno.EACCES, errno.EAGAIN)
    finally:
        holder.communicate("", timeout=10)
    with open(p, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_new_files_take_the_directory_layout_round_robin(wfs, d):
    sub = os.path.join(d, "wide")
    os.mkdir(sub)
    r = wfs.lfs("setstripe", "-c", "-1", "-S", "128K", sub)
    assert r.returncode == 0, r.stderr
    starts = set()
    for i in range(3):
        p = os.path.join(sub, f"f{i}")
        with open(p, "wb") as f:
            f.write(data(700_000, p))
        info = wfs.info(os.path.relpath(p, wfs.path()))
        assert info["layout"]["stripe_count"] == 3
        assert info["layout"]["stripe_size"] == 128 * 1024
        assert open(p, "rb").read() == data(700_000, p)
        starts.add(info["layout"]["stripe_offset"])
    assert len(starts) > 1  # the MDS rotates the first OST


def as_user(code: str, uid: int = NOBODY) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)


def test_permissions_for_an_ordinary_user(wfs, d):
    secret = os.path.join(d, "secret")
    open(secret, "w").write("root only")
    os.chmod(secret, 0o600)
    public = os.path.join(d, "public")
    open(public, "w").write("everyone")
    os.chmod(public, 0o644)
    closed = os.path.join(d, "closed")
    os.mkdir(closed, 0o700)
    r = as_user(f"""
        import errno, os
        def err(fn, *a):
            try:
                fn(*a)
                return "ok"
            except OSError as e:
                return errno.errorcode[e.errno]
        print(err(open, {secret!r}))
        print(open({public!r}).read())
        print(err(open, {public!r}, "w"))
        print(err(os.chmod, {public!r}, 0o777))
        print(err(os.chown, {public!r}, 65534, 65534))
        print(err(os.listdir, {closed!r}))
        print(err(os.mkdir, {closed!r} + "/x"))
        mine = {d!r} + "/mine"
        with open(mine, "w") as f:
            f.write("x")
        st = os.stat(mine)
        print(st.st_uid, st.st_gid)
        os.chmod(mine, 0o600)
        print(oct(os.stat(mine).st_mode & 0o777))
        print(err(os.setxattr, {public!r}, "user.a", b"1"))
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[:9] == ["EACCES", "everyone", "EACCES", "EPERM", "EPERM", "EACCES", "EACCES",
                         f"{NOBODY} {NOBODY}", "0o600"], r.stdout
    assert lines[9] == "EACCES"


def test_sticky_directory_protects_others_files(d):
    tmp = os.path.join(d, "tmp")
    os.mkdir(tmp)
    os.chmod(tmp, 0o1777)
    victim = os.path.join(tmp, "roots")
    open(victim, "w").close()
    r = as_user(f"""
        import errno, os
        try:
            os.unlink({victim!r})
            print("deleted")
        except OSError as e:
            print(errno.errorcode[e.errno])
    """)
    assert r.stdout.strip() == "EPERM"
    assert os.path.exists(victim)


def test_names_utf8_and_long(d):
    name = "ünïcödé 名前 " + "x" * 200
    p = os.path.join(d, name)
    open(p, "w").write("u")
    assert name in os.listdir(d)
    raises(errno.ENAMETOOLONG, open, os.path.join(d, "y" * 256), "w")
    for fn in (os.stat, os.unlink, os.rmdir):  # lookups refuse long names too (pjdfstest */02)
        raises(errno.ENAMETOOLONG, fn, os.path.join(d, "z" * 256))


def test_truncate_to_a_huge_size_is_instant(d):
    p = os.path.join(d, "huge")
    open(p, "w").close()
    os.truncate(p, 999_999_999_999_999)  # pjdfstest truncate/12: 0 at once, as tmpfs
    assert os.stat(p).st_size == 999_999_999_999_999
    os.truncate(p, 0)
