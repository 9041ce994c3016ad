"""``containerd-shim-katapy-v2 ... delete``: clean up after a shim that died.

containerd runs it (cwd = bundle) when it cannot reach the shim, e.g. after
``kill -9``.  Using the sandbox record the shim left (``katapy.shim.persist``):
kill every process in the sandbox cgroup (the VMM: the dead shim itself for
builtin, QEMU for qemu), unmount the container's rootfs and volumes from the
share, and for the sandbox's own container remove the cgroup, the state
directory and the stale socket.  Prints the raw ``DeleteResponse`` bytes
(exit_status 137, exited_at now) as runc does (docs/protocols.md §1).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from katapy import log, paths
from katapy.resource import mounts, rootfs
from katapy.resource.cgroups import CgroupError, SandboxCgroup
from katapy.shim import address as addr
from katapy.shim import bundle as bundle_mod
from katapy.shim.args import ShimArgs
from katapy.shim.errors import InvalidArgument
from katapy.shim.persist import SandboxRecord

KILLED_STATUS = 128 + int(signal.SIGKILL)


def _state_dir() -> Path:
    try:
        from katapy import config

        return Path(config.load(check_files=False).runtime.state_dir)
    except Exception:
        return paths.state_dir()


def cleanup(container_id: str, bundle: Path, namespace: str = "", containerd_address: str = "") -> None:
    logger = log.get("shim.delete", container_id=container_id)
    try:
        spec = bundle_mod.load_spec(bundle)
    except InvalidArgument:
        spec = {}
    sandbox_id = bundle_mod.sandbox_id(spec, container_id) if spec else container_id
    sdir = _state_dir() / sandbox_id
    record = SandboxRecord.load(sdir)
    shared = Path(record.shared_dir) if record else sdir / "shared"
    rootfs.release(shared, container_id)
    if sandbox_id != container_id:
        logger.info("container share released", sandbox_id=sandbox_id)
        return
    if record is not None:
        cg = SandboxCgroup(sandbox_id, [Path(d) for d in record.cgroup_dirs])
        try:
            cg.kill_all(exclude={os.getpid()})
            cg.destroy()
        except CgroupError as exc:
            logger.error("sandbox cgroup cleanup failed", error=str(exc))
        for pid in (record.vmm_pid, record.shim_pid):
            if pid > 0 and pid != os.getpid() and _is_ours(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    mounts.unmount_all_under(sdir)
    if sdir.exists() and not mounts.mount_points_under(sdir):
        shutil.rmtree(sdir, ignore_errors=True)
    if containerd_address:
        try:
            sock = addr.socket_path(addr.socket_address(containerd_address, namespace, sandbox_id))
            sock.unlink(missing_ok=True)
        except ValueError:
            pass
    logger.info("sandbox cleaned up after a dead shim", sandbox_id=sandbox_id)


def _is_ours(pid: int) -> bool:
    """Only kill a recorded pid if it still runs a katapy shim or a VMM (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"katapy" in cmdline or b"qemu-system" in cmdline


def delete_response(exit_status: int = KILLED_STATUS) -> bytes:
    from katapy.pb import containerd_shim_pb2 as pb
    from katapy.shim.publisher import timestamp

    return pb.DeleteResponse(pid=0, exit_status=exit_status, exited_at=timestamp(time.time())).SerializeToString()


def run(args: ShimArgs) -> int:
    if not args.id:
        print("delete: -id is required", file=sys.stderr)
        return 1
    bundle = Path(args.bundle or os.getcwd())
    cleanup(args.id, bundle, args.namespace, args.address)
    sys.stdout.buffer.write(delete_response())
    sys.stdout.buffer.flush()
    return 0
