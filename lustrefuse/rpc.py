"""RPC transport: a threaded server, a blocking client, and a trio client.

Addresses are ``unix:/path/to.sock`` or ``tcp:HOST:PORT``. Unix sockets are
created 0600; TCP connections must answer an HMAC challenge with the shared
secret before any request is read. A reply may carry file descriptors
(SCM_RIGHTS over Unix sockets) so a client on the same host can ``pread`` an
OST object directly.
"""

from __future__ import annotations

import array
import errno
import hashlib
import hmac
import logging
import os
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field

from . import protocol
from .metrics import REGISTRY
from .protocol import ProtocolError, RpcError

log = logging.getLogger(__name__)

MAX_FDS = 8
_ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
NONCE = 32


def parse_address(addr: str):
    kind, _, rest = addr.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return socket.AF_INET, (host.strip("[]"), int(port))
    raise ValueError(f"bad address '{addr}' (want unix:PATH or tcp:HOST:PORT)")


def _mac(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def _take_fds(anc, fds: list):
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)


def _close_all(fds: list[int]):
    for fd in fds:
        os.close(fd)
    fds.clear()


def _recv_some(sock: socket.socket, view: memoryview, fds: list | None = None) -> int:
    """One receive into ``view``; descriptors sent with the bytes go into ``fds`` (only
    the first receive of a message can carry them). A non-blocking socket with nothing
    to read raises BlockingIOError."""
    if fds is not None:
        k, anc, _flags, _addr = sock.recvmsg_into([view], _ANC)
        _take_fds(anc, fds)
    else:
        k = sock.recv_into(view)
    if not k:
        raise ConnectionError("connection closed")
    return k


