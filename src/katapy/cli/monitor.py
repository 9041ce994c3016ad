"""``katapy monitor --listen HOST:PORT``: serve every sandbox's metrics on this host (katapy.metrics.monitor)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:8090")
    return host or "127.0.0.1", int(port)


def main(argv: list[str]) -> int:
    from katapy import config

    p = argparse.ArgumentParser(prog="katapy monitor", description=__doc__)
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 8090), help="HOST:PORT (default 127.0.0.1:8090)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the shims keep their sandboxes (default: [runtime] state_dir)")
    p.add_argument("--scrape-timeout", type=float, default=2.0, help="seconds each shim gets to answer")
    a = p.parse_args(argv)
    from katapy.metrics.monitor import Monitor, serve

    state_dir = a.state_dir or Path(config.load(check_files=False).runtime.state_dir)
    monitor = Monitor(state_dir, a.scrape_timeout)
    host, port = a.listen
    try:
        server = serve(monitor, host, port)
    except OSError as exc:
        print(f"katapy monitor: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    print(f"katapy monitor: serving http://{host}:{server.server_port}/metrics for {state_dir}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t = threading.Thread(target=server.serve_forever, name="katapy-monitor-http", daemon=True)
    t.start()
    stop.wait()
    server.shutdown()
    server.server_close()
    monitor.close()
    return 0
