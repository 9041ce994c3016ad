"""The agent's SetOnlineCPUs logic (katapy.agent.cpu_online) against a fake /sys/devices/system/cpu in a tmp dir.

The fake tree has the files the kernel ABI defines (``present``; ``cpuN/online``
except for CPU 0, as on x86).  A CPU the kernel refuses to take down answers
the write with EBUSY (kernel/cpu.c ``cpu_down``); the fake raises what
``CpuSysfs.write`` raises for that errno.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from katapy.agent.cpu_online import CpuSysfs, parse_cpu_list, set_online_cpus
from katapy.ttrpc.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument


class FakeCpuTree(CpuSysfs):
    """A sysfs CPU tree; ``refuse`` lists CPUs whose writes fail with EBUSY (as a CPU the kernel keeps)."""

    def __init__(self, root: Path, present: int, online: int, refuse: tuple[int, ...] = ()) -> None:
        super().__init__(root)
        self.refuse = set(refuse)
        self.writes: list[tuple[int, bool]] = []
        (root / "present").write_text(f"0-{present - 1}\n")
        for cpu in range(present):
            (root / f"cpu{cpu}").mkdir()
            if cpu:
                (root / f"cpu{cpu}" / "online").write_text("1\n" if cpu < online else "0\n")

    def write(self, cpu: int, online: bool) -> None:
        if cpu in self.refuse:
            raise FailedPrecondition(f"cpu{cpu} refused to go {'online' if online else 'offline'}: "
                                     f"{os.strerror(errno.EBUSY)}")
        super().write(cpu, online)
        self.writes.append((cpu, online))

    def online(self) -> list[int]:
        return list(self.state().online_ids)


@pytest.mark.parametrize("text,ids", [("0", [0]), ("0-3\n", [0, 1, 2, 3]), ("0-1,4,6-7", [0, 1, 4, 6, 7]),
                                      ("", [])])
def test_parse_cpu_list(text, ids):
    assert parse_cpu_list(text) == ids


def test_grow_onlines_the_lowest_offline_cpus(tmp_path):
    t = FakeCpuTree(tmp_path, present=4, online=1)
    got = set_online_cpus(3, t)
    assert (got.online, got.present, got.online_ids) == (3, 4, (0, 1, 2))
    assert t.writes == [(1, True), (2, True)]


def test_shrink_offlines_the_highest_online_cpus_never_cpu0(tmp_path):
    t = FakeCpuTree(tmp_path, present=4, online=4)
    assert set_online_cpus(2, t).online_ids == (0, 1)
    assert t.writes == [(3, False), (2, False)]
    assert set_online_cpus(1, t).online_ids == (0,)
    assert (0, False) not in t.writes


def test_shrink_skips_holes(tmp_path):
    t = FakeCpuTree(tmp_path, present=4, online=1)
    (tmp_path / "cpu3" / "online").write_text("1")  # 0 and 3 online
    assert set_online_cpus(1, t).online_ids == (0,)
    assert t.writes == [(3, False)]


def test_same_count_changes_nothing(tmp_path):
    t = FakeCpuTree(tmp_path, present=4, online=2)
    assert set_online_cpus(2, t).online == 2
    assert t.writes == []


@pytest.mark.parametrize("target", [0, 5, -1])
def test_out_of_range_is_refused_before_any_write(tmp_path, target):
    t = FakeCpuTree(tmp_path, present=4, online=2)
    with pytest.raises(InvalidArgument, match="the guest has 4 present"):
        set_online_cpus(target, t)
    assert t.writes == [] and t.online() == [0, 1]


def test_refused_offline_is_reported_and_the_rest_undone(tmp_path):
    t = FakeCpuTree(tmp_path, present=4, online=4, refuse=(2,))
    with pytest.raises(FailedPrecondition) as info:
        set_online_cpus(1, t)
    msg = info.value.message
    assert "cpu2 refused to go offline: Device or resource busy" in msg and "4 CPUs online now" in msg, msg
    assert t.online() == [0, 1, 2, 3]  # cpu3 was taken down, then brought back
    assert t.writes == [(3, False), (3, True)]


def test_refused_online_is_reported_and_the_rest_undone(tmp_path):
    t = FakeCpuTree(tmp_path, present=4, online=1, refuse=(2,))
    with pytest.raises(FailedPrecondition, match="cpu2 refused to go online.*1 CPUs online now"):
        set_online_cpus(4, t)
    assert t.online() == [0]


def test_real_write_error_names_the_cpu_and_errno(tmp_path):
    t = CpuSysfs(tmp_path)
    (tmp_path / "present").write_text("0-1")
    (tmp_path / "cpu1" / "online").mkdir(parents=True)  # a directory: open(..., "w") fails with EISDIR
    with pytest.raises(FailedPrecondition, match="cpu1 refused to go offline: Is a directory"):
        t.write(1, False)


def test_cpus_without_an_online_file_cannot_be_taken_down(tmp_path):
    t = FakeCpuTree(tmp_path, present=3, online=3)
    (tmp_path / "cpu2" / "online").unlink()  # like cpu0: always on
    with pytest.raises(FailedPrecondition, match="only 1 of its 3 online CPUs can go offline"):
        set_online_cpus(1, t)
    assert t.writes == []


def test_missing_present_file_is_a_clear_error(tmp_path):
    with pytest.raises(FailedPrecondition, match="cannot read .*present"):
        set_online_cpus(1, CpuSysfs(tmp_path))


def test_online_cpu_mem_onlines_offline_cpus_through_the_same_files(tmp_path):
    """OnlineCPUMem's CPU half (katapy.agent.guest.online_cpus) walks the same sysfs files as SetOnlineCPUs."""
    from katapy.agent.guest import online_cpus

    tree = FakeCpuTree(tmp_path, present=4, online=1, refuse=(2,))
    assert online_cpus(2, timeout=None, sysfs=tree) == 2
    assert tree.online() == [0, 1, 3]  # cpu2 refused: the next offline one instead
    with pytest.raises(DeadlineExceeded):
        online_cpus(1, timeout=0.2, sysfs=tree)  # only the refusing cpu2 is left
