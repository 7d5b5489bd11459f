"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server in tests).

The proxy runs in the test process, in threads, on 127.0.0.1 (a free port by
default). It forwards every request (method, path, query, headers, body) to the
upstream endpoint and relays the answer, except when a fault rule matches::

    proxy = FaultProxy("http://127.0.0.1:5000")
    proxy.start()
    proxy.add("status", method="GET", key="data/a.bin", ranged=True, times=3,
              status=503, code="SlowDown")
    proxy.add("reset", method="GET", probability=0.3, seed=7)
    ...
    proxy.count(method="GET", key="data/a.bin")   # requests seen
    proxy.down(); proxy.up()                      # refuse connections, then serve again
    proxy.stop()

Fault kinds (``add(kind, ...)``):

``latency``   sleep ``delay`` seconds, then go on (other rules may still fire).
``status``    answer ``status`` (default 503) with an S3 XML error body of ``code``
              (default SlowDown for 503, InternalError otherwise); upstream is not asked.
``reset``     send the upstream headers and ``fraction`` of the body, then reset the
              connection (RST: SO_LINGER 0).
``truncate``  send the headers (full Content-Length) and ``fraction`` of the body,
              then close the connection normally (FIN).
``short``     a well-formed answer whose body is cut to ``fraction`` of the upstream
              body, with a Content-Length that matches (a short, not a broken, body).
``etag``      relay the answer with a different ETag header (``etag=``, or a made-up one);
              with ``mangle=`` (bytes -> bytes) the body is replaced as well, as a store
              that ignored If-Match and served a newer version would.
``drop``      reset the connection before answering anything.

Matching (all given criteria must hold): ``method``, ``bucket``, ``key`` (exact,
decoded), ``key_prefix``, ``ranged`` (True: only requests with a Range header,
False: only without), ``predicate`` (a callable taking a ``Request``). A rule
fires at most ``times`` times (None: forever), each time with ``probability``
(drawn from ``random.Random(seed)``, so runs repeat). Rules are tried in the
order they were added; the first terminal fault that fires wins.

Looking: ``count(...)``/``requests(...)`` filter the (bounded) request log by
method, key, ranged and the fault done to each request (``None``, ``"latency"``
or the fault kind); ``seen`` counts every request, ``refused`` the connections
turned away for want of slots; each rule's ``fired`` counts its injections.

Everything is bounded: request bodies (``max_body``), concurrent connections
(``max_connections``), socket timeouts, the request log (``max_log``), and
injected latency (``MAX_DELAY``, cut short by ``stop``).
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import http.server
import random
import socket
import struct
import threading
import time
import urllib.parse
import uuid
import xml.sax.saxutils
from collections.abc import Callable
from dataclasses import dataclass, field

KINDS = ("latency", "status", "reset", "truncate", "short", "etag", "drop")
MAX_DELAY = 60.0
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "content-length"}
_STATUS_CODES = {500: "InternalError", 503: "SlowDown", 502: "BadGateway",
                 504: "GatewayTimeout", 403: "AccessDenied", 404: "NoSuchKey",
                 412: "PreconditionFailed"}
_MESSAGES = {"SlowDown": "Please reduce your request rate.",
             "InternalError": "We encountered an internal error. Please try again.",
             "AccessDenied": "Access Denied", "NoSuchKey": "The specified key does not exist.",
             "PreconditionFailed": "At least one of the pre-conditions you specified did not hold"}


@dataclass(frozen=True)
class Request:
    """What a rule can look at (and what the log records)."""

    method: str
    path: str  # decoded, without the query
    query: str
    bucket: str
    key: str
    range: str | None
    headers: dict  # lower-case names
    fault: str | None = None  # what was done to it (filled in the log)
    time: float = 0.0


@dataclass(eq=False)
class Rule:
    kind: str
    method: str | None = None
    bucket: str | None = None
    key: str | None = None
    key_prefix: str | None = None
    ranged: bool | None = None
    predicate: Callable[[Request], bool] | None = None
    times: int | None = None
    probability: float = 1.0
    seed: int = 0
    # fault parameters
    delay: float = 0.0
    status: int = 503
    code: str | None = None
    message: str | None = None
    fraction: float = 0.5
    etag: str | None = None
    mangle: Callable[[bytes], bytes] | None = None
    fired: int = 0  # how many times it fired
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def matches(self, req: Request) -> bool:
        if self.method is not None and req.method != self.method.upper():
            return False
        if self.bucket is not None and req.bucket != self.bucket:
            return False
        if self.key is not None and req.key != self.key:
            return False
        if self.key_prefix is not None and not req.key.startswith(self.key_prefix):
            return False
        if self.ranged is not None and (req.range is not None) != self.ranged:
            return False
        return self.predicate is None or bool(self.predicate(req))


