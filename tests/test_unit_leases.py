"""Caching leases (leases.py): the MDS's table, the client's cache, and the namespace
triggers that report changes. Pure logic and a real SQLite file; no mounts."""

import stat
import threading
import time

import pytest

from lustrefuse import hsm
from lustrefuse.leases import LeaseCache, LeaseTable
from lustrefuse.namespace import ROOT, Namespace


def polled(table: LeaseTable, client: str = "c1") -> dict:
    return table.poll(client, [], 0)


def test_a_change_waits_for_the_holders_answer():
    t = LeaseTable(term=5)
    polled(t)
    seq = t.grant("c1", [7], t.changes)
    assert seq > 0
    t.changed(7, names=False)
    assert t.take_dirtied()  # this thread changed a held inode: its request must settle
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (t.settle(), done.set()))
    waiter.start()
    r = t.poll("c1", [], 1.0)  # the holder's poll brings the revoke at once
    assert r["revokes"] == [(7, seq, False)] and not r["reset"]
    time.sleep(0.05)
    assert not done.is_set(), "the change was acknowledged before the holder answered"
    t.poll("c1", [(7, seq)], 0)  # the answer rides on the next poll
    waiter.join(2)
    assert done.is_set()
    assert t.stats()["leases"] == 0


def test_no_lease_for_state_read_before_a_change_or_for_a_client_that_never_polled():
    t = LeaseTable()
    assert t.grant("c1", [1], t.changes) == 0  # no poll yet: it could not hear a revoke
    polled(t)
    since = t.changes
    t.changed(1)  # nobody holds it, but the state read after ``since`` may be stale
    assert not t.take_dirtied()
    assert t.grant("c1", [1], since) == 0
    assert t.grant("c1", [1], t.changes) > 0
    assert t.grant(None, [1], t.changes) == 0


def test_a_silent_holder_is_waited_for_one_term_then_told_to_reset():
    t = LeaseTable(term=0.3)
    polled(t)
    t.grant("c1", [3], t.changes)
    start = time.monotonic()
    t.revoke_and_wait([3])
    waited = time.monotonic() - start
    assert 0.2 <= waited < 2.0
    r = polled(t)
    assert r["reset"] and r["revokes"] == []
    assert t.stats()["lease_expiries"] == 1
    assert t.grant("c1", [3], t.changes) > 0  # and it may hold leases again


def test_a_client_holds_at_most_its_quota_oldest_revoked_first():
    t = LeaseTable(per_client=2)
    polled(t)
    s1 = t.grant("c1", [1], t.changes)
    t.grant("c1", [2], t.changes)
    t.grant("c1", [3], t.changes)
    assert t.stats()["leases"] == 2
    assert polled(t)["revokes"] == [(1, s1, False)]


def test_a_disconnected_client_is_not_waited_for():
    t = LeaseTable(term=30)
    polled(t)
    t.grant("c1", [4], t.changes)
    rid = t.revoke([4])
    t.drop_client("c1")
    start = time.monotonic()
    t.wait(rid)
    assert time.monotonic() - start < 1


def test_cache_answers_only_under_a_trusted_unrevoked_lease():
    now = [100.0]
    c = LeaseCache(clock=lambda: now[0])
    a = {"ino": 5, "size": 1}
    c.put_name(ROOT, b"f", a, 3)
    assert c.lookup(ROOT, b"f") is None  # no poll answered yet: nothing is trusted
    c.renewed(now[0], 10)
    assert c.lookup(ROOT, b"f") == a and c.getattr(5) == a
    assert c.put_open(5, 3, 77, {"dv": 1}) == []
    now[0] += 20  # the MDS may have given up on us by now
    assert c.getattr(5) is None and c.take_open(5) is None
    c.renewed(now[0], 10)
    # the kept handle goes back to the MDS; the name is dropped here and in the kernel
    assert c.revoke([(5, 3, True)]) == ([77], [(ROOT, b"f")])
    assert c.getattr(5) is None and c.lookup(ROOT, b"f") is None


def test_a_name_lives_under_its_own_grant_not_a_later_getattrs():
    c = LeaseCache()
    c.renewed(c.clock(), 10)
    c.put_name(ROOT, b"old", {"ino": 6}, 2)
    c.put_attrs({"ino": 6}, 5)  # a later getattr: the attributes are newer than the name
    assert c.revoke([(6, 3, True)]) == ([], [(ROOT, b"old")])  # renamed before the getattr
    assert c.lookup(ROOT, b"old") is None
    assert c.getattr(6) == {"ino": 6}


