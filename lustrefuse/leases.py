"""Caching leases: what lets a client answer lookups, getattrs and re-opens itself.

Lustre clients keep names, attributes and opens under MDS locks (LOOKUP, UPDATE and
OPEN ibits), which the MDS calls back before it changes what they cover. This is the
same idea for one MDS, reduced to one lease per (client, inode):

- The MDS grants a lease with a lookup, getattr or read-only open reply (a sequence
  number; 0 = none). The client may then reuse that reply's attributes, the name it
  resolved (as Lustre's LOOKUP lock, a name is covered by the lease on the inode it
  names) and the open handle, until the lease is revoked or its term runs out.
- Any change of an inode's row (attributes, size, data version, HSM flags, layout, S3
  identity, links), and the removal or renaming of a name, marks the inode changed
  (SQLite triggers, so that no mutation path can forget one). Before the change is
  acknowledged to whoever made it, every holder is told (a long poll on the client's
  session) and answers; a holder that does not answer within the lease term stops
  trusting its leases by itself, so the MDS stops waiting then.
- The client trusts its leases only up to ``term`` after the last poll the MDS
  answered, so a client cut off from the MDS drops its cache before the MDS would
  stop waiting for it.

``LeaseTable`` is the MDS's side, ``LeaseCache`` the client's; both are pure state
(plus a condition variable on the MDS side), with no I/O.
"""

from __future__ import annotations

import stat
import threading
import time
from collections import OrderedDict

TERM = 10.0  # seconds a client trusts its leases after the MDS last heard from it
POLL_WAIT = 2.0  # seconds a lease poll waits for revokes before it returns empty
MAX_LEASES_PER_CLIENT = 65536  # past this, the oldest are revoked (bounds both sides' memory)
TRUST_MARGIN = 1.0  # a client trusts its leases this much less than the MDS's term
REVOKED_KEEP = 120.0  # seconds a client remembers a revoke (grants still on the wire)


