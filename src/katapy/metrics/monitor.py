"""``katapy monitor``: every sandbox on this host in one Prometheus endpoint (Kata's kata-monitor).

On each scrape of ``/metrics`` the monitor lists ``<state_dir>/*/metrics.sock``
(one per running shim, :mod:`katapy.metrics.endpoint`), fetches them all in
parallel with one deadline (:attr:`Monitor.scrape_timeout`), and serves the
union with a ``sandbox_id`` label on every series, plus ``pod_name`` and
``pod_namespace`` when the shim recorded the pod (CRI sandboxes).  A shim that
does not answer in time, answers garbage or disappears mid-scrape costs that
sandbox its series, not the scrape: ``katapy_monitor_scrape_up{sandbox_id}`` is
0 for it, and the scrape still ends within the deadline plus local work.

The text format allows each family once, so families of the same name from
different sandboxes are merged (Prometheus's exposition format rules).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from katapy import log
from katapy.metrics.endpoint import CONTENT_TYPE, SOCKET_NAME, fetch
from katapy.metrics.sandbox import render

_log = log.get("metrics.monitor")

SCRAPE_TIMEOUT_S = 2.0
RECORD = "sandbox.json"  # katapy.shim.persist.RECORD (not imported: the monitor needs none of the shim)


@dataclass(frozen=True)
class Scraped:
    sandbox_id: str
    labels: dict[str, str]
    families: list[Metric] | None  # None: no usable answer
    seconds: float
    error: str = ""


def _labels(sandbox_dir: Path) -> dict[str, str]:
    out = {"sandbox_id": sandbox_dir.name}
    try:
        rec = json.loads((sandbox_dir / RECORD).read_text())
    except (OSError, ValueError):
        return out
    for key in ("pod_name", "pod_namespace"):
        v = rec.get(key) if isinstance(rec, dict) else None
        if isinstance(v, str) and v:
            out[key] = v
    return out


class Monitor:
    def __init__(self, state_dir: Path, scrape_timeout: float = SCRAPE_TIMEOUT_S) -> None:
        self.state_dir = state_dir
        self.scrape_timeout = scrape_timeout
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="katapy-monitor")

    def sockets(self) -> list[Path]:
        try:
            return sorted(p for p in self.state_dir.glob(f"*/{SOCKET_NAME}") if p.is_socket())
        except OSError:
            return []

    def _scrape(self, sock: Path) -> Scraped:
        labels = _labels(sock.parent)
        t0 = time.monotonic()
        try:
            text = fetch(sock, self.scrape_timeout).decode()
            fams = list(text_string_to_metric_families(text))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            return Scraped(sock.parent.name, labels, None, time.monotonic() - t0, str(exc))
        return Scraped(sock.parent.name, labels, fams, time.monotonic() - t0)

    def scrape_all(self) -> list[Scraped]:
        socks = self.sockets()
        futures = [self._pool.submit(self._scrape, s) for s in socks]
        out = []
        deadline = time.monotonic() + self.scrape_timeout + 0.5
        for sock, fut in zip(socks, futures):
            try:
                out.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
            except Exception as exc:  # TimeoutError from result(), or a bug: that sandbox is down, not the scrape
                out.append(Scraped(sock.parent.name, _labels(sock.parent), None, self.scrape_timeout, repr(exc)))
        return out

    def families(self) -> list[Metric]:
        results = self.scrape_all()
        merged: dict[str, Metric] = {}
        up = GaugeMetricFamily("katapy_monitor_scrape_up", "1 when the sandbox's shim answered the last scrape.",
                               labels=["sandbox_id"])
        took = GaugeMetricFamily("katapy_monitor_scrape_duration_seconds",
                                 "Seconds the last scrape of the sandbox's shim took.", labels=["sandbox_id"])
        for r in results:
            up.add_metric([r.sandbox_id], 0 if r.families is None else 1)
            took.add_metric([r.sandbox_id], r.seconds)
            if r.families is None:
                _log.warning("sandbox metrics not scraped", sandbox_id=r.sandbox_id, error=r.error)
                continue
            for fam in r.families:
                into = merged.get(fam.name)
                if into is None:
                    into = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                elif into.type != fam.type:
                    continue  # two shim versions disagreeing on a family: keep the first
                for s in fam.samples:
                    into.add_sample(s.name, {**s.labels, **r.labels}, s.value, s.timestamp, s.exemplar)
        count = GaugeMetricFamily("katapy_monitor_sandboxes", "Sandboxes found on this host at the last scrape.",
                                  value=len(results))
        return [count, up, took, *merged.values()]

    def render(self) -> bytes:
        return render(self.families())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def serve(monitor: Monitor, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server answering ``GET /metrics`` with ``monitor.render()`` (call serve_forever on it)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        timeout = 10.0

        def do_GET(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "katapy monitor serves /metrics")
                return
            body = monitor.render()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            _log.debug("monitor request", line=format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