def test_the_kernel_keeps_a_directorys_name_through_attribute_changes():
    """Dropping a directory's name from the kernel drops everything under it: only a
    name that really went is dropped there, though our own cache drops it at once
    (without a lease nobody would tell us of a later rename). A file's name goes from
    the kernel with any revoke: it costs one lookup."""
    c = LeaseCache()
    c.renewed(c.clock(), 10)
    d = {"ino": 8, "mode": stat.S_IFDIR | 0o755}
    c.put_name(ROOT, b"dir", d, 2)
    assert c.revoke([(8, 2, False)]) == ([], [])  # its mtime: new entries in it
    assert c.lookup(ROOT, b"dir") is None
    c.put_attrs(d, 4)  # stat-ed again through the kernel's name
    assert c.revoke([(8, 4, True)]) == ([], [(ROOT, b"dir")])  # renamed
    c.put_name(8, b"file", {"ino": 9, "mode": stat.S_IFREG | 0o644}, 5)
    assert c.revoke([(9, 5, False)]) == ([], [(8, b"file")])


def test_a_grant_that_arrives_after_its_revoke_is_not_used():
    c = LeaseCache()
    c.renewed(c.clock(), 10)
    c.revoke([(9, 4, False)])  # the revoke overtook the reply that carried lease 4
    c.put_attrs({"ino": 9}, 4)
    assert c.getattr(9) is None
    assert c.put_open(9, 4, 11, {}) == [11]
    c.put_attrs({"ino": 9}, 5)  # a later grant is good
    assert c.getattr(9) == {"ino": 9}


def test_a_reset_drops_everything_and_refuses_grants_made_before_it():
    c = LeaseCache()
    c.renewed(c.clock(), 10)
    c.put_open(2, 6, 21, {})
    c.put_attrs({"ino": 2}, 6)
    assert c.reset(floor=8) == [21]
    c.renewed(c.clock(), 10)
    c.put_attrs({"ino": 2}, 7)  # granted before the MDS forgot us
    assert c.getattr(2) is None
    c.put_attrs({"ino": 2}, 9)
    assert c.getattr(2) == {"ino": 2}


def test_kept_opens_are_bounded():
    c = LeaseCache(max_opens=2)
    c.renewed(c.clock(), 10)
    assert c.put_open(1, 1, 101, {}) == []
    assert c.put_open(2, 2, 102, {}) == []
    assert c.put_open(3, 3, 103, {}) == [101]
    assert c.put_open(3, 4, 104, {}) == [103]  # one kept handle per inode


def test_namespace_reports_what_leases_cover_and_nothing_else(tmp_path):
    """{inode: whether one of its names went} for each transaction's changes."""
    seen: dict[int, bool] = {}
    ns = Namespace(str(tmp_path / "mds.db"), 2, 1 << 20,
                   on_change=lambda ino, names: seen.__setitem__(ino, names))
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)["ino"]
    assert seen == {ROOT: False}  # its mtime and nlink
    seen.clear()
    f = ns.create(d, b"f", 0o644, 0, 0)["ino"]
    assert seen == {d: False}  # a new inode is nobody's yet
    seen.clear()
    ns.setattr(f, {"size": 2 << 20})
    assert seen == {f: False}
    seen.clear()
    assert not ns.mark_present(f, [0])  # hydration: presence only, nothing a lease covers
    assert seen == {}
    ns.set_hsm(f, hsm.EXISTS | hsm.ARCHIVED)
    assert seen == {f: False}
    seen.clear()
    ns.rename(d, b"f", ROOT, b"g")
    assert seen[f] is True and seen[d] is False and seen[ROOT] is False
    seen.clear()
    g = ns.create(ROOT, b"h", 0o644, 0, 0)["ino"]
    seen.clear()
    ns.rename(ROOT, b"g", ROOT, b"h")  # replaces h
    assert seen[f] is True and seen[g] is True
    seen.clear()
    ns.unlink(ROOT, b"h")
    assert seen[f] is True
    seen.clear()
    d2 = ns.mkdir(ROOT, b"d2", 0o755, 0, 0)["ino"]
    seen.clear()
    with pytest.raises(RuntimeError):
        with ns.tx() as db:
            db.execute("UPDATE inodes SET mode=? WHERE ino=?", (0o40700, d2))
            raise RuntimeError("mid-way")
    assert seen == {d2: False}  # undone, but another thread may have read it meanwhile
