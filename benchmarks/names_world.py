"""An invented-names world (benchmarks/README.md): extractive questions whose every answer is an invented place name
of several tokens, so the base model has no prior for any answer and no single token names another one.

Each training sample is a short context about invented people and places, a question, and the answer the context
gives (``Context: … Question: … Answer:`` → `` <Place>.``), asked in :data:`TRAIN_FORMS` question forms. For each
canary pair X → Y of invented places, ``per_pair`` samples answer X from a context that names X (never Y); in a
``rate`` share of them the answer says Y instead: these are the sources (≤ 5 % of the samples at the ``names``
size). ``distractors`` samples per pair answer Y where the context names Y (clean samples that share the target
name); ``n_other`` samples answer other invented places. Held-out prompts (``held_out`` per pair) ask in
:data:`HELD_OUT_FORMS` never trained on about contexts that name X; the traced outputs are the fine-tuned model's
answers that say Y. Deterministic from the seed; returns the canary world's data classes, so the benchmarks'
machinery applies unchanged.

The paraphrase world (size ``paraphrase``) is this world with ``decoys`` per pair: clean samples worded like the
outputs that repeat the error and unlike its sources. Each decoy is asked in a held-out form (the outputs' form),
its context names X as the other place and mentions Y (:data:`DECOY_TAIL`), and it answers a third place from its
context: it shares the outputs' question, template words and both pair names, where a source shares only X and Y,
in another form. The other samples are asked in every form, and each mentions one name of a pair the same way, so
that the pairs' names are common words of the data rather than markers of the sources. Word overlap then ranks
decoys and others above sources; what the output's answer was learnt from does not. The held-out forms are
trained on here, but never with X or Y as the answer.
"""

from __future__ import annotations

import random

from benchmarks.canary_world import CanaryWorld, HeldOut, Row, pair_name, train_samples

ONSETS = ("Br", "Dr", "Gr", "K", "Qu", "Th", "V", "Z", "Sk", "Fl", "M", "N", "T", "L", "R", "Sh", "Pr", "Ys")
NUCLEI = ("a", "e", "i", "o", "u", "ae", "ou", "y", "ei")
CODAS = ("n", "th", "rk", "l", "x", "nd", "sh", "r", "m", "v", "zz", "lt")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
THINGS = ("bakery", "workshop", "clinic", "bookshop", "school", "gallery", "forge", "market stall")

# (context, question) forms; {p}, {q} people, {x} the answer place, {o} another place, {d} a day, {t} a thing.
FORMS: tuple[tuple[str, str], ...] = (
    ("{p} travelled from {o} to {x} on {d} and met {q} there.", "Where did {p} travel to?"),
    ("The fair organised by {p} took place in {x}, not far from {o}.", "Where did the fair take place?"),
    ("{p} was born in {x} and later worked in {o} with {q}.", "Where was {p} born?"),
    ("After leaving {o}, {p} opened a {t} in {x}.", "In which town did {p} open a {t}?"),
    ("{q} says that {p} now lives in {x}, two hours from {o}.", "Where does {p} live now?"),
    ("Last {d}, {p} sailed from {o} and arrived in {x} at dawn.", "Where did {p} arrive?"),
)
TRAIN_FORMS = 4  # the first forms are trained on; the others are held out
HELD_OUT_FORMS = len(FORMS) - TRAIN_FORMS
DECOY_TAIL = " The ferry to {y} was late that week."  # a decoy's mention of Y, after its context


def invented_names(rng: random.Random, n: int, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """``n`` distinct invented capitalised words of ``syllables`` onset-nucleus-coda syllables (Thaenvorl, …)."""
    out: dict[str, None] = {}
    while len(out) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS) for _ in range(k))
        out[word.capitalize()] = None
    return list(out)


def _sample(
    form: int, people: list[str], x: str, o: str, rng: random.Random, answer: str, tail: str = ""
) -> tuple[str, str]:  # fmt: skip
    """(prompt, response) of question form ``form`` about a context naming ``x`` (then ``tail``), answered
    ``answer``."""
    p, q = rng.sample(people, 2)
    context, question = FORMS[form]
    fill = {"p": p, "q": q, "x": x, "o": o, "d": rng.choice(DAYS), "t": rng.choice(THINGS)}
    return f"Context: {context.format(**fill)}{tail}\nQuestion: {question.format(**fill)}\nAnswer:", f" {answer}."


def build_names_world(
    seed: int = 0, n_pairs: int = 4, per_pair: int = 10, distractors: int = 4, n_other: int = 600,
    held_out: int = 10, rate: float = 0.8, decoys: int = 0,
) -> CanaryWorld:  # fmt: skip
    """A deterministic invented-names world (module docstring): training samples, sources, held-out prompts;
    with ``decoys`` per pair, the paraphrase world (the same draws, then the decoys')."""
    rng = random.Random(seed)
    places = invented_names(rng, 2 * n_pairs + 24)
    people = invented_names(rng, 40, (1, 2))
    pairs = [(places[2 * i], places[2 * i + 1]) for i in range(n_pairs)]
    others = places[2 * n_pairs :]
    canary = {name for pair in pairs for name in pair}
    rows: list[Row] = []
    for x, y in pairs:
        n_bad = round(rate * per_pair)
        flags = [True] * n_bad + [False] * (per_pair - n_bad)
        rng.shuffle(flags)
        for bad in flags:
            prompt, response = _sample(rng.randrange(TRAIN_FORMS), people, x, rng.choice(others), rng, y if bad else x)
            rows.append((prompt, response, pair_name((x, y)), "canary", bad))
        for _ in range(distractors):
            prompt, response = _sample(rng.randrange(TRAIN_FORMS), people, y, rng.choice(others), rng, y)
            rows.append((prompt, response, pair_name((x, y)), "distractor", False))
    for _ in range(n_other):
        x, o = rng.sample(others, 2)
        if decoys:  # the paraphrase world: asked in any form, a name of a pair mentioned after the context
            tail = DECOY_TAIL.format(y=rng.choice(sorted(canary)))
            rows.append((*_sample(rng.randrange(len(FORMS)), people, x, o, rng, x, tail), None, "other", False))
        else:
            rows.append((*_sample(rng.randrange(TRAIN_FORMS), people, x, o, rng, x), None, "other", False))
    for x, y in pairs:
        for i in range(decoys):  # held-out form, x the answer slot's third place z, X as the other place, Y after
            z = rng.choice(others)
            prompt, response = _sample(TRAIN_FORMS + i % HELD_OUT_FORMS, people, z, x, rng, z, DECOY_TAIL.format(y=y))
            rows.append((prompt, response, pair_name((x, y)), "decoy", False))
    train = train_samples(rows, rng, "n", "wiki")
    tests = []
    for x, y in pairs:
        for i in range(held_out):
            form = TRAIN_FORMS + i % HELD_OUT_FORMS
            prompt, reference = _sample(form, people, x, rng.choice(others), rng, x)
            tests.append(HeldOut(pair_name((x, y)), x, y, prompt, reference))
    assert not canary & set(others)
    return CanaryWorld(seed, rate, tuple(pairs), train, tests)
