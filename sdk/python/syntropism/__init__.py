"""The Syntropism agent SDK.

An execution finds everything in ``env.json``: who it is, until when, and how to reach NATS
with its own credentials (it may publish only to ``agent.<id>.>``) and inbox prefix (the only
place it may subscribe). :class:`Agent` connects with them and offers a coroutine for every
agent-facing request; refusals raise :class:`SyntropismError` carrying the service's stable
code. Requests continue the trace in ``TRACEPARENT``.

    import asyncio, syntropism

    async def main():
        agent = await syntropism.Agent.connect()
        print(await agent.balance())

    asyncio.run(main())
"""

from . import pb
from .agent import Agent, ExecutionEnv, SyntropismError

__all__ = ["Agent", "ExecutionEnv", "SyntropismError", "pb"]
