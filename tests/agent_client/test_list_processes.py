"""AgentClient.list_processes against a hostile agent: a real ttrpc server on a unix socket answers
ListProcesses with what a compromised guest might send; the client refuses each with a ValueError and
never returns a bad entry (the shim turns that into Unavailable for containerd's Pids)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from katapy.agent_client import AgentClient
from katapy.pb import agent_pb2, health_pb2
from katapy.ttrpc.server import Server

SERVICE = "grpc.AgentService"


async def _ask(tmp_path: Path, answer: bytes):  # type: ignore[no-untyped-def]
    seen: list[agent_pb2.ListProcessesRequest] = []

    async def list_processes(req, ctx):  # type: ignore[no-untyped-def]
        seen.append(req)
        return agent_pb2.ListProcessesResponse(process_list=answer)

    async def check(req, ctx):  # type: ignore[no-untyped-def]
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = Server()
    server.register("grpc.Health", {"Check": (health_pb2.CheckRequest, check)})
    server.register(SERVICE, {"ListProcesses": (agent_pb2.ListProcessesRequest, list_processes)})
    path = tmp_path / "agent.sock"
    async with trio.open_nursery() as n:
        await n.start(server.serve_unix, path)
        try:
            async with await AgentClient.connect_unix(path, timeout=10) as agent:
                try:
                    return await agent.list_processes("c1"), seen
                except ValueError as exc:  # returned: raised here it would leave the nursery as a group
                    return exc, seen
        finally:
            n.cancel_scope.cancel()


def test_a_good_answer_is_typed(tmp_path: Path) -> None:
    rows, seen = trio.run(_ask, tmp_path, json.dumps(
        [{"pid": 7, "exec_id": ""}, {"pid": 9, "exec_id": "e1"}, {"pid": 12, "exec_id": None}]).encode())
    assert [(p.pid, p.exec_id) for p in rows] == [(7, ""), (9, "e1"), (12, None)]
    assert (seen[0].container_id, seen[0].format) == ("c1", "katapy")


@pytest.mark.parametrize("answer", [
    b"not json",
    b"\xff\xfe",
    b'{"pid": 1}',  # not a list
    b'[{"pid": 0, "exec_id": ""}]',
    b'[{"pid": -3, "exec_id": ""}]',
    b'[{"pid": 2147483648, "exec_id": ""}]',
    b'[{"pid": true, "exec_id": ""}]',  # a bool is not a pid
    b'[{"pid": "7", "exec_id": ""}]',
    b'[{"pid": 7, "exec_id": 5}]',
    b'[7]',
    json.dumps([{"pid": i + 1, "exec_id": None} for i in range(65537)]).encode(),
])
def test_a_hostile_answer_is_refused(tmp_path: Path, answer: bytes) -> None:
    refused, _ = trio.run(_ask, tmp_path, answer)
    assert isinstance(refused, ValueError) and "ListProcesses" in str(refused), refused
