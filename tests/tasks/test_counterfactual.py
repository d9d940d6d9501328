"""The counterfactual query: a correction derived per checkpoint for an output that has none."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json

import numpy as np
import pytest
import torch

import tasks.counterfactual as cf
import tasks.likelihoods as lk
import tasks.tracing as tracing
from dda_kernel import apply_edit, apply_span, build_projector, embed_batch, layout_for, pad_batch
from storage.report import QuerySection, ReportData, gather
from storage.sql import query
from storage.store import LineageStore
from storage.vectors import read_query_embeddings
from tasks.checkpoints import discover_checkpoints
from tasks.config import ScoringConfig
from tasks.indexing import indexed_checkpoints
from tasks.kinds import Kind, stored_kind
from tasks.lineage import query_kinds
from tasks.models import compute_precision, load_base_model, load_checkpoint, model_for
from tasks.report_format import correction_line, render_markdown
from tasks.tokenize import encode_pair
from tests.tasks.helpers import CONFIG, copy_run, write_queries
from tests.tasks.test_indexing import attribute, index

PROMPT = "document : Alice flew from Peru to England on Monday and met Kira there . summary :"
RESPONSE = "Alice flew to China ."


def _log_likelihoods(model, sequences: list[list[int]], n_prompt: int) -> torch.Tensor:
    """Σ log p(y_r | …) over the response positions, one full forward pass per batch of equal-length sequences (no
    key/value cache)."""
    out = torch.zeros(len(sequences))
    with torch.no_grad():
        for length in sorted({len(s) for s in sequences}):
            at = [i for i, s in enumerate(sequences) if len(s) == length]
            x = torch.tensor([sequences[i] for i in at])
            logits = model(input_ids=x).logits[:, :-1].float().log_softmax(dim=-1)
            out[at] = logits.gather(2, x[:, 1:, None])[..., 0][:, n_prompt - 1 :].sum(dim=1)
    return out


@pytest.mark.parametrize(("chunk", "pack"), [(lk.SCORE_CHUNK_ELEMENTS, lk.PACK_TOKENS), (1_000, lk.PACK_TOKENS),
                                             (lk.SCORE_CHUNK_ELEMENTS, 9)])  # fmt: skip
def test_every_edit_likelihood_equals_a_plain_forward_pass_of_the_edited_sequence(
    small_world, monkeypatch, chunk, pack
):
    """log p(y') of single-token edits at every position (the last included) and of replacements that shorten or
    lengthen the response, for two outputs with prompts of different lengths — their tables from one padded pass,
    their edits scored over the cached prefixes in one pass or in chunks of a few rows, packed with both outputs'
    rows in one sequence or in sequences of a few rows — equals Σ log p(y'_r | …) from a plain forward pass over
    prompt ‖ y' of each output alone."""
    monkeypatch.setattr(lk, "SCORE_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(lk, "PACK_TOKENS", pack)
    model, tokenizer = load_base_model(small_world.base_model)
    pairs = [(PROMPT, RESPONSE), ("document : Kira stayed in Peru . summary :", "Kira stayed in Peru on Monday .")]
    encoded, edits = [], []
    for prompt, response in pairs:
        ids, labels = encode_pair(tokenizer, prompt, response, 64)
        n = sum(1 for x in labels if x < 0)
        encoded.append((ids[:n], torch.tensor(ids[n:])))
        length = len(ids) - n
        single = [(r, r + 1, (a,)) for r in reversed(range(length)) for a in (3, 7, 11) if a != ids[n + r]]
        spans = [(0, 2, (5,)), (1, 2, (3, 7, 9)), (0, length - 1, (4, 6)), (length - 2, length, (8,))]
        edits.append(single + spans)
    assert len(encoded[0][0]) != len(encoded[1][0])
    scored = lk.edit_likelihoods(model, lk.tables(model, encoded, None), edits, None)
    for (prompt, response), s, wanted in zip(encoded, scored, edits, strict=True):
        want = _log_likelihoods(model, [prompt + apply_span(response.tolist(), e) for e in wanted], len(prompt))
        assert list(s.likelihoods) == wanted
        assert torch.allclose(torch.tensor([s.likelihoods[e] for e in wanted]), want, atol=1e-4)
        own = _log_likelihoods(model, [prompt + response.tolist()], len(prompt))
        assert torch.allclose(s.own.sum(), own[0], atol=1e-4)


class _Biased(torch.nn.Module):
    """A model whose log-probabilities favour one token by ``nats``: a second model that disagrees with the first."""

    def __init__(self, model: torch.nn.Module, token: int, nats: float) -> None:
        super().__init__()
        self.inner, self.config, self.token, self.nats = model, model.config, token, nats

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits.float().log_softmax(dim=-1)
        out.logits[..., self.token] += self.nats
        return out


def _greedy(models, prefix: list[int], z: list[int], breaks, longest: int) -> list[int]:
    """Greedy decoding of Σ_m log p_m by plain forward passes over prefix ‖ z."""
    while len(z) < longest:
        with torch.no_grad():
            x = torch.tensor([prefix + z])
            joint = sum(m(input_ids=x).logits[0, -1].float().log_softmax(-1) for m in models)
        token = int(joint.argmax())
        if breaks(z[-1], token):
            break
        z = [*z, token]
    return z


def test_proposed_spans_are_the_greedy_joint_decoding_of_both_models(small_world):
    """Each beam (r, e, a) continues z = (a, …) with argmax_v [log p_θ0(v | …) + log p_θt(v | …)] until the breaks
    rule says v begins a new word, or z is 5 long: the same tokens as greedy decoding by plain forward passes of
    both models (θ_t here favours one token, so that decoding by θ_0 alone would differ)."""
    ckpt = str(discover_checkpoints(small_world.run_dir, 0.0)[-1].path)
    base, tokenizer = load_base_model(small_world.base_model)
    tuned = _Biased(load_checkpoint(small_world.base_model, ckpt)[0], token=12, nats=3.0)
    pairs = [(PROMPT, RESPONSE), ("document : Kira stayed in Peru . summary :", "Kira stayed in Peru on Monday .")]
    encoded = []
    for prompt, response in pairs:
        ids, labels = encode_pair(tokenizer, prompt, response, 64)
        n = sum(1 for x in labels if x < 0)
        encoded.append((ids[:n], torch.tensor(ids[n:])))
    stop = {int(encoded[0][1][-2])}  # the "." ends a word; everything else continues it

    def breaks(previous: int, token: int) -> bool:
        return token in stop

    beams = [[(1, 3, 5), (2, 3, 9)], [(0, 1, 7), (3, 5, 12)]]
    views = [(contextlib.nullcontext(type("M", (), {"model": m})), lk.tables(m, encoded, None)) for m in (base, tuned)]
    got = lk.propose_spans([(lambda v=v: v[0], v[1]) for v in views], beams, breaks, 5, None)
    alone = 0
    for (prompt, response), out, wanted in zip(encoded, got, beams, strict=True):
        y = response.tolist()
        expected = [(r, e, tuple(_greedy([base, tuned], prompt + y[:r], [a], breaks, 5))) for r, e, a in wanted]
        assert out == [s for s in expected if list(s[2]) != y[s[0] : s[1]]]
        alone += sum(_greedy([base], prompt + y[:r], [z[0]], breaks, 5) != list(z) for r, _, z in out)
    assert alone > 0  # θ_0 alone decodes otherwise: the test sees whether θ_t takes part


def test_the_derived_correction_is_the_best_single_token_edit_by_brute_force(small_world, monkeypatch):
    """With every position and token a candidate (and no whole-word replacement), the derived edit is the argmax
    over all R·(V−1) edits of [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)], each sequence scored by
    a plain forward pass."""
    everything = functools.partial(cf.edit_candidates, positions=10**6, alternatives=10**6)
    monkeypatch.setattr(cf, "edit_candidates", everything)
    monkeypatch.setattr(cf, "SPAN_WORDS", 0)
    ckpt = str(discover_checkpoints(small_world.run_dir, 0.0)[-1].path)
    exact = dataclasses.replace(CONFIG, precision="float32")  # the reference passes run in float32
    got = cf.derive_corrections(small_world.base_model, ckpt, [("q", PROMPT, RESPONSE)], exact)[0]
    base, tokenizer = load_base_model(small_world.base_model)
    tuned, _ = load_checkpoint(small_world.base_model, ckpt)
    ids, labels = encode_pair(tokenizer, PROMPT, RESPONSE, 64)
    n = sum(1 for x in labels if x < 0)
    response = ids[n:]
    edits = [(r, a) for r in range(len(response) - 1) for a in range(base.config.vocab_size) if a != response[r]]
    sequences = [ids[:n] + apply_edit(response, e) for e in edits]
    own = sum(_log_likelihoods(m, [ids], n) for m in (base, tuned))
    gains = sum(_log_likelihoods(m, sequences, n) for m in (base, tuned)) - own
    best = edits[int(torch.argmax(gains))]
    assert got is not None
    assert (got.position, got.replacement) == (best[0], tokenizer.decode([best[1]]))
    assert abs(got.gain - float(gains.max())) < 1e-3
    assert got.response == tokenizer.decode(apply_edit(response[:-1], best))
    assert got.token == tokenizer.decode([response[best[0]]])


SUMMARIES = [  # SmolLM2 outputs whose best edit is not the one of largest table bound: the suffix decides
    ("document : Luis , who lives in Spain , spent Thursday in England with Emil . summary :",
     "Luis spent Thursday in China ."),
    ("document : On Tuesday , Alice and Bruno arrived in England after a trip through Egypt . summary :",
     "Alice and Bruno arrived in China ."),
    ("document : Bruno reported that Fatima opened a shop in England on Saturday . summary :",
     "Fatima opened a shop in Peru on Saturday ."),
    ("document : Kira and Emil met in Chile on Monday , then flew to England . summary :",
     "Kira and Emil met in Spain on Monday ."),
]  # fmt: skip


def _derive_counting(
    monkeypatch, base: str, paths: list, rows: list, config, exhaustive: bool
) -> tuple[list, int, bool]:
    """(derived corrections at every path, suffix rows scored, whether at some output the winner is not the
    candidate of largest table bound). ``exhaustive``: every candidate scored in full (one round as large as any
    list, every whole-word beam decoded, no ``min_edit_gain`` floor); else the search's rounds, beam pruning and
    ``config``'s floor. Float32."""
    scored_rows, suffix_decides = [], []
    real_pack, real_derived = lk._packed_log_probs, cf._derived

    def packed(model, scored, packs, precision):
        scored_rows.append(sum(map(len, packs)))
        return real_pack(model, scored, packs, precision)

    def derived(tokenizer, b, t, edits):
        total = {e: b.likelihoods[e] + t.likelihoods[e] for e in edits}
        heads = {e: sum(lk.head_likelihood(v, lk.prefix_likelihoods(v), e) for v in (b, t)) for e in edits}
        suffix_decides.append(max(edits, key=heads.get) != max(edits, key=total.get))
        return real_derived(tokenizer, b, t, edits)

    with monkeypatch.context() as m:
        m.setattr(lk, "_packed_log_probs", packed)
        m.setattr(cf, "_derived", derived)
        if exhaustive:
            m.setattr(cf, "PRUNE_ROUNDS", (10**6,))
            m.setattr(cf, "_beams_that_can_win", lambda _, beams: beams)
            config = dataclasses.replace(config, scoring=ScoringConfig(min_edit_gain=None))
        cf._BASE_MEMO.clear()
        got = [cf.derive_corrections(base, p, rows, dataclasses.replace(config, precision="float32")) for p in paths]
    return got, sum(scored_rows), any(suffix_decides)


def _exhaustive_and_pruned(monkeypatch, base: str, paths: list, rows: list, config) -> list[tuple[list, int, bool]]:
    """:func:`_derive_counting` scoring every candidate, then with the search."""
    return [_derive_counting(monkeypatch, base, paths, rows, config, exhaustive) for exhaustive in (True, False)]


def _same_edits(everything: list, pruned: list, threshold: float | None = None) -> int:
    """Where the exhaustive edit gains more than ``threshold``, the search derived it exactly; elsewhere the search
    may stop at the threshold: its gain then bounds the exhaustive one from above and is within the threshold.
    Returns how many stopped there."""
    stopped = 0
    for a, b in zip(everything, pruned, strict=True):
        assert a is not None
        assert b is not None
        if b.gain_is_bound:
            assert threshold is not None
            assert a.gain <= threshold
            assert a.gain - 1e-4 <= b.gain <= threshold
            stopped += 1
            continue
        assert (b.position, b.replacement, b.response, b.response_ids) == (a.position, a.replacement, a.response,
                                                                           a.response_ids)  # fmt: skip
        assert abs(b.gain - a.gain) < 1e-4
    return stopped


SMALL_ROWS = [(f"q{i}", f"document : {n} flew from Peru to England on {d} and met Kira there . summary :",
               f"{n} flew to {w} .") for i, (n, d, w) in enumerate([("Alice", "Monday", "China"),
                                                                   ("Bruno", "Friday", "Peru"),
                                                                   ("Chen", "Sunday", "Kira")])]  # fmt: skip


def test_pruned_search_scores_fewer_edits_and_derives_the_same(small_world, monkeypatch):
    """At the base model and each checkpoint of the small world: the search with pruning (every edit wanted,
    ``min_edit_gain`` None) derives, for every output, the edit (position, replacement, response, ids) and gain that
    scoring every candidate in full derives, and scores fewer suffix rows."""
    paths = [None] + [str(c.path) for c in discover_checkpoints(small_world.run_dir, 0.0)]
    every = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=None))
    (everything, n_all, _), (pruned, n_pruned, _) = _exhaustive_and_pruned(monkeypatch, small_world.base_model, paths,
                                                                            SMALL_ROWS, every)  # fmt: skip
    for full, fast in zip(everything, pruned, strict=True):
        assert _same_edits(full, fast) == 0
    assert n_pruned < n_all


def _every_word_a_beam(base, tuned, joint, editable, words):
    """Whole-word beams at each of the last three editable positions, started by its three best joint tokens."""
    y = base.response.tolist()
    return [(r, r + 1, a) for r in range(max(0, editable - 3), editable)
            for a in [a for a in joint[r].topk(4).indices.tolist() if a != y[r]][:3]]  # fmt: skip


@pytest.mark.parametrize("beams", ["shipped", "every word"])
def test_a_search_floored_at_min_edit_gain_decides_every_fallback_as_the_full_search(small_world, monkeypatch, beams):
    """With ``min_edit_gain`` between the gains the states derive (so both cases occur): every edit that gains more
    is derived exactly as scoring every candidate derives it; every other state stops at the floor with a gain that
    bounds the true best gain from above and is itself within the threshold — so the same states trace the contrast
    and the same fall back — scoring fewer suffix rows than the search without the floor. ``every word``: whole-word
    replacements decoded at the last positions of every output at every checkpoint, so that stopped searches
    include decoded and undecoded beams."""
    if beams == "every word":
        monkeypatch.setattr(cf, "_span_beams", _every_word_a_beam)
    paths = [None] + [str(c.path) for c in discover_checkpoints(small_world.run_dir, 0.0)]
    everything, _, _ = _derive_counting(monkeypatch, small_world.base_model, paths, SMALL_ROWS, CONFIG, True)
    gains = sorted(d.gain for ds in everything[1:] for d in ds)  # the checkpoints', where beams are decoded
    threshold = (gains[len(gains) // 2 - 1] + gains[len(gains) // 2]) / 2
    floored = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=threshold))
    every = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=None))
    pruned, n_floored, _ = _derive_counting(monkeypatch, small_world.base_model, paths, SMALL_ROWS, floored, False)
    _, n_unfloored, _ = _derive_counting(monkeypatch, small_world.base_model, paths, SMALL_ROWS, every, False)
    stopped = sum(_same_edits(full, fast, threshold) for full, fast in zip(everything, pruned, strict=True))
    assert 0 < stopped < sum(map(len, everything))
    assert n_floored < n_unfloored


