"""The event publisher against a real containerd: forwarded events appear, in order, in ``ctr events``."""
from __future__ import annotations

import subprocess
import time

import pytest
import trio

from katapy.shim import events as ev
from katapy.shim.publisher import EventPublisher
from katapy.shim.types import Stdio

from .containerd import PrivateContainerd

pytestmark = pytest.mark.containerd


def test_published_events_reach_ctr_events_in_order(containerd: PrivateContainerd) -> None:
    watcher = subprocess.Popen(["ctr", "--address", containerd.address, "events"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=containerd.env(), text=True)
    try:
        time.sleep(0.5)  # let ctr subscribe
        sent = [
            ev.TaskCreated("evc", "/b/evc", (), Stdio(), 42),
            ev.TaskStarted("evc", 42),
            ev.ExecAdded("evc", "e1"),
            ev.ExecStarted("evc", "e1", 42),
            ev.TaskPaused("evc"),
            ev.TaskResumed("evc"),
            ev.TaskOOM("evc"),
            ev.TaskExited("evc", "evc", 42, 3, time.time()),
            ev.TaskDeleted("evc", "evc", 42, 3, time.time()),
        ]

        async def publish_all() -> int:
            pub = EventPublisher(containerd.ttrpc_address, containerd.namespace)
            async with trio.open_nursery() as n:
                n.start_soon(pub.run)
                for e in sent:
                    pub.publish(e)
                assert await pub.flush(20)
                n.cancel_scope.cancel()
            return pub.sent

        assert trio.run(publish_all) == len(sent)
        time.sleep(0.5)
    finally:
        watcher.terminate()
        out, err = watcher.communicate(timeout=10)
    lines = [line for line in out.splitlines() if "evc" in line]
    topics = [line.split()[5] for line in lines]  # date time +0000 UTC namespace topic json
    assert topics == [e.topic for e in sent], out + err
    assert all(f" {containerd.namespace} " in line for line in lines)
    # the payload decoded on containerd's side (bare type_url): the exit status is visible
    exit_line = lines[7]
    assert '"id":"evc"' in exit_line and '"exit_status":3' in exit_line, exit_line


def test_publisher_retries_then_drops_when_containerd_is_unreachable(tmp_path) -> None:
    async def main() -> tuple[int, int]:
        pub = EventPublisher(str(tmp_path / "nobody.sock"), "ns")
        async with trio.open_nursery() as n:
            n.start_soon(pub.run)
            pub.publish(ev.TaskOOM("x"))
            assert await pub.flush(10)
            n.cancel_scope.cancel()
        return pub.sent, pub.dropped

    assert trio.run(main) == (0, 1)
