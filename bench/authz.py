#!/usr/bin/env python3
"""What the authorization gate costs per decision, for a small and a large policy.

For a 20-rule and a 10,000-rule policy (1,000 users in 50 roles, roles inheriting in chains):

1. load: lint, compile and check the examples (including casbin's reading of them);
2. cold: the first decision for a request (the cache holds nothing for it) — p50 and p99;
3. warm: the same decision again, answered from the per-version cache — p50 and p99;
4. for information, casbin's own ``enforce()`` on the same policy lines (what the gate avoids).

5. the mesh op round trip on one private Prosody with the gate on (the 10,000-rule policy, the
   caller a member of it) vs off (a hook that allows everything), in alternating batches so that
   both see the same machine; and, for information, gate on with the agent's audit log written.

Targets: warm <= 5 us, cold at 10,000 rules <= 1 ms, round trip gate on <= 1.05x off.

Usage::

    python bench/authz.py            # exit 0 when every target is met
    python bench/authz.py --quick
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import verdicts  # noqa: E402
from rbac import Gate, compile_policy  # noqa: E402
from rbac.casbin_model import casbin_decide, enforcer  # noqa: E402

USERS, ROLES = 1000, 50
KINDS = ["storage", "monitor", "fencing", "host", "sample"]
VERBS = ["info", "create", "delete", "run", "status", "fence", "list", "snapshot"]


def policy_text(rules: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    lines = ["roles:"]
    for r in range(ROLES):
        parent = f" {{inherits: [role{r - 1}]}}" if r % 5 else " {}"  # chains of 5: inheritance is exercised
        lines.append(f"  role{r}:{parent}")
    lines.append("members:")
    for r in range(ROLES):
        lines.append(f"  role{r}: [" + ", ".join(f"user{u}@bench.test" for u in range(USERS) if u % ROLES == r) + "]")
    lines.append("grants:")
    denies = []
    seen = set()
    while len(seen) < rules:
        role = rng.randrange(ROLES)
        op = f"{rng.choice(KINDS)}.{rng.choice(VERBS)}" if rng.random() < 0.8 else f"{rng.choice(KINDS)}.**"
        on = f"/pool/p{rng.randrange(400)}/**" if rng.random() < 0.7 else f"/cluster/c{rng.randrange(40)}/node/*"
        key = (role, op, on)
        if key in seen:
            continue
        seen.add(key)
        entry = f"  - {{role: role{role}, ops: [\"{op}\"], on: [\"{on}\"]}}"
        (denies if rng.random() < 0.1 else lines).append(entry)
    if denies:
        lines.append("denies:")
        lines += denies
    lines += ["examples:", "  - {as: nobody@bench.test, op: storage.info, expect: deny}"]
    return "\n".join(lines) + "\n"


def requests(n: int, seed: int = 11) -> list[tuple[str, str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        path = f"/pool/p{rng.randrange(400)}/vol{rng.randrange(50)}" if rng.random() < 0.7 else \
            f"/cluster/c{rng.randrange(40)}/node/{rng.randrange(16)}"
        out.append((f"user{rng.randrange(USERS)}@bench.test", f"{rng.choice(KINDS)}.{rng.choice(VERBS)}", [path]))
    return out


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def measure(rules: int, n: int, casbin_n: int) -> dict[str, float]:
    text = policy_text(rules)
    t = time.perf_counter()
    gate = Gate()
    result = gate.load(text)
    load = time.perf_counter() - t
    assert result.ok, result
    reqs = requests(n)
    cold, warm, allowed = [], [], 0
    clock = time.perf_counter_ns
    for caller, op, res in reqs:
        gate._cache.clear()  # cold: nothing cached for this request
        t0 = clock()
        d = gate.decide(caller, op, res)
        cold.append((clock() - t0) / 1000)
        allowed += d.allowed
    for caller, op, res in reqs:
        gate.decide(caller, op, res)  # fill the cache: every request below is a hit
    for caller, op, res in reqs:
        t0 = clock()
        gate.decide(caller, op, res)
        warm.append((clock() - t0) / 1000)
    e = enforcer(compile_policy(text))
    t0 = time.perf_counter()
    for caller, op, res in reqs[:casbin_n]:
        casbin_decide(e, caller, op, res)
    casbin_us = (time.perf_counter() - t0) / casbin_n * 1e6
    cold50, cold99 = percentiles(cold)
    warm50, warm99 = percentiles(warm)
    return {"rules": rules, "load_s": load, "cold_p50": cold50, "cold_p99": cold99, "warm_p50": warm50,
            "warm_p99": warm99, "casbin_us": casbin_us, "allowed": allowed / len(reqs)}


async def round_trips(batches: int, per_batch: int) -> dict[str, float]:
    """p50 of a mesh op round trip (ms): gate off, gate on, gate on with the audit log."""
    import socket
    import tempfile

    from agents.actor import Endpoint
    from agents.agent import Agent
    from agents.authz import Decision, PolicyAuthorizer
    from agents.client import Client
    from agents.ops import op
    from agents.server import PrivateServer

    class BenchAgent(Agent):
        kind = "bench"

        @op("storage.create", effect="change", deadline=5)  # an op name the generated policy uses
        async def create(self, call, value: int = 0) -> int:  # noqa: ANN001 (a local class: no forward refs)
            return value

    class AllowAll:
        def decide(self, caller, spec, resources):
            return Decision(True, "gate off")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="vertebra-bench-authz-"))
    server = PrivateServer(home, port=port)
    server.start()
    actors = []
    try:
        server.register_many({"on": "p-on", "off": "p-off", "audited": "p-audited", "caller": "p-caller"})
        endpoint = Endpoint(server.host, server.port, server.domain, server.ssl_context())
        text = policy_text(10_000) + "\n".join([
            "", "# the benchmark's caller, allowed the op on its pool (appended to the generated policy)"])
        text = text.replace("members:\n", "members:\n  bench: [caller@vertebra.test]\n", 1)
        text = text.replace("roles:\n", "roles:\n  bench: {}\n", 1)
        text = text.replace("grants:\n", "grants:\n  - {role: bench, ops: [storage.create], on: [/pool/bench]}\n", 1)
        gate_on = PolicyAuthorizer()
        result = gate_on.load(text)
        assert result.ok, result
        (home / "audited").mkdir()
        agents = {
            "off": BenchAgent("off@vertebra.test", "p-off", endpoint, resources=["/pool/bench"],
                              authorizer=AllowAll()),
            "on": BenchAgent("on@vertebra.test", "p-on", endpoint, resources=["/pool/bench"], authorizer=gate_on),
            "audited": BenchAgent("audited@vertebra.test", "p-audited", endpoint, resources=["/pool/bench"],
                                  authorizer=gate_on, state_dir=home / "audited"),
        }
        client = Client("caller@vertebra.test", "p-caller", endpoint, broker="")
        for actor in (*agents.values(), client):
            await actor.start()
            actors.append(actor)
        samples: dict[str, list[float]] = {name: [] for name in agents}
        for _ in range(batches):
            for name, agent in agents.items():
                for i in range(per_batch):
                    t = time.perf_counter()
                    res = await client.request(str(agent.jid), "storage.create", {"value": i}, timeout=5)
                    samples[name].append((time.perf_counter() - t) * 1000)
                    assert res.outcome.value == "ok", res.error
        return {name: statistics.median(values) for name, values in samples.items()}
    finally:
        for actor in actors:
            await actor.stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 2000 if args.quick else 20000
    verdicts.begin()
    ok = True
    print(f"{'rules':>6} {'load':>8} {'cold p50':>9} {'cold p99':>9} {'warm p50':>9} {'warm p99':>9}"
          f" {'casbin enforce':>15} {'allowed':>8}")
    for rules in (20, 10_000):
        m = measure(rules, n, 20 if rules > 1000 else 200)
        print(f"{m['rules']:>6} {m['load_s']:>7.2f}s {m['cold_p50']:>7.1f}us {m['cold_p99']:>7.1f}us"
              f" {m['warm_p50']:>7.2f}us {m['warm_p99']:>7.2f}us {m['casbin_us']:>13.0f}us {m['allowed']:>7.0%}")
        ok &= verdicts.record(f"warm decision p50, {rules:,} rules", f"{m['warm_p50']:.2f} us", "<= 5 us",
                              m["warm_p50"] <= 5.0)
        if rules >= 10_000:
            ok &= verdicts.record(f"cold decision p50, {rules:,} rules", f"{m['cold_p50']:.1f} us", "<= 1000 us",
                                  m["cold_p50"] <= 1000.0)
    import asyncio

    p50 = asyncio.run(round_trips(10 if args.quick else 30, 100))
    ratio = p50["on"] / p50["off"]
    print(f"mesh round trip p50: gate on {p50['on']:.3f} ms (10,000 rules), gate off {p50['off']:.3f} ms,"
          f" ratio {ratio:.3f}x; with the audit log too: {p50['audited']:.3f} ms"
          f" ({p50['audited'] / p50['off']:.3f}x, for information)")
    ok &= verdicts.record("mesh round trip p50, gate on / off", f"{ratio:.3f}x", "<= 1.05x", ratio <= 1.05)
    verdicts.save()
    print("targets: warm <= 5us, cold at 10,000 rules <= 1ms, round trip <= 1.05x:", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