class LeaseTable:
    """The MDS's leases: who holds which inode, revokes on their way, and who answered."""

    def __init__(self, term: float = TERM, per_client: int = MAX_LEASES_PER_CLIENT,
                 clock=time.monotonic, first_seq: int = 0):
        self.cv = threading.Condition()
        self.term = term
        self.per_client = per_client
        self.clock = clock
        self.holders: dict[int, dict[str, int]] = {}  # ino -> client -> seq of newest grant
        self.held: dict[str, OrderedDict] = {}  # client -> its inodes, oldest grant first
        self.queued: dict[str, list[tuple]] = {}  # client -> (ino, seq, names) to send
        self.unacked: dict[str, dict[int, tuple[int, int]]] = {}  # client -> ino -> (rid, seq)
        self.seen: dict[str, float] = {}  # client -> clock of its newest poll
        self.expired: set[str] = set()  # clients that must drop every lease they hold
        self.dirty: dict[int, bool] = {}  # held inodes changed since -> whether a name went
        self.changes = 0  # every change counts: a grant racing one is refused
        self.granted = self.revoked = self.expiries = 0
        self._seq = first_seq  # the MDS starts from the time: a restart never reuses one
        self._rid = 0  # revoke batches: waiters wait for every batch up to theirs
        self._local = threading.local()

    # -- the trigger side (called as the MDS's transactions end) --------------

    def changed(self, ino: int, names: bool = False):
        """What a lease covers changed for ``ino`` (reported by the namespace's triggers
        when its transaction ends); ``names``: one of its names was removed or moved.
        Counted and checked under the lock that grants take: a grant either sees the
        count move, or is seen here and revoked."""
        with self.cv:
            self.changes += 1
            if ino not in self.holders:
                return
            self.dirty[ino] = self.dirty.get(ino, False) or names
            self.cv.notify_all()
        self._local.dirtied = True

    def take_dirtied(self) -> bool:
        """Whether this thread changed a held inode since the last call."""
        d = getattr(self._local, "dirtied", False)
        self._local.dirtied = False
        return d

    # -- grants ---------------------------------------------------------------

    def grant(self, client: str | None, inos, since: int) -> int:
        """A lease on ``inos`` for ``client`` if nothing changed since ``changes`` was
        ``since`` (read before the state the reply carries). 0: no lease."""
        if not client:
            return 0
        with self.cv:
            if client not in self.seen or client in self.expired or self.changes != since:
                return 0
            self._seq += 1
            seq = self._seq
            held = self.held.setdefault(client, OrderedDict())
            for ino in inos:
                self.holders.setdefault(ino, {})[client] = seq
                held[ino] = None
                held.move_to_end(ino)
            while len(held) > self.per_client:  # the client's cache is bounded by ours
                old, _ = held.popitem(last=False)
                self._revoke_one(old, client, self.holders[old].pop(client), False)
                if not self.holders[old]:
                    del self.holders[old]
            self.granted += 1
            return seq

    # -- revokes --------------------------------------------------------------

    def _revoke_one(self, ino: int, client: str, seq: int, names: bool):
        self.queued.setdefault(client, []).append((ino, seq, names))
        un = self.unacked.setdefault(client, {})
        old = un.get(ino)  # an earlier waiter still waits for this inode's answer
        un[ino] = (old[0] if old else self._rid, max(seq, old[1]) if old else seq)
        self.revoked += 1

    def revoke(self, inos) -> int:
        """Queue revokes of every lease on ``inos``; returns the batch to wait for."""
        with self.cv:
            return self._revoke_locked(dict.fromkeys(inos, False))

    def _revoke_locked(self, inos: dict[int, bool]) -> int:
        """``inos``: inode -> whether one of its names went (the holder then drops the
        kernel's copies of its names; a directory's would take its whole subtree)."""
        any_ = False
        for ino, names in inos.items():
            holders = self.holders.pop(ino, None)
            if not holders:
                continue
            if not any_:
                self._rid += 1
                any_ = True
            for client, seq in holders.items():
                self.held[client].pop(ino, None)
                self._revoke_one(ino, client, seq, names)
        if any_:
            self.cv.notify_all()
        return self._rid

    def revoke_and_wait(self, inos):
        self.wait(self.revoke(inos))

    def settle(self):
        """Revoke what changed and wait until its holders answered (or expired)."""
        with self.cv:
            dirty, self.dirty = self.dirty, {}
            rid = self._revoke_locked(dirty)
        self.wait(rid)

    def revoke_dirty(self, timeout: float) -> None:
        """For the MDS's background thread: revoke changes made outside any request
        (imports, the coordinator, disconnects) without waiting for the answers."""
        with self.cv:
            if not self.dirty:
                self.cv.wait(timeout)
            dirty, self.dirty = self.dirty, {}
            self._revoke_locked(dirty)

    def wait(self, rid: int):
        """Until every revoke of batch ``rid`` or earlier is answered or expired."""
        with self.cv:
            while True:
                due = None
                late = []
                now = self.clock()
                for client, un in self.unacked.items():
                    if any(r <= rid for r, _ in un.values()):
                        end = self.seen.get(client, 0.0) + self.term
                        if end <= now:
                            late.append(client)
                        elif due is None or end < due:
                            due = end
                for client in late:
                    self._expire(client)
                if late:
                    continue
                if due is None:
                    return
                self.cv.wait(max(0.001, due - now))

    def _expire(self, client: str):
        """The client did not answer within its term: it trusts none of its leases now
        (see ``LeaseCache.trusted``), so forget them; its next poll tells it to reset."""
        self._drop_locked(client)
        self.expired.add(client)
        self.expiries += 1

    def drop_client(self, client: str):
        """The client's session is gone: so are its leases (it resets them itself)."""
        with self.cv:
            self._drop_locked(client)
            self.expired.discard(client)
            self.seen.pop(client, None)

    def _drop_locked(self, client: str):
        for ino in self.held.pop(client, {}):
            h = self.holders.get(ino)
            if h is not None:
                h.pop(client, None)
                if not h:
                    del self.holders[ino]
        self.queued.pop(client, None)
        self.unacked.pop(client, None)
        self.cv.notify_all()

    # -- the client's long poll -------------------------------------------------

    def poll(self, client: str, acks, wait: float) -> dict:
        """Take the client's answers, then wait up to ``wait`` s for revokes for it.
        ``reset``: the client must drop every lease (it did not answer in time)."""
        with self.cv:
            self.seen[client] = self.clock()
            reset = client in self.expired
            self.expired.discard(client)
            un = self.unacked.get(client)
            if un:
                for ino, seq in acks:
                    ent = un.get(ino)
                    if ent is not None and ent[1] <= seq:
                        del un[ino]
                if not un:
                    del self.unacked[client]
                self.cv.notify_all()
            if not reset:
                self.cv.wait_for(lambda: self.queued.get(client) or client in self.expired,
                                 wait)
            revokes = self.queued.pop(client, [])
            if client in self.expired:  # expired while waiting: all of it goes
                reset = True
                revokes = []
                self.expired.discard(client)
            # ``seq``: every grant so far; after a reset the client trusts only later ones
            return {"revokes": revokes, "reset": reset, "term": self.term, "seq": self._seq}

    def stats(self) -> dict:
        with self.cv:
            return {"leases": sum(len(h) for h in self.held.values()),
                    "lease_clients": len(self.seen), "leases_granted": self.granted,
                    "leases_revoked": self.revoked, "lease_expiries": self.expiries}


