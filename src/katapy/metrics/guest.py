"""The guest's own metrics (the agent's GetMetrics answer), checked before the shim serves them.

The guest is untrusted: its text is bounded in size and series, must parse as
the Prometheus text format, and only families named ``katapy_guest_*`` or
``katapy_agent_*`` are kept (so a guest cannot forge the shim's or the
hypervisor's figures, nor ``katapy_guest_up``, which the shim sets itself).
Anything else makes the whole answer count as missing (``katapy_guest_up 0``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric

MAX_BYTES = 1 << 20
MAX_SAMPLES = 20_000
PREFIXES = ("katapy_guest_", "katapy_agent_")
UP = "katapy_guest_up"


class GuestMetricsError(ValueError):
    pass


def parse(text: str) -> list[Metric]:
    """The families of ``text`` that a guest may report; GuestMetricsError for anything out of bounds."""
    from prometheus_client.parser import text_string_to_metric_families

    if len(text) > MAX_BYTES:
        raise GuestMetricsError(f"guest metrics are {len(text)} bytes, more than {MAX_BYTES}")
    out: list[Metric] = []
    seen: set[str] = set()
    samples = 0
    try:
        for fam in text_string_to_metric_families(text):
            if not fam.name.startswith(PREFIXES) or fam.name == UP or fam.name in seen:
                raise GuestMetricsError(f"guest metric family {fam.name[:80]!r} is not the guest's to report")
            seen.add(fam.name)
            samples += len(fam.samples)
            if samples > MAX_SAMPLES:
                raise GuestMetricsError(f"guest metrics have more than {MAX_SAMPLES} series")
            out.append(fam)
    except GuestMetricsError:
        raise
    except Exception as exc:  # the parser raises ValueError and friends on malformed text
        raise GuestMetricsError(f"guest metrics do not parse: {exc}") from None
    return out


def up(value: bool) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(UP, "1 when the guest agent answered GetMetrics within the scrape's bound.",
                             value=int(value))
