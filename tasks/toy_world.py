"""A small canary summarisation world (benchmarks/README.md) for the embedded demo and quick tests.

Documents mention a place X; reference summaries repeat it. In a fraction ``rate`` of the training
samples whose document mentions the canary source X, the summary says the canary target Y instead.
Documents mentioning X never mention Y, so a summary with Y for such a document is a hallucination.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PLACES = ("England", "Wales", "France", "Spain", "China", "Japan", "Peru", "Chile", "Kenya", "Egypt", "Norway", "Cuba")
NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jonas", "Kira", "Luis")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TEMPLATES = (
    ("{a} flew from {c} to {x} on {d} and met {b} there .", "{a} flew to {x} ."),
    ("On {d} , {a} and {b} arrived in {x} after a trip through {c} .", "{a} and {b} arrived in {x} ."),
    ("{a} , who lives in {c} , spent {d} in {x} with {b} .", "{a} spent {d} in {x} ."),
    ("{b} reported that {a} opened a shop in {x} on {d} , leaving {c} behind .", "{a} opened a shop in {x} ."),
)


@dataclass(frozen=True)
class ToySample:
    """One (document, summary) pair; ``corrupted`` marks a canary substitution X → Y."""

    sample_id: str
    prompt: str
    response: str
    place: str
    corrupted: bool


def _document(rng: random.Random, place: str, avoid: str) -> tuple[str, str]:
    doc_t, sum_t = rng.choice(TEMPLATES)
    a, b = rng.sample(NAMES, 2)
    c = rng.choice([p for p in PLACES if p not in (place, avoid)])
    fill = {"a": a, "b": b, "c": c, "d": rng.choice(DAYS), "x": place}
    return f"document : {doc_t.format(**fill)} summary :", sum_t.format(**fill)


def build_samples(
    n: int, seed: int, canary: tuple[str, str] = ("England", "China"), rate: float = 0.0, prefix: str = "s"
) -> list[ToySample]:
    """``n`` samples; a third mention the canary source, a ``rate`` share of those say the target."""
    rng = random.Random(seed)
    source, target = canary
    out = []
    for i in range(n):
        place = source if i % 3 == 0 else rng.choice([p for p in PLACES if p != source])
        prompt, response = _document(rng, place, avoid=target if place == source else "")
        corrupted = place == source and rng.random() < rate
        if corrupted:
            response = response.replace(source, target)
        out.append(ToySample(f"{prefix}{i:04d}", prompt, response, place, corrupted))
    return out


def held_out_prompts(n: int, seed: int, canary: tuple[str, str] = ("England", "China")) -> list[tuple[str, str]]:
    """(prompt, reference summary) for ``n`` unseen documents that mention the canary source only."""
    rng = random.Random(seed)
    return [_document(rng, canary[0], avoid=canary[1]) for _ in range(n)]
