"""Prometheus metrics for operators: each shim's sandbox, and ``katapy monitor`` over all of them.

Kata's shape (``src/runtime/pkg/kata-monitor``, the shim's ``/metrics`` on its
socket): every shim serves its own sandbox's figures in the Prometheus text
exposition format (https://prometheus.io/docs/instrumenting/exposition_formats/)
over HTTP on a unix socket in the sandbox's state directory,
``<state_dir>/<sandbox_id>/metrics.sock``, reachable only by root; ``katapy
monitor`` finds those sockets, scrapes each with a bounded timeout, labels the
series with the sandbox (and pod, where known) and serves the union on TCP.

* :mod:`katapy.metrics.procfs`: a process's RSS, threads, fds and CPU time.
* :mod:`katapy.metrics.sandbox`: what one shim knows, as metric families.
* :mod:`katapy.metrics.endpoint`: the shim's HTTP server on its unix socket.
* :mod:`katapy.metrics.monitor`: the host-wide aggregator.

Names follow Prometheus's conventions (https://prometheus.io/docs/practices/naming/):
base units (bytes, seconds), ``_total`` for counters, one prefix per component
(``katapy_shim_``, ``katapy_hypervisor_``, ``katapy_guest_``, ``katapy_monitor_``).
"""
