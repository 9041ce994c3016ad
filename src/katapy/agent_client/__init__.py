"""Host-side client of the guest agent (Kata agent API over ttrpc, trio).

``AgentClient`` and the typed values in ``katapy.agent_client.types``; protobuf
stays inside this package.
"""
from katapy.agent_client.client import AgentClient

__all__ = ["AgentClient"]
