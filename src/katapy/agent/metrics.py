"""GetMetrics: the agent's and the guest kernel's figures in the Prometheus text format (Kata's agent does
the same: ``src/agent/src/metrics.rs``, families ``kata_agent_*`` and ``kata_guest_*``).

Read from procfs on each request (proc(5): meminfo, stat, loadavg, net/dev,
diskstats; /proc/self for the agent).  Written by hand, not with
prometheus_client: the guest image carries no more Python than the agent
needs, and this is a few lines of text.  The shim checks and relabels what
comes back (the guest is not trusted): katapy.shim.metrics.
"""
from __future__ import annotations

import os

_USER_HZ = os.sysconf("SC_CLK_TCK")
_CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, doc: str, samples: list[tuple[dict[str, str], float]]) -> None:
        if not samples:
            return
        sample_name = f"{name}_total" if kind == "counter" else name  # text format 0.0.4 names counters *_total
        self.lines += [f"# HELP {sample_name} {doc}", f"# TYPE {sample_name} {kind}"]
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{sample_name}{{{lab}}} {value!r}" if lab else f"{sample_name} {value!r}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _agent(t: _Text) -> None:
    stat = _read("/proc/self/stat")
    status = _read("/proc/self/status")
    if not stat:
        return
    fields = stat[stat.rindex(")") + 2:].split()
    rss = next((int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
    t.family("katapy_agent_resident_memory_bytes", "gauge", "Resident memory of the agent, bytes.", [({}, rss)])
    t.family("katapy_agent_threads", "gauge", "Threads of the agent.", [({}, int(fields[17]))])
    t.family("katapy_agent_open_fds", "gauge", "Open file descriptors of the agent.",
             [({}, len(os.listdir("/proc/self/fd")))])
    t.family("katapy_agent_cpu_seconds", "counter", "User and system CPU time of the agent, seconds.",
             [({}, (int(fields[11]) + int(fields[12])) / _USER_HZ)])


def _meminfo(t: _Text) -> None:
    samples = []
    for line in _read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            samples.append(({"item": key.strip()}, int(parts[0]) * 1024))
    t.family("katapy_guest_meminfo_bytes", "gauge", "The guest kernel's /proc/meminfo, bytes.", samples)


def _cpu(t: _Text) -> None:
    samples = []
    for line in _read("/proc/stat").splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith("cpu") or parts[0] == "cpu":
            continue
        for mode, ticks in zip(_CPU_MODES, parts[1:]):
            samples.append(({"cpu": parts[0][3:], "mode": mode}, int(ticks) / _USER_HZ))
    t.family("katapy_guest_cpu_seconds", "counter", "Time each online guest CPU spent in each mode, seconds.",
             samples)
    load = _read("/proc/loadavg").split()
    if len(load) >= 3:
        for i, span in enumerate(("1", "5", "15")):
            t.family(f"katapy_guest_load{span}", "gauge", f"The guest's {span}-minute load average.",
                     [({}, float(load[i]))])


def _network(t: _Text) -> None:
    rx_b, rx_p, tx_b, tx_p = [], [], [], []
    for line in _read("/proc/net/dev").splitlines()[2:]:
        name, _, rest = line.partition(":")
        v = rest.split()
        if len(v) < 16:
            continue
        lab = {"interface": name.strip()}
        rx_b.append((lab, int(v[0])))
        rx_p.append((lab, int(v[1])))
        tx_b.append((lab, int(v[8])))
        tx_p.append((lab, int(v[9])))
    t.family("katapy_guest_network_receive_bytes", "counter", "Bytes each guest interface received.", rx_b)
    t.family("katapy_guest_network_receive_packets", "counter", "Packets each guest interface received.", rx_p)
    t.family("katapy_guest_network_transmit_bytes", "counter", "Bytes each guest interface sent.", tx_b)
    t.family("katapy_guest_network_transmit_packets", "counter", "Packets each guest interface sent.", tx_p)


def _disks(t: _Text) -> None:
    rd, wr, rd_b, wr_b = [], [], [], []
    for line in _read("/proc/diskstats").splitlines():
        v = line.split()
        if len(v) < 14 or v[2].startswith(("loop", "ram")):
            continue
        lab = {"device": v[2]}
        rd.append((lab, int(v[3])))
        rd_b.append((lab, int(v[5]) * 512))  # sectors are 512 bytes in diskstats (Documentation/admin-guide/iostats.rst)
        wr.append((lab, int(v[7])))
        wr_b.append((lab, int(v[9]) * 512))
    t.family("katapy_guest_disk_reads_completed", "counter", "Reads each guest block device completed.", rd)
    t.family("katapy_guest_disk_read_bytes", "counter", "Bytes read from each guest block device.", rd_b)
    t.family("katapy_guest_disk_writes_completed", "counter", "Writes each guest block device completed.", wr)
    t.family("katapy_guest_disk_written_bytes", "counter", "Bytes written to each guest block device.", wr_b)


def collect() -> str:
    t = _Text()
    for part in (_agent, _meminfo, _cpu, _network, _disks):
        part(t)
    return t.text()
