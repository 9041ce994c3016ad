"""`katapy sandbox run --health`: boot a sandbox VM, check its agent, print the timings, stop it;
`katapy sandbox list` / `inspect ID`: the sandboxes the shims run on this host (katapy.cli.sandbox_list).

The quickest end-to-end check of a host: the configured backend (or
``--hypervisor``) starts the VM with the configured guest kernel and image;
the agent is dialled over hybrid vsock (``CONNECT <port>``) until its
Health.Check answers SERVING; the VM is then stopped and its state removed.
Exit status 0 when the agent answered, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import trio

from katapy import config, log


async def run_health(args: argparse.Namespace) -> dict[str, Any]:
    from katapy.testing.sandbox import sandbox_vm

    t0 = time.monotonic()
    cfg = config.load(args.config)
    if args.shared_fs:
        cfg = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, shared_fs=args.shared_fs))
    report: dict[str, Any] = {"config": str(cfg.source or "built-in defaults"), "config_load_s": time.monotonic() - t0}
    async with sandbox_vm(cfg, backend=args.hypervisor, state_root=args.state_dir) as sb:
        report["backend"] = sb.hypervisor.name
        report.update(sb.times)
        t1 = time.monotonic()
        report["health"] = "SERVING" if await sb.agent.health_check() else "NOT_SERVING"
        report["health_check_s"] = time.monotonic() - t1
        report["agent_version"] = await sb.agent.version()
        report["metrics"] = sb.hypervisor.metrics()
        if args.console:
            report["console"] = sb.hypervisor.console_log() if hasattr(sb.hypervisor, "console_log") else ""
    report.update({k: v for k, v in sb.times.items() if k == "stop_s"})
    report["total_s"] = time.monotonic() - t0
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"backend:        {report['backend']} (config {report['config']})")
    print(f"agent health:   {report['health']} (agent {report['agent_version']})")
    print(f"config load:    {report['config_load_s'] * 1000:8.1f} ms")
    for key, label in (("vm_start_s", "VM start"), ("agent_ready_s", "agent ready"),
                       ("health_check_s", "health check"), ("stop_s", "stop + cleanup"), ("total_s", "total")):
        if key in report:
            print(f"{label + ':':<16}{report[key] * 1000:8.1f} ms")
    m = report.get("metrics", {})
    if "rss_kib" in m:
        print(f"VMM RSS:        {m['rss_kib'] / 1024:8.1f} MiB (pid {m.get('pid')}, {m.get('threads')} threads)")
    if report.get("console"):
        print("--- guest console ---")
        print(report["console"].rstrip())


def _list_or_inspect(args: argparse.Namespace) -> int:
    from katapy.cli import sandbox_list

    state_dir = args.state_dir or Path(config.load(check_files=False).runtime.state_dir)
    if args.cmd == "list":
        sandbox_list.print_table(sandbox_list.sandboxes(state_dir))
        return 0
    d = state_dir / args.id
    if "/" in args.id or args.id in ("", ".", "..") or not (d / "sandbox.json").is_file():
        print(f"katapy sandbox inspect: no sandbox {args.id!r} in {state_dir}", file=sys.stderr)
        return 1
    print(sandbox_list.as_json(sandbox_list.inspect(d)))
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="katapy sandbox", description="start a sandbox VM and talk to its agent")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="boot a sandbox VM, check the agent, stop it")
    run.add_argument("--health", action="store_true", help="check the agent's health (the default action)")
    run.add_argument("--config", type=Path, help="configuration file (default: KATAPY_CONFIG or /etc/katapy)")
    run.add_argument("--hypervisor", choices=("auto", "builtin", "qemu"), help="override [hypervisor] name")
    run.add_argument("--state-dir", type=Path, help="where the sandbox's state directory goes (default: /tmp)")
    run.add_argument("--shared-fs", choices=config.SHARED_FS, help="override [hypervisor] shared_fs")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--console", action="store_true", help="also print the guest console")
    ls = sub.add_parser("list", help="the sandboxes running on this host")
    ins = sub.add_parser("inspect", help="one running sandbox, as JSON")
    ins.add_argument("id")
    for p in (ls, ins):
        p.add_argument("--state-dir", type=Path, help="the shims' state directory (default: [runtime] state_dir)")
    args = ap.parse_args(argv)
    if args.cmd in ("list", "inspect"):
        return _list_or_inspect(args)
    log.configure("debug" if "-v" in argv else "warning")
    try:
        report = trio.run(run_health, args)
    except config.ConfigError as exc:
        print(f"katapy sandbox: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line for the user; the logs have the rest
        print(f"katapy sandbox: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print(report)
    return 0 if report["health"] == "SERVING" else 1