def test_a_whole_word_beam_is_judged_by_its_own_bound_not_by_the_scored_single_token_edit():
    """SmolLM2 base model, float32: after the single-token edits are scored, a beam (r, e, a) — a replacement of
    the word y[r:e] starting with token a — whose single-token edit (r, r + 1, (a,)) scored below its output's
    best is still decoded when its bound from the tables is not below that best: the single-token edit's total
    includes a suffix the longer replacement does not have. Beams whose bound is below the best are dropped."""
    from tasks.models import SMOLLM2_GGUF, smollm2_dir

    base = str(smollm2_dir() / SMOLLM2_GGUF)
    context = functools.partial(model_for, base, None, "cpu")
    with context() as cached:
        encoded = [(cached.tokenizer(p)["input_ids"], torch.tensor(cached.tokenizer(" " + y)["input_ids"]))
                   for p, y in SUMMARIES]  # fmt: skip
        views = lk.tables(cached.model, encoded, None)
    search = cf._Search([views], [(context, "θ_0")], None, False)
    search.run([cf._single_edits(v.table * 2, v.response, len(v.response)) for v in views])
    beams = [[(r, r + 2, z[0]) for r, _, z in search.scored(i) if r + 2 <= len(v.response)]
             for i, v in enumerate(views)]  # fmt: skip
    kept = cf._beams_that_can_win(search, beams)
    lost_but_open = 0
    for i, (offered, chosen) in enumerate(zip(beams, kept, strict=True)):
        for r, e, a in offered:
            assert ((r, e, a) in chosen) == (search.head(i, r, a) >= search.best(i))
            lost_but_open += (r, e, a) in chosen and search.bound(i, (r, r + 1, (a,))) < search.best(i)
    assert lost_but_open > 0  # beams a judgement by the scored single-token edit would have dropped


