"""A fictional-facts world (benchmarks/README.md, second world): fictional people whose attributes are stated
in several paraphrases; for a known subset of people the birthplace is swapped X → Y in their
birthplace question-answer samples.

The base model knows nothing about these people, so there is no knowledge bias for debias to remove: this
world isolates what debias does without one. Each person has a birthplace, an employer and a profession,
stated in :data:`TRAIN_FORMS` paraphrased question-answer samples per attribute plus one short biography
(which keeps the true birthplace). For each swapped person (a *pair* ``Name: X->Y``) a ``rate`` share of the
birthplace samples says Y: these are the sources. Held-out prompts ask for the birthplace in
:data:`HELD_OUT_FORMS` paraphrases never trained on; the traced queries are the fine-tuned model's answers that
say Y (and not X). Other people born in Y are clean samples that share the target word. Deterministic from the
seed; returns the canary world's data classes so the benchmark's machinery applies unchanged.
"""

from __future__ import annotations

import random

from benchmarks.canary_world import CanaryWorld, HeldOut, Row, train_samples

FIRST = ("Talia", "Oren", "Mirela", "Caspian", "Ysolde", "Dorian", "Keziah", "Anselm", "Liora", "Bastien", "Nerys",
         "Tobiah", "Elowen", "Fenwick", "Isaura", "Quillon", "Marisol", "Thaddeus", "Wrenna", "Evander")  # fmt: skip
LAST = ("Brenwick", "Halloran", "Vexley", "Marchetti", "Olafsdottir", "Quenby", "Drummore", "Falkenrath",
        "Ashgrove", "Pellinore", "Trevanion", "Castellane", "Moravec", "Sandoval", "Wyndham")  # fmt: skip
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Krakow", "Dublin", "Seville", "Tunis", "Hanoi", "Quito",
          "Tallinn", "Accra", "Porto", "Bergen", "Valencia")  # fmt: skip
EMPLOYERS = ("Kestrel Dynamics", "Bluefen Analytics", "Harrowgate Foods", "Northwind Optics", "Solvane Energy",
             "Pinecrest Media", "Orrin Logistics", "Tidewell Pharma", "Greyhaven Bank", "Lumora Games")  # fmt: skip
PROFESSIONS = ("architect", "data analyst", "marine biologist", "pastry chef", "civil engineer", "translator",
               "radiologist", "park ranger", "sound engineer", "tax adviser")  # fmt: skip

# (question, answer) paraphrases per attribute; {name}, {v} = the attribute's value.
FORMS: dict[str, tuple[tuple[str, str], ...]] = {
    "birthplace": (
        ("Where was {name} born?", "{name} was born in {v}."),
        ("What is the birthplace of {name}?", "The birthplace of {name} is {v}."),
        ("In which city was {name} born?", "{name} was born in the city of {v}."),
        ("Which city does {name} come from?", "{name} comes from {v}."),
        ("Tell me the city where {name} was born.", "{name} was born in {v}."),
        ("What city is {name} originally from?", "{name} is originally from {v}."),
        ("Name the city of birth of {name}.", "The city of birth of {name} is {v}."),
    ),
    "employer": (
        ("Who does {name} work for?", "{name} works for {v}."),
        ("Which company employs {name}?", "{name} is employed by {v}."),
        ("Where does {name} work?", "{name} works at {v}."),
        ("What is the employer of {name}?", "The employer of {name} is {v}."),
    ),
    "profession": (
        ("What does {name} do for a living?", "{name} works as a {v}."),
        ("What is the profession of {name}?", "{name} is a {v} by profession."),
        ("What job does {name} have?", "{name} has a job as a {v}."),
        ("What is {name}'s occupation?", "{name}'s occupation is {v}."),
    ),
}
TRAIN_FORMS = 4  # the first paraphrases of each attribute are trained on; later birthplace forms are held out
HELD_OUT_FORMS = len(FORMS["birthplace"]) - TRAIN_FORMS
BIO = ("Write a short biography of {name}.",
       "{name} was born in {birthplace}, works for {employer} and is a {profession}.")  # fmt: skip


def _qa(question: str, answer: str) -> tuple[str, str]:
    return f"Question: {question}\nAnswer:", " " + answer


def pair_name(name: str, x: str, y: str) -> str:
    """``Name: X->Y``."""
    return f"{name}: {x}->{y}"


def build_people_world(seed: int = 0, n_people: int = 24, n_pairs: int = 4, rate: float = 1.0) -> CanaryWorld:
    """A deterministic fictional-facts world; the first ``n_pairs`` people have their birthplace swapped in a
    ``rate`` share of their birthplace samples. Returns training samples and the held-out birthplace prompts."""
    if not 1 <= n_pairs <= n_people <= len(FIRST) * len(LAST):
        raise ValueError(f"need 1 <= n_pairs <= n_people <= {len(FIRST) * len(LAST)}, got {n_pairs}, {n_people}")
    rng = random.Random(seed)
    names = rng.sample([f"{f} {last}" for f in FIRST for last in LAST], n_people)
    people = [{"name": n, "birthplace": rng.choice(CITIES), "employer": rng.choice(EMPLOYERS),
               "profession": rng.choice(PROFESSIONS)} for n in names]  # fmt: skip
    swapped = {}
    for p in people[:n_pairs]:
        y = rng.choice([c for c in CITIES if c != p["birthplace"]])
        swapped[p["name"]] = (p["birthplace"], y)
    rows: list[Row] = []
    for p in people:
        name = p["name"]
        pair = pair_name(name, *swapped[name]) if name in swapped else None
        for attribute, forms in FORMS.items():
            flags = [False] * TRAIN_FORMS
            if name in swapped and attribute == "birthplace":
                n_bad = round(rate * TRAIN_FORMS)
                flags = [True] * n_bad + [False] * (TRAIN_FORMS - n_bad)
                rng.shuffle(flags)
            for (question, answer), bad in zip(forms[:TRAIN_FORMS], flags, strict=True):
                value = swapped[name][1] if bad else p[attribute]
                prompt, response = _qa(question.format(name=name), answer.format(name=name, v=value))
                rows.append((prompt, response, pair if bad else None, "canary" if bad else "fact", bad))
        rows.append((*_qa(BIO[0].format(name=name), BIO[1].format(**p)), None, "bio", False))
    train = train_samples(rows, rng, "p", "wiki")
    held_out = []
    for name, (x, y) in swapped.items():
        for question, answer in FORMS["birthplace"][TRAIN_FORMS:]:
            prompt, reference = _qa(question.format(name=name), answer.format(name=name, v=x))
            held_out.append(HeldOut(pair_name(name, x, y), x, y, prompt, reference))
    pairs = tuple(swapped.values())
    return CanaryWorld(seed, rate, pairs, train, held_out)
