"""The FUSE client: POSIX operations translated to MDS metadata calls and OST data I/O.

Hot read path: the layout and each OST's chunk table are fetched at open; a
same-host OST hands over its object's descriptor, so a read of present data
is a ``pread`` plus a one-time checksum check per chunk, with no RPC. A
missing chunk is hydrated by its OST (single-flight across all readers);
sequential access prefetches the next chunks.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import stat
import struct
import time
import uuid
from dataclasses import dataclass, field

import pyfuse3
import trio

from . import hsm, leases, rpc
from .integrity import checksum
from .layout import GET_SPAN, Layout, StripeSpec
from .metrics import REGISTRY
from .protocol import CTL_NAME, RpcError

log = logging.getLogger(__name__)

CTL_INO = 1 << 62
HYDRATE_TIMEOUT = 300.0
KEEPALIVE = 2.0  # seconds between attempts to get the MDS session back
PREFETCH_CHUNKS = 64  # a sequential reader keeps this many chunks in flight (Lustre: 64 MiB a file)
CLOSE_DELAY = 0.01  # read-only closes wait this long for an open to carry them to the MDS
READ_AHEAD_OPEN = 1 << 20  # bytes of the first chunk read ahead at open
PASSTHROUGH_PREFIXES = (b"security.", b"system.")  # answered locally: no ACLs, no caps
DIR_PAGE = 1000  # directory entries per MDS readdir call; an open directory holds one page


def fuse_errors(fn):
    """Only FUSEError may leave a handler (pyfuse3): map everything else to an errno."""
    import functools

    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args, **kw):
        start = time.perf_counter()
        try:
            return await fn(*args, **kw)
        except pyfuse3.FUSEError:
            REGISTRY.inc("fuse_errors", help="FUSE requests answered with an error", op=op)
            raise
        except RpcError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except OSError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except (trio.TooSlowError, ConnectionError) as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            REGISTRY.observe("fuse_latency_seconds", time.perf_counter() - start,
                             help="FUSE request service time", op=op)

    return wrapper


@dataclass
class OpenFile:
    ino: int
    handle: int  # the MDS's open handle
    st: dict
    layout: Layout
    size: int
    writable: bool
    fds: dict = field(default_factory=dict)  # ost -> fd (same host) or None (remote)
    tables: dict = field(default_factory=dict)  # ost -> {chunk: (length, xxh)}
    verified: set = field(default_factory=set)
    cache: tuple = (-1, b"")  # the last verified chunk (s, bytes)
    written: set = field(default_factory=set)
    dirty: bool = False
    next_seq: int = 0  # offset a sequential reader reads next
    prefetching: dict = field(default_factory=dict)  # chunk -> trio.Event set when it lands
    prefetch_end: int = 0  # first chunk not yet asked for by prefetch
    seq_reads: int = 0  # reads in a row that each began where the last one ended
    lease: int = 0  # the MDS's lease on a read-only open: its handle may be kept (leases.py)

    @property
    def desc(self) -> dict:
        st = self.st
        return {"ino": self.ino, "layout": self.layout.to_dict(), "s3_key": st["s3_key"],
                "etag": st["etag"], "s3_size": st["s3_size"] or 0, "size": self.size}

    def from_s3(self, s: int) -> bool:
        """Whether chunk ``s`` has bytes in the S3 copy that are not local yet."""
        return bool(self.st["s3_key"]) and self.layout.chunk_length(s, self.st["s3_size"] or 0) > 0


def object_stamp(st: dict) -> tuple:
    """What the MDS says about a file's data: equal stamps, same OST objects' contents
    (with the objects' own fstat, see ObjectCache). A write bumps the data version, a
    release or hydration changes the presence bits and HSM flags, a re-import the ETag."""
    return (st["dv"], st["size"], st["mtime_ns"], st["ctime_ns"], st["hsm"], st["present"],
            st["s3_key"], st["etag"], st["s3_size"], json.dumps(st["layout"], sort_keys=True))


def fd_stamp(fd: int) -> tuple | None:
    """An object file as seen through our descriptor: any OST write, hydration, punch or
    truncate changes it; a destroyed object has no links left (None)."""
    st = os.fstat(fd)
    if st.st_nlink == 0:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class ObjectCache:
    """Per inode: the same-host OST descriptors and chunk tables of the last read-only
    open, so that the next open of an unchanged file needs no OST round trip. Handles
    get their own ``dup`` of each descriptor and a copy of each table; entries are
    checked at every use (``object_stamp`` from the MDS's open reply, ``fd_stamp``)."""

    def __init__(self, max_fds: int):
        from collections import OrderedDict

        self.max_fds = max_fds
        self.entries: OrderedDict = OrderedDict()  # ino -> (stamp, {ost: (fd, fstat)}, tables)
        self.nfds = 0
        self.hits = self.misses = 0

    def take(self, ino: int, stamp: tuple, of: OpenFile) -> bool:
        """Fill ``of`` from the cache if the entry is still right; else drop it."""
        ent = self.entries.get(ino)
        if ent is None:
            self.misses += 1
            return False
        key, fds, tables = ent
        if key != stamp or any(fd_stamp(fd) != fst for fd, fst in fds.values()):
            self.drop(ino)
            self.misses += 1
            return False
        self.entries.move_to_end(ino)
        for idx, (fd, _fst) in fds.items():
            of.fds[idx] = os.dup(fd)
        of.tables = {idx: dict(t) for idx, t in tables.items()}
        self.hits += 1
        return True

    def put(self, ino: int, stamp: tuple, of: OpenFile):
        """Remember what a fresh open fetched (only same-host objects: they can be
        checked with fstat)."""
        self.drop(ino)
        if not of.fds or any(fd is None for fd in of.fds.values()) or len(of.fds) > self.max_fds:
            return
        fds = {}
        try:
            for idx, fd in of.fds.items():
                fst = fd_stamp(fd)
                if fst is None:
                    raise OSError(errno.ESTALE, "object destroyed")
                fds[idx] = (os.dup(fd), fst)
        except OSError:
            for fd, _ in fds.values():
                os.close(fd)
            return
        self.entries[ino] = (stamp, fds, {idx: dict(t) for idx, t in of.tables.items()})
        self.nfds += len(fds)
        while self.nfds > self.max_fds:
            self.drop(next(iter(self.entries)))

    def drop(self, ino: int):
        ent = self.entries.pop(ino, None)
        if ent is not None:
            for fd, _ in ent[1].values():
                os.close(fd)
            self.nfds -= len(ent[1])


class Counters(dict):
    """The client's counters, for ``lustrefuse stats`` and Prometheus alike."""

    def add(self, name: str, n: int = 1):
        self[name] = self.get(name, 0) + n  # exported at scrape time (services.run_mount)


class Filesystem(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, mds_address: str, secret: bytes | None = None,
                 attr_timeout: float = 10.0, data_dir: str | None = None):
        super().__init__()
        self.mds = rpc.TrioClient(mds_address, secret, timeout=30)
        self.session = rpc.TrioClient(mds_address, secret, timeout=30, max_connections=1)
        self.secret = secret
        self.client_id = uuid.uuid4().hex
        self.osts: dict[int, rpc.TrioClient] = {}
        self.ost_local: dict[int, bool] = {}
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, list] = {}
        self.writers: dict[int, set[int]] = {}  # ino -> fhs open for write
        self.seen_version: dict[int, int] = {}  # ino -> data version our page cache holds
        self._fh = iter(range(1, 1 << 62))
        self.attr_timeout = attr_timeout
        self.data_dir = data_dir
        self.counters = Counters()
        self.nursery = None
        self.fsname = "lustrefuse"
        self.mountpoint = ""
        self.hydrate_limit = trio.CapacityLimiter(64)  # one budget for reads and prefetch
        self.objects = ObjectCache(object_cache_fds())
        self.closing: list[int] = []  # MDS handles of read-only files closed, not yet sent
        self.closes_due = trio.Event()
        self.leases = leases.LeaseCache()  # lookups, attributes, opens the MDS lets us keep
        self.lease_floor_due = False  # after a lost session: the next poll sets the floor
        self.names_limiter = trio.CapacityLimiter(1)  # kernel name invalidations, in order

    async def start(self, nursery):
        self.nursery = nursery
        info = await self.session.call("hello", client=self.client_id)
        self.fsname = info["fsname"]
        await self._refresh_osts()
        nursery.start_soon(self._keepalive)
        nursery.start_soon(self._close_sender)

    async def _keepalive(self):
        """The MDS session: a long poll that proves we are alive and brings the MDS's
        lease revokes (leases.py), answered by the next poll. Without a session we
        trust no lease; after an MDS restart (or a new connection), re-open our files
        there (replay), so it neither frees unlinked-but-open files nor trims data we
        have not flushed yet."""
        acks: list = []
        closes: list[int] = []
        while True:
            sent = time.monotonic()
            try:
                r = await self.session.call("lease_poll", client=self.client_id, acks=acks,
                                            closes=closes, wait=leases.POLL_WAIT,
                                            timeout=leases.POLL_WAIT + 10)
            except RpcError as e:
                # the MDS forgot our opens with the session: cached ones are gone (a
                # close of a handle it does not know is a no-op, so send them anyway)
                self.closing.extend(closes + self.leases.reset())
                self.lease_floor_due = True
                acks, closes = [], []
                log.warning("lost the MDS session (%s); reconnecting", e)
                await self._reconnect()
                continue
            closes = []
            if r["reset"] or self.lease_floor_due:
                closes += self.leases.reset(r["seq"])
                self.lease_floor_due = False
            revokes = r["revokes"]
            acks = [(ino, seq) for ino, seq, _names in revokes]
            if revokes:
                handles, names = self.leases.revoke(revokes)
                closes += handles
                self.counters.add("lease_revokes", len(revokes))
                # the kernel's copies go too: attributes before we answer (no lock is
                # involved), names after (the kernel may hold the directory's lock
                # for a request that waits for our answer)
                await trio.to_thread.run_sync(invalidate_inodes, [i for i, _ in acks], True)
                if names:
                    self.nursery.start_soon(self._invalidate_names, names)
            self.leases.renewed(sent, r["term"])

    async def _invalidate_names(self, names: list):
        await trio.to_thread.run_sync(invalidate_entries, names, limiter=self.names_limiter)

    async def _reconnect(self):
        while True:
            try:
                await self.session.call("hello", client=self.client_id, timeout=10)
                for of in list(self.files.values()):
                    st = await self.mds.call("open", ino=of.ino, client=self.client_id,
                                             writable=of.writable)
                    of.handle = st["handle"]
                    of.lease = 0  # a replayed open is not cached on its close
                log.info("MDS session restored; %d open files re-opened", len(self.files))
                return
            except RpcError as e:
                log.warning("MDS session not restored yet: %s", e)
                await trio.sleep(KEEPALIVE)

    async def _refresh_osts(self):
        cfg = await self.mds.call("config")
        for idx, addr in cfg["osts"].items():
            idx = int(idx)
            if idx not in self.osts or self.osts[idx].address != addr:
                self.osts[idx] = rpc.TrioClient(addr, self.secret, timeout=HYDRATE_TIMEOUT)
                self.ost_local[idx] = addr.startswith("unix:")

    async def ost(self, idx: int) -> rpc.TrioClient:
        if idx not in self.osts:
            await self._refresh_osts()
            if idx not in self.osts:
                raise RpcError(errno.EIO, f"OST {idx} is not registered")
        return self.osts[idx]

    # -- attributes --------------------------------------------------------

    def _entry(self, a: dict) -> pyfuse3.EntryAttributes:
        return self._attributes(a["ino"], a["mode"], a["uid"], a["gid"], a["nlink"], a["size"],
                                a["atime_ns"], a["mtime_ns"], a["ctime_ns"], a["rdev"],
                                a.get("hsm", 0))

    def _entry_row(self, r) -> pyfuse3.EntryAttributes:
        """``_entry`` of a flat readdir row: (cookie, name, *namespace.ATTR_COLS)."""
        return self._attributes(*r[2:12], r[13])

    def _attributes(self, ino, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev,
                    hsm_flags) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self.attr_timeout
        e.st_mode = mode
        e.st_uid = uid
        e.st_gid = gid
        e.st_nlink = nlink
        size = self._local_size(ino, size) if self.writers else size
        e.st_size = size
        e.st_atime_ns = atime_ns
        e.st_mtime_ns = mtime_ns
        e.st_ctime_ns = ctime_ns
        e.st_rdev = rdev
        e.st_blksize = 1 << 20
        # like du on Lustre: a released file holds no local blocks (sanity-hsm 21)
        e.st_blocks = 0 if hsm_flags & hsm.RELEASED else (size + 511) // 512
        return e

    def _ctl_entry(self) -> pyfuse3.EntryAttributes:
        now = time.time_ns()
        return self._entry({"ino": CTL_INO, "mode": stat.S_IFREG | 0o666, "nlink": 1, "uid": 0,
                            "gid": 0, "rdev": 0, "size": 0, "atime_ns": now, "mtime_ns": now,
                            "ctime_ns": now})

    @fuse_errors
    async def lookup(self, parent, name, ctx=None):
        if len(name) > 255:  # the kernel leaves NAME_MAX to the filesystem
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if parent == pyfuse3.ROOT_INODE and name == CTL_NAME:
            return self._ctl_entry()
        name = bytes(name)
        a = self.leases.lookup(parent, name)
        if a is not None:
            self.counters.add("lease_lookups")
            return self._entry(a)
        self.counters.add("lookups")
        a = await self.mds.call("lookup", parent=parent, name=name, client=self.client_id)
        self.leases.put_name(parent, name, a, a["lease"])
        return self._entry(a)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        if inode == CTL_INO:
            return self._ctl_entry()
        a = self.leases.getattr(inode)
        if a is not None:
            self.counters.add("lease_getattrs")
            return self._entry(a)
        self.counters.add("getattrs")
        a = await self.mds.call("getattr", ino=inode, client=self.client_id)
        self.leases.put_attrs(a, a["lease"])
        return self._entry(a)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == CTL_INO:
            return self._ctl_entry()
        upd = {}
        if fields.update_size:
            await self._truncate(inode, attr.st_size, fh)
            upd["size"] = attr.st_size
        if fields.update_mode:
            upd["mode"] = attr.st_mode
        if fields.update_uid:
            upd["uid"] = attr.st_uid
        if fields.update_gid:
            upd["gid"] = attr.st_gid
        now = time.time_ns()
        if fields.update_atime:
            upd["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            upd["mtime_ns"] = attr.st_mtime_ns
        if getattr(fields, "update_ctime", False):
            upd["ctime_ns"] = attr.st_ctime_ns
        if "mode" in upd and ctx.uid != 0:
            # a non-member non-root owner loses setgid on chmod, as the kernel does locally
            a = await self.mds.call("getattr", ino=inode)
            if upd["mode"] & stat.S_ISGID and ctx.gid != a["gid"]:
                upd["mode"] &= ~stat.S_ISGID
        if ("uid" in upd or "gid" in upd) and "mode" not in upd:
            a = await self.mds.call("getattr", ino=inode)
            if stat.S_ISREG(a["mode"]) and a["mode"] & (stat.S_ISUID | stat.S_ISGID):
                upd["mode"] = a["mode"] & ~(stat.S_ISUID | stat.S_ISGID)
        upd.setdefault("ctime_ns", now)
        a = await self.mds.call("setattr", ino=inode, fields=upd)
        if inode in self.seen_version:
            self.seen_version[inode] = a["dv"]
        return self._entry(a)

    async def _truncate(self, ino: int, size: int, fh=None):
        st = await self.mds.call("file_state", ino=ino)
        if not stat.S_ISREG(st["mode"]):
            raise pyfuse3.FUSEError(errno.EINVAL)
        lay = Layout.from_dict(st["layout"])
        of = OpenFile(ino, 0, st, lay, st["size"], True)
        for f in self.files.values():
            if f.ino == ino:
                of = f
                break
        edge = size // lay.stripe_size
        if size and size % lay.stripe_size and size < of.size and of.from_s3(edge):
            # keep the bytes before the cut: the edge chunk must be local first
            await self._hydrate(of, lay.ost_of_chunk(edge), [edge])
        for idx in sorted(set(lay.osts)):
            ost = await self.ost(idx)
            got = await ost.call("truncate", desc=of.desc, size=size)
            for s, ent in (got or {}).items():
                of.tables.setdefault(idx, {})[int(s)] = tuple(ent)
        for f in self.files.values():
            if f.ino == ino:
                f.size = size
                f.st["s3_size"] = min(f.st["s3_size"] or 0, size)  # as the MDS clamps it
                f.cache = (-1, b"")
                f.verified.clear()
                for t in f.tables.values():
                    for s in [s for s in t if s * lay.stripe_size >= size]:
                        del t[s]
        self.counters.add("truncates")

    # -- directories ------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode, ctx):
        fh = next(self._fh)
        # ino, the page (flat rows), the cookie it was fetched after, the cookie after
        # which the directory ended when last asked (None: not known)
        self.dirs[fh] = [inode, [], 0, None]
        return fh

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        """Entries after cookie ``start_id`` (the MDS's dentry id), fetched a page at a
        time by keyset pagination: memory per open directory is one page, whatever its
        size. The kernel asks again where its buffer filled up; a page shorter than
        asked for marks the end, so the final call costs no round trip."""
        d = self.dirs[fh]
        ino = d[0]
        after = start_id
        self.counters.add("readdirs")
        while True:
            page, page_after, end = d[1], d[2], d[3]
            if page and page_after <= after < page[-1][0]:
                i = bisect.bisect_right(page, after, key=_cookie)
            elif end is not None and after >= end:
                return
            else:
                page = await self.mds.call("readdir", ino=ino, after=after, limit=DIR_PAGE,
                                           rows=True)
                self.counters.add("readdir_pages")
                d[1], d[2] = page, after
                d[3] = (page[-1][0] if page else after) if len(page) < DIR_PAGE else None
                if not page:
                    return
                i = 0
            for r in page[i:] if i else page:
                if not pyfuse3.readdir_reply(token, bytes(r[1]), self._entry_row(r), r[0]):
                    return
                after = r[0]

    @fuse_errors
    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    @fuse_errors
    async def mkdir(self, parent, name, mode, ctx):
        return self._entry(await self.mds.call("mkdir", parent=parent, name=bytes(name),
                                               mode=mode, uid=ctx.uid, gid=ctx.gid))

    @fuse_errors
    async def rmdir(self, parent, name, ctx):
        await self.mds.call("rmdir", parent=parent, name=bytes(name))

    @fuse_errors
    async def unlink(self, parent, name, ctx):
        if parent == pyfuse3.ROOT_INODE and name == CTL_NAME:
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.flush_closes()  # a last close frees the inode now, as before
        await self.mds.call("unlink", parent=parent, name=bytes(name))

    @fuse_errors
    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        await self.flush_closes()  # a replaced target is freed now if nobody holds it
        await self.mds.call("rename", parent=parent_old, name=bytes(name_old),
                            newparent=parent_new, newname=bytes(name_new), flags=flags)

    @fuse_errors
    async def link(self, inode, new_parent, new_name, ctx):
        return self._entry(await self.mds.call("link", ino=inode, parent=new_parent,
                                               name=bytes(new_name)))

    @fuse_errors
    async def symlink(self, parent, name, target, ctx):
        return self._entry(await self.mds.call("symlink", parent=parent, name=bytes(name),
                                               target=bytes(target), uid=ctx.uid, gid=ctx.gid))

    @fuse_errors
    async def readlink(self, inode, ctx):
        return await self.mds.call("readlink", ino=inode)

    @fuse_errors
    async def mknod(self, parent, name, mode, rdev, ctx):
        return self._entry(await self.mds.call("create", parent=parent, name=bytes(name),
                                               mode=mode, uid=ctx.uid, gid=ctx.gid, rdev=rdev))

    @fuse_errors
    async def statfs(self, ctx):
        st = await self.mds.call("statfs")
        s = pyfuse3.StatvfsData()
        bs = 4096
        osts = [o for o in st["osts"] if "error" not in o]
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = sum(o["blocks"] for o in osts) // bs
        s.f_bfree = sum(o["bfree"] for o in osts) // bs
        s.f_bavail = sum(o["bavail"] for o in osts) // bs
        m = st["mdts"][0]
        s.f_files = m["files"]
        s.f_ffree = m["ffree"]
        s.f_favail = m["ffree"]
        s.f_namemax = 255
        return s

    # -- files -------------------------------------------------------------

    async def _open_file(self, ino: int, writable: bool) -> OpenFile:
        cached = None if writable else self.leases.take_open(ino)
        if cached is not None:  # a handle we kept under a lease: nothing changed since
            lease, handle, st = cached
            self.counters.add("lease_opens")
        else:
            st = await self._open_on_mds(ino, writable)
            handle, lease = st["handle"], st["lease"]
        if not stat.S_ISREG(st["mode"]):
            await self.mds.call("close", handle=handle)
            raise pyfuse3.FUSEError(errno.EINVAL)
        of = OpenFile(ino, handle, st, Layout.from_dict(st["layout"]),
                      self._local_size(ino, st["size"]), writable)
        of.lease = lease
        # nobody writes it (the MDS says so) and it is what we saw last time: the objects'
        # descriptors and chunk tables from then are still right (no OST round trip)
        cacheable = not writable and st.get("writers") is False
        key = object_stamp(st)
        if cacheable and self.objects.take(ino, key, of):
            self.counters.add("object_cache_hits")
        else:
            if writable:
                self.objects.drop(ino)
            await self._open_objects(of)
            if cacheable:
                self.objects.put(ino, key, of)
        self._read_ahead_first(of)
        return of

    async def _open_on_mds(self, ino: int, writable: bool) -> dict:
        closes, self.closing = self.closing, []  # read-only closes ride along (see release)
        try:
            return await self.mds.call("open", ino=ino, client=self.client_id,
                                       writable=writable, **({"closes": closes} if closes else {}))
        except BaseException:
            self.closing[:0] = closes  # maybe not seen: again (a second close is a no-op)
            raise

    async def _open_objects(self, of: OpenFile):
        """Each OST's descriptor of the object (same host) and its chunk table."""
        ino = of.ino
        try:
            for idx in sorted(set(of.layout.osts)):
                ost = await self.ost(idx)
                if self.ost_local.get(idx):
                    res, fds = await ost.call("open_object", want_fds=True, ino=ino, create=True)
                    of.fds[idx] = fds[0] if fds else None
                    for extra in fds[1:]:
                        os.close(extra)
                else:
                    res = {"table": await ost.call("table", ino=ino)}
                    of.fds[idx] = None
                of.tables[idx] = {int(s): tuple(v) for s, v in res["table"].items()}
        except BaseException:
            self._close_fds(of)
            await self.mds.call("close", handle=of.handle)
            raise

    def _read_ahead_first(self, of: OpenFile):
        """Start the disk read of the first chunk while the kernel turns the open
        around: a reader that opens a file reads its beginning next (small files whole)."""
        idx = of.layout.ost_of_chunk(0)
        fd = of.fds.get(idx)
        ent = of.tables.get(idx, {}).get(0)
        if fd is not None and ent and not of.writable:
            os.posix_fadvise(fd, of.layout.chunk_object_offset(0), min(ent[0], READ_AHEAD_OPEN),
                             os.POSIX_FADV_WILLNEED)

    def _close_fds(self, of: OpenFile):
        for fd in of.fds.values():
            if fd is not None:
                os.close(fd)
        of.fds.clear()

    def _local_size(self, ino: int, size: int) -> int:
        """Unflushed writes through this client are newer than the MDS's size."""
        fhs = self.writers.get(ino)
        if fhs:
            size = max([size] + [self.files[fh].size for fh in fhs])
        return size

    def _register(self, of: OpenFile) -> int:
        fh = next(self._fh)
        self.files[fh] = of
        if of.writable:
            self.writers.setdefault(of.ino, set()).add(fh)
        return fh

    @fuse_errors
    async def open(self, inode, flags, ctx):
        if inode == CTL_INO:
            return pyfuse3.FileInfo(fh=0, keep_cache=False)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        of = await self._open_file(inode, writable)
        if flags & os.O_TRUNC and of.size:
            await self._truncate(inode, 0)
            of.size = 0
            of.st["s3_size"] = 0
            of.tables = {k: {} for k in of.tables}
            a = await self.mds.call("setattr", ino=inode, fields={"size": 0})
            of.st["size"] = a["size"]
        fh = self._register(of)
        # close-to-open: pages cached from an older version of the file must go
        prev = self.seen_version.get(inode)
        keep = prev is None or prev == of.st["dv"]
        self.seen_version[inode] = of.st["dv"]
        if not keep:
            self.counters.add("stale_cache_drops")
            await trio.to_thread.run_sync(invalidate_inodes, [inode], True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @fuse_errors
    async def create(self, parent, name, mode, flags, ctx):
        a = await self.mds.call("create", parent=parent, name=bytes(name), mode=mode,
                                uid=ctx.uid, gid=ctx.gid)
        of = await self._open_file(a["ino"], True)
        fh = self._register(of)
        return pyfuse3.FileInfo(fh=fh), self._entry(a)

    async def _hydrate(self, of: OpenFile, idx: int, chunks: list[int], prefetch: bool = False):
        ost = await self.ost(idx)
        async with self.hydrate_limit:
            for attempt in range(50):  # an OST that is still starting answers EAGAIN
                try:
                    got = await ost.call("hydrate", desc=of.desc, chunks=chunks,
                                         prefetch=prefetch)
                    break
                except RpcError as e:
                    if e.errno != errno.EAGAIN or attempt == 49:
                        raise
                    await trio.sleep(0.1)
        self.counters.add("hydrate_calls")
        for s, ent in got.items():  # a stripe row's chunks land on their own OSTs
            s = int(s)
            of.tables.setdefault(of.layout.ost_of_chunk(s), {})[s] = tuple(ent)

    async def _prefetch_from(self, of: OpenFile, idx: int, chunks: list[int]):
        """A background task: it must never raise, or it would take the mount down."""
        try:
            await self._hydrate(of, idx, chunks, prefetch=True)
            self.counters.add("prefetched_chunks", len(chunks))
        except Exception as e:
            log.info("prefetch of inode %d chunks %s from OST %d failed: %s", of.ino, chunks,
                     idx, e)
        finally:
            for s in chunks:
                done = of.prefetching.pop(s, None)
                if done is not None:
                    done.set()

    def _prefetch(self, of: OpenFile, chunks: list[int]):
        """One GET per run of adjacent chunks, whichever OSTs hold them: the run's
        fetcher hands the other OSTs their chunks (1 MiB GETs cost far more per byte)."""
        by_ost: dict[int, list[int]] = {}
        for run in of.layout.get_runs(chunks, GET_SPAN):
            by_ost.setdefault(of.layout.fetcher_of_run(run, GET_SPAN), []).extend(run)
        for s in chunks:
            of.prefetching[s] = trio.Event()
        for idx, ss in by_ost.items():
            self.nursery.start_soon(self._prefetch_from, of, idx, ss)

    def _maybe_prefetch(self, of: OpenFile, s: int):
        """Keep a sequential reader PREFETCH_CHUNKS ahead, topped up half a window at a
        time so that OSTs can fetch runs of adjacent chunks with one GET each."""
        last = of.layout.chunk_count(of.size)
        if of.prefetch_end <= s:
            of.prefetch_end = s + 1
        if of.prefetch_end - s > PREFETCH_CHUNKS // 2 or of.prefetch_end >= last:
            return
        stop = min(s + 1 + PREFETCH_CHUNKS, last)
        want = [c for c in range(of.prefetch_end, stop)
                if c not in of.prefetching and of.from_s3(c)
                and c not in of.tables.get(of.layout.ost_of_chunk(c), {})]
        of.prefetch_end = stop
        if want and self.nursery is not None:
            self._prefetch(of, want)
        # chunks already on local disk: let the kernel read them ahead too
        for c in range(s + 1, min(s + 3, last)):
            idx = of.layout.ost_of_chunk(c)
            ent = of.tables.get(idx, {}).get(c)
            fd = of.fds.get(idx)
            if ent and fd is not None:
                os.posix_fadvise(fd, of.layout.chunk_object_offset(c), ent[0],
                                 os.POSIX_FADV_WILLNEED)

    async def _chunk(self, of: OpenFile, s: int) -> bytes:
        """The verified bytes of chunk ``s`` as held by its OST (may be shorter than
        the stripe: the rest is a hole)."""
        if of.cache[0] == s:
            return of.cache[1]
        idx = of.layout.ost_of_chunk(s)
        ent = of.tables.get(idx, {}).get(s)
        self.counters.add("chunk_hits" if ent is not None else "chunk_misses")
        if ent is None:
            if not of.from_s3(s):
                return b""  # never written, not in S3: a hole
            if of.st["hsm"] & hsm.LOST:  # Lustre refuses the implicit restore (sanity-hsm 25a)
                log.error("inode %d is lost_from_hsm: chunk %d cannot be fetched", of.ino, s)
                raise pyfuse3.FUSEError(errno.EIO)
            pending = of.prefetching.get(s)
            if pending is not None:  # its GET is on the way (maybe by another OST)
                self.counters.add("prefetch_waits")
                await pending.wait()
                ent = of.tables.get(idx, {}).get(s)
            if ent is None:
                await self._hydrate(of, idx, [s])
                ent = of.tables[idx][s]
        length, xxh = ent
        data = await self._read_object(of, idx, of.layout.chunk_object_offset(s), length)
        if checksum(data) != xxh:
            self.counters.add("checksum_failures")
            log.error("checksum mismatch in inode %d chunk %d (OST %d); asking the OST", of.ino,
                      s, idx)
            ost = await self.ost(idx)
            clean = of.from_s3(s) and not of.st["hsm"] & hsm.DIRTY and s not in of.written
            ent = tuple(await ost.call("verify", desc=of.desc, s=s, refetch=clean))
            of.tables[idx][s] = ent
            data = await self._read_object(of, idx, of.layout.chunk_object_offset(s), ent[0])
            if checksum(data) != ent[1]:
                raise pyfuse3.FUSEError(errno.EIO)
        of.cache = (s, data)
        of.verified.add(s)
        return data

    def _verified_range(self, of: OpenFile, s: int, idx: int, obj_off: int, n: int):
        """Bytes of a chunk already checked in this open: read just the range asked for
        (random 4 KiB reads must not re-read and re-hash a whole stripe). None if the
        chunk is not verified here or its bytes went away (released meanwhile)."""
        if of.cache[0] == s:
            within = obj_off - of.layout.chunk_object_offset(s)
            return of.cache[1][within:within + n]
        fd = of.fds.get(idx)
        if s not in of.verified or fd is None:
            return None
        length = of.tables[idx][s][0]
        want = max(0, min(n, of.layout.chunk_object_offset(s) + length - obj_off))
        data = os.pread(fd, want, obj_off) if want else b""
        if len(data) < want:  # punched under us: verify (and fetch) afresh
            of.verified.discard(s)
            return None
        self.counters.add("bytes_from_ost", len(data))
        return data

    async def _read_object(self, of: OpenFile, idx: int, offset: int, length: int) -> bytes:
        fd = of.fds.get(idx)
        if fd is not None:
            data = pread_cached(fd, length, offset)  # page-cache hot: cheaper inline
            if len(data) < length:  # not cached (or EOF): the disk must not stall the loop
                self.counters.add("object_reads_uncached")
                data += await trio.to_thread.run_sync(os.pread, fd, length - len(data),
                                                      offset + len(data))
        else:
            ost = await self.ost(idx)
            data = await ost.call("read", ino=of.ino, offset=offset, length=length)
        if len(data) < length:
            data += bytes(length - len(data))
        self.counters.add("bytes_from_ost", length)
        return data

    @fuse_errors
    async def read(self, fh, off, size):
        if fh == 0:
            return b""
        of = self.files[fh]
        end = min(off + size, of.size)
        if off >= end:
            return b""
        self.counters.add("reads")
        # sequential = this read continues the previous one (a lone first read is not)
        of.seq_reads = of.seq_reads + 1 if off == of.next_seq else 0
        sequential = of.seq_reads >= 2
        of.next_seq = end
        out = []
        for s, idx, obj_off, n in of.layout.pieces(off, end - off):
            piece = self._verified_range(of, s, idx, obj_off, n)
            if piece is None:
                data = await self._chunk(of, s)
                within = obj_off - of.layout.chunk_object_offset(s)
                piece = data[within:within + n]
            if len(piece) < n:
                piece += bytes(n - len(piece))
            out.append(piece)
            if sequential:  # after the data this read waits for, not before
                self._maybe_prefetch(of, s)
        self.counters.add("bytes_read", end - off)
        return b"".join(out) if len(out) > 1 else out[0]

    @fuse_errors
    async def write(self, fh, off, buf):
        of = self.files[fh]
        pos = 0
        for s, idx, obj_off, n in of.layout.pieces(off, len(buf)):
            ost = await self.ost(idx)
            ent = await ost.call("write", desc=of.desc, s=s, offset=obj_off,
                                 data=bytes(buf[pos:pos + n]))
            of.tables.setdefault(idx, {})[s] = tuple(ent)
            of.written.add(s)
            for f in self.files.values():
                if f.ino == of.ino:
                    f.verified.discard(s)
                    if f.cache[0] == s:
                        f.cache = (-1, b"")
            pos += n
        of.size = max(of.size, off + len(buf))
        of.dirty = True
        for other in self.files.values():  # other handles of this inode see the new bytes
            if other is not of and other.ino == of.ino:
                other.size = max(other.size, of.size)
                other.cache = (-1, b"")
                for idx, t in of.tables.items():
                    other.tables.setdefault(idx, {}).update(t)
        self.counters.add("bytes_written", len(buf))
        return len(buf)

    async def _commit(self, of: OpenFile):
        """Tell the MDS about written data (size, chunks, DIRTY)."""
        if not of.dirty:
            return
        of.dirty = False
        a = await self.mds.call("written", ino=of.ino, size=of.size, chunks=sorted(of.written),
                                mtime_ns=time.time_ns())
        of.st["hsm"] = hsm.after_write(of.st["hsm"])
        self.seen_version[of.ino] = a["dv"]

    @fuse_errors
    async def flush(self, fh):
        if fh in self.files:
            await self._commit(self.files[fh])

    @fuse_errors
    async def fsync(self, fh, datasync):
        of = self.files.get(fh)
        if of is None:
            return
        for idx in set(of.layout.osts):
            ost = await self.ost(idx)
            await ost.call("fsync", ino=of.ino)
        await self._commit(of)

    @fuse_errors
    async def release(self, fh):
        of = self.files.pop(fh, None)
        if of is None:
            return
        try:
            await self._commit(of)
        finally:
            if of.writable:
                fhs = self.writers.get(of.ino)
                if fhs:
                    fhs.discard(fh)
                    if not fhs:
                        del self.writers[of.ino]
            self._close_fds(of)
            if of.writable or self.nursery is None:
                await self.mds.call("close", handle=of.handle)
            else:  # read-only: kept for a re-open while the lease holds; else the MDS hears
                # of it with our next open, or within CLOSE_DELAY
                self._queue_closes(self.leases.put_open(of.ino, of.lease, of.handle, of.st))

    def _queue_closes(self, handles: list[int]):
        if handles:
            self.closing.extend(handles)
            self.closes_due.set()

    async def _close_sender(self):
        """Tell the MDS about read-only closes no open carried along (a background task:
        it never raises). Writable handles close synchronously (size, trim, writers)."""
        while True:
            await self.closes_due.wait()
            self.closes_due = trio.Event()
            await trio.sleep(CLOSE_DELAY)
            if not await self.flush_closes():
                await trio.sleep(KEEPALIVE)  # the MDS is away: its restart forgets them
                self.closes_due.set()

    async def flush_closes(self) -> bool:
        """Send pending read-only closes now (before anything that depends on the MDS
        knowing a file is no longer open here: release, unlink, rename)."""
        if not self.closing:
            return True
        handles, self.closing = self.closing, []
        try:
            await self.mds.call("close", handle=handles[0], more=handles[1:], timeout=10)
        except (RpcError, OSError, trio.TooSlowError) as e:
            log.info("closing %d handles on the MDS: %s; will retry", len(handles), e)
            self.closing[:0] = handles  # handles are never reused: a repeat is harmless
            return False
        self.counters.add("batched_closes", len(handles))
        return True

    # -- extended attributes and the control plane --------------------------

    async def _info(self, ino: int) -> dict:
        return await self.mds.call("info", ino=ino)

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        name = bytes(name)
        if name.startswith(PASSTHROUGH_PREFIXES):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if inode == CTL_INO:
            return await self._ctl_get(name)
        if name == b"lustrefuse.info":
            return json.dumps(await self._info(inode)).encode()
        if name == b"trusted.hsm":
            info = await self._info(inode)
            return struct.pack("<IIQQ", 0, info["hsm"]["flags"], info["hsm"]["archive_id"], 0)
        if name in (b"lustre.lov", b"trusted.lov"):
            info = await self._info(inode)
            if not info["layout"]:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return lov_bytes(inode, info["layout"])
        if name == b"lustrefuse.hsm_state":
            info = await self._info(inode)
            return " ".join(hsm.state_words(info["hsm"]["flags"])).encode()
        try:
            return await self.mds.call("getxattr", ino=inode, name=name)
        except RpcError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    async def _ctl_get(self, name: bytes) -> bytes:
        if name == b"lustrefuse.df":
            st = await self.mds.call("statfs")
            st["mount"] = self.mountpoint
            return json.dumps(st).encode()
        if name == b"lustrefuse.stats":
            return json.dumps(await self.collect_stats()).encode()
        if name == b"lustrefuse.data_dir":
            return (self.data_dir or "").encode()
        if name.startswith(b"lustrefuse.fid2path."):
            return await self.mds.call("fid2path", fid=name[len(b"lustrefuse.fid2path."):].decode())
        if name == b"lustrefuse.hsm_list":
            return json.dumps(await self.mds.call("hsm_list", all=True)).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def collect_stats(self) -> dict:
        out = {"client": dict(self.counters), "mds": await self.mds.call("stats"), "osts": {}}
        total = {"s3_requests": out["mds"].get("s3_requests", 0),
                 "s3_gets": out["mds"].get("s3_gets", 0),
                 "s3_bytes_in": out["mds"].get("s3_bytes_in", 0)}
        for idx in sorted(self.osts):
            try:
                s = await self.osts[idx].call("stats", timeout=5)
            except RpcError as e:
                s = {"error": str(e)}
            out["osts"][str(idx)] = s
            for k in total:
                total[k] += s.get(k, 0)
        total["bytes_served_from_osts"] = self.counters.get("bytes_from_ost", 0)
        out["total"] = total
        return out

    @fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        name = bytes(name)
        value = bytes(value)
        if inode == CTL_INO:
            return await self._ctl_set(name, value, ctx)
        if name in (b"trusted.hsm", b"lustrefuse.info"):
            return  # as Lustre: state is changed by requests, not by writing the xattr
        if name in (b"lustre.lov", b"trusted.lov"):
            spec = lov_spec(value)
            try:
                await self.mds.call("setstripe", ino=inode, spec=spec.to_dict(), uid=ctx.uid)
            except RpcError as e:
                if e.errno != errno.EEXIST:  # tar/rsync restoring onto a laid-out file
                    raise
            return
        if name == b"lustrefuse.hsm_request":
            await self._request(ctx, value.decode().strip(), [inode], 0)
            return
        if name.startswith(b"lustrefuse."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if name.startswith(PASSTHROUGH_PREFIXES):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        await self.mds.call("setxattr", ino=inode, name=name, value=value)

    async def _request(self, ctx, action: str, inos: list[int], archive_id: int):
        action = action.lower()
        if action not in ("archive", "restore", "release", "remove", "cancel"):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if action == "restore" and ctx.uid != 0:
            for ino in inos:  # anyone who may read a file may restore it (Lustre's mask)
                a = await self.mds.call("getattr", ino=ino)
                if not may_read(a, ctx.uid, ctx.gid):
                    raise pyfuse3.FUSEError(errno.EACCES)
            uid = 0
        else:
            uid = ctx.uid
        await self.flush_closes()  # a file closed here is not open to a release
        await self.mds.call("hsm_request", action=action, inos=inos, uid=uid,
                            archive_id=archive_id)
        if action == "release":  # the next read must fetch again, not hit old pages
            await trio.to_thread.run_sync(invalidate_inodes, inos, False)

    async def _ctl_set(self, name: bytes, value: bytes, ctx):
        try:
            req = json.loads(value) if value else {}
        except ValueError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if not isinstance(req, dict):
            raise pyfuse3.FUSEError(errno.EINVAL)
        inos = req.get("inos", [])
        if not isinstance(inos, list) or not all(isinstance(i, int) for i in inos):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if name == b"lustrefuse.request":
            await self._request(ctx, str(req.get("action", "")), inos,
                                int(req.get("archive_id") or 0))
        elif name == b"lustrefuse.hsm_set":
            for ino in inos:
                await self.mds.call("hsm_set", ino=ino, set=int(req.get("set", 0)),
                                    clear=int(req.get("clear", 0)), uid=ctx.uid,
                                    archive_id=int(req.get("archive_id") or 0))
        elif name == b"lustrefuse.setstripe":
            spec = req.get("spec")
            await self.mds.call("setstripe", ino=int(req["ino"]), spec=spec, uid=ctx.uid)
        elif name == b"lustrefuse.drop_leases":  # Lustre's lru_size=clear: cold metadata
            if ctx.uid != 0:
                raise pyfuse3.FUSEError(errno.EPERM)
            self._queue_closes(self.leases.drop_all())
        else:
            raise pyfuse3.FUSEError(errno.EINVAL)

    @fuse_errors
    async def listxattr(self, inode, ctx):
        if inode == CTL_INO:
            return []
        return await self.mds.call("listxattr", ino=inode)

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        name = bytes(name)
        if inode == CTL_INO or name.startswith(b"lustrefuse."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            await self.mds.call("removexattr", ino=inode, name=name)
        except RpcError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    async def forget(self, inode_list):
        return


def pread_cached(fd: int, length: int, offset: int) -> bytes:
    """What of ``[offset, offset+length)`` the page cache holds, without waiting for the
    disk (``RWF_NOWAIT``): a short answer means "not cached" or EOF."""
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return b""
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        return os.pread(fd, length, offset)  # a filesystem without RWF_NOWAIT
    del buf[n:]
    return buf


def object_cache_fds() -> int:
    """Descriptors the object cache may hold: a quarter of our limit, at most 4096."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, min(4096, soft // 4)) if soft != resource.RLIM_INFINITY else 4096


def _cookie(row) -> int:
    return row[0]


def invalidate_inodes(inos: list[int], attr_only: bool):
    """Drop the kernel's cached attributes (and, unless ``attr_only``, pages) of
    ``inos``: one thread hop for a whole batch (a hop costs ~0.4 ms)."""
    for ino in inos:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=attr_only)
        except OSError:
            pass  # the kernel does not know the inode: nothing cached


def invalidate_entries(names: list):
    """Drop the kernel's dentries for (directory, name) pairs: may wait for the
    directory's lock, so never on the event loop."""
    for parent, name in names:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError:
            pass  # not cached by the kernel


def may_read(a: dict, uid: int, gid: int) -> bool:
    mode = a["mode"]
    if uid == a["uid"]:
        return bool(mode & stat.S_IRUSR)
    if gid == a["gid"]:
        return bool(mode & stat.S_IRGRP)
    return bool(mode & stat.S_IROTH)


LOV_MAGIC_V1 = 0x0BD10BD0
LOV_PATTERN_RAID0 = 0x1
LOV_PATTERN_F_RELEASED = 0x80000000


def lov_bytes(ino: int, lay: dict) -> bytes:
    """struct lov_user_md_v1 for ``lustre.lov`` (reference §2.7)."""
    pattern = LOV_PATTERN_RAID0 | (LOV_PATTERN_F_RELEASED if lay["released"] else 0)
    seq, oid = 0x200000400 + (ino >> 32), ino & 0xFFFFFFFF
    out = struct.pack("<IIQQIHH", LOV_MAGIC_V1, pattern, oid, seq, lay["stripe_size"],
                      lay["stripe_count"], lay["gen"])
    for o in lay["osts"]:
        out += struct.pack("<QQII", ino, 0, 0, o)
    return out


def lov_spec(value: bytes) -> StripeSpec:
    if len(value) < 32:
        raise pyfuse3.FUSEError(errno.EINVAL)
    magic, _pattern, _oid, _seq, size, count, offset = struct.unpack("<IIQQIHH", value[:32])
    if magic != LOV_MAGIC_V1:
        raise pyfuse3.FUSEError(errno.EINVAL)
    return StripeSpec(size, -1 if count == 0xFFFF else count,
                      -1 if offset == 0xFFFF else offset)


async def serve(fs: Filesystem, mountpoint: str, options: set, notify=None):
    """Mount and run until unmounted or SIGTERM/SIGINT."""
    import signal

    fs.mountpoint = os.path.abspath(mountpoint)
    pyfuse3.init(fs, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:
            await fs.start(nursery)

            async def on_signal():
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for _ in sigs:
                        log.info("signal received; unmounting")
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            if notify:
                nursery.start_soon(trio.to_thread.run_sync, notify)
            await pyfuse3.main(min_tasks=4, max_tasks=128)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)

