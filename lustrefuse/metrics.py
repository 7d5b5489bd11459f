"""Prometheus metrics, opt-in: counters, gauges and latency histograms over plain HTTP.

Each process has one registry. ``serve("127.0.0.1:9567")`` exposes it at
``/metrics`` in the text exposition format; nothing listens unless asked.
"""

from __future__ import annotations

import bisect
import http.server
import threading
import time
from collections.abc import Callable

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Registry:
    def __init__(self, prefix: str = "lustrefuse"):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.counters: dict[tuple, float] = {}
        self.hist: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]
        self.help: dict[str, tuple[str, str]] = {}
        self.gauges: dict[str, Callable[[], dict]] = {}  # name -> fn returning {labels: value}

    def _key(self, name: str, labels: dict) -> tuple:
        return (name, tuple(sorted(labels.items())))

    def inc(self, name: str, value: float = 1.0, help: str = "", **labels):
        self.help.setdefault(name, ("counter", help))
        key = self._key(name, labels)
        with self.lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, name: str, seconds: float, help: str = "", **labels):
        self.help.setdefault(name, ("histogram", help))
        key = self._key(name, labels)
        with self.lock:
            h = self.hist.get(key)
            if h is None:
                h = self.hist[key] = [0] * len(BUCKETS) + [0.0, 0]
            i = bisect.bisect_left(BUCKETS, seconds)
            if i < len(BUCKETS):
                h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def gauge(self, name: str, fn: Callable[[], dict], help: str = "", kind: str = "gauge"):
        """``fn`` returns ``{labels_tuple_or_(): value}`` when scraped. With kind="counter"
        it exposes a count kept elsewhere (no work on the hot path, only at scrape)."""
        self.help[name] = (kind, help)
        self.gauges[name] = fn

    def time(self, name: str, help: str = "", **labels):
        reg = self

        class _Timer:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                reg.observe(name, time.perf_counter() - self.t, help, **labels)

        return _Timer()

    def render(self) -> str:
        out = []
        seen = set()

        def header(name):
            if name not in seen:
                seen.add(name)
                kind, text = self.help.get(name, ("untyped", ""))
                out.append(f"# HELP {self.prefix}_{name} {text or name}")
                out.append(f"# TYPE {self.prefix}_{name} {kind}")

        with self.lock:
            counters = sorted(self.counters.items())
            hists = sorted((k, list(v)) for k, v in self.hist.items())
        for (name, labels), value in counters:
            header(name)
            out.append(f"{self.prefix}_{name}_total{_labels(dict(labels))} {value:g}")
        for (name, labels), h in hists:
            header(name)
            acc = 0
            for b, n in zip(BUCKETS, h, strict=False):
                acc += n
                out.append(f"{self.prefix}_{name}_bucket{_labels({**dict(labels), 'le': b})} {acc}")
            out.append(f"{self.prefix}_{name}_bucket{_labels({**dict(labels), 'le': '+Inf'})} {h[-1]}")
            out.append(f"{self.prefix}_{name}_sum{_labels(dict(labels))} {h[-2]:g}")
            out.append(f"{self.prefix}_{name}_count{_labels(dict(labels))} {h[-1]}")
        for name, fn in sorted(self.gauges.items()):
            try:
                values = fn()
            except Exception:
                continue
            header(name)
            suffix = "_total" if self.help[name][0] == "counter" else ""
            for labels, value in values.items():
                out.append(f"{self.prefix}_{name}{suffix}{_labels(dict(labels))} {value:g}")
        return "\n".join(out) + "\n"


REGISTRY = Registry()


def serve(address: str, registry: Registry = REGISTRY) -> http.server.ThreadingHTTPServer:
    """Serve ``/metrics`` on HOST:PORT in a daemon thread."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad metrics address '{address}' (want HOST:PORT)")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = registry.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, name="metrics", daemon=True).start()
    return srv
