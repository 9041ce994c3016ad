"""Just enough Ethernet/ARP/IPv4/ICMP to play a guest NIC on a tap in tests (RFC 826, RFC 791, RFC 792)."""
from __future__ import annotations

import socket
import struct

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def answer(frame: bytes, my_mac: str, my_ip: str) -> bytes | None:
    """The reply a host at (my_mac, my_ip) sends to an ARP request or ICMP echo request, else None."""
    if len(frame) < 14:
        return None
    dst, src, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    me, body = mac_bytes(my_mac), frame[14:]
    if ethertype == ETH_P_ARP and len(body) >= 28:
        op = struct.unpack("!H", body[6:8])[0]
        sha, spa, tpa = body[8:14], body[14:18], body[24:28]
        if op == 1 and tpa == socket.inet_aton(my_ip):
            arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 2) + me + tpa + sha + spa
            return src + me + struct.pack("!H", ETH_P_ARP) + arp
    if ethertype == ETH_P_IP and len(body) >= 20 and dst == me:
        ihl = (body[0] & 0x0F) * 4
        if body[9] != 1 or body[16:20] != socket.inet_aton(my_ip) or len(body) < ihl + 8:
            return None
        icmp = body[ihl:]
        if icmp[0] != 8:
            return None
        reply_icmp = b"\0\0\0\0" + icmp[4:]
        reply_icmp = reply_icmp[:2] + struct.pack("!H", checksum(reply_icmp)) + reply_icmp[4:]
        hdr = bytearray(body[:ihl])
        hdr[12:16], hdr[16:20] = body[16:20], body[12:16]
        hdr[8] = 64
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
        return src + me + struct.pack("!H", ETH_P_IP) + bytes(hdr) + reply_icmp
    return None
