"""Join a veth and a tap with tc: everything arriving on one leaves by the other (Kata's "tcfilter" model).

For each of the two links: an ingress qdisc (handle ffff:, tc-ingress) and
one u32 filter matching every packet (``match u32 0 0`` at offset 0,
protocol ETH_P_ALL) whose action is ``mirred egress redirect`` to the other
link (tc-mirred(8)).  The packet is stolen at ingress, so the veth's own IP
stack never sees pod traffic; the guest behind the tap answers for the
pod's IP and MAC.  Equivalent to::

    tc qdisc add dev VETH ingress
    tc filter add dev VETH parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev TAP
    (and the same with VETH and TAP swapped)

Removing the ingress qdisc removes its filters with it (that is teardown).
matchall would say the same more directly but is not built into every host
kernel; u32 is.
"""
from __future__ import annotations

from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from katapy.resource.network.types import NetworkError

INGRESS_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
FILTER_CLASSID = 0x10001  # u32 needs a flowid; with a redirect action it is never used
_GONE = (2, 19, 22)  # ENOENT, ENODEV, EINVAL: the qdisc or link is already gone


def _redirect(ipr: Any, src_index: int, dst_index: int, what: str) -> None:
    try:
        ipr.tc("add", "ingress", src_index, "ffff:")
        ipr.tc("add-filter", "u32", src_index, parent=INGRESS_HANDLE, protocol=ETH_P_ALL, prio=1,
               target=FILTER_CLASSID, keys=["0x0/0x0+0"],
               action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst_index})
    except NetlinkError as exc:
        raise NetworkError(f"tc redirect {what}: {exc.args[-1] if exc.args else exc} (errno {exc.code}); "
                           "the host kernel needs sch_ingress, cls_u32 and act_mirred") from None


def connect(ipr: Any, veth_index: int, tap_index: int) -> None:
    """Redirect veth ingress to tap egress and tap ingress to veth egress."""
    _redirect(ipr, veth_index, tap_index, "veth->tap")
    try:
        _redirect(ipr, tap_index, veth_index, "tap->veth")
    except NetworkError:
        disconnect(ipr, veth_index)
        raise


def disconnect(ipr: Any, index: int) -> None:
    """Remove the ingress qdisc (and so the redirect filter) of one link; a missing one is fine."""
    try:
        ipr.tc("del", "ingress", index, "ffff:")
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise NetworkError(f"tc: removing the ingress qdisc of link {index}: {exc}") from None


def redirect_targets(ipr: Any, index: int) -> list[int]:
    """The ifindexes the link's ingress filters redirect to (for tests and leak checks)."""
    out = []
    try:
        filters = ipr.get_filters(index=index, parent=INGRESS_HANDLE)
    except NetlinkError:
        return []
    for f in filters:
        opts = f.get_attr("TCA_OPTIONS")
        if opts is None:
            continue
        acts = opts.get_attr("TCA_U32_ACT")
        if acts is None:
            continue
        for prio in acts.get_attrs("TCA_ACT_PRIO_1") or []:
            parms = prio.get_attr("TCA_ACT_OPTIONS")
            if parms is not None:
                mirred = parms.get_attr("TCA_MIRRED_PARMS")
                if mirred is not None:
                    out.append(int(mirred["ifindex"]))
    return out
