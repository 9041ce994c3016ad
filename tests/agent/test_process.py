"""Container processes through the real agent, crun and AgentClient: output, exit codes, stdin, tty, exec."""
from __future__ import annotations

import hashlib
import os

import trio

from katapy.agent_client import AgentClient

from .helpers import AgentTarget, make_spec, process_spec


async def read_all(agent: AgentClient, cid: str, exec_id: str, stream: str = "stdout") -> bytes:
    read = agent.read_stdout if stream == "stdout" else agent.read_stderr
    out = b""
    while chunk := await read(cid, exec_id, 65536):
        out += chunk
    return out


async def run_container(target: AgentTarget, agent: AgentClient, cid: str, args: list[str],
                        **spec_options: object) -> tuple[int, bytes, bytes]:
    """Create + start a container, collect stdout/stderr until EOF, wait, remove."""
    await agent.create_container(cid, cid, make_spec(target.rootfs(cid), args, cid, **spec_options))
    await agent.start_container(cid)
    async with trio.open_nursery() as n:
        results: dict[str, bytes] = {}

        async def collect(stream: str) -> None:
            results[stream] = await read_all(agent, cid, cid, stream)

        n.start_soon(collect, "stdout")
        n.start_soon(collect, "stderr")
    status = await agent.wait_process(cid, cid)
    await agent.remove_container(cid, 10)
    return status, results["stdout"], results["stderr"]


def test_echo_and_exit_codes(agent_target: AgentTarget) -> None:
    async def main() -> None:
        async with await agent_target.connect() as agent:
            assert await agent.health_check()
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            status, out, err = await run_container(
                agent_target, agent, "echo", ["sh", "-c", "echo hello; echo oops >&2; hostname"])
            assert status == 0
            assert out == b"hello\nh-echo\n"
            assert err == b"oops\n"
            status, _, _ = await run_container(agent_target, agent, "fail", ["false"])
            assert status == 1
            # A PID-namespace init cannot be killed from inside its namespace, so
            # this container shares the agent's PID namespace.
            status, _, _ = await run_container(agent_target, agent, "killed", ["sh", "-c", "kill -9 $$"],
                                               pid_namespace=False)
            assert status == 137

    trio.run(main)


def test_stdin_one_mebibyte_through_cat(agent_target: AgentTarget) -> None:
    payload = os.urandom(1 << 20)

    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            cid = "cat"
            await agent.create_container(cid, cid, make_spec(agent_target.rootfs(cid), ["cat"], cid))
            await agent.start_container(cid)
            received: list[bytes] = []
            async with trio.open_nursery() as n:
                async def reader() -> None:
                    received.append(await read_all(agent, cid, cid))

                n.start_soon(reader)
                view = memoryview(payload)
                while view:
                    written = await agent.write_stdin(cid, cid, bytes(view[:200_000]))
                    assert written > 0
                    view = view[written:]
                await agent.close_stdin(cid, cid)
            assert await agent.wait_process(cid, cid) == 0
            assert hashlib.sha256(received[0]).hexdigest() == hashlib.sha256(payload).hexdigest()
            await agent.remove_container(cid, 10)

    trio.run(main)


def test_tty_process_and_resize(agent_target: AgentTarget) -> None:
    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            cid = "tty"
            spec = make_spec(agent_target.rootfs(cid), ["sh", "-c", "read line; stty size; tty"], cid, terminal=True)
            await agent.create_container(cid, cid, spec)
            await agent.tty_win_resize(cid, cid, 33, 111)
            await agent.start_container(cid)
            await agent.write_stdin(cid, cid, b"go\n")
            out = await read_all(agent, cid, cid)
            assert await agent.wait_process(cid, cid) == 0
            text = out.decode().replace("\r", "")
            assert "33 111" in text
            assert "/dev/pts/" in text
            await agent.remove_container(cid, 10)

    trio.run(main)


def test_exec_into_running_container(agent_target: AgentTarget) -> None:
    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            cid = "svc"
            await agent.create_container(cid, cid, make_spec(agent_target.rootfs(cid), ["sleep", "300"], cid))
            await agent.start_container(cid)
            await agent.exec_process(cid, "e1", process_spec(["sh", "-c", "echo in-$(hostname); ps | grep -c sleep; exit 7"]))
            out = await read_all(agent, cid, "e1")
            assert await agent.wait_process(cid, "e1") == 7
            lines = out.decode().split()
            assert lines[0] == f"in-h-{cid}"
            # exec'd tty process with its own window size
            await agent.exec_process(cid, "t1", process_spec(["sh", "-c", "read x; stty size"], terminal=True))
            await agent.tty_win_resize(cid, "t1", 10, 20)
            await agent.write_stdin(cid, "t1", b"\n")
            tty_out = await read_all(agent, cid, "t1")
            assert await agent.wait_process(cid, "t1") == 0
            assert b"10 20" in tty_out
            await agent.signal_process(cid, cid, 9)
            assert await agent.wait_process(cid, cid) == 137
            await agent.remove_container(cid, 10)

    trio.run(main)


def test_list_processes_names_init_execs_and_children(agent_target: AgentTarget) -> None:
    """ListProcesses reads the container's cgroup: init (exec id ""), an exec (its id), init's child (None)."""
    from katapy.ttrpc.errors import NotFound

    async def listed(agent: AgentClient, cid: str, want: int) -> list[tuple[int, str | None]]:
        with trio.fail_after(30):
            while len(rows := await agent.list_processes(cid)) != want:
                await trio.sleep(0.2)
        return [(p.pid, p.exec_id) for p in rows]

    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            cid = "ps"
            await agent.create_container(cid, cid, make_spec(agent_target.rootfs(cid), ["sh", "-c", "sleep 300 & wait"],
                                                             cid))
            await agent.start_container(cid)
            await agent.exec_process(cid, "e1", process_spec(["sleep", "200"]))
            rows = await listed(agent, cid, 3)
            assert [p for p, _ in rows] == sorted(p for p, _ in rows)
            assert sorted((e is None, e or "") for _, e in rows) == [(False, ""), (False, "e1"), (True, "")], rows
            await agent.signal_process(cid, "e1", 9)
            assert await agent.wait_process(cid, "e1") == 137
            assert sorted(str(e) for _, e in await listed(agent, cid, 2)) == ["", "None"]
            await agent.signal_process(cid, cid, 9)
            await agent.wait_process(cid, cid)
            await agent.remove_container(cid, 10)
            try:
                await agent.list_processes(cid)
            except NotFound:
                pass
            else:
                raise AssertionError("ListProcesses of a removed container answered")

    trio.run(main)


def test_container_cannot_reach_the_agents_root(agent_target: AgentTarget) -> None:
    """A container process with CAP_SYS_ADMIN that lazily unmounts its own ``/`` still sees only its
    rootfs, nothing of the agent's root filesystem (its /usr).  In a guest crun runs with --no-pivot
    (the initramfs root cannot be pivoted): the container root is moved over the agent's ``/`` and
    chrooted, so this is what keeps the agent's files out of reach there."""

    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            script = "test -e /usr && exit 3; umount -l /; if test -e /usr; then echo ESCAPED; else echo CONTAINED; fi"
            status, out, err = await run_container(agent_target, agent, "escape", ["sh", "-c", script],
                                                   extra_caps=("CAP_SYS_ADMIN",))
            assert (status, out) == (0, b"CONTAINED\n"), (status, out, err)

    trio.run(main)