def _recv_exact(sock: socket.socket, n: int, fds: list | None = None) -> bytearray:
    """Exactly ``n`` bytes, received in place: a frame of several MiB is neither
    allocated per ``recv`` nor copied again at the end."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        got += _recv_some(sock, view[got:], None if got else fds)
    return buf


def _large_body(view: memoryview, got: int, total: int) -> tuple[bytearray, memoryview, int]:
    """The body of a frame too large for the first-receive buffer ``view``, which holds
    its first ``got`` bytes (header included): a buffer of the body's size with those
    bytes in place, its view, and how many it holds. The rest is received in place."""
    head = protocol.HEADER.size
    body = bytearray(total - head)
    body_view = memoryview(body)
    body_view[:got - head] = view[head:got]
    return body, body_view, got - head


FRAME_TIMEOUT = 30.0  # a frame, once begun, must arrive within this (idle pools may wait)


def read_frame(sock: socket.socket, fds: list | None = None):
    header = _recv_exact(sock, protocol.HEADER.size, fds)
    length = protocol.parse_header(header)
    return protocol.decode(_recv_exact(sock, length) if length else b"")


class FrameReader:
    """Request frames from one blocking server connection. A small request (nearly all
    of them) arrives whole with one receive; only a frame that comes in pieces gets a
    deadline (``FRAME_TIMEOUT``): an idle connection may wait for ever, a half-sent
    frame may not hold a server thread."""

    CHUNK = 64 * 1024

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.view = memoryview(bytearray(self.CHUNK))
        self.pending = b""  # bytes received after the previous frame (a pipelining peer)
        self.timed = False

    def _more(self, view: memoryview) -> int:
        if not self.timed:  # a frame has begun: the rest must come in time
            self.sock.settimeout(FRAME_TIMEOUT)
            self.timed = True
        return _recv_some(self.sock, view)

    def read(self, fds: list | None = None):
        head = protocol.HEADER.size
        view = self.view
        got = len(self.pending)
        view[:got] = self.pending
        self.pending = b""
        try:
            if not got:
                got = _recv_some(self.sock, view, fds)
            while got < head:
                got += self._more(view[got:])
            total = head + protocol.parse_header(view[:head])
            if total <= self.CHUNK:
                while got < total:
                    got += self._more(view[got:])
                self.pending = bytes(view[total:got])
                return protocol.decode(view[head:total])
            body, body_view, n = _large_body(view, got, total)
            while n < len(body):
                n += self._more(body_view[n:])
            return protocol.decode(body)
        finally:
            if self.timed:
                self.sock.settimeout(None)
                self.timed = False


@dataclass
class Reply:
    """A handler result that also hands over file descriptors (closed after sending)."""

    result: object
    fds: list[int] = field(default_factory=list)


@dataclass
class Peer:
    """What a handler knows about the connection it serves."""

    conn_id: int
    uid: int | None = None  # from SO_PEERCRED on Unix sockets
    host: str | None = None  # the peer's address on TCP
    state: dict = field(default_factory=dict)
    fds: list = field(default_factory=list)  # descriptors sent with the current request


class Server:
    """Serve ``handlers[op](peer, **args)`` on one address, a thread per connection."""

    def __init__(self, address: str, handlers: dict, secret: bytes | None = None,
                 on_disconnect=None, mode: int = 0o600, role: str = "server"):
        self.address = address
        self.role = role  # the metrics label of this listener (mds, ost0, ...)
        self.handlers = handlers
        self.secret = secret
        self.on_disconnect = on_disconnect
        family, where = parse_address(address)
        if family == socket.AF_INET and not secret:
            raise ValueError("a TCP listener needs a shared secret (--secret-file)")
        outer = self
        self._ids = iter(range(1, 1 << 62))

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                outer._serve_connection(self.request)

        if family == socket.AF_UNIX:
            if os.path.exists(where):
                os.unlink(where)
            base = type("UnixServer", (socketserver.ThreadingUnixStreamServer,),
                        {"request_queue_size": 256})
            old = os.umask(0o177)
            try:
                self._srv = base(where, Handler)
            finally:
                os.umask(old)
            group = os.environ.get("LUSTREFUSE_SOCKET_GROUP")
            if group:  # members of this group may use the socket too
                import grp

                os.chown(where, -1, grp.getgrnam(group).gr_gid)
                mode |= 0o060
            os.chmod(where, mode)
        else:
            base = type("TcpServer", (socketserver.ThreadingTCPServer,),
                        {"request_queue_size": 256, "allow_reuse_address": True})
            self._srv = base(where, Handler)
            if where[1] == 0:
                self.address = f"tcp:{where[0]}:{self._srv.server_address[1]}"
        self._srv.daemon_threads = True

    def serve_forever(self):
        self._srv.serve_forever(poll_interval=0.2)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="rpc-server", daemon=True)
        t.start()
        return t

    def shutdown(self):
        self._srv.shutdown()
        self._srv.server_close()

    def _serve_connection(self, sock: socket.socket):
        peer = Peer(next(self._ids))
        try:
            if sock.family == socket.AF_UNIX:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                peer.uid = int.from_bytes(creds[4:8], "little")
            else:
                peer.host = sock.getpeername()[0]
                if not self._authenticate(sock):
                    return
            unix = sock.family == socket.AF_UNIX
            frames = FrameReader(sock)
            while True:
                peer.fds = []
                try:
                    msg = frames.read(peer.fds if unix else None)
                except (ConnectionError, OSError):
                    _close_all(peer.fds)
                    return
                except ProtocolError as e:
                    log.warning("rejected a malformed frame: %s", e)
                    try:
                        sock.sendall(protocol.reply_err(errno.EPROTO, str(e)))
                    except OSError:
                        pass
                    return  # the stream position is unknown now
                try:
                    self._dispatch(sock, peer, msg)
                finally:  # a handler uses what it was sent during the call only
                    _close_all(peer.fds)
        finally:
            if self.on_disconnect:
                try:
                    self.on_disconnect(peer)
                except Exception:
                    log.exception("disconnect hook failed")
            sock.close()

    def _authenticate(self, sock: socket.socket) -> bool:
        nonce = os.urandom(NONCE)
        sock.settimeout(10)
        try:
            sock.sendall(nonce)
            answer = _recv_exact(sock, 32)
        except (OSError, ConnectionError):
            return False
        if not hmac.compare_digest(answer, _mac(self.secret, nonce)):
            log.warning("refused a TCP client without the shared secret")
            try:  # say why, so the client can tell a refusal from a network fault
                sock.sendall(protocol.reply_err(errno.EACCES, "wrong or missing shared secret"))
            except OSError:
                pass
            return False
        sock.settimeout(None)
        return True

    def _dispatch(self, sock: socket.socket, peer: Peer, msg):
        fds: list[int] = []
        op = "?"
        start = time.perf_counter()
        try:
            op, args = protocol.parse_request(msg)
            handler = self.handlers.get(op)
            if handler is None:
                raise RpcError(errno.ENOSYS, f"unknown operation '{op}'")
            try:
                result = handler(peer, **args)
            except TypeError as e:
                if "argument" in str(e):
                    raise RpcError(errno.EINVAL, f"{op}: {e}") from None
                raise
            if isinstance(result, Reply):
                fds = result.fds
                result = result.result
            frame = protocol.reply_ok(result)
        except ProtocolError as e:
            frame = protocol.reply_err(errno.EPROTO, str(e))
        except RpcError as e:
            frame = protocol.reply_err(e.errno, e.strerror)
        except OSError as e:
            frame = protocol.reply_err(e.errno or errno.EIO, str(e))
        except Exception as e:
            log.exception("handler failed")
            frame = protocol.reply_err(errno.EIO, f"internal error: {e}")
        if op not in self.handlers:
            op = "unknown"  # keep label values bounded whatever peers send
        REGISTRY.inc("rpc_requests", help="RPC requests served", role=self.role, op=op)
        REGISTRY.observe("rpc_latency_seconds", time.perf_counter() - start,
                         help="RPC service time", role=self.role, op=op)
        try:
            if fds and sock.family == socket.AF_UNIX:
                socket.send_fds(sock, [frame[:1]], fds)
                sock.sendall(frame[1:])
            else:
                sock.sendall(frame)
        finally:
            for fd in fds:
                os.close(fd)


def _connect(address: str, secret: bytes | None, timeout: float) -> socket.socket:
    family, where = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(where)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = _recv_exact(sock, NONCE)
            sock.sendall(_mac(secret or b"", nonce))
    except BaseException:
        sock.close()
        raise
    return sock


def _result(msg, fds: list[int], want_fds: bool):
    """A reply's result (or its RpcError); descriptors go to the caller only if asked for."""
    try:
        result = protocol.parse_reply(msg)
    except RpcError:
        want_fds = False
        raise
    finally:
        if not want_fds:
            for fd in fds:
                os.close(fd)
    return (result, fds) if want_fds else result


