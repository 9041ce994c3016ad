"""``python3 -m katapy.agent``: the guest agent's entry point.

As PID 1 (``/init`` execs it) it finishes system set-up that /init may have
skipped, reaps every zombie, reads ``katapy.agent_port`` and ``katapy.log``
from /proc/cmdline, listens on AF_VSOCK (VMADDR_CID_ANY, port), serves port
forwarding on vsock port 1026 (``katapy.agent.portforward``) and the upcall
channel on port 0xDB (``katapy.agent.upcall``), the debug console on port
1027 when ``katapy.debug_console=1`` (``katapy.agent.console``), sends its log
to host port 1025 when the host listens, and prints
``katapy-agent: ready port=<port>`` on the console.

With ``--listen unix:PATH`` it is an ordinary process for development and
tests: it mounts nothing at start, does not act as init (it becomes a child
subreaper so it can still wait for container processes), and serves the same
API on the unix socket.
"""
from __future__ import annotations

import os
import sys

USAGE = """usage: python3 -m katapy.agent [--listen unix:PATH | --listen vsock:PORT]
                           [--state-dir DIR] [--resolv-conf PATH] [--log-level LEVEL]

  --listen       where to serve ttrpc (default: vsock, port from katapy.agent_port= on
                 /proc/cmdline, else 1024)
  --state-dir    container bundles and crun state (default /run/katapy/containers)
  --resolv-conf  file CreateSandbox writes DNS servers to (default /etc/resolv.conf)
  --log-level    debug|info|warning|error (default: katapy.log= on /proc/cmdline, else info)
"""
DEFAULT_PORT = 1024
LOG_PORT = 1025


def parse_args(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    names = {"--listen", "--state-dir", "--resolv-conf", "--log-level"}
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            opts["help"] = "1"
            continue
        key, eq, value = arg.partition("=")
        if key not in names:
            raise SystemExit(f"katapy-agent: unknown argument {arg!r}\n{USAGE}")
        if not eq:
            value = next(it, "")
            if not value:
                raise SystemExit(f"katapy-agent: {key} needs a value")
        opts[key[2:]] = value
    return opts


def kernel_params() -> dict[str, str]:
    try:
        with open("/proc/cmdline") as f:
            words = f.read().split()
    except OSError:
        return {}
    return {k: v for k, _, v in (w.partition("=") for w in words) if k.startswith("katapy.")}


def init_system() -> None:
    """PID 1 set-up /init normally does; each step is skipped when already done."""
    from katapy.agent import storage

    mounts = [
        ("proc", "/proc", "proc", 0, ""),
        ("sysfs", "/sys", "sysfs", 0, ""),
        ("devtmpfs", "/dev", "devtmpfs", 0, ""),
        ("devpts", "/dev/pts", "devpts", 0, "newinstance,ptmxmode=0666"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, ""),
        ("tmpfs", "/run", "tmpfs", 0, "mode=0755"),
    ]
    with open("/proc/self/mounts") if os.path.exists("/proc/self/mounts") else open(os.devnull) as f:
        present = {line.split()[1] for line in f if len(line.split()) > 1}
    for source, target, fstype, flags, data in mounts:
        if target in present:
            continue
        try:
            os.makedirs(target, exist_ok=True)
            storage.mount(source, target, fstype, flags, data)
        except OSError as exc:
            print(f"katapy-agent: mount {target}: {exc}", file=sys.stderr)
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


def listen(spec: str):  # type: ignore[no-untyped-def]
    import socket

    kind, _, where = spec.partition(":")
    if kind == "unix":
        if not where:
            raise SystemExit("katapy-agent: --listen unix: needs a path")
        try:
            os.unlink(where)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(where)
    elif kind == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, int(where)))
    else:
        raise SystemExit(f"katapy-agent: --listen wants unix:PATH or vsock:PORT, got {spec!r}")
    sock.listen(64)
    return sock


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    if "help" in opts:
        sys.stdout.write(USAGE)
        return 0
    from katapy.agent import log

    is_init = os.getpid() == 1
    if is_init:
        init_system()
    params = kernel_params() if is_init or "listen" not in opts else {}
    log.configure(opts.get("log-level") or params.get("katapy.log", "info"))
    listen_spec = opts.get("listen") or f"vsock:{params.get('katapy.agent_port', DEFAULT_PORT)}"
    if listen_spec.startswith("vsock:"):
        log.keep_vsock_connected(LOG_PORT)

    from katapy.agent.container import Containers
    from katapy.agent.crun import Crun
    from katapy.agent.reaper import Reaper, set_child_subreaper
    from katapy.agent.sandbox import Sandbox
    from katapy.agent.server import AgentServer
    from katapy.ttrpc.sync_server import SyncServer

    if not is_init:
        set_child_subreaper()
    reaper = Reaper()
    reaper.start()
    state_dir = opts.get("state-dir", "/run/katapy/containers")
    containers = Containers(reaper, state_dir, Crun(reaper, os.path.join(state_dir, ".crun")))
    sandbox = Sandbox(containers, opts.get("resolv-conf", "/etc/resolv.conf"))
    server = SyncServer(log.PrintfLogger("ttrpc"))
    AgentServer(sandbox, init_daemon=is_init).register(server)
    sock = listen(listen_spec)
    kind, _, where = listen_spec.partition(":")
    if kind == "vsock":
        from katapy.agent.portforward import Forwarder
        from katapy.protocol.portforward import PORT_FORWARD_PORT

        try:
            Forwarder(listen(f"vsock:{PORT_FORWARD_PORT}")).start()
        except OSError as exc:  # e.g. katapy.agent_port=1026: the agent's API matters more
            log.error("port forwarding not served", port=PORT_FORWARD_PORT, error=str(exc))
        from katapy.agent.upcall.server import UPCALL_PORT, UpcallServer

        try:  # the VMM's hotplug requests (katapy.agent.upcall); the wire format loads on first connect
            UpcallServer(listen(f"vsock:{UPCALL_PORT}")).start()
        except OSError as exc:  # without it hotplug fails on the host side; the agent's API matters more
            log.error("upcall not served", port=UPCALL_PORT, error=str(exc))
        if params.get("katapy.debug_console") == "1":  # the host's debug_console = true
            from katapy.agent.console.server import ConsoleServer
            from katapy.protocol.debug_console import DEBUG_CONSOLE_PORT

            try:
                ConsoleServer(listen(f"vsock:{DEBUG_CONSOLE_PORT}"), reaper).start()
            except OSError as exc:
                log.error("debug console not served", port=DEBUG_CONSOLE_PORT, error=str(exc))
    ready = f"port={where}" if kind == "vsock" else f"listen={listen_spec}"
    print(f"katapy-agent: ready {ready}", flush=True)
    log.info("agent ready", listen=listen_spec, pid=os.getpid(), init=is_init, uptime_s=_uptime())
    _install_signal_handlers(server, is_init)
    try:
        server.serve_listener(sock)
    finally:
        sock.close()
        if kind == "unix":
            try:
                os.unlink(where)
            except OSError:
                pass
        sandbox.destroy()
        reaper.stop()
        log.info("agent stopped")
    return 0


def _uptime() -> str:
    """Seconds since the kernel booted (/proc/uptime, proc(5)): the agent's start-up cost in a guest."""
    try:
        with open("/proc/uptime") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return "?"


def _install_signal_handlers(server, is_init: bool) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM/SIGINT stop the agent (not as PID 1: init does not exit)."""
    import signal

    if is_init:
        return

    def stop(signum, frame):  # type: ignore[no-untyped-def]
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