class LeaseCache:
    """The client's side: what it may answer itself, and under which lease.

    Attributes and names are plain attribute dicts as the MDS sends them; a cached
    open is (lease, MDS handle, the open reply). Everything is dropped on a revoke of
    its inode, and nothing is trusted past ``trusted_until``."""

    def __init__(self, max_opens: int = 4096, max_attrs: int = MAX_LEASES_PER_CLIENT,
                 clock=time.monotonic):
        self.clock = clock
        self.trusted_until = 0.0
        self.floor = 0  # grants up to this one were made before a reset: never valid
        self.max_opens = max_opens
        self.max_attrs = max_attrs
        self.revoked: dict[int, tuple[int, float]] = {}  # ino -> (newest seq revoked, when)
        self.attrs: OrderedDict = OrderedDict()  # ino -> (seq, attr dict)
        self.names: dict[tuple[int, bytes], tuple[int, int]] = {}  # (dir, name) -> (seq, ino)
        self.names_of: dict[int, set] = {}  # ino -> its cached (dir, name)s
        # ino -> the names we told the kernel, leased or not: when one goes, the kernel's
        # copy must go too (an attribute change does not touch them)
        self.kernel_names: OrderedDict = OrderedDict()
        self.opens: OrderedDict = OrderedDict()  # ino -> (seq, handle, open reply)

    def trusted(self) -> bool:
        return self.clock() < self.trusted_until

    def valid(self, ino: int, seq: int) -> bool:
        if seq <= self.floor:
            return False
        r = self.revoked.get(ino)
        return r is None or seq > r[0]

    # -- filling ----------------------------------------------------------------

    def put_attrs(self, a: dict, seq: int):
        ino = a["ino"]
        if not self.valid(ino, seq):
            return
        self.attrs[ino] = (seq, a)
        self.attrs.move_to_end(ino)
        while len(self.attrs) > self.max_attrs:
            old, _ = self.attrs.popitem(last=False)
            self._drop_names(old, None)

    def put_name(self, parent: int, name: bytes, a: dict, seq: int):
        """A lookup's answer: the name and the attributes, under the child's lease."""
        ino = a["ino"]
        leased = self.valid(ino, seq)
        if leased:
            self.put_attrs(a, seq)
        if name in (b".", b".."):  # ".." follows a rename of the directory: not cached
            return
        known = self.kernel_names.get(ino)  # the kernel learns the name, leased or not
        if known is None:
            known = self.kernel_names[ino] = set()
            while len(self.kernel_names) > self.max_attrs:
                self.kernel_names.popitem(last=False)
        known.add((parent, name))
        if leased:
            self.names[(parent, name)] = (seq, ino)
            self.names_of.setdefault(ino, set()).add((parent, name))

    def _drop_names(self, ino: int, seq: int | None):
        """Forget our names of ``ino`` granted up to ``seq`` (all: None)."""
        keys = self.names_of.get(ino)
        if not keys:
            return
        for k in [k for k in keys if seq is None or self.names[k][0] <= seq]:
            del self.names[k]
            keys.discard(k)
        if not keys:
            del self.names_of[ino]

    def put_open(self, ino: int, seq: int, handle: int, st: dict) -> list[int]:
        """Keep a closed read-only handle for a re-open; returns handles to close now."""
        if not self.valid(ino, seq) or not self.trusted():
            return [handle]
        closes = []
        old = self.opens.pop(ino, None)
        if old is not None:
            closes.append(old[1])
        self.opens[ino] = (seq, handle, st)
        while len(self.opens) > self.max_opens:
            closes.append(self.opens.popitem(last=False)[1][1])
        return closes

    # -- answering --------------------------------------------------------------

    def getattr(self, ino: int) -> dict | None:
        ent = self.attrs.get(ino)
        if ent is None or not self.trusted():
            return None
        return ent[1]

    def lookup(self, parent: int, name: bytes) -> dict | None:
        ent = self.names.get((parent, name))
        if ent is None or not self.trusted():
            return None
        a = self.attrs.get(ent[1])
        return a[1] if a is not None else None

    def take_open(self, ino: int) -> tuple[int, int, dict] | None:
        """(lease, handle, open reply) of a cached open of ``ino``, now the caller's."""
        if ino not in self.opens or not self.trusted():
            return None
        return self.opens.pop(ino)

    # -- revokes --------------------------------------------------------------------

    def revoke(self, revokes) -> tuple[list[int], list]:
        """Apply the MDS's revokes (inode, lease, whether a name of it went); returns
        the cached handles to close, and the names the kernel may hold that must go
        too. Our own names of a revoked inode always go: without a lease nobody would
        tell us of a later rename. So do the kernel's, but for a directory whose name
        did not change: dropping it there drops everything under it, and a directory's
        attributes change with every entry made or removed in it."""
        now = self.clock()
        closes, names = [], []
        for ino, seq, name_went in revokes:
            old = self.revoked.get(ino)
            self.revoked[ino] = (max(seq, old[0]) if old else seq, now)
            a = self.attrs.get(ino)
            is_dir = a is not None and stat.S_ISDIR(a[1].get("mode", 0))
            if a is not None and a[0] <= seq:
                del self.attrs[ino]
            self._drop_names(ino, seq)
            if name_went or not is_dir:
                names += self.kernel_names.pop(ino, ())
            o = self.opens.get(ino)
            if o is not None and o[0] <= seq:
                del self.opens[ino]
                closes.append(o[1])
        if len(self.revoked) > 4 * self.max_attrs:  # revokes of grants long answered
            self.revoked = {i: r for i, r in self.revoked.items() if now - r[1] < REVOKED_KEEP}
        return closes, names

    def drop_all(self) -> list[int]:
        """Forget everything cached (the leases stay valid); returns the kept handles."""
        closes = [o[1] for o in self.opens.values()]
        self.attrs.clear()
        self.names.clear()
        self.names_of.clear()
        self.kernel_names.clear()
        self.opens.clear()
        return closes

    def reset(self, floor: int | None = None) -> list[int]:
        """Drop everything (the MDS expired us, or the session broke). ``floor``: the
        MDS's newest grant when it said so; replies still on the wire carry older ones."""
        if floor is not None:
            self.floor = max(self.floor, floor)
        self.trusted_until = 0.0
        return self.drop_all()

    def renewed(self, sent_at: float, term: float):
        """A poll sent at ``sent_at`` was answered: the MDS heard from us then."""
        self.trusted_until = max(self.trusted_until, sent_at + term - TRUST_MARGIN)