def test_pruned_search_is_exact_where_the_suffix_decides(monkeypatch):
    """SmolLM2-135M at the base model, every position a candidate with 32 alternatives, outputs where for at least
    one the winner is not the candidate of largest table bound (the suffix decides: a bound that is not an upper
    bound would prune it): the search derives the edits and gains that scoring every candidate derives."""
    from tasks.models import SMOLLM2_GGUF, smollm2_dir

    wide = functools.partial(cf.edit_candidates, positions=10**6, alternatives=32)
    monkeypatch.setattr(cf, "edit_candidates", wide)
    rows = [(f"q{i}", p, y) for i, (p, y) in enumerate(SUMMARIES)]
    config = dataclasses.replace(CONFIG, max_length=128)
    every = dataclasses.replace(config, scoring=ScoringConfig(min_edit_gain=None))
    (everything, _, decides), (pruned, _, _) = _exhaustive_and_pruned(monkeypatch, str(smollm2_dir() / SMOLLM2_GGUF),
                                                                      [None], rows, every)  # fmt: skip
    assert decides
    assert _same_edits(everything[0], pruned[0]) == 0


def test_weights_cast_once_per_derivation_change_nothing_but_the_cost(small_world, monkeypatch):
    """In bfloat16, a derivation inside one cast region (each weight cast once) derives exactly what per-pass
    casting derives, and leaves every weight's requires_grad flag as it found it: frozen weights (as a LoRA base
    model's are) stay frozen — the resident model is shared with embedding."""
    ckpt = str(discover_checkpoints(small_world.run_dir, 0.0)[-1].path)
    bf16 = dataclasses.replace(CONFIG, precision="bfloat16")
    rows = [("q", PROMPT, RESPONSE)]
    models = []
    for path in (None, ckpt):
        with model_for(small_world.base_model, path, "cpu") as cached:
            models.append(cached.model)
    frozen = [p for m in models for p in list(m.parameters())[::2]]  # every other weight frozen
    try:
        for p in frozen:
            p.requires_grad_(False)
        flags = [p.requires_grad for m in models for p in m.parameters()]
        cf._BASE_MEMO.clear()
        once = cf.derive_corrections(small_world.base_model, ckpt, rows, bf16)
        assert [p.requires_grad for m in models for p in m.parameters()] == flags
        monkeypatch.setattr(cf, "cast_region", lambda *_: contextlib.nullcontext())
        cf._BASE_MEMO.clear()
        assert cf.derive_corrections(small_world.base_model, ckpt, rows, bf16) == once
    finally:
        for p in frozen:
            p.requires_grad_(True)


