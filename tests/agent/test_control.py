"""Signals, OOM events, pause/resume, stats and sandbox set-up through the real agent."""
from __future__ import annotations

import trio

from katapy.agent_client import AgentClient
from katapy.agent_client.types import Storage

from .helpers import AgentTarget, make_spec, process_spec
from .test_process import read_all


async def start(agent: AgentClient, target: AgentTarget, cid: str, args: list[str], **options: object) -> None:
    await agent.create_container(cid, cid, make_spec(target.rootfs(cid), args, cid, **options))
    await agent.start_container(cid)


def test_sigterm_and_sigkill_one_process_and_all(agent_target: AgentTarget) -> None:
    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            cid = "sig"
            await start(agent, agent_target, cid, ["sleep", "300"])
            for exec_id in ("a", "b", "c"):
                await agent.exec_process(cid, exec_id, process_spec(["sleep", "300"]))
            await agent.signal_process(cid, "a", 15)
            assert await agent.wait_process(cid, "a") == 128 + 15
            await agent.signal_process(cid, "b", 9)
            assert await agent.wait_process(cid, "b") == 128 + 9
            # signalling a finished process is NOT_FOUND (containerd tolerates that from Kill)
            try:
                await agent.signal_process(cid, "b", 9)
            except Exception as exc:
                assert type(exc).__name__ == "NotFound", exc
            else:
                raise AssertionError("signal to a finished process succeeded")
            # exec_id "" signals every process of the container
            await agent.signal_process(cid, "", 9)
            assert await agent.wait_process(cid, "c") == 137
            assert await agent.wait_process(cid, cid) == 137
            await agent.remove_container(cid, 10)

    trio.run(main)


def test_oom_kill_reported(agent_target: AgentTarget) -> None:
    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            cid = "oom"
            # busybox tail keeps the whole newline-free /dev/zero "line" in memory
            await start(agent, agent_target, cid, ["tail", "/dev/zero"], memory_limit=16 << 20)
            with trio.fail_after(30):
                assert await agent.get_oom_event() == cid
            assert await agent.wait_process(cid, cid) == 137
            stats = await agent.stats_container(cid)
            assert stats.memory.limit == 16 << 20
            await agent.remove_container(cid, 10)

    trio.run(main)


def test_pause_resume_and_stats(agent_target: AgentTarget) -> None:
    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            cid = "ticker"
            await start(agent, agent_target, cid, ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done"])
            # One reader for the whole test: a cancelled ReadStdout would leave the
            # agent's read blocked and its data answered to nobody.
            out = bytearray()

            async def reader() -> None:
                while chunk := await agent.read_stdout(cid, cid, 4096):
                    out.extend(chunk)

            async with trio.open_nursery() as n:
                n.start_soon(reader)
                while out.count(b"\n") < 3:
                    await trio.sleep(0.02)
                await agent.pause_container(cid)
                await trio.sleep(0.3)  # output written before the freeze arrives
                frozen = bytes(out)
                await trio.sleep(0.7)
                assert bytes(out) == frozen, "output continued while paused"
                await agent.resume_container(cid)
                while out.count(b"\n") < frozen.count(b"\n") + 3:
                    await trio.sleep(0.02)
                numbers = [int(x) for x in bytes(out).split()[:-1]]
                assert numbers == list(range(1, len(numbers) + 1)), "the loop restarted or lost output"
                stats = await agent.stats_container(cid)
                assert stats.cpu.total_usage_ns > 0
                assert stats.memory.usage > 0
                assert stats.pids_current >= 1
                await agent.update_container(cid, {"pids": {"limit": 50}})
                assert (await agent.stats_container(cid)).pids_limit == 50
                await agent.remove_container(cid, 10)  # the reader sees EOF
            assert await agent.guest_details()  # still serving

    trio.run(main)


def test_sandbox_hostname_dns_and_tmpfs_storage(agent_target: AgentTarget) -> None:
    async def main() -> None:
        async with await agent_target.connect() as agent:
            mount_point = f"{agent_target.scratch}/data"
            await agent.create_sandbox("podhost", ["nameserver 10.0.0.53", "search example.org"], "sb1",
                                       agent_target.sandbox_storages(
                                           Storage("ephemeral", "tmpfs", "tmpfs", mount_point, ["size=1m"])))
            cid = "bind"
            # The container sees the agent's resolv.conf and the tmpfs storage through bind mounts
            # (as the shim passes them), so the same check holds on a host and in a guest.
            spec = make_spec(agent_target.rootfs(cid), ["sh", "-c", "cat /etc/resolv.conf; df -k /data | tail -1;"
                                                        " echo hi > /data/f; cat /data/f"], cid)
            spec["mounts"] += [{"destination": "/data", "type": "bind", "source": mount_point, "options": ["rbind", "rw"]},
                               {"destination": "/etc/resolv.conf", "type": "bind", "source": agent_target.resolv_conf,
                                "options": ["rbind", "ro"]}]
            await agent.create_container(cid, cid, spec)
            await agent.start_container(cid)
            out = await read_all(agent, cid, cid)
            assert await agent.wait_process(cid, cid) == 0
            lines = out.decode().splitlines()
            assert lines[:2] == ["nameserver 10.0.0.53", "search example.org"]
            assert lines[2].split()[1] == "1024"  # a 1 MiB tmpfs, mounted by the agent
            assert lines[3] == "hi"
            details = await agent.guest_details()
            assert "virtio-fs" in details.storage_handlers
            assert details.init_daemon is agent_target.in_guest  # PID 1 only in a guest
            await agent.remove_container(cid, 10)
            await agent.destroy_sandbox()
            # DestroySandbox unmounted the tmpfs: a second sandbox can mount it again
            await agent.create_sandbox("podhost", [], "sb2", agent_target.sandbox_storages(
                Storage("ephemeral", "tmpfs", "tmpfs", mount_point, ["size=2m"])))
            await agent.destroy_sandbox()

    trio.run(main)
