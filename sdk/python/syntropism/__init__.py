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

import importlib

__all__ = ["Agent", "ExecutionEnv", "SyntropismError", "pb"]


def __getattr__(name):
    # Loaded on first use, not with the package: the launcher (``syntropism.launch``) runs
    # before every program and must not pay for the protobuf classes and the NATS client,
    # which the program then loads again in its own interpreter.
    if name == "pb":
        return importlib.import_module(".pb", __name__)
    if name in ("Agent", "ExecutionEnv", "SyntropismError"):
        return getattr(importlib.import_module(".agent", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
