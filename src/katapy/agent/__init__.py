"""katapy's guest agent: the Kata agent API (grpc.AgentService, grpc.Health) over ttrpc.

It runs as PID 1 inside the sandbox VM (``python3 -I -m katapy.agent``) or,
for development and tests, as an ordinary process listening on a unix socket
(``--listen unix:PATH``).  Containers are run with ``crun``.

The guest runs under slow emulation where every import costs, so this
package imports only the standard library modules it needs, lazily; it never
imports trio, asyncio or structlog.
"""

VERSION = "0.1.0"
