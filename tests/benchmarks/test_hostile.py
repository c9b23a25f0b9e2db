"""benchmarks/hostile.py, short: hostile 1 MiB bodies sent back to back do not stall the others.

The benchmark measures the issue's goal (/healthz p99 < 100 ms, a concurrent stream's token gaps +20% at most) and
writes it into docs/benchmarks.md; this short run on a shared 2-core machine asserts looser bounds that still tell
the design from the one it replaced (bodies parsed in a thread of the server: token gaps ×10)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import free_port, started_server
from benchmarks.hostile import ATTACKER, VICTIM, run, verdict


def test_hostile_bodies_do_not_stall_others(stories_hf: Path) -> None:
    tokens = [f"{VICTIM[0]}={VICTIM[1]}", f"{ATTACKER[0]}={ATTACKER[1]}"]
    with started_server(stories_hf, free_port(), tokens, ["--rpm", "0", "--no-cache"]) as base:
        quiet, attacked = run(base, seconds=6, attackers=20)
    p99, growth, _met = verdict(quiet, attacked)
    assert attacked.attack_requests >= 10 and set(attacked.attack_statuses or {}) == {400}
    assert len(attacked.itl_ms) > 200 and len(attacked.healthz_ms) > 100
    assert p99 < 250, attacked.summary()
    # at most tripled: other test suites on the same 2 cores swing the gaps by +70% on their own (seen)
    assert growth < 2.0, f"quiet: {quiet.summary()}; attacked: {attacked.summary()}"