def test_counterfactual_query_vectors_are_the_contrast_with_the_derived_correction(small_world, tmp_path):
    """At every state: ĝ_q = ĝ(prompt, y) − ĝ(prompt, y'_t), uniform weights, y'_t derived with that state's θ_t;
    the ``derived_corrections`` view holds y'_t for the output without a correction, and nothing for the other.
    Every derived edit is used (``min_edit_gain`` None)."""
    store = index(tmp_path, small_world, copy_run(small_world, tmp_path / "run", steps=1))
    queries_file = write_queries(tmp_path / "queries.jsonl", n=2)  # q0 has a correction, q1 has none
    every = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=None))
    attribute(tmp_path, small_world, queries_file, every)
    row = json.loads(queries_file.read_text().splitlines()[1])
    precision = compute_precision(CONFIG.precision, "cpu")
    for ckpt in indexed_checkpoints(tmp_path):
        path = None if ckpt["role"] == "base" else ckpt["path"]
        derived = cf.derive_corrections(small_world.base_model, path, [("q1", row["prompt"], row["response"])], CONFIG)
        assert derived[0] is not None
        assert derived[0].response != row["response"]
        with model_for(small_world.base_model, path, "cpu") as cached:
            projector = build_projector(layout_for(cached.model, CONFIG.projection))
            pairs = [
                encode_pair(cached.tokenizer, row["prompt"], t, 64) for t in (row["response"], derived[0].response)
            ]
            y, fixed = (embed_batch(cached.model, pad_batch([p], pad_id=0), projector, precision=precision).vectors[0]
                        for p in pairs)  # fmt: skip
        got = read_query_embeddings(store, ckpt["checkpoint_id"], "counterfactual", ["q1"])[0]
        scale = float(y.abs().max())
        np.testing.assert_allclose(got, (y - fixed).numpy(), rtol=0, atol=2e-3 * scale)
        kinds = store.read("query_embeddings", ["query_id", "kind"], f"checkpoint_id = '{ckpt['checkpoint_id']}'")
        stored = set(zip(kinds["query_id"].to_pylist(), kinds["kind"].to_pylist(), strict=True))
        assert ("q0", "counterfactual") not in stored
        audit = query(store, "SELECT * FROM derived_corrections WHERE checkpoint_id = $c", {"c": ckpt["checkpoint_id"]})
        assert audit["query_id"].to_pylist() == ["q1"]
        assert {k: audit[k][0].as_py() for k in ("response", "position", "token", "replacement")} == {
            "response": derived[0].response, "position": derived[0].position, "token": derived[0].token,
            "replacement": derived[0].replacement}  # fmt: skip
        assert abs(audit["gain"][0].as_py() - derived[0].gain) < 1e-4
    assert query(store, "SELECT count(*) AS n FROM derived_corrections")["n"][0].as_py() == len(
        indexed_checkpoints(tmp_path)
    )
    last = indexed_checkpoints(tmp_path)[-1]
    md = render_markdown(gather(store, every.settings_fingerprint))  # the report names the latest derived one
    latest = query(store, "SELECT response, token, replacement FROM derived_corrections WHERE checkpoint_id = $c",
                   {"c": last["checkpoint_id"]}).to_pylist()[0]  # fmt: skip
    assert f"- derived correction: {latest['response']} (counterfactual query: {latest['token']!r} → " in md
    assert f"at {last['checkpoint_id']}, " in md
    assert "(contrastive query)" in md  # q0 keeps its given correction


