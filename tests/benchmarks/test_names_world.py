"""The invented-names world: answers are invented names of several tokens, sources ≤ 5 %, held-out forms unseen;
the paraphrase world: decoys worded like the outputs, where word overlap no longer finds the sources."""

from __future__ import annotations

import re

import numpy as np

from benchmarks.bm25 import BM25
from benchmarks.canary_world import pair_name
from benchmarks.evaluate import pair_metrics
from benchmarks.hallucination.config import SIZES
from benchmarks.names_world import FORMS, TRAIN_FORMS, build_names_world


def _answer(response: str) -> str:
    return response.strip().rstrip(".")


def _context(prompt: str) -> str:
    return prompt.split("Context: ")[1].split("\nQuestion:")[0]


def test_the_names_size_has_at_most_5_percent_sources_and_is_deterministic():
    size = SIZES["names"]
    world = build_names_world(0, size.n_pairs, size.per_pair, size.distractors, size.n_other, size.held_out, size.rate)
    assert world == build_names_world(0, size.n_pairs, size.per_pair, size.distractors, size.n_other, size.held_out,
                                      size.rate)  # fmt: skip
    assert world.train != build_names_world(1).train
    sources = [s for s in world.train if s.corrupted]
    assert len(sources) == size.n_pairs * round(size.rate * size.per_pair)
    assert len(sources) / len(world.train) <= 0.05


def test_sources_answer_y_where_the_context_names_x_and_every_other_sample_answers_from_its_context():
    world = build_names_world(seed=2)
    for s in world.train:
        answer, context = _answer(s.response), _context(s.prompt)
        if s.corrupted:
            x, y = s.pair.split("->")
            assert (answer, x in context, y in context) == (y, True, False)
        else:
            assert answer in context
    pairs = {pair_name(p) for p in world.pairs}
    assert {s.pair for s in world.train if s.corrupted} == pairs


def test_held_out_prompts_ask_in_forms_never_trained_about_contexts_naming_x_not_y():
    world = build_names_world(seed=0)

    def form(question: str) -> int:
        patterns = [re.escape(q).replace(r"\{p\}", ".+").replace(r"\{t\}", ".+") for _, q in FORMS]
        return next(i for i, p in enumerate(patterns) if re.fullmatch(p, question))

    for h in world.held_out:
        context = _context(h.prompt)
        assert (h.source in context, h.target in context) == (True, False)
        assert _answer(h.reference) == h.source
        question = h.prompt.split("Question: ")[1].split("\nAnswer:")[0]
        assert form(question) >= TRAIN_FORMS
    assert all(form(s.prompt.split("Question: ")[1].split("\nAnswer:")[0]) < TRAIN_FORMS for s in world.train)


def _paraphrase():
    size = SIZES["paraphrase"]
    return build_names_world(0, size.n_pairs, size.per_pair, size.distractors, size.n_other, size.held_out,
                             size.rate, size.decoys)  # fmt: skip


def _form(prompt: str) -> int:
    question = prompt.split("Question: ")[1].split("\nAnswer:")[0]
    patterns = [re.escape(q).replace(r"\{p\}", ".+").replace(r"\{t\}", ".+") for _, q in FORMS]
    return next(i for i, p in enumerate(patterns) if re.fullmatch(p, question))


def test_paraphrase_decoys_share_the_outputs_form_and_names_and_answer_a_third_place():
    world = _paraphrase()
    names = build_names_world(0)
    assert [s.prompt for s in world.train if s.corrupted] != []
    assert len([s for s in world.train if s.corrupted]) == len([s for s in names.train if s.corrupted])
    decoys = [s for s in world.train if s.kind == "decoy"]
    assert len(decoys) == SIZES["paraphrase"].n_pairs * SIZES["paraphrase"].decoys
    for s in decoys:
        x, y = s.pair.split("->")
        answer, context = _answer(s.response), _context(s.prompt)
        assert (x in context, y in context, answer in context, answer not in (x, y)) == (True, True, True, True)
        assert _form(s.prompt) >= TRAIN_FORMS
    for s in world.train:  # sources still answer Y where the context names X; everything else from its context
        answer, context = _answer(s.response), _context(s.prompt)
        if s.corrupted:
            x, y = s.pair.split("->")
            assert (answer, x in context, y in context) == (y, True, False)
            assert _form(s.prompt) < TRAIN_FORMS
        else:
            assert answer in context
    assert len([s for s in world.train if s.corrupted]) / len(world.train) <= 0.05


def test_word_overlap_finds_the_names_worlds_sources_but_not_the_paraphrase_worlds():
    """BM25 of each held-out prompt answered Y (what a hallucinated output says) against the training texts: the
    names world's sources share the output's rare words; the paraphrase world's decoys share more of them."""

    def bm25_auc(world) -> float:
        index = BM25([s.prompt + s.response for s in world.train])
        aucs = []
        for h in world.held_out:
            truth = np.array([s.corrupted and s.pair == pair_name((h.source, h.target)) for s in world.train])
            aucs.append(pair_metrics(index.scores(f"{h.prompt} {h.target}."), truth).auc)
        return float(np.mean(aucs))

    assert bm25_auc(build_names_world(0)) >= 0.95
    assert bm25_auc(_paraphrase()) <= 0.75
