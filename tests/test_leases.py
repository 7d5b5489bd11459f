"""Caching leases between two mounts of one filesystem (leases.py).

Mount A (the filesystem's own) reads files twice, so that it answers the second
lookup and open from its cache; mount B (a second ``lustrefuse mount`` of the same
MDS) then changes the file. A must see every change at its next open or lookup, as
if it had no cache (close-to-open), and the handles A keeps for re-opens must never
make a file busy: ``hsm_release`` from B succeeds unless a process has it open.
"""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import new_bucket
from helpers import LUSTREFUSE, data, is_mounted, lfs, pid_alive, ping, read_file, wait_for

from lustrefuse import hsm

OBJECTS = {f"l/{n}.bin": data(300_000 + i, f"lease-{n}")
           for i, n in enumerate(["rewrite", "trunc", "release", "busy", "unlink", "rename",
                                  "over-a", "over-b", "chmod", "stopped", "same", "drop",
                                  "restart"])}


@pytest.fixture(scope="module")
def lfs2(make_module_fs, s3):
    return make_module_fs(new_bucket(s3), osts=2, stripe_size="64K", objects=OBJECTS)


@pytest.fixture(scope="module")
def mount_b(lfs2, tmp_path_factory):
    """A second client: its own FUSE daemon on its own mountpoint, same MDS."""
    mnt = tmp_path_factory.mktemp("mount-b")
    log = mnt.parent / "mount-b.log"
    proc = subprocess.Popen([LUSTREFUSE, "mount", f"unix:{lfs2.data_dir}/mds.sock", str(mnt),
                             "--log-file", str(log)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: is_mounted(mnt), 30, 0.05, "mount B")
        yield mnt, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # a test may have stopped it
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)


def cached_twice(fs, rel: str) -> bytes:
    """Read ``rel`` on A until A answers its lookup and open from its leases: the first
    read hydrates the file, which changes its HSM state (a revoke); the second re-opens
    on the MDS and gets a lease; the third needs no MDS call."""
    first = read_file(fs.path(rel))
    wait_for(lambda: fs.hsm_flags(rel) == hsm.RESIDENT, 30, 0.05, f"{rel} resident")
    assert read_file(fs.path(rel)) == first
    before = fs.stats()["client"]
    assert read_file(fs.path(rel)) == first
    after = fs.stats()["client"]
    assert after.get("lease_opens", 0) == before.get("lease_opens", 0) + 1, after
    return first


def gone(path):
    """A name removed on the other mount: A's own cache drops it before the change
    returns; the kernel's copy of it just after (``invalidate_entry`` may have to wait
    for the directory's lock, so it is not done while the change waits)."""
    wait_for(lambda: not os.path.lexists(path), 5, 0.01, f"{path} gone on A")
    with pytest.raises(FileNotFoundError):
        os.stat(path)


def write(path, payload: bytes):
    with open(path, "r+b") as f:
        f.write(payload)


def test_a_rewrite_on_b_is_read_on_a_at_the_next_open(lfs2, mount_b):
    mnt_b, _ = mount_b
    old = cached_twice(lfs2, "l/rewrite.bin")
    new = bytes(b ^ 0x5A for b in old)  # same size, every byte different
    write(mnt_b / "l/rewrite.bin", new)
    assert read_file(lfs2.path("l/rewrite.bin")) == new


def test_a_truncate_on_b_is_seen_by_stat_and_read_on_a(lfs2, mount_b):
    mnt_b, _ = mount_b
    old = cached_twice(lfs2, "l/trunc.bin")
    os.stat(lfs2.path("l/trunc.bin"))  # the attributes are cached too
    os.truncate(mnt_b / "l/trunc.bin", 1000)
    assert os.stat(lfs2.path("l/trunc.bin")).st_size == 1000
    assert read_file(lfs2.path("l/trunc.bin")) == old[:1000]


def test_release_on_b_takes_back_a_kept_handle_not_an_open_one(lfs2, mount_b):
    mnt_b, _ = mount_b
    want = cached_twice(lfs2, "l/release.bin")
    assert read_file(lfs2.path("l/busy.bin"))  # now resident on A, then held open there
    wait_for(lambda: lfs2.hsm_flags("l/busy.bin") == hsm.RESIDENT, 30, 0.1, "busy.bin resident")
    with open(lfs2.path("l/busy.bin"), "rb"):
        r = lfs("hsm_release", str(mnt_b / "l/busy.bin"))
        assert r.returncode != 0 and "Device or resource busy" in r.stderr, r
    wait_for(lambda: lfs2.hsm_flags("l/release.bin") == hsm.RESIDENT, 30, 0.1,
             "release.bin resident")
    r = lfs("hsm_release", str(mnt_b / "l/release.bin"))
    assert r.returncode == 0, r.stderr  # A only kept the handle: not busy
    assert lfs2.hsm_flags("l/release.bin") == hsm.IMPORTED
    assert read_file(lfs2.path("l/release.bin")) == want  # fetched again, not stale tables