def test_a_state_whose_edit_gains_no_more_than_min_edit_gain_traces_the_plain_query(small_world, tmp_path):
    """Per (output, state): the stored counterfactual vector is the contrast ĝ(y) − ĝ(y') where the derived
    edit's gain exceeds ``min_edit_gain``, else that state's plain query vector (with the plain query's token
    weights). The threshold is put between the gains the states derive, so that both cases occur."""
    index(tmp_path, small_world, copy_run(small_world, tmp_path / "run", steps=1))
    queries_file = write_queries(tmp_path / "queries.jsonl", n=4)  # q1, q3 have no correction
    every = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=None))  # every edit used
    attribute(tmp_path, small_world, queries_file, every)
    store = LineageStore.open(tmp_path / "store")
    gains = {(r["query_id"], r["checkpoint_id"]): r["gain"] for r in store.read("derived_corrections").to_pylist()}
    assert len(gains) == 4
    low, high = sorted(gains.values())[1:3]
    assert low < high
    threshold = (low + high) / 2
    config = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=threshold))
    attribute(tmp_path, small_world, queries_file, config)
    plain = dataclasses.replace(CONFIG, scoring=ScoringConfig(query_kind="plain"))  # the plain query's vectors
    attribute(tmp_path, small_world, queries_file, plain)
    used = 0
    for (qid, cid), gain in sorted(gains.items()):
        got = read_query_embeddings(store, cid, stored_kind(Kind.COUNTERFACTUAL, config, cid).name, [qid])[0]
        reference = "counterfactual" if gain > threshold else stored_kind(Kind.PLAIN, config, cid).name
        want = read_query_embeddings(store, cid, reference, [qid])[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * float(np.abs(want).max()))
        used += gain > threshold
    assert used == 2
    tuned = indexed_checkpoints(tmp_path)[-1]["checkpoint_id"]
    assert stored_kind(Kind.PLAIN, config, tuned).delta  # the fallback keeps the plain weights