class Client:
    """A blocking client with a small connection pool; safe to share between threads."""

    def __init__(self, address: str, secret: bytes | None = None, timeout: float = 30.0):
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def call(self, op: str, timeout: float | None = None, want_fds: bool = False,
             send_fds: list[int] = (), **args):
        """``send_fds``: descriptors to hand to the server with the request (Unix
        sockets only; the server has them for the call's duration)."""
        fds: list[int] = []
        for attempt in (0, 1):
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            reused = sock is not None
            if sock is None:
                sock = _connect(self.address, self.secret, self.timeout)
            try:
                sock.settimeout(timeout or self.timeout)
                frame = protocol.request(op, args)
                if send_fds:
                    socket.send_fds(sock, [frame[:1]], list(send_fds))
                    sock.sendall(memoryview(frame)[1:])
                else:
                    sock.sendall(frame)
                msg = read_frame(sock, fds)
                break
            except ConnectionError:
                sock.close()
                # an idle pooled connection whose server restarted: the other idle ones are
                # as dead, so drop them all and try once more on a new connection
                if not (reused and attempt == 0 and not fds):
                    raise
                self.close()
            except BaseException:
                sock.close()
                for fd in fds:
                    os.close(fd)
                raise
        with self._lock:
            self._idle.append(sock)
        return _result(msg, fds, want_fds)

    def close(self):
        with self._lock:
            for s in self._idle:
                s.close()
            self._idle.clear()


class _Stale(Exception):
    """A connection that broke before its answer (its server may have restarted)."""

    def __init__(self, sock, cause):
        super().__init__(str(cause))
        self.sock = sock
        self.cause = cause


