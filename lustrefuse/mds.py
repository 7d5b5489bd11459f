"""The metadata server: namespace RPCs, open tracking, OST registry, import, HSM.

One process owns the SQLite namespace (``DATA_DIR/mds.db``) and an exclusive
lock on ``DATA_DIR/mds.lock`` so a second MDS on the same directory refuses
to start. Clients and OSTs reach it over ``unix:DATA_DIR/mds.sock`` (or TCP
with a shared secret).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import hsm, leases, rpc
from .coordinator import Coordinator
from .importer import Importer
from .layout import Layout, LayoutError, StripeSpec, format_fid, parse_fid
from .namespace import ROOT, Namespace, bitmap_has
from .protocol import RpcError
from .repository import DataRepository
from .s3 import Repository, S3Error

log = logging.getLogger(__name__)

REPLAY_GRACE = 30.0  # seconds clients have to re-open their files after an MDS restart

class LockedError(SystemExit):
    pass


def take_lock(path: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockedError(f"another MDS is already running on {os.path.dirname(path)}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Mds:
    def __init__(self, data_dir: str, config: dict):
        self.data_dir = data_dir
        self.config = config
        self.fsname = config.get("fsname", "lustrefuse")
        # before the namespace: its triggers report here. Lease numbers start from the
        # time (as handles): clients compare them with what a previous MDS granted
        self.leases = leases.LeaseTable(first_seq=time.time_ns() // 1000)
        self.ns = Namespace(os.path.join(data_dir, "mds.db"), config["osts"],
                            config["stripe_size"], on_change=self.leases.changed)
        self.repo = None
        if config.get("bucket"):
            self.repo = Repository(config["bucket"], config.get("endpoint_url"))
        self.prefix = config.get("prefix", "")
        self.osts: dict[int, rpc.Client] = {}
        self.ost_addrs: dict[int, str] = {}
        for idx, addr in (self.ns.meta_get("ost_addrs", {}) or {}).items():
            self._add_ost(int(idx), addr)
        self.lock = threading.Lock()
        self.releasing: set[int] = set()  # inodes a release is punching: opens wait
        self.release_done = threading.Condition(self.lock)
        # open tracking: handle -> (client, ino, writable)
        self.opens: dict[int, tuple[str, int, bool]] = {}
        self.open_count: dict[int, int] = {}
        self.writer_count: dict[int, int] = {}  # ino -> handles open for write (no scans)
        self.clients: set[str] = set()
        # handles are never reused, not even across restarts: a close that a client sent
        # to the MDS before a restart (or repeats) cannot close a handle of the new one
        self._handles = iter(range(time.time_ns() >> 6, 1 << 62))
        self.importer: Importer | None = None
        self.import_thread: threading.Thread | None = None
        self.bg = ThreadPoolExecutor(4, thread_name_prefix="mds-bg")
        self.coordinator = Coordinator(self)
        self.datarepo = DataRepository(self)
        self._auto_import = threading.Event()
        self._stopping = threading.Event()

    # -- OSTs --------------------------------------------------------------

    def _add_ost(self, idx: int, addr: str):
        self.ost_addrs[idx] = addr
        self.osts[idx] = rpc.Client(addr, self.config.get("secret"), timeout=600)

    def ost(self, idx: int) -> rpc.Client:
        c = self.osts.get(idx)
        if c is None:
            raise RpcError(errno.EIO, f"OST {idx} has not registered")
        return c

    def h_register_ost(self, peer, index: int, address: str):
        if address.startswith("tcp:0.0.0.0:") and peer.host:  # listening on every address:
            address = f"tcp:{peer.host}:{address.rsplit(':', 1)[1]}"  # advertise the one we see
        if not 0 <= index < self.config["osts"]:
            raise RpcError(errno.EINVAL, f"OST index {index} is outside 0..{self.config['osts'] - 1}")
        with self.lock:
            self._add_ost(index, address)
            self.ns.meta_set("ost_addrs", {str(k): v for k, v in self.ost_addrs.items()})
        log.info("OST %d registered at %s", index, address)
        return self.repo_config()

    def repo_config(self) -> dict:
        return {k: self.config.get(k) for k in ("bucket", "endpoint_url", "prefix")}

    def h_config(self, peer):
        return {"osts": {str(k): v for k, v in self.ost_addrs.items()},
                "ost_count": self.config["osts"], "fsname": self.fsname,
                "stripe_size": self.config["stripe_size"], **self.repo_config()}

    def h_ping(self, peer):
        return {"pid": os.getpid(), "osts": len(self.ost_addrs)}

    # -- sessions and opens -----------------------------------------------

    def h_hello(self, peer, client: str):
        """Bind a client's session to this connection: when it closes, its opens go."""
        peer.state["client"] = client
        with self.lock:
            self.clients.add(client)
        return {"fsname": self.fsname}

    def on_disconnect(self, peer):
        client = peer.state.get("client")
        if not client:
            return
        self.leases.drop_client(client)
        with self.lock:
            self.clients.discard(client)
            gone = [h for h, (c, _i, _w) in self.opens.items() if c == client]
        for h in gone:
            self._close(h, clean=False)
        log.info("client %s disconnected; %d open files dropped", client, len(gone))

    def is_open(self, ino: int, writers_only: bool = False) -> bool:
        with self.lock:
            if writers_only:
                return self.writer_count.get(ino, 0) > 0
            return self.open_count.get(ino, 0) > 0

    def h_open(self, peer, ino: int, client: str, writable: bool = False,
               closes: list | None = None):
        """Open ``ino`` for ``client``; ``closes``: handles it closed meanwhile (read-only
        closes ride along with the next open, see ``h_close``). The reply says whether
        anyone has the file open for write (a client may then not reuse cached tables),
        and ``lease``: read-only, nobody writing, the client may keep the handle after
        its close and re-open from it (see leases.py)."""
        since = self.leases.changes
        st = self.ns.file_state(ino)
        if writable:
            self.ns.note_writer(ino, True)
        waited = False
        with self.lock:
            while ino in self.releasing:  # its data is being punched: wait for the release
                self.release_done.wait(1.0)
                waited = True
            h = next(self._handles)
            self.opens[h] = (client, ino, writable)
            self.open_count[ino] = self.open_count.get(ino, 0) + 1
            if writable:
                self.writer_count[ino] = self.writer_count.get(ino, 0) + 1
            writers = self.writer_count.get(ino, 0) > 0
        if waited:  # released meanwhile: the state read above is out of date
            st = self.ns.file_state(ino)
        st["handle"] = h
        st["writers"] = writers
        if writable:  # cached opens elsewhere would skip the MDS and reuse stale tables
            self.leases.revoke_and_wait([ino])
        st["lease"] = 0 if writers or waited else self.leases.grant(client, [ino], since)
        for c in closes or ():  # after the open: never the last close of this inode
            self._close(int(c))
        return st

    def h_file_state(self, peer, ino: int):
        return self.ns.file_state(ino)

    def _close(self, handle: int, clean: bool = True):
        with self.lock:
            entry = self.opens.pop(handle, None)
            if entry is None:
                return
            _client, ino, writable = entry
            self.open_count[ino] -= 1
            last = self.open_count[ino] == 0
            if last:
                del self.open_count[ino]
            if writable:
                self.writer_count[ino] -= 1
                if not self.writer_count[ino]:
                    del self.writer_count[ino]
            writers_left = self.writer_count.get(ino, 0) > 0
        if writable and not clean:
            self.trim(ino)  # the client died: what it never flushed is not the file's
        if writable and not writers_left:
            self.ns.note_writer(ino, False)
        if last and self.ns.nlink(ino) == 0:
            self._destroy(ino)

    def trim(self, ino: int):
        """Cut a file's OST objects to the size the MDS acknowledged (Lustre's orphan
        cleanup after a client eviction): unflushed bytes past EOF must not reappear."""
        try:
            st = self.ns.file_state(ino)
        except RpcError:
            return
        if not st["layout"]:
            return
        desc = {"ino": ino, "layout": st["layout"], "s3_key": st["s3_key"], "etag": st["etag"],
                "s3_size": st["s3_size"] or 0, "size": st["size"]}
        for idx in sorted(set(st["layout"]["osts"])):
            try:  # after an MDS restart the OSTs may still be coming up: wait for them
                self.coordinator.ost_call(idx, "truncate", desc=desc, size=st["size"])
            except (OSError, RpcError) as e:
                log.error("cannot trim inode %d on OST %d: %s", ino, idx, e)

    def h_close(self, peer, handle: int, more: list | None = None):
        """Close one handle, or a batch (``more``): unknown handles are no-ops."""
        self._close(handle)
        for h in more or ():
            self._close(int(h))

    def _destroy(self, ino: int):
        """Free an inode nobody names or holds open, and its OST objects."""
        try:
            st = self.ns.file_state(ino)
        except RpcError:
            return
        self.ns.destroy(ino)
        lay = st.get("layout")
        if lay:
            for idx in set(lay["osts"]):
                self.bg.submit(self._ost_call, idx, "destroy", ino=ino)

    def _ost_call(self, idx: int, op: str, **args):
        try:
            return self.ost(idx).call(op, **args)
        except (OSError, RpcError) as e:
            log.warning("OST %d %s failed: %s", idx, op, e)

    # -- namespace ---------------------------------------------------------

    def _leased(self, client: str | None, read) -> dict:
        """``read()``'s attributes, with a lease on them for ``client`` (0: none). The
        change count is taken before the read: a change in between refuses the lease."""
        since = self.leases.changes
        a = read()
        a["lease"] = self.leases.grant(client, [a["ino"]], since)
        return a

    def h_getattr(self, peer, ino: int, client: str | None = None):
        """``client``: a mount asking for a lease on the attributes (see leases.py)."""
        return self._leased(client, lambda: self.ns.getattr(ino))

    def h_lookup(self, peer, parent: int, name: bytes, client: str | None = None):
        """``client``: as getattr; the lease covers the name too."""
        return self._leased(client, lambda: self.ns.lookup(parent, name))

    def h_lease_poll(self, peer, client: str, acks: list | None = None,
                     closes: list | None = None, wait: float = leases.POLL_WAIT):
        """A mount's long poll on its session: its answers to revokes (and the cached
        handles it closed for them), then the revokes for it, within ``wait`` s."""
        if peer.state.get("client") != client:  # a new connection: say hello (and replay)
            raise RpcError(errno.ENOTCONN, "no session on this connection")
        for h in closes or ():  # before the answers: a release waits for these closes
            self._close(int(h))
        return self.leases.poll(client, [(int(i), int(q)) for i, q in acks or ()],
                                max(0.0, min(float(wait), 30.0)))

    def lease_loop(self):
        """Revoke leases on what changed outside a request (imports, the coordinator,
        closes of disconnected clients): nobody waits for those answers."""
        while not self._stopping.is_set():
            self.leases.revoke_dirty(1.0)

    def h_readdir(self, peer, ino: int, after: int = 0, limit: int = 1000, rows: bool = False):
        """One page of a directory (at most 5,000 entries); ``rows``: flat rows
        (cookie, name, *namespace.ATTR_COLS), the client's compact form."""
        limit = max(0, min(int(limit), 5000))  # never negative: LIMIT -1 is no limit
        if rows:
            return self.ns.readdir_rows(ino, int(after), limit)
        return self.ns.readdir(ino, int(after), limit)

    def h_readlink(self, peer, ino: int):
        return self.ns.readlink(ino)

    def h_create(self, peer, parent: int, name: bytes, mode: int, uid: int, gid: int,
                 rdev: int = 0):
        return self.ns.create(parent, name, mode, uid, gid, rdev)

    def h_mkdir(self, peer, parent: int, name: bytes, mode: int, uid: int, gid: int):
        a = self.ns.mkdir(parent, name, mode, uid, gid)
        self.datarepo.on_created(a["ino"])
        return a

    def h_symlink(self, peer, parent: int, name: bytes, target: bytes, uid: int, gid: int):
        a = self.ns.symlink(parent, name, target, uid, gid)
        self.datarepo.on_created(a["ino"])
        return a

    def _exported_key(self, parent: int, name: bytes) -> str | None:
        """The object key of an entry that has been exported (to delete it with it)."""
        ino = self.ns._child(parent, name)
        if ino is None:
            return None
        st = self.ns.file_state(ino)
        if stat.S_ISDIR(st["mode"]):
            return self.datarepo.key_of(ino, True)
        if stat.S_ISLNK(st["mode"]):
            return self.datarepo.key_of(ino)
        if st["s3_key"] and st["nlink"] <= 1:
            return st["s3_key"]
        return None

    def h_link(self, peer, ino: int, parent: int, name: bytes):
        return self.ns.link(ino, parent, name)

    def _maybe_destroy(self, ino: int | None):
        if ino is not None and self.ns.nlink(ino) == 0 and not self.is_open(ino):
            self._destroy(ino)

    def h_unlink(self, peer, parent: int, name: bytes):
        key = self._exported_key(parent, name) if self.datarepo.export_policy else None
        ino = self.ns.unlink(parent, name)
        self.datarepo.on_removed(key)
        self._maybe_destroy(ino)
        return ino

    def h_rmdir(self, peer, parent: int, name: bytes):
        key = self._exported_key(parent, name) if self.datarepo.export_policy else None
        ino = self.ns.rmdir(parent, name)
        self.datarepo.on_removed(key)
        self.ns.destroy(ino)
        return ino

    def h_rename(self, peer, parent: int, name: bytes, newparent: int, newname: bytes,
                 flags: int = 0):
        policy = self.datarepo.export_policy
        moved = self.ns._child(parent, name)
        old_key = None
        if policy and moved is not None:
            st = self.ns.file_state(moved)
            old_key = st["s3_key"] or self.datarepo.key_of(moved, stat.S_ISDIR(st["mode"]))
        replaced_key = self._exported_key(newparent, newname) if policy else None
        old = self.ns.rename(parent, name, newparent, newname, flags)
        if policy and moved is not None:
            if replaced_key and replaced_key != old_key:
                self.datarepo.on_removed(replaced_key)
            self.datarepo.on_renamed(moved, old_key)
        if old is not None:
            (mode,) = self.ns._row(old, "mode")
            if stat.S_ISDIR(mode):
                self.ns.destroy(old)
            else:
                self._maybe_destroy(old)
        return old

    def h_setattr(self, peer, ino: int, fields: dict):
        a = self.ns.setattr(ino, fields)
        if "size" in fields:
            self.datarepo.on_closed_after_write(ino)
        elif set(fields) & {"mode", "uid", "gid", "mtime_ns", "atime_ns"}:
            self.datarepo.on_metadata_changed(ino)
        return a

    def h_written(self, peer, ino: int, size: int, chunks: list, mtime_ns: int | None = None):
        self.ns.note_written(ino, size, [int(s) for s in chunks], mtime_ns)
        self.datarepo.on_closed_after_write(ino)
        return self.ns.getattr(ino)

    # -- data repository tasks ---------------------------------------------

    def h_task_start(self, peer, kind: str, paths: list | None = None,
                     older_than_days: float | None = None):
        return self.datarepo.start_task(kind, list(paths or []), older_than_days)

    def h_task_list(self, peer):
        return self.datarepo.list_tasks()

    def h_task_cancel(self, peer, id: int):
        return self.datarepo.cancel_task(int(id))

    def h_getxattr(self, peer, ino: int, name: bytes):
        return self.ns.getxattr(ino, name)

    def h_listxattr(self, peer, ino: int):
        return self.ns.listxattr(ino)

    def h_setxattr(self, peer, ino: int, name: bytes, value: bytes, flags: int = 0):
        return self.ns.setxattr(ino, name, value, flags)

    def h_removexattr(self, peer, ino: int, name: bytes):
        return self.ns.removexattr(ino, name)

    def h_statfs(self, peer):
        osts = []
        for idx in sorted(self.osts):
            try:
                osts.append(self.ost(idx).call("statfs", timeout=5))
            except (OSError, RpcError) as e:
                osts.append({"index": idx, "error": str(e)})
        st = os.statvfs(self.data_dir)
        used = self.ns.counts()["inodes"]
        mdt = {"index": 0, "blocks": st.f_blocks * st.f_frsize, "bfree": st.f_bfree * st.f_frsize,
               "bavail": st.f_bavail * st.f_frsize, "files": max(st.f_files, used),
               "ffree": max(st.f_files - used, 0)}
        return {"fsname": self.fsname, "mdts": [mdt], "osts": osts}

    # -- chunk presence ------------------------------------------------------

    def h_chunks_present(self, peer, ost: int, chunks: dict):
        for ino, ss in chunks.items():
            self.ns.mark_present(int(ino), [int(s) for s in ss])

    # -- Lustre views -----------------------------------------------------

    def h_info(self, peer, ino: int):
        st = self.ns.file_state(ino)
        mode = st["mode"]
        kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
                else "link" if stat.S_ISLNK(mode) else "other")
        info = {"fid": format_fid(ino), "ino": ino, "type": kind,
                "hsm": {"flags": st["hsm"], "archive_id": st["archive_id"]},
                "action": self.coordinator.current_action(ino, st),
                "size": st["size"], "mtime": st["mtime_ns"] / 1e9, "atime": st["atime_ns"] / 1e9,
                "ctime": st["ctime_ns"] / 1e9, "layout": None, "dir_default": None,
                "defaults": {"stripe_size": self.config["stripe_size"], "stripe_count": 1,
                             "stripe_offset": -1},
                "s3": {"key": st["s3_key"], "etag": st["etag"]}}
        if st["layout"]:
            lay = Layout.from_dict(st["layout"])
            released = bool(st["hsm"] & hsm.RELEASED)
            n = lay.chunk_count(st["size"])
            present = [s for s in range(n) if bitmap_has(st["present"], s)]
            info["layout"] = {
                "stripe_size": lay.stripe_size, "stripe_count": lay.stripe_count,
                "stripe_offset": lay.stripe_offset, "osts": list(lay.osts), "gen": lay.gen,
                "pattern": "raid0", "released": released,
                "objects": [{"ost": o, "objid": ino, "group": 0} for o in lay.osts]}
            info["chunks"] = n
            info["present"] = len(present)
            info["present_bytes"] = sum(lay.chunk_length(s, st["size"]) for s in present)
            info["present_by_ost"] = {str(o): sum(1 for s in present if lay.ost_of_chunk(s) == o)
                                      for o in lay.osts}
        if kind == "dir":
            raw = self.ns.dir_spec(ino)
            info["dir_default"] = raw.to_dict() if raw != StripeSpec() else None
        return info

    def h_fid2path(self, peer, fid: str):
        try:
            ino = parse_fid(fid)
        except ValueError as e:
            raise RpcError(errno.EINVAL, str(e)) from None
        return self.ns.path_of(ino)

    def h_setstripe(self, peer, ino: int, spec: dict | None, uid: int):
        st = self.ns.file_state(ino)
        if uid != 0 and uid != st["uid"]:
            raise RpcError(errno.EPERM, "only the owner may set a layout")
        s = StripeSpec.from_dict(spec)
        try:
            if stat.S_ISDIR(st["mode"]):
                from .layout import validate_spec
                validate_spec(s, self.config["osts"])
                self.ns.set_dir_spec(ino, None if s == StripeSpec() else s)
                return None
            if not stat.S_ISREG(st["mode"]):
                raise RpcError(errno.EINVAL, "not a file or directory")
            if st["size"] or st["data_version"] or st["s3_key"]:
                raise RpcError(errno.EEXIST, "stripe already set")
            from .layout import make_layout
            lay = make_layout(s.merged_over(self.ns.dir_spec(ROOT)), self.config["osts"],
                              self.ns._rr, self.config["stripe_size"])
        except LayoutError as e:
            raise RpcError(errno.EINVAL, str(e)) from None
        self.ns.set_layout(ino, lay)
        return lay.to_dict()

    # -- HSM ---------------------------------------------------------------

    def h_hsm_set(self, peer, ino: int, set: int = 0, clear: int = 0, uid: int = 0,
                  archive_id: int = 0):
        st = self.ns.file_state(ino)
        if uid != 0 and uid != st["uid"]:
            raise RpcError(errno.EPERM, "not the owner")
        try:
            new = hsm.change_flags(st["hsm"], set, clear, uid == 0)
        except hsm.HsmError as e:
            raise RpcError(e.errno, str(e)) from None
        aid = archive_id if archive_id and new & hsm.EXISTS else None
        self.ns.set_hsm(ino, new, aid)
        return new

    def h_hsm_request(self, peer, action: str, inos: list, uid: int = 0, archive_id: int = 0):
        return self.coordinator.request(action, [int(i) for i in inos], uid, archive_id)

    def h_hsm_list(self, peer, all: bool = False):
        return self.coordinator.list(all)

    def release(self, ino: int, wait_open: float = 1.0) -> int:
        """Drop a file's local data, keep its namespace (Lustre's synchronous release)."""
        return self.release_many([ino], 0, wait_open)

    def release_many(self, inos: list[int], uid: int = 0, wait_open: float = 1.0) -> int:
        """Release files as one request, all or nothing: every file is checked first
        (owner or root, regular, archived and clean, not open). Then, so that a crash
        at any point leaves no file marked released with its only copy gone and no
        presence bit for a punched chunk: one MDS transaction forgets the chunks, each
        OST punches all its objects in one call, one transaction marks them released.
        Returns the bytes freed."""
        inos = list(dict.fromkeys(inos))
        states = self.ns.release_states(inos)
        todo: list[int] = []
        by_ost: dict[int, list[int]] = {}
        osts_of: dict[str, list[int]] = {}  # layout JSON -> its OSTs (files share layouts)
        for ino in inos:
            mode, owner, flags, lay, present = states[ino]
            if uid != 0 and owner != uid:
                raise RpcError(errno.EPERM, "only the owner or root may release")
            if not stat.S_ISREG(mode):
                raise RpcError(errno.EINVAL, "not a regular file")
            try:
                if not hsm.release_check(flags) and not present:
                    continue  # released and nothing local: a no-op, as Lustre
            except hsm.HsmError as e:
                raise RpcError(e.errno, str(e)) from None
            todo.append(ino)
            if lay:
                osts = osts_of.get(lay)
                if osts is None:
                    osts = osts_of[lay] = sorted(set(json.loads(lay)["osts"]))
                for idx in osts:
                    by_ost.setdefault(idx, []).append(ino)
        if not todo:
            return 0
        self.leases.revoke_and_wait(todo)  # cached opens: closed by their clients' answers
        self._hold_for_release(todo, wait_open)
        try:
            self.ns.forget_present_many(todo)
            freed = self._punch_many(by_ost)
            self.ns.mark_released_many(todo)
        finally:
            with self.lock:
                self.releasing.difference_update(todo)
                self.release_done.notify_all()
        return freed

    def _hold_for_release(self, inos: list[int], wait_open: float):
        """EBUSY if one of the files stays open for ``wait_open`` seconds (a close() may
        still be on its way from the kernel); else hold off their opens until the
        release is done (h_open waits), in the same lock hold as the check."""
        deadline = time.monotonic() + wait_open
        with self.lock:
            while True:
                self.leases.revoke(inos)  # a re-open meanwhile may be cached again
                if any(self.open_count.get(i) for i in inos):
                    if time.monotonic() > deadline:
                        raise RpcError(errno.EBUSY, "file is open")
                elif not self.releasing.intersection(inos):  # else another release's
                    break
                self.release_done.wait(0.02)
            self.releasing.update(inos)

    def _punch_many(self, by_ost: dict[int, list[int]]) -> int:
        """One ``punch_many`` call per OST, the OSTs in parallel. Bytes freed."""
        freed, errors = [], []

        def one(idx: int, inos: list[int]):
            try:
                freed.append(self.ost(idx).call("punch_many", inos=inos,
                                                timeout=max(30.0, len(inos) / 500)) or 0)
            except (OSError, RpcError) as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=item) for item in list(by_ost.items())[1:]]
        for t in threads:
            t.start()
        for item in list(by_ost.items())[:1]:
            one(*item)  # the first OST on this thread
        for t in threads:
            t.join()
        if errors:
            e = errors[0]
            raise e if isinstance(e, RpcError) else RpcError(errno.EIO, f"punch failed: {e}")
        return sum(freed)

    def h_mark_lost(self, peer, ino: int, etag: str | None):
        """An OST found the archive copy changed or gone: LOST, until a re-import."""
        st = self.ns.file_state(ino)
        if st["etag"] == etag and st["hsm"] & hsm.ARCHIVED:
            self.ns.set_hsm(ino, st["hsm"] | hsm.LOST)

    def h_evict(self, peer, ost: int, inos: list, need: int):
        """Auto-release for an OST short of space: archived, clean, releasable files only."""
        released, freed = [], 0
        self.leases.revoke_and_wait([int(i) for i in inos])  # cached opens are not in use
        for ino in inos:
            if freed >= need:
                break
            try:
                st = self.ns.file_state(int(ino))
            except RpcError:
                continue
            flags = st["hsm"]
            if not stat.S_ISREG(st["mode"]) or not st["s3_key"] or not flags & hsm.ARCHIVED \
                    or flags & (hsm.DIRTY | hsm.NORELEASE | hsm.LOST) or self.is_open(st["ino"]):
                continue
            for idx in sorted(set(st["layout"]["osts"])):
                n = self.ost(idx).call("punch", ino=st["ino"]) or 0
                if idx == ost:
                    freed += n
            self.ns.mark_released(st["ino"])
            released.append(st["ino"])
            log.info("auto-released inode %d for OST %d", st["ino"], ost)
        return {"released": released, "freed": freed}

    # -- import --------------------------------------------------------------

    def drop_data(self, ino: int):
        """Empty a file's stripes on every OST now (an import found its object changed)."""
        for idx in sorted(self.osts):
            self._ost_call(idx, "punch", ino=ino)

    def on_object_changed(self, ino: int):
        """An import found the object changed or deleted: drop stale stripes."""
        if self.ns.nlink(ino) == 0 and not self.is_open(ino):
            self._destroy(ino)

    def h_import_start(self, peer, posix_metadata: bool = True, deletions: bool = True):
        if self.repo is None:
            raise RpcError(errno.EINVAL, "no S3 repository is linked")
        with self.lock:
            if self.import_thread and self.import_thread.is_alive():
                return self.importer.status.as_dict()
            self.importer = Importer(self.ns, self.repo, self.prefix,
                                     self.config["imported_file_chunk_size"],
                                     self.config["stripe_size"], posix_metadata,
                                     self.on_object_changed, drop_data=self.drop_data)
            self.import_thread = threading.Thread(
                target=self.importer.run, kwargs={"deletions": deletions},
                name="import", daemon=True)
            self.import_thread.start()
        return self.importer.status.as_dict()

    def auto_import_loop(self):
        """FSx auto-import: a periodic incremental sweep of the bucket with the policy's events."""
        from .repository import parse_policy

        events = parse_policy(self.config.get("auto_import"))
        interval = float(self.config.get("auto_import_interval") or 60)
        if not events or self.repo is None:
            return
        log.info("auto-import every %.0fs for %s", interval, ",".join(sorted(events)))
        while not self._auto_import.wait(interval):
            with self.lock:
                busy = self.import_thread and self.import_thread.is_alive()
            if busy:
                continue
            imp = Importer(self.ns, self.repo, self.prefix, self.config["imported_file_chunk_size"],
                           self.config["stripe_size"], True, self.on_object_changed, events,
                           self.drop_data)
            with self.lock:
                self.importer = imp
            imp.run(deletions="deleted" in events)

    def h_import_status(self, peer):
        if self.importer is None:
            return {"state": "idle"}
        return self.importer.status.as_dict()

    def h_stats(self, peer):
        s = {"inodes": self.ns.counts()["inodes"], "open_files": len(self.opens),
             "clients": len(self.clients), **self.coordinator.counters,
             **self.leases.stats()}
        if self.repo is not None:
            s.update({"s3_" + k: v for k, v in self.repo.counters.as_dict().items()})
        return s

    def handlers(self) -> dict:
        return {name[2:]: self._settling(name[2:], getattr(self, name))
                for name in dir(self) if name.startswith("h_")}

    def _settling(self, op: str, handler):
        """A request that changed what a client caches is answered only after the
        client dropped it (leases.py). Not the lease poll: the session that would have
        to answer is the one waiting (its changes are revoked by ``lease_loop``)."""
        waits = op != "lease_poll"

        def call(peer, **args):
            try:
                return handler(peer, **args)
            finally:
                if self.leases.take_dirtied() and waits:
                    self.leases.settle()
        call.__doc__ = handler.__doc__
        return call

    def recover(self):
        """After a restart: free orphans (nobody can hold them open any more)."""
        for ino in self.ns.orphans():
            self._destroy(ino)
        left = self.ns.writers()  # open for write when the MDS stopped
        if left:  # clients that are still alive re-open their files within the grace period
            t = threading.Timer(REPLAY_GRACE, self._trim_unclaimed, [left])
            t.daemon = True
            t.start()
        self.coordinator.recover()

    def _trim_unclaimed(self, inos: list[int]):
        for ino in inos:
            if not self.is_open(ino, writers_only=True):
                self.trim(ino)
                self.ns.note_writer(ino, False)

    def close(self):
        self._stopping.set()
        self._auto_import.set()
        self.coordinator.stop()
        self.bg.shutdown(wait=False)


def check_repository(config: dict):
    """Fail early with one clear line when the bucket or endpoint is unusable."""
    repo = Repository(config["bucket"], config.get("endpoint_url"))
    try:
        repo.check_bucket()
    except S3Error as e:
        raise SystemExit(f"lustrefuse: cannot use s3://{config['bucket']}: {e}") from None


def load_or_init_config(data_dir: str, given: dict) -> dict:
    """The filesystem's config is fixed at creation; later runs may not contradict it."""
    path = os.path.join(data_dir, "fs.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for k in ("bucket", "prefix", "osts"):
            if given.get(k) is not None and given[k] != saved.get(k):
                raise SystemExit(f"{data_dir} was created with {k}={saved.get(k)!r}, "
                                 f"not {given[k]!r}")
        saved.update({k: v for k, v in given.items() if v is not None and k in (
            "endpoint_url", "secret_file", "auto_export", "auto_import", "auto_import_interval",
            "capacity", "hydrate_budget", "low_watermark", "high_watermark")})
        return saved
    os.makedirs(data_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(given, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return given
