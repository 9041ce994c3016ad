"""``containerd-shim-katapy-v2``: containerd's runtime ``io.containerd.katapy.v2``.

Dispatches on the action (``start``, ``delete``, none = daemon; docs/protocols.md
§1).  Imports are lazy: ``start`` and ``delete`` run on every container
start/cleanup and must not pay for trio, the VMM or the agent client.  Logs
go to the bundle's ``log`` FIFO (containerd copies it into its own log) as
structlog key=value lines; ``start``/``delete`` errors also go to stderr,
which containerd reports.
"""
from __future__ import annotations

import os
import sys
from typing import Any


def _open_log(debug: bool) -> Any:
    """The bundle's ``log`` FIFO (cwd is the bundle), opened write-only as a katapy.log.FifoStream (a line
    written while containerd is down is dropped, never raised); None if nobody reads it."""
    from katapy import log

    stream: Any = None
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        stream = log.FifoStream(fd)
    except OSError:
        stream = None
    log.configure("debug" if debug else os.environ.get("KATAPY_LOG_LEVEL", "info"),
                  stream if stream is not None else open(os.devnull, "w"))
    return stream


def main(argv: list[str] | None = None) -> int:
    from katapy.shim.args import UsageError, parse

    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"containerd-shim-katapy-v2: {exc}", file=sys.stderr)
        return 2
    if args.version:
        from katapy import __version__

        print(f"containerd-shim-katapy-v2:\n  Version: {__version__}\n  Revision: katapy")
        return 0
    # ``start`` runs on every container start and logs only when it fails: structlog's import is most of
    # its run time (0.1-0.2 s here, ~5 s under nested TCG, where each CRI StartContainer waited on it)
    if args.action != "start":
        _open_log(args.debug)
    try:
        if args.action == "start":
            from katapy.shim import start

            return start.run(args)
        if args.action == "delete":
            from katapy.shim import delete

            return delete.run(args)
        from katapy.shim import daemon

        return daemon.run(args)
    except Exception as exc:
        import traceback

        from katapy import log

        if args.action == "start":
            _open_log(args.debug)
        logger = log.get("shim.main", id=args.id, action=args.action or "daemon")
        logger.error("shim failed", error=f"{type(exc).__name__}: {exc}",
                     traceback="".join(traceback.format_exception(exc))[-6000:])
        if args.action:
            print(f"containerd-shim-katapy-v2 {args.action}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