class TrioClient:
    """The same protocol for the FUSE daemon's trio loop (no thread hop per call).

    Every file a reader opens costs the mount a lookup and an open on the MDS, so a call
    is kept to the system calls it needs: a plain non-blocking socket, one ``send``, one
    wait for the reply and, for replies up to ``FIRST_RECV``, one receive of header and
    body together. (trio's socket wrapper and semaphores yield to the scheduler two or
    three times per operation; that doubled the mount's CPU per call.)"""

    FIRST_RECV = 64 * 1024

    def __init__(self, address: str, secret: bytes | None = None, timeout: float = 30.0,
                 max_connections: int = 32):
        import trio

        self._trio = trio
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self._idle: list[socket.socket] = []
        self._slots = trio.Semaphore(max_connections)

    async def _connect(self) -> socket.socket:
        trio = self._trio
        family, where = parse_address(self.address)
        tsock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await tsock.connect(where)
            sock = socket.socket(fileno=tsock.detach())
        except BaseException:
            tsock.close()
            raise
        try:
            sock.setblocking(False)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nonce = await self._recv_exact(sock, NONCE)
                await self._sendall(sock, _mac(self.secret or b"", nonce))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _sendall(self, sock: socket.socket, data: bytes):
        view = memoryview(data)
        while view:
            try:
                n = sock.send(view)
            except BlockingIOError:
                await self._trio.lowlevel.wait_writable(sock)
                continue
            view = view[n:]

    async def _recv_into(self, sock: socket.socket, view: memoryview, fds: list | None,
                         wait_first: bool = False) -> int:
        """Some bytes into ``view`` (and any descriptors sent with them into ``fds``)."""
        while True:
            if wait_first:  # a reply is never there yet: skip the attempt that would fail
                await self._trio.lowlevel.wait_readable(sock)
            try:
                return _recv_some(sock, view, fds)
            except BlockingIOError:
                wait_first = True

    async def _recv_exact(self, sock: socket.socket, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            got += await self._recv_into(sock, view[got:], None)
        return buf

    async def _recv_reply(self, sock: socket.socket, fds: list):
        """One reply frame, decoded; a large body is received in place, not copied."""
        head = protocol.HEADER.size
        buf = bytearray(self.FIRST_RECV)
        view = memoryview(buf)
        got = await self._recv_into(sock, view, fds, wait_first=True)
        while got < head:
            got += await self._recv_into(sock, view[got:], None)
        total = head + protocol.parse_header(view[:head])
        if got > total:  # one call at a time per connection: nothing may follow a reply
            raise ProtocolError("data after the reply")
        if total <= self.FIRST_RECV:
            while got < total:
                got += await self._recv_into(sock, view[got:total], None)
            return protocol.decode(view[head:total])
        body, body_view, got = _large_body(view, got, total)
        while got < len(body):
            got += await self._recv_into(sock, body_view[got:], None)
        return protocol.decode(body)

    async def call(self, op: str, timeout: float | None = None, want_fds: bool = False,
                   **args):
        trio = self._trio
        try:
            self._slots.acquire_nowait()  # the usual case: no wait, no scheduler trip
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            for attempt in (0, 1):
                sock = self._idle.pop() if self._idle else None
                reused = sock is not None
                fds: list[int] = []
                try:
                    sock, msg = await self._exchange(sock, op, args, fds, timeout)
                    break
                except _Stale as e:
                    e.sock.close()
                    # an idle pooled connection whose server restarted: the other idle ones
                    # are as dead, so drop them all and try once more on a new connection
                    if reused and attempt == 0 and not fds:
                        self.close()
                        continue
                    raise RpcError(errno.EIO, f"{op}: {self.address}: {e.cause}") from None
            self._idle.append(sock)
        finally:
            self._slots.release()
        return _result(msg, fds, want_fds)

    async def _exchange(self, sock, op: str, args: dict, fds: list, timeout: float | None):
        trio = self._trio
        try:
            with trio.fail_after(timeout or self.timeout):
                if sock is None:
                    sock = await self._connect()
                await self._sendall(sock, protocol.request(op, args))
                return sock, await self._recv_reply(sock, fds)
        except trio.TooSlowError:
            if sock is not None:
                sock.close()
            for fd in fds:
                os.close(fd)
            raise RpcError(errno.ETIMEDOUT, f"{op}: no answer from {self.address}") from None
        except ConnectionError as e:
            if sock is None:
                raise RpcError(errno.EIO, f"{op}: {self.address}: {e}") from None
            for fd in fds:
                os.close(fd)
            raise _Stale(sock, e) from None
        except (OSError, ProtocolError) as e:
            if sock is not None:
                sock.close()
            for fd in fds:
                os.close(fd)
            raise RpcError(errno.EIO, f"{op}: {self.address}: {e}") from None
        except BaseException:
            if sock is not None:
                sock.close()
            for fd in fds:
                os.close(fd)
            raise

    def close(self):
        for s in self._idle:
            s.close()
        self._idle.clear()