def s3_error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    code, message, resource = (xml.sax.saxutils.escape(v) for v in (code, message, resource))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId>"
            f"<HostId>{request_id}</HostId></Error>").encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy  # set on the subclass made per proxy

    def setup(self):
        self.timeout = self.proxy.client_timeout
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        if self.upstream is not None:
            self.upstream.close()

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self):
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    # -- the request ---------------------------------------------------------

    def _read_body(self) -> bytes | None:
        limit = self.proxy.max_body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    return None
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                if len(out) + n > limit:
                    return None
                out += self.rfile.read(n)
                self.rfile.readline(16)
        n = int(self.headers.get("Content-Length") or 0)
        if n > limit:
            return None
        return self.rfile.read(n) if n else b""

    def _proxy(self):
        p = self.proxy
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path)
        parts = path.lstrip("/").split("/", 1)
        req = Request(method=self.command, path=path, query=split.query, bucket=parts[0],
                      key=parts[1] if len(parts) > 1 else "",
                      range=self.headers.get("Range"),
                      headers={k.lower(): v for k, v in self.headers.items()}, time=time.time())
        body = self._read_body()
        if body is None:
            self.close_connection = True
            with p.lock:
                p.seen += 1
                p.log.append(dataclasses.replace(req, fault="too-large"))
            self._send_simple(413, "EntityTooLarge", "body too large for the test proxy", req)
            return
        fault = p._choose(req)  # logs the request, then may sleep (latency)
        kind = fault.kind if fault else None
        if p._interrupt.is_set():  # went down while this request waited: it dies with it
            self._reset()
            return
        if kind == "drop":
            self._reset()
            return
        if kind == "status":
            code = fault.code or _STATUS_CODES.get(fault.status, "InternalError")
            self._send_simple(fault.status, code, fault.message or _MESSAGES.get(code, code), req)
            return
        try:
            status, reason, headers, rbody = self._forward(body)
        except (OSError, http.client.HTTPException) as e:
            self._send_simple(502, "BadGateway", f"upstream: {e}", req)
            return
        if kind == "etag":
            new = fault.etag or f'"{uuid.uuid4().hex}"'
            headers = [(k, v) for k, v in headers if k.lower() != "etag"] + [("ETag", new)]
            if fault.mangle is not None:
                rbody = fault.mangle(rbody)
        if kind == "short":
            rbody = rbody[:int(len(rbody) * fault.fraction)]
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        if self.command == "HEAD":
            if self.upstream_length is not None:
                self.send_header("Content-Length", self.upstream_length)
        else:
            self.send_header("Content-Length", str(len(rbody)))
        if kind in ("reset", "truncate"):
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind in ("reset", "truncate"):
            self.close_connection = True
            self.wfile.write(rbody[:int(len(rbody) * fault.fraction)])
            if kind == "reset":
                time.sleep(0.05)  # let the partial body reach the client before the RST
                self._reset()
            else:
                try:
                    self.connection.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            return
        self.wfile.write(rbody)

    def _forward(self, body: bytes):
        p = self.proxy
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if self.command not in ("GET", "HEAD", "DELETE") or body:
            headers["Content-Length"] = str(len(body))
        for _ in range(2):
            reused = self.upstream is not None
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(p.upstream_host, p.upstream_port,
                                                           timeout=p.upstream_timeout)
            try:
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self.upstream.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.upstream.close()
                    self.upstream = None
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP
                       and k.lower() not in ("server", "date")]
                self.upstream_length = resp.getheader("Content-Length")
                return resp.status, resp.reason, out, data
            except (OSError, http.client.HTTPException):
                self.upstream.close()
                self.upstream = None
                if not reused:  # only a stale keep-alive connection is worth a second try
                    raise
        raise AssertionError("unreachable")

    # -- answers ---------------------------------------------------------------

    def _send_simple(self, status: int, code: str, message: str, req: Request):
        rid = uuid.uuid4().hex[:16].upper()
        body = s3_error_body(code, message, req.path, rid)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", rid)
        if status == 503:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self):
        """Close with RST (SO_LINGER 0), whatever else holds the socket."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.proxy._forget(sock)
        try:
            fd = sock.detach()
        except OSError:
            return
        if fd >= 0:
            socket.close(fd)


class FaultProxy:
    """See the module docstring. Thread-safe; use as a context manager or start/stop."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0,
                 max_connections: int = 512, max_body: int = 64 << 20, max_log: int = 10000,
                 client_timeout: float = 30.0, upstream_timeout: float = 30.0):
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream_host = u.hostname
        self.upstream_port = u.port or 80
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.max_body = max_body
        self.client_timeout = client_timeout
        self.upstream_timeout = upstream_timeout
        self.lock = threading.Lock()
        self.rules: list[Rule] = []
        self.log: collections.deque[Request] = collections.deque(maxlen=max_log)
        self.seen = 0  # requests seen in all (the log is bounded, this is not)
        self.refused = 0  # connections turned away for want of slots
        self._stopping = threading.Event()
        self._interrupt = threading.Event()  # set by down/stop: cuts injected latency short
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._handler = type("Handler", (_Handler,), {"proxy": self})

    # -- life ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._stopping.clear()
        self._interrupt.clear()
        self._listen()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _listen(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.host, self.port))
            s.listen(128)
        except OSError:
            s.close()
            raise
        s.settimeout(0.1)
        self.port = s.getsockname()[1]
        self._listener = s
        t = threading.Thread(target=self._accept_loop, args=(s,), name=f"s3fault:{self.port}",
                             daemon=True)
        self._accept_thread = t
        t.start()

    def _accept_loop(self, lsock: socket.socket):
        while not self._stopping.is_set() and self._listener is lsock:
            try:
                conn, addr = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(self.client_timeout)
            with self.lock:
                if len(self._conns) >= self.max_connections:
                    self.refused += 1
                    conn.close()
                    continue
                t = threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                                     name="s3fault-conn")
                self._conns[conn] = t
            t.start()
        lsock.close()

    def _serve(self, conn: socket.socket, addr):
        try:
            self._handler(conn, addr, self)
        except Exception:  # noqa: BLE001 - a broken client connection is not a test failure
            pass
        finally:
            self._forget(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _forget(self, conn: socket.socket):
        with self.lock:
            self._conns.pop(conn, None)

    def _kill_connections(self, timeout: float = 5.0):
        with self.lock:
            conns = list(self._conns.items())
        for c, _t in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _c, t in conns:
            t.join(max(0.0, deadline - time.monotonic()))

    def _close_listener(self):
        lsock, self._listener = self._listener, None
        t, self._accept_thread = self._accept_thread, None
        if t is not None:
            t.join(5)
        elif lsock is not None:
            lsock.close()

    def down(self):
        """Refuse connections (the port is closed) and break the open ones."""
        self._interrupt.set()
        self._close_listener()
        self._kill_connections()

    def up(self):
        """Serve again on the same port after ``down``."""
        self._interrupt.clear()
        if self._listener is None:
            for _ in range(50):
                try:
                    self._listen()
                    return
                except OSError:
                    time.sleep(0.1)
            self._listen()

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def stop(self):
        self._stopping.set()
        self._interrupt.set()
        self._close_listener()
        self._kill_connections()

    # -- faults ----------------------------------------------------------------

    def add(self, kind: str, **kw) -> Rule:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r} (one of {', '.join(KINDS)})")
        if not 0.0 <= kw.get("probability", 1.0) <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        if not 0.0 <= kw.get("fraction", 0.5) <= 1.0:
            raise ValueError("fraction must be in [0, 1]")
        if not 0.0 <= kw.get("delay", 0.0) <= MAX_DELAY:
            raise ValueError(f"delay must be in [0, {MAX_DELAY}]")
        rule = Rule(kind=kind, **kw)
        rule.rng = random.Random(rule.seed)
        with self.lock:
            self.rules.append(rule)
        return rule

    def remove(self, rule: Rule):
        with self.lock:
            if rule in self.rules:
                self.rules.remove(rule)

    def clear(self):
        with self.lock:
            self.rules.clear()

    def _choose(self, req: Request) -> Rule | None:
        delay = 0.0
        chosen = None
        with self.lock:
            self.seen += 1
            for rule in self.rules:
                if rule.times is not None and rule.fired >= rule.times:
                    continue
                if not rule.matches(req):
                    continue
                if rule.probability < 1.0 and rule.rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                if rule.kind == "latency":
                    delay += rule.delay
                    continue
                chosen = rule
                break
            label = chosen.kind if chosen else ("latency" if delay else None)
            self.log.append(dataclasses.replace(req, fault=label))
        if delay:
            self._interrupt.wait(min(delay, MAX_DELAY))
        return chosen

    # -- looking -------------------------------------------------------------

    def requests(self, method: str | None = None, key: str | None = None,
                 ranged: bool | None = None, fault: str | None = None) -> list[Request]:
        probe = Rule(kind="latency", method=method, key=key, ranged=ranged)
        with self.lock:
            log = list(self.log)
        return [r for r in log if probe.matches(r) and (fault is None or r.fault == fault)]

    def count(self, method: str | None = None, key: str | None = None,
              ranged: bool | None = None, fault: str | None = None) -> int:
        return len(self.requests(method, key, ranged, fault))

    def reset_log(self):
        with self.lock:
            self.log.clear()