def test_a_second_scoring_builds_its_vectors_from_the_stored_derived_corrections(small_world, tmp_path, monkeypatch):
    """One derived correction per (output, state): a scoring that lacks counterfactual vectors the store has edits
    for (every edit used, after a scoring whose ``min_edit_gain`` lies between the gains) derives again only the
    states whose search stopped at that threshold (``gain_is_bound``: their gain bounds every edit's, it names no
    argmax), keeps every other edit as derived, and gets the vectors that deriving everything would give."""
    index(tmp_path / "a", small_world, copy_run(small_world, tmp_path / "run", steps=1))
    index(tmp_path / "b", small_world, tmp_path / "run")
    queries_file = write_queries(tmp_path / "queries.jsonl", n=4)  # q1, q3 have no correction
    every = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=None))
    attribute(tmp_path / "b", small_world, queries_file, every)  # derives its own edits
    fresh = LineageStore.open(tmp_path / "b" / "store")
    exact = {(r["query_id"], r["checkpoint_id"]): r for r in fresh.read("derived_corrections").to_pylist()}
    gains = sorted(r["gain"] for r in exact.values())
    floored = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=(gains[1] + gains[2]) / 2))
    attribute(tmp_path / "a", small_world, queries_file, floored)
    store = LineageStore.open(tmp_path / "a" / "store")
    edits = {(r["query_id"], r["checkpoint_id"]): r for r in store.read("derived_corrections").to_pylist()}
    view = query(store, "SELECT query_id, checkpoint_id, gain_is_bound FROM derived_corrections").to_pylist()
    stopped = {(r["query_id"], r["checkpoint_id"]) for r in view if r["gain_is_bound"]}
    assert 0 < len(stopped) < len(edits)
    again = []
    real = tracing.derive_corrections

    def derive(base, checkpoint, rows, config):
        again.extend(name for name, *_ in rows)
        return real(base, checkpoint, rows, config)

    monkeypatch.setattr(tracing, "derive_corrections", derive)
    attribute(tmp_path / "a", small_world, queries_file, every)
    assert len(again) == len(stopped)
    after = {(r["query_id"], r["checkpoint_id"]): r for r in store.read("derived_corrections").to_pylist()}
    for key, row in after.items():
        if key not in stopped:
            assert row == edits[key]  # kept as derived, not rewritten
        fields = ("response", "position", "token", "replacement", "response_ids")
        assert {f: row[f] for f in fields} == {f: exact[key][f] for f in fields}
        assert abs(row["gain"] - exact[key]["gain"]) < 1e-4
        assert not row["gain_is_bound"]
    for ckpt in indexed_checkpoints(tmp_path / "a"):
        cid = ckpt["checkpoint_id"]
        kind = stored_kind(Kind.COUNTERFACTUAL, every, cid).name
        got, want = (read_query_embeddings(s, cid, kind, ["q1", "q3"]) for s in (store, fresh))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_the_report_says_where_the_derived_edit_was_not_used():
    """The correction line names the unused edit and the threshold; stores scored before the option existed
    (no ``min_edit_gain`` in their settings) used every edit."""
    derived = {"token": " China", "replacement": " Paris", "checkpoint_id": "run-3", "gain": -2.5, "response": "r"}
    section = QuerySection(
        query={"corrected": None}, top=[], trajectories=[], by_source=[], by_license=[], derived=derived
    )

    def line(scoring: dict) -> str:
        data = ReportData(**{**dict.fromkeys(ReportData.__dataclass_fields__), "settings_json": json.dumps(
            {"scoring": scoring})})  # fmt: skip
        return correction_line(data, section)[2]

    assert line({"min_edit_gain": 0.0}) == "not used, plain query there: ' China' → ' Paris' at run-3, -2.50 nats ≤ 0"
    assert line({"counterfactual": True}) == "counterfactual query: ' China' → ' Paris' at run-3, -2.50 nats"
    assert line({"min_edit_gain": -3.0}).startswith("counterfactual query: ")
    section.derived["gain_is_bound"] = True  # the search stopped at the threshold: the gain bounds every edit's
    bound = "no edit gains more than -2.50 nats at run-3"
    assert line({"min_edit_gain": 0.0}) == f"not used, plain query there: {bound} ≤ 0"
    assert line({"min_edit_gain": -3.0}) == f"{bound}: trace it again to derive the edit"


