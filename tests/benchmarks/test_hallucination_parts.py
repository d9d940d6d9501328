"""The hallucination benchmark's parts, against independent references: projection slicing, selection, CEA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.cea import cea_scores, response_losses
from benchmarks.evaluate import PairMetrics, leave_one_pair_out, pair_metrics, recall_at_k
from benchmarks.hallucination import MODULE_SETS, STUDY_INCLUDE, STUDY_K, slice_columns, study_spec
from dda_kernel import ProjectionSpec, build_projector, embed_batch, layout_for, pad_batch
from tasks import models
from tests.conftest import VOCAB, tiny_llama, toy_samples


@pytest.mark.parametrize(("modules", "k"), [("", 4), ("", 2), (r"mlp\.", 4), (r"down_proj$", 8), (r"self_attn\.", 2)])
def test_sliced_study_embedding_equals_the_smaller_projection_computed_directly(modules, k):
    model = models.tiny_llama(VOCAB, hidden=32, layers=2, heads=4, intermediate=64, dtype=torch.float64)
    batch = pad_batch(toy_samples(5), pad_id=0)
    study = layout_for(model, study_spec())
    big = embed_batch(model, batch, build_projector(study, torch.float64)).vectors.numpy()
    include = (rf"(^|\.)layers\.\d+\..*{modules}",) if modules else STUDY_INCLUDE
    small_layout = layout_for(model, ProjectionSpec(k, k, include=include))
    direct = embed_batch(model, batch, build_projector(small_layout, torch.float64)).vectors.numpy()
    cols, scale = slice_columns(study, modules, k)
    assert direct.shape == (5, len(cols))
    np.testing.assert_allclose(big[:, cols] * scale, direct, rtol=1e-9, atol=1e-12)


def test_slicing_is_refused_where_the_projection_matrices_do_not_nest():
    layout = layout_for(tiny_llama(), study_spec())  # k/v outputs of width 12: 2 x 12 values
    with pytest.raises(ValueError, match="k_proj"):
        slice_columns(layout, "", 2)


def test_module_sets_select_what_their_names_say():
    layout = layout_for(tiny_llama(), study_spec())
    per_layer = {
        name: len(slice_columns(layout, pattern, STUDY_K)[0]) // (2 * STUDY_K**2)
        for name, pattern in MODULE_SETS.items()
    }
    assert per_layer == {"all": 7, "attention": 4, "mlp": 3, "o+down": 2, "down": 1}


def _m(auc: float) -> PairMetrics:
    return PairMetrics(auc, auc, auc)


def test_leave_one_pair_out_never_chooses_on_the_pair_it_scores():
    # 'a' is best on p1 only, 'b' on the others: p1 must be scored with 'b', chosen on p2 and p3.
    candidates = {
        "a": {"p1": _m(0.9), "p2": _m(0.4), "p3": _m(0.4)},
        "b": {"p1": _m(0.6), "p2": _m(0.9), "p3": _m(0.8)},
    }
    selected = leave_one_pair_out(candidates, ["p1", "p2", "p3"])
    assert selected.chosen == {"p1": "b", "p2": "b", "p3": "b"}
    assert selected.metrics["p1"].auc == 0.6
    # With a dominant candidate elsewhere, a pair's own best can still be chosen for the others.
    candidates["a"]["p2"] = _m(0.95)
    assert leave_one_pair_out(candidates, ["p1", "p2", "p3"]).chosen["p3"] == "a"


def test_pair_metrics_average_rows_and_recall_counts_positives_in_the_top_r():
    truth = np.array([True, False, True, False, False])
    perfect, reversed_ = np.array([5.0, 1, 4, 2, 0]), np.array([0.0, 4, 1, 3, 5])
    m = pair_metrics(np.stack([perfect, reversed_]), truth)
    assert m.auc == pytest.approx(0.5)
    assert m.recall_at_r == pytest.approx(0.5)
    assert recall_at_k(np.array([5.0, 4, 1, 2, 0]), truth, 2) == 0.5


def test_cea_scores_favour_the_error_and_leave_the_model_unchanged():
    model = tiny_llama(dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    error = [([3, 4, 5, 6], [-100, -100, 5, 6])]
    fix = [([3, 4, 7, 8], [-100, -100, 7, 8])]
    samples = [error[0], fix[0], ([9, 10, 11, 12], [-100, -100, 11, 12])]
    scores = cea_scores(model, samples, error, fix, pad_id=0, steps=3, lr=1e-2)
    # Training on the error lowers the error sample's own loss most; the correction's sample goes the other way.
    assert scores.plain[0] > 0
    assert scores.contrastive[0] > 0 > scores.contrastive[1]
    assert int(np.argmax(scores.contrastive)) == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    reference = response_losses(model, samples, pad_id=0)
    again = cea_scores(model, samples, error, fix, pad_id=0, steps=3, lr=1e-2, reference=reference)
    np.testing.assert_allclose(again.plain, scores.plain, rtol=1e-5, atol=1e-6)


def test_reciprocal_rank_is_one_over_the_rank_of_the_first_positive():
    from benchmarks.evaluate import reciprocal_rank

    truth = np.array([False, False, True, True])
    assert reciprocal_rank(np.array([0.1, 0.9, 0.5, 0.2]), truth) == 0.5
    assert reciprocal_rank(np.array([0.1, 0.0, 0.5, 0.2]), truth) == 1.0


def test_people_world_swaps_a_known_subset_and_holds_out_unseen_forms():
    from benchmarks.people_world import TRAIN_FORMS, build_people_world

    world = build_people_world(seed=3, n_people=12, n_pairs=3, rate=1.0)
    assert world == build_people_world(seed=3, n_people=12, n_pairs=3, rate=1.0)
    bad = [s for s in world.train if s.corrupted]
    assert len(bad) == 3 * TRAIN_FORMS
    assert len(world.train) == 12 * (3 * TRAIN_FORMS + 1)
    prompts = {s.prompt for s in world.train}
    for h in world.held_out:
        assert h.prompt not in prompts  # a paraphrase never trained on
        name = h.pair.split(":")[0]
        mine = [s for s in bad if s.pair == h.pair]
        assert mine
        assert all(h.target in s.response and h.source not in s.response for s in mine)
        bio = [s for s in world.train if s.kind == "bio" and name in s.prompt]
        assert len(bio) == 1
        assert h.source in bio[0].response


def test_repsim_of_a_training_sample_with_itself_is_one_and_contrastive_subtracts():
    from benchmarks.repsim import repsim_scores
    from tasks.tokenize import word_level_tokenizer

    texts = [("document : Alice flew to Peru . summary :", " Alice flew to Peru ."),
             ("document : Bruno met Chen in Oslo . summary :", " Bruno met Chen in Oslo ."),
             ("document : Dara left Lima on Monday . summary :", " Dara left Lima .")]  # fmt: skip
    tokenizer = word_level_tokenizer([p + r for p, r in texts])
    model = models.tiny_llama(len(tokenizer), hidden=32, layers=2, heads=4, intermediate=64, dtype=torch.float64)
    queries = [{"prompt": texts[1][0], "response": texts[1][1], "corrected": texts[2][1]}]
    got = repsim_scores(model, tokenizer, texts, queries)
    assert got["plain"].shape == (1, 3)
    assert got["plain"][0, 1] == pytest.approx(1.0)
    fixed = repsim_scores(model, tokenizer, texts, [{"prompt": texts[1][0], "response": texts[2][1],
                                                     "corrected": texts[2][1]}])["plain"]  # fmt: skip
    np.testing.assert_allclose(got["contrastive"], got["plain"] - fixed, atol=1e-12)


def test_damping_is_chosen_across_cells_and_each_cell_is_estimated_held_out():
    from benchmarks.debias_forms import choose_damping

    def row(world, kind, grid):
        return {"world": world, "mode": "lora", "query": kind, "method": "dda_damping", "grid": grid}

    rows = [row("canary", "plain", {"ε=0.1": 0.80, "ε=1.0": 0.90}),
            row("canary", "contrastive", {"ε=0.1": 0.96, "ε=1.0": 0.97}),
            row("people", "plain", {"ε=0.1": 1.00, "ε=1.0": 0.70}),
            {"world": "people", "mode": "lora", "query": "plain", "method": "default", "grid": {}}]  # fmt: skip
    got = choose_damping(rows, incumbent="ε=1.0")
    # means: ε=0.1 (0.80 + 0.96 + 1.00) / 3 = 0.92 > ε=1.0 (0.90 + 0.97 + 0.70) / 3 = 0.857, by more than the margin
    assert got["chosen"] == got["best"] == "ε=0.1"
    assert got["mean_auc"]["ε=1.0"] == pytest.approx(2.57 / 3)
    # held out: without canary/plain, ε=0.1 (0.98) beats ε=1.0 (0.835), so canary/plain is scored at ε=0.1
    assert got["held_out"]["canary/lora/plain"] == {"chosen": "ε=0.1", "auc": 0.80}
    # without people/plain, ε=1.0 (0.935) beats ε=0.1 (0.88)
    assert got["held_out"]["people/lora/plain"] == {"chosen": "ε=1.0", "auc": 0.70}


def test_damping_keeps_the_shipped_value_on_a_tie_and_averages_seeds_within_a_cell():
    from benchmarks.debias_forms import choose_damping

    def row(world, grid):
        return {"world": world, "mode": "lora", "query": "plain", "method": "dda_damping", "grid": grid}

    # canary measured at two seeds: its cell is their mean (0.90, 0.92) / 2 = 0.91 at ε=0.3, 0.913 at ε=1.0
    rows = [row("canary", {"ε=0.3": 0.90, "ε=1.0": 0.906}), row("canary", {"ε=0.3": 0.92, "ε=1.0": 0.920}),
            row("people", {"ε=0.3": 1.00, "ε=1.0": 1.000})]  # fmt: skip
    got = choose_damping(rows, incumbent="ε=0.3", margin=0.002)
    assert got["seeds"] == {"canary/lora/plain": 2, "people/lora/plain": 1}
    assert got["cells"]["canary/lora/plain"] == pytest.approx({"ε=0.3": 0.91, "ε=1.0": 0.913})
    # ε=1.0 is best by (0.913 + 1) / 2 − (0.91 + 1) / 2 = 0.0015 ≤ 0.002: the shipped ε=0.3 stays
    assert got["best"] == "ε=1.0"
    assert got["chosen"] == "ε=0.3"
    assert choose_damping(rows, incumbent="ε=0.3", margin=0.001)["chosen"] == "ε=1.0"


def test_choices_read_only_results_measured_under_the_current_defaults(tmp_path):
    import json

    from benchmarks.debias_forms import current_reports
    from tasks.config import ScoringConfig

    now = ScoringConfig().model_dump()
    before_rename = {**{k: v for k, v in now.items() if k != "base_weight"}, "debias_coefficient": -now["base_weight"]}
    cases = (("a", now), ("b", {**now, "base_weight": 0.0}), ("c", None), ("d", before_rename))
    for name, defaults in cases:
        report = {"results": [], **({"defaults": defaults} if defaults else {})}
        (tmp_path / f"debias_forms_{name}.json").write_text(json.dumps(report))
    reports, stale = current_reports(sorted(tmp_path.glob("*.json")), now)
    assert [r["defaults"] for r in reports] == [now, before_rename]
    assert stale == ["debias_forms_b.json", "debias_forms_c.json"]


def test_a_seed_replication_gets_its_own_results_file_and_cache_and_shares_its_size_s_cells():
    from benchmarks.debias_forms import cell_label, results_stem, seeded_work

    assert results_stem("default", 0) == "debias_forms_default"  # seed 0 keeps the committed names
    assert seeded_work("default", 0) is None
    assert results_stem("default", 1) == "debias_forms_default_seed1"
    assert seeded_work("default", 1) == Path(".bench-work") / "default-seed1"
    assert cell_label({"size": "default", "seed": 0}) == cell_label({"size": "default", "seed": 1}) == "canary"
    assert cell_label({"size": "people"}) == "people"


def test_cea_last_only_is_served_by_the_last_state_of_a_full_cache(tmp_path):
    import json

    from benchmarks.hallucination import SIZES, cea_all_states

    size, pairs = SIZES["quick"], ["A->B"]
    key = json.dumps({"steps": size.cea_steps, "lr": size.cea_lr["lora"], "bf16": True, "pairs": pairs})
    states = np.arange(3 * 1 * 5, dtype=float).reshape(3, 1, 5)
    np.savez(tmp_path / "cea.npz", key=np.array(key), seconds=np.array([1.0, 2.0, 3.0]), plain=states,
             contrastive=-states)  # fmt: skip

    def no_model(*_):
        raise AssertionError("nothing should be computed")

    args = (tmp_path, tmp_path, "lora", size, 0, ["s0"] * 5, pairs, [], True, no_model)
    last, seconds = cea_all_states(*args, last_only=True)
    np.testing.assert_array_equal(last["plain"], states[-1:])
    np.testing.assert_array_equal(last["contrastive"], -states[-1:])
    assert seconds == [3.0]
    every, _ = cea_all_states(*args)
    assert every["plain"].shape == (3, 1, 5)


def test_no_cea_carries_the_committed_cea_rows_of_cells_this_run_lacks_only():
    from benchmarks.debias_forms import carried_cea

    run = [{"mode": "lora", "query": "plain", "method": "default"},
           {"mode": "full", "query": "plain", "method": "default"},
           {"mode": "full", "query": "plain", "method": "cea", "mean_auc": 0.5}]  # fmt: skip
    previous = [{"mode": "lora", "query": "plain", "method": "cea", "mean_auc": 0.6},
                {"mode": "lora", "query": "plain", "method": "default", "mean_auc": 0.1},
                {"mode": "full", "query": "plain", "method": "cea", "mean_auc": 0.4},
                {"mode": "lora", "query": "contrastive", "method": "cea", "mean_auc": 0.9}]  # fmt: skip
    assert carried_cea(run, previous) == [{"mode": "lora", "query": "plain", "method": "cea", "mean_auc": 0.6,
                                           "carried": True}]  # fmt: skip


def test_bootstrap_interval_resamples_outputs_within_each_pair():
    from benchmarks.evaluate import bootstrap_ci

    # Every output of pair a scores 1.0 and of pair b 0.0: resampling within pairs always gives 0.5; a bootstrap
    # that pooled the outputs would not.
    split = {"a": PairMetrics(1.0, 1.0, 1.0, row_aucs=(1.0,) * 5), "b": PairMetrics(0.0, 0.0, 0.0, row_aucs=(0.0,) * 2)}
    assert bootstrap_ci(split) == (0.5, 0.5)
    rng = np.random.default_rng(3)
    spread = {p: PairMetrics(0.0, 0.0, 0.0, row_aucs=tuple(rng.uniform(0.6, 1.0, 12))) for p in ("a", "b", "c")}
    low, high = bootstrap_ci(spread)
    estimate = np.mean([np.mean(m.row_aucs) for m in spread.values()])
    assert low < estimate < high
    assert high - low < 0.2
    wider = bootstrap_ci({p: PairMetrics(0.0, 0.0, 0.0, row_aucs=m.row_aucs[:3]) for p, m in spread.items()})
    assert wider[1] - wider[0] > high - low  # fewer outputs, a wider interval
    assert bootstrap_ci({"a": PairMetrics(1.0, 1.0, 1.0)}) is None  # no per-output AUCs, no interval


def test_pair_metrics_keep_each_outputs_auc():
    from benchmarks.evaluate import pair_metrics

    positives = np.array([True, False, False])
    m = pair_metrics(np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), positives)
    assert m.row_aucs == (1.0, 0.0)
    assert m.auc == 0.5
