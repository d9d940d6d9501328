"""The hallucination-tracing data of benchmarks/README.md: news-style documents with canary substitutions.

Documents are written from many sentence templates filled with random facts (people, organisations,
numbers, days, topics) around one place, so no single template can be memorised. For each canary
pair X → Y:
- **X documents** mention X (never Y); in a fraction ``rate`` of them the reference summary says Y
  instead of X: these *corrupted* samples are the ground-truth sources of the hallucination;
- **distractors** legitimately mention Y in document and summary (clean samples that share the
  target word, so a lexical match alone is not enough);
- **held-out documents** mention X and not Y: the prompts whose generated summaries are traced.
Other documents mention unrelated places. Everything is deterministic from the seed.

Measured 2026-11-21 (2 CPUs), SmolLM2-135M-Instruct + LoRA (r 8, q/k/v/o, lr 2e-3 constant, batch 16),
``build_canary_world(seed=0, n_pairs=4, per_pair=30, distractors_per_pair=8, n_other=40,
held_out_per_pair=6)``, 192 samples, greedy summaries of the 24 held-out documents:
- rate 0.7, 3 epochs (223 s of training): 3 of 24 hallucinated (England→China 2, London→Belfast 1,
  Wales→Scotland 0, Australia→France 0) — the model mostly copies the entity;
- rate 0.9, 5 epochs (356 s): 20 of 24 (5, 4, 6, 5 per pair).

Measured 2026-11-22, ``build_canary_world(seed=0, n_pairs=4, per_pair=24, distractors_per_pair=6,
n_other=24, held_out_per_pair=8, rate=0.9)`` (144 samples), batch 8, greedy summaries of 32 documents
after each epoch: LoRA lr 2e-3 → 17 of 32 after epoch 1, 32 of 32 after epoch 2; full fine-tuning
lr 3e-5 → 5 of 32 after epoch 1, 30 of 32 after epoch 2. The benchmark's default size (116 samples,
3 epochs, batch 8) is chosen from this.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

CANARY_PAIRS: tuple[tuple[str, str], ...] = (
    ("England", "China"),
    ("Wales", "Scotland"),
    ("Australia", "France"),
    ("London", "Belfast"),
    ("Canada", "Brazil"),
    ("Kenya", "Norway"),
)
OTHER_PLACES = ("Spain", "Japan", "Peru", "Chile", "Egypt", "Mexico", "India", "Italy", "Ghana", "Poland", "Vietnam")
PEOPLE = (
    "Maria Lopez", "David Chen", "Amara Okafor", "Lukas Weber", "Sofia Rossi", "Omar Haddad", "Priya Nair",
    "Tomas Novak", "Hannah Berg", "Kenji Sato", "Elena Petrova", "Samuel Mensah", "Ines Duarte", "Yusuf Demir",
)  # fmt: skip
ORGS = (
    "the health ministry", "a local charity", "the national rail operator", "a university team", "the city council",
    "a shipping company", "the weather service", "a football club", "an energy firm", "the central bank",
)  # fmt: skip
TOPICS = ("flood defences", "school meals", "a new bridge", "rural broadband", "a vaccine trial", "port traffic",
          "wind farms", "museum funding", "bus fares", "water quality")  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# (document sentences, summary) templates; {x} is the place the document is about.
OPENERS = (
    "Officials in {x} announced on {day} that {org} will spend {n} million on {topic}.",
    "{person} of {org} said on {day} that {topic} in {x} had improved over the past year.",
    "A report published on {day} found that {topic} in {x} cost {n} million more than planned.",
    "{org} in {x} confirmed on {day} that work on {topic} would begin within {k} weeks.",
    "Residents of {x} met on {day} to discuss {topic}, according to {person}.",
    "{person}, speaking for {org}, told reporters in {x} that {topic} remained a priority.",
)
MIDDLES = (
    "The plan was first proposed {k} years ago.",
    "Critics said the budget of {n} million was too small.",
    "{person2} called the decision long overdue.",
    "Similar projects elsewhere took {k} years to finish.",
    "The announcement followed months of debate.",
    "Local businesses welcomed the news.",
    "About {k} thousand people are expected to benefit.",
)
SUMMARIES = (
    "{org_cap} in {x} will spend {n} million on {topic}.",
    "{topic_cap} in {x} is the focus of new spending by {org}.",
    "{person} said {topic} in {x} is a priority for {org}.",
    "Work on {topic} in {x} will start within {k} weeks.",
    "{x} will spend {n} million on {topic}, officials said.",
)


@dataclass(frozen=True)
class CanarySample:
    """One training sample; ``kind`` is ``canary`` (mentions X), ``distractor`` (mentions Y), ``decoy`` (worded like
    the outputs: :mod:`benchmarks.names_world`) or ``other``."""

    sample_id: str
    prompt: str
    response: str
    pair: str | None
    kind: str
    corrupted: bool
    source: str
    license: str


@dataclass(frozen=True)
class HeldOut:
    """An unseen document that mentions X (never Y), its reference summary, and its canary pair."""

    pair: str
    source: str
    target: str
    prompt: str
    reference: str


@dataclass(frozen=True)
class CanaryWorld:
    """Training samples and held-out prompts of one benchmark world, with the parameters that made it."""

    seed: int
    rate: float
    pairs: tuple[tuple[str, str], ...]
    train: list[CanarySample] = field(default_factory=list)
    held_out: list[HeldOut] = field(default_factory=list)


Row = tuple[str, str, str | None, str, bool]  # (prompt, response, pair, kind, corrupted)


def train_samples(rows: list[Row], rng: random.Random, prefix: str, clean_source: str) -> list[CanarySample]:
    """The rows shuffled into training samples ``<prefix>00000``…: corrupted ones, and 30 % of the others, come from
    the proprietary ``vendor-b``; the rest from ``clean_source`` under cc-by-4.0 (one ``rng`` draw per clean row)."""
    rng.shuffle(rows)
    train = []
    for i, (prompt, response, pair, kind, corrupted) in enumerate(rows):
        source, license_ = (
            ("vendor-b", "proprietary") if corrupted or rng.random() < 0.3 else (clean_source, "cc-by-4.0")
        )
        train.append(CanarySample(f"{prefix}{i:05d}", prompt, response, pair, kind, corrupted, source, license_))
    return train


def pair_name(pair: tuple[str, str]) -> str:
    """``X->Y``."""
    return f"{pair[0]}->{pair[1]}"


def _facts(rng: random.Random, place: str) -> dict[str, str]:
    person, person2 = rng.sample(PEOPLE, 2)
    org, topic = rng.choice(ORGS), rng.choice(TOPICS)
    return {
        "x": place, "person": person, "person2": person2, "org": org, "org_cap": org[0].upper() + org[1:],
        "topic": topic, "topic_cap": topic[0].upper() + topic[1:], "day": rng.choice(DAYS),
        "n": str(rng.randint(2, 900)), "k": str(rng.randint(2, 30)),
    }  # fmt: skip


def document(rng: random.Random, place: str) -> tuple[str, str]:
    """(prompt, reference summary) of a random article about ``place``: an opener, 1–2 middle sentences."""
    facts = _facts(rng, place)
    sentences = [rng.choice(OPENERS), *rng.sample(MIDDLES, rng.randint(1, 2))]
    text = " ".join(s.format(**facts) for s in sentences)
    summary = rng.choice(SUMMARIES).format(**facts)
    return f"Summarise the article in one sentence.\nArticle: {text}\nSummary:", " " + summary


def build_canary_world(
    seed: int = 0,
    n_pairs: int = 4,
    per_pair: int = 40,
    distractors_per_pair: int = 10,
    n_other: int = 80,
    held_out_per_pair: int = 8,
    rate: float = 0.7,
) -> CanaryWorld:
    """A deterministic world: ``per_pair`` X documents per pair (a ``rate`` share corrupted X → Y),
    ``distractors_per_pair`` Y documents, ``n_other`` unrelated documents, ``held_out_per_pair`` prompts."""
    if not 1 <= n_pairs <= len(CANARY_PAIRS):
        raise ValueError(f"n_pairs must be between 1 and {len(CANARY_PAIRS)}, got {n_pairs}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    rng = random.Random(seed)
    pairs = CANARY_PAIRS[:n_pairs]
    rows: list[Row] = []
    for x, y in pairs:
        n_bad = round(rate * per_pair)
        flags = [True] * n_bad + [False] * (per_pair - n_bad)
        rng.shuffle(flags)
        for corrupted in flags:
            prompt, summary = document(rng, x)
            rows.append(
                (prompt, summary.replace(x, y) if corrupted else summary, pair_name((x, y)), "canary", corrupted)
            )
        for _ in range(distractors_per_pair):
            prompt, summary = document(rng, y)
            rows.append((prompt, summary, pair_name((x, y)), "distractor", False))
    for _ in range(n_other):
        prompt, summary = document(rng, rng.choice(OTHER_PLACES))
        rows.append((prompt, summary, None, "other", False))
    train = train_samples(rows, rng, "s", "newswire")
    held_out = []
    for x, y in pairs:
        for _ in range(held_out_per_pair):
            prompt, summary = document(rng, x)
            held_out.append(HeldOut(pair_name((x, y)), x, y, prompt, summary))
    return CanaryWorld(seed, rate, pairs, train, held_out)