def test_unlink_on_b_is_seen_on_a_and_frees_the_inode(lfs2, mount_b):
    mnt_b, _ = mount_b
    cached_twice(lfs2, "l/unlink.bin")
    inodes = lfs2.stats()["mds"]["inodes"]
    os.unlink(mnt_b / "l/unlink.bin")
    gone(lfs2.path("l/unlink.bin"))
    # A's kept handle was given back with the revoke: nothing holds the inode open
    wait_for(lambda: lfs2.stats()["mds"]["inodes"] == inodes - 1, 10, 0.05, "inode freed")


def test_renames_on_b_are_seen_on_a(lfs2, mount_b):
    mnt_b, _ = mount_b
    cached_twice(lfs2, "l/rename.bin")
    a = cached_twice(lfs2, "l/over-a.bin")
    cached_twice(lfs2, "l/over-b.bin")
    os.rename(mnt_b / "l/rename.bin", mnt_b / "l/renamed.bin")
    gone(lfs2.path("l/rename.bin"))
    assert os.path.exists(lfs2.path("l/renamed.bin"))
    os.rename(mnt_b / "l/over-a.bin", mnt_b / "l/over-b.bin")  # replaces over-b
    gone(lfs2.path("l/over-a.bin"))
    assert read_file(lfs2.path("l/over-b.bin")) == a


def test_chmod_on_b_is_seen_on_a(lfs2, mount_b):
    mnt_b, _ = mount_b
    cached_twice(lfs2, "l/chmod.bin")
    os.stat(lfs2.path("l/chmod.bin"))
    os.chmod(mnt_b / "l/chmod.bin", 0o600)
    assert os.stat(lfs2.path("l/chmod.bin")).st_mode & 0o777 == 0o600


def test_a_write_on_a_itself_is_read_back_on_a(lfs2, mount_b):
    old = cached_twice(lfs2, "l/same.bin")
    new = old[::-1]
    write(lfs2.path("l/same.bin"), new)
    assert read_file(lfs2.path("l/same.bin")) == new


def test_a_stopped_client_holds_changes_up_one_term_then_drops_its_cache(lfs2, mount_b):
    """B caches the file and freezes (SIGSTOP): A's change waits at most B's lease
    term, then goes through; once B runs again it reads the new bytes, not its cache."""
    mnt_b, proc = mount_b
    path_b = mnt_b / "l/stopped.bin"
    old = read_file(path_b)
    assert read_file(path_b) == old
    new = bytes(b ^ 0xFF for b in old)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        write(lfs2.path("l/stopped.bin"), new)  # the close waits for B's answer or its term
        waited = time.monotonic() - start
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert read_file(lfs2.path("l/stopped.bin")) == new
    assert read_file(path_b) == new
    print(f"the change waited {waited:.1f} s for the stopped client")


def test_unknown_session_cannot_poll(lfs2):
    """A lease poll is bound to the session that said hello on its connection."""
    from lustrefuse import rpc

    c = rpc.Client(f"unix:{lfs2.data_dir}/mds.sock", timeout=10)
    try:
        with pytest.raises(rpc.RpcError) as e:
            c.call("lease_poll", client="nobody", acks=[], closes=[], wait=0)
        assert e.value.errno == errno.ENOTCONN
    finally:
        c.close()


def test_dropping_leases_makes_metadata_cold_and_needs_root(lfs2):
    """``lustrefuse.drop_leases`` on the control file, Lustre's ``lru_size=clear``:
    the next lookup and open go to the MDS again. Only root may ask."""
    want = cached_twice(lfs2, "l/drop.bin")
    os.setxattr(lfs2.ctl, "lustrefuse.drop_leases", b"")
    with open("/proc/sys/vm/drop_caches", "w") as f:  # and the kernel's own names
        f.write("2\n")
    before = lfs2.stats()["client"]
    assert read_file(lfs2.path("l/drop.bin")) == want
    after = lfs2.stats()["client"]
    assert after.get("lease_opens", 0) == before.get("lease_opens", 0)
    assert after["lookups"] > before["lookups"]
    parent = os.path.dirname(lfs2.path())
    while parent not in ("/", "/tmp"):  # an ordinary user must reach the control file
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
        parent = os.path.dirname(parent)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c",
                        f"import os; os.setxattr({lfs2.ctl!r}, 'lustrefuse.drop_leases', b'')"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr


def test_random_changes_on_b_are_each_seen_on_a_at_once(lfs2, mount_b):
    """200 random changes through B (rewrites of any size, truncates, renames over
    other files, unlinks, creates, chmods), each checked on A right after it returns,
    by path, as a user would: every file's size, mode and bytes are B's, and every name
    B removed is gone (the kernel's copy of a name within a few ms). Seeded, so a
    failure can be replayed."""
    import random

    mnt_b, _ = mount_b
    rng = random.Random(20261206)
    os.makedirs(mnt_b / "rand", exist_ok=True)
    model: dict[str, tuple[bytes, int]] = {}  # name -> (bytes, mode)

    def put(name: str, payload: bytes):
        with open(mnt_b / "rand" / name, "wb") as f:
            f.write(payload)
        model[name] = (payload, model.get(name, (b"", 0o644))[1])

    for i in range(4):
        put(f"f{i}", rng.randbytes(rng.randrange(0, 300_000)))
    removed: set[str] = set()
    for step in range(200):
        names = sorted(model)
        op = rng.choice(["rewrite", "rewrite", "truncate", "rename", "unlink", "create",
                         "chmod"] if names else ["create"])
        name = rng.choice(names) if names else None
        if op == "rewrite":
            put(name, rng.randbytes(rng.randrange(0, 300_000)))
        elif op == "truncate":
            size = rng.randrange(0, len(model[name][0]) + 70_000)
            os.truncate(mnt_b / "rand" / name, size)
            old = model[name][0]
            model[name] = (old[:size] + bytes(max(0, size - len(old))), model[name][1])
        elif op == "rename":
            target = rng.choice(names + [f"n{step}"])
            if target != name:
                os.rename(mnt_b / "rand" / name, mnt_b / "rand" / target)
                model[target] = model.pop(name)
                removed.add(name)
        elif op == "unlink":
            os.unlink(mnt_b / "rand" / name)
            del model[name]
            removed.add(name)
        elif op == "create":
            put(f"c{step}", rng.randbytes(rng.randrange(0, 100_000)))
        else:
            mode = rng.choice([0o600, 0o640, 0o644, 0o755])
            os.chmod(mnt_b / "rand" / name, mode)
            model[name] = (model[name][0], mode)
        removed -= set(model)
        for n, (payload, mode) in model.items():
            path = lfs2.path(f"rand/{n}")
            st = os.stat(path)
            assert (st.st_size, st.st_mode & 0o777) == (len(payload), mode), (step, op, n)
            assert read_file(path) == payload, (step, op, n)
        for n in removed:
            gone(lfs2.path(f"rand/{n}"))


def test_after_an_mds_restart_the_cache_is_dropped_and_leases_work_again(lfs2, mount_b):
    """The MDS dies (SIGKILL) and ``up`` starts it again: A's long poll breaks at once,
    so A trusts nothing it cached; a change made through B on the new MDS is read on A;
    and the new MDS's leases (numbered from its start time, above the old ones) are
    usable again. Last in this file: it restarts the module's MDS."""
    mnt_b, _ = mount_b
    old = cached_twice(lfs2, "l/restart.bin")
    mds = lfs2.pids()["mds"]
    os.kill(mds, signal.SIGKILL)
    wait_for(lambda: not pid_alive(mds), 10, 0.05, "the MDS to die")
    lfs2.up_again()
    wait_for(lambda: ping(f"unix:{lfs2.data_dir / 'mds.sock'}"), 60, 0.1,
             "the MDS to answer again")
    new = bytes(b ^ 0x33 for b in old)
    write(mnt_b / "l/restart.bin", new)
    assert read_file(lfs2.path("l/restart.bin")) == new

    def reopened_from_a_lease() -> bool:  # once A's session is back on the new MDS
        before = lfs2.stats()["client"].get("lease_opens", 0)
        assert read_file(lfs2.path("l/restart.bin")) == new
        return lfs2.stats()["client"].get("lease_opens", 0) > before

    wait_for(reopened_from_a_lease, 20, 0.2, "an open from a lease of the new MDS")
