"""Target ``upcall``: the upcall wire format (katapy.upcall.wire), both directions.

Fuzzed: 1 KiB messages with the magic/version right or wrong, any size,
type and flags, and payloads of every request and reply kind; each goes to
``decode_reply`` (what the VMM's upcall client parses from the guest) for
every request type it could answer, and to ``decode_request`` (what the
guest's server parses).  Wrong-length messages are fuzzed too.

Clean errors: UpcallProtocolError.  Checked: whatever decodes encodes back
to a message that decodes equal.
"""
from __future__ import annotations

from fuzz.common import Input
from katapy.upcall import wire

_TYPES = tuple(int(t) for t in wire.MsgType)


def _message(inp: Input) -> bytes:
    if inp.one_in(16):
        return inp.take(inp.pick((wire.MSG_SIZE - 1, wire.MSG_SIZE + 1, 0, 16)))
    magic = wire.MAGIC_VERSION if not inp.one_in(16) else inp.u32()
    mtype = inp.pick(_TYPES + (99, inp.u32()))
    body = inp.blob(wire.HEADER.size + 8 + wire.MAX_APIC_IDS)
    size = inp.pick((len(body), 0, 4, 8, 16, 20, 258, wire.MSG_SIZE, inp.u32()))
    head = wire.HEADER.pack(magic, size, mtype, 0 if not inp.one_in(16) else inp.u32())
    return (head + body).ljust(wire.MSG_SIZE, b"\0")[: wire.MSG_SIZE]


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    buf = _message(inp)
    for expect in wire.MsgType:
        try:
            reply = wire.decode_reply(buf, expect)
        except wire.UpcallProtocolError:
            continue
        # the guest greets with connect_greeting(), not encode_reply (which always carries ret)
        again = wire.connect_greeting() if expect is wire.MsgType.CONNECT else wire.encode_reply(reply)
        assert wire.decode_reply(again, expect) == reply, "reply changed through encode"
    try:
        req = wire.decode_request(buf)
    except wire.UpcallProtocolError:
        return
    assert wire.decode_request(wire.encode_request(req)) == req, "request changed through encode"