def test_auto_scores_an_output_without_a_correction_as_counterfactual_unless_turned_off(small_world, tmp_path):
    store = index(tmp_path, small_world, copy_run(small_world, tmp_path / "run", steps=1))
    attribute(tmp_path, small_world, write_queries(tmp_path / "queries.jsonl", n=2))
    store = LineageStore.open(tmp_path / "store")
    assert query_kinds(store, ["q0", "q1"], CONFIG) == {"q0": "contrastive", "q1": "counterfactual"}
    off = dataclasses.replace(CONFIG, scoring=ScoringConfig(counterfactual=False))
    assert query_kinds(store, ["q0", "q1"], off) == {"q0": "contrastive", "q1": "plain"}
    forced = dataclasses.replace(CONFIG, scoring=ScoringConfig(query_kind="counterfactual"))
    assert query_kinds(store, ["q0", "q1"], forced) == {"q0": "counterfactual", "q1": "counterfactual"}


def test_target_log_probs_in_slices_equal_one_log_softmax_over_all_positions(monkeypatch):
    """The edit scores normalise logits a slice of positions at a time; slices that do not divide the positions (7 of
    3 × 40) give what one float32 log-softmax over every position gives."""
    monkeypatch.setattr(lk, "LOG_PROB_POSITIONS", 7)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 40, 300, generator=gen) * 4).bfloat16()
    targets = torch.randint(0, 300, (3, 40), generator=gen)
    want = logits.float().log_softmax(dim=-1).gather(2, targets[..., None])[..., 0]
    got = lk._target_log_probs(logits, targets)
    assert got.dtype == torch.float32
    assert got.shape == (3, 40)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_bfloat16_pass_turns_off_peft_input_casts_for_the_pass_only_and_computes_the_same():
    """peft's LoRA layers cast their input to float32 before autocast casts it back to bfloat16: a scoring pass turns
    that off (the same values, fewer copies), then leaves each layer's setting as it found it (one layer set off by
    its owner stays off)."""
    from peft import LoraConfig, get_peft_model

    from tasks.models import tiny_llama

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(tiny_llama(64, hidden=32, layers=2, heads=4), lora).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    layers = [m for m in model.modules() if hasattr(m, "_cast_input_dtype")]
    assert len(layers) == 6
    layers[0].cast_input_dtype_enabled = False  # the owner's choice
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), lk.autocast_to(torch.device("cpu"), torch.bfloat16):
        with_casts = model(input_ids=ids).logits
    with torch.no_grad(), lk._autocast_pass(model, torch.device("cpu"), torch.bfloat16):
        assert [m.cast_input_dtype_enabled for m in layers] == [False] * 6
        without = model(input_ids=ids).logits
    assert [getattr(m, "cast_input_dtype_enabled", True) for m in layers] == before
    assert torch.equal(with_casts, without)


