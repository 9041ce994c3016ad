"""Bad requests and garbage on the wire: clear statuses, and the agent keeps serving."""
from __future__ import annotations

import struct

import pytest
import trio

from katapy.agent_client.oci import OciSpecError
from katapy.ttrpc.errors import AlreadyExists, InvalidArgument, NotFound

from .helpers import AgentTarget, make_spec, process_spec


def test_bad_requests_get_clear_errors(agent_target: AgentTarget) -> None:
    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb1", agent_target.sandbox_storages())
            for call in (agent.start_container("nope"), agent.wait_process("nope", "nope"),
                         agent.read_stdout("nope", "nope"), agent.remove_container("nope"),
                         agent.signal_process("nope", "", 9), agent.stats_container("nope")):
                with pytest.raises(NotFound, match="nope"):
                    await call
            rootfs = agent_target.rootfs("c1")
            bad_root = make_spec("relative/rootfs", ["true"], "c1")
            with pytest.raises(InvalidArgument, match="root.path"):
                await agent.create_container("c1", "c1", bad_root)
            with pytest.raises(InvalidArgument, match="args"):
                await agent.create_container("c1", "c1", make_spec(rootfs, [], "c1"))
            with pytest.raises(InvalidArgument, match="container id"):
                await agent.create_container("../etc", "x", make_spec(rootfs, ["true"], "x"))
            with pytest.raises(InvalidArgument, match="crun create failed"):
                await agent.create_container("c1", "c1", make_spec(rootfs, ["/no/such/binary"], "c1"))
            with pytest.raises(OciSpecError, match="process.args"):  # refused by the client itself
                await agent.create_container("c1", "c1", {**make_spec(rootfs, ["true"], "c1"),
                                                          "process": {"args": "true"}})
            await agent.create_container("c1", "c1", make_spec(rootfs, ["sleep", "60"], "c1"))
            with pytest.raises(AlreadyExists):
                await agent.create_container("c1", "c1", make_spec(rootfs, ["sleep", "60"], "c1"))
            with pytest.raises(NotFound, match="e9"):
                await agent.wait_process("c1", "e9")
            await agent.start_container("c1")
            with pytest.raises(InvalidArgument):
                await agent.exec_process("c1", "e1", process_spec([]))
            with pytest.raises(InvalidArgument, match="signal"):
                await agent.signal_process("c1", "c1", 999)
            await agent.remove_container("c1", 10)
            assert await agent.health_check()

    trio.run(main)


def _frame(stream_id: int, kind: int, data: bytes, length: int | None = None) -> bytes:
    """A ttrpc frame built by hand (docs/protocols.md §3): u32 len, u32 stream, u8 type, u8 flags."""
    return struct.pack(">IIBB", len(data) if length is None else length, stream_id, kind, 0) + data


def test_malformed_frames_leave_agent_serving(agent_target: AgentTarget) -> None:
    garbage = [
        b"\xff" * 64,  # absurd length
        _frame(2, 1, b"\x0a\x03abc"),  # even stream id
        _frame(1, 1, b"\x0a\x10grpc.AgentService\x12\x0fCreateContainer\x1a\x05\xff\xff\xff\xff\xff"),  # bad payload
        _frame(3, 1, b"\xff\xff\xff"),  # undecodable Request
        _frame(5, 9, b"unknown type"),
        _frame(7, 1, b"", length=5 << 20),  # oversize announcement, then hang up
    ]
    for blob in garbage * 5:
        with agent_target.raw_connect() as s:
            s.sendall(blob)
            s.settimeout(0.3)
            try:
                s.recv(4096)
            except (TimeoutError, OSError):
                pass

    async def main() -> None:
        async with await agent_target.connect() as agent:
            assert await agent.health_check()
            assert await agent.version()

    trio.run(main)
    assert agent_target.alive()
