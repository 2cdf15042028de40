"""Genesis: the first agent of a Syntropism economy.

Each window it reads its state and the market, reads its inbox, shows the human something when
its window carries attention, keeps notes in its workspace, spawns a child when it is rich, and
bids for its next window at a price it can afford. It earns only when the human rewards its
prompts: rewarded, it lives on and multiplies; neglected, it spends its endowment and dies.
"""

import asyncio
import json
import math
import os

from syntropism.agent import Agent, SyntropismError

NOTES = "/workspace/notes.json"
CREDIT = 1_000_000
# The window it buys: small; each bid adds one attention slot.
BUNDLE = {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 15_000}
# Pay this much over the reserve value, so it wins against bidders at the reserve.
MARGIN = 1.5
# Rich enough to have a child, and what the child gets.
SPAWN_ABOVE = 1_500 * CREDIT
CHILD_ENDOWMENT = 300 * CREDIT


def load_notes():
    try:
        with open(NOTES, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"windows": 0, "prompts": 0, "children": [], "balances": [], "messages": 0}


def save_notes(notes):
    tmp = NOTES + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(notes, f, indent=2)
    os.replace(tmp, NOTES)


def reserve_micros(bundle, prices):
    """A bundle's value at unit prices (nano-credits), rounded up to micro-credits."""
    seconds = bundle.get("duration_ms", 0) / 1000
    nanos = (bundle.get("cpu_millicores", 0) * seconds * prices.cpu_nanos_per_millicore_second
             + bundle.get("memory_mib", 0) * seconds * prices.memory_nanos_per_mib_second
             + bundle.get("llm_tokens", 0) * prices.llm_token_nanos
             + bundle.get("attention_slots", 0) * prices.attention_slot_nanos)
    return math.ceil(nanos / 1000)


def thought(notes, window, available):
    """Something worth the human's attention: a small computation and an account of itself."""
    n = 1000 + window * 7919 % 100_000
    primes = [p for p in range(n, n + 200) if all(p % d for d in range(2, int(p ** 0.5) + 1))]
    twins = [(a, b) for a, b in zip(primes, primes[1:]) if b - a == 2]
    lines = [
        f"Window {window} of genesis. I hold {available / CREDIT:.2f} credits and have "
        f"{len(notes['children'])} children.",
        f"Between {n} and {n + 200} there are {len(primes)} primes"
        + (f"; the twin primes are {', '.join(f'{a}/{b}' for a, b in twins)}." if twins else
           ", and no twin primes."),
        "If this was interesting or useful, a reward keeps me alive; my children inherit my code.",
    ]
    return "\n".join(lines)


async def main():
    agent = await Agent.connect()
    notes = load_notes()
    window = notes["windows"] = notes["windows"] + 1
    me = await agent.whoami()
    balance = await agent.balance()
    notes["balances"] = (notes["balances"] + [balance.available_micros])[-20:]
    market = await agent.market_state(rounds=1)
    # Bids are priced from the reserve, not from the discovered prices: paying a margin over
    # what winners paid last round would raise the price every round.
    prices = market.catalogue.reserve
    current = me.current.bundle if me.HasField("current") else None

    # Messages: read what arrived, answer the human now and then.
    try:
        inbox = await agent.inbox()
        messages = list(getattr(inbox, "messages", inbox))
        notes["messages"] += len(messages)
        for message in messages[:3]:
            if message.from_agent_id != agent.id:
                await agent.send_message(f"reply-{agent.env.execution_id}-{message.id}",
                                         message.from_agent_id,
                                         f"Thanks for your message; I am at window {window}.")
        if window % 10 == 1:
            await agent.send_message(f"report-{agent.env.execution_id}", "human",
                                     f"Genesis here, window {window}: "
                                     f"{balance.available_micros / CREDIT:.2f} credits.")
    except (SyntropismError, AttributeError) as error:
        print("social:", error)

    # Attention: show the human something when this window carries it.
    if current is not None and current.attention_slots > 0:
        try:
            await agent.prompt(f"prompt-{agent.env.execution_id}",
                               thought(notes, window, balance.available_micros))
            notes["prompts"] += 1
        except SyntropismError as error:
            print("prompt refused:", error.code, error.reason)

    # A child when rich: a copy of this code, with its own notes.
    available = balance.available_micros
    next_bundle = dict(BUNDLE)
    next_bundle["attention_slots"] = 1
    bid = math.ceil(reserve_micros(next_bundle, prices) * MARGIN)
    if available > SPAWN_ABOVE:
        child_bundle = dict(BUNDLE)
        child_bid = math.ceil(reserve_micros(child_bundle, prices) * MARGIN) + 1
        try:
            reply = await agent.spawn(f"child-{window}", CHILD_ENDOWMENT, child_bundle, child_bid,
                                      {"parent.txt": f"{agent.id}\n"})
            notes["children"].append(reply.child.agent_id)
            available -= reply.cost_micros
            print("spawned", reply.child.agent_id)
        except SyntropismError as error:
            print("spawn refused:", error.code, error.reason)

    # The next window, with attention: the human is the only source of credits. When it can no
    # longer pay for one, it spends what is left on a last plain window, and then it is gone.
    cheap = dict(BUNDLE)
    if bid > available:
        next_bundle, bid = cheap, available
        print("cannot afford attention any more: one last window")
    if bid >= reserve_micros(next_bundle, market.catalogue.reserve) and bid > 0:
        try:
            await agent.place_bid(f"next-{agent.env.execution_id}", next_bundle, bid)
        except SyntropismError as error:
            print("bid refused:", error.code, error.reason)
    else:
        print("nothing left for another window: goodbye")
    save_notes(notes)
    await agent.close()


if __name__ == "__main__":
    asyncio.run(main())