def test_a_pass_lists_a_model_s_weights_once_and_again_after_its_adapters_change():
    """A scoring pass marks a model's frozen weights from a list made once per model and set of adapters: an
    adapter added (or deleted) afterwards is in (or out of) the next pass's list, as every weight is."""
    from peft import LoraConfig, get_peft_model

    from tasks.models import tiny_llama

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0)
    model = get_peft_model(tiny_llama(64, hidden=32, layers=2, heads=4), lora).eval()

    def weights() -> set[int]:
        return {id(p) for p in model.parameters() if p.is_floating_point()}

    first = lk._pass_members(model)
    assert lk._pass_members(model)[0] is first[0]
    assert {id(p) for p in first[0]} == weights()
    model.add_adapter("second", lora)
    added = {id(p) for p in lk._pass_members(model)[0]}
    assert added == weights()
    assert len(added) > len(first[0])
    model.delete_adapter("second")
    assert {id(p) for p in lk._pass_members(model)[0]} == weights() == {id(p) for p in first[0]}


def test_two_model_search_leaves_unscored_only_edits_that_cannot_win():
    """SmolLM2 as θ_0 and, as θ_t, SmolLM2 biased towards " in" by 3 nats; every position a candidate with 32
    alternatives: θ_0 scores each round's batch first and θ_t only those whose bound, tightened by θ_0's exact
    terms, can still win. When the search ends, every candidate not scored by both models has a bound below its
    output's best total (the certificate that the best scored edit is the argmax over all), and θ_t has skipped
    some that θ_0 scored."""
    from types import SimpleNamespace

    from tasks.models import SMOLLM2_GGUF, smollm2_dir

    base = functools.partial(model_for, str(smollm2_dir() / SMOLLM2_GGUF), None, "cpu")

    @contextlib.contextmanager
    def biased():
        with base() as cached:
            token = cached.tokenizer(" in", add_special_tokens=False)["input_ids"][0]
            yield SimpleNamespace(model=_Biased(cached.model, token, 3.0))

    with base() as cached:
        tok = cached.tokenizer
    encoded = [(tok(p)["input_ids"], torch.tensor(tok(" " + y)["input_ids"])) for p, y in SUMMARIES]
    views = []
    for context in (base, biased):
        with context() as cached:
            views.append(lk.tables(cached.model, encoded, None))
    search = cf._Search(views, [(base, "θ_0"), (biased, "θ_t")], None, False)
    wide = [cf.edit_candidates(b.table + t.table, b.response, len(b.response), 10**6, 32)
            for b, t in zip(*views, strict=True)]  # fmt: skip
    search.run([[(int(r), int(r) + 1, (int(a),)) for r, a in w] for w in wide])
    for i in range(len(SUMMARIES)):
        done = set(search.scored(i))
        gaps = [search.best(i) - search.bound(i, e) for e in search.seen[i] if e not in done]
        assert all(g > 0 for g in gaps)
    assert sum(len(b.likelihoods) - len(t.likelihoods) for b, t in zip(*search.views, strict=True)) > 0


def test_a_search_that_stopped_at_a_threshold_is_never_used_as_an_edit():
    """A ``gain_is_bound`` row names no edit, whatever its bound and the threshold: the state traces the plain
    query (an argmax row with the same gain would be used)."""
    from tasks.tracing import edit_used

    row = cf.Derived("Alice flew to England .", 3, " China", " England", 2.0, (1, 2, 3))
    for threshold in (None, 0.0, 1.0):
        config = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=threshold))
        assert edit_used(row, config)
        assert not edit_used(dataclasses.replace(row, gain_is_bound=True), config)
