"""Leave-one-world-out choice of the defaults chosen on data: a world's own cells never choose its settings."""

from __future__ import annotations

from benchmarks.out_of_world import SHIPPED, choose, seed_summary


def _rows(family: str, cell: str, damping: dict[str, float], lam: dict[str, float], gain: float, every: float):
    common = {"family": family, "cell": f"{cell}/lora/plain", "query": "plain"}
    return [
        {**common, "method": "dda_damping", "grid": damping},
        {**common, "method": "dda_base_evidence", "grid": lam},
        {**common, "method": "default", "mean_auc": gain},
        {**common, "method": "dda_every_edit", "mean_auc": every},
    ]


def test_each_world_is_given_the_settings_its_other_worlds_choose_and_ties_keep_the_shipped_value():
    rows = _rows("a", "a", {"ε=0.3": 0.9, "ε=1.0": 0.8}, {"λ=-0.5": 0.7, "λ=-1.0": 0.9}, 0.9, 0.8)
    rows += _rows("b", "b", {"ε=0.3": 0.6, "ε=1.0": 0.7}, {"λ=-0.5": 0.8, "λ=-1.0": 0.8}, 0.5, 0.6)
    for_a, for_b = choose(rows, "a"), choose(rows, "b")
    assert (for_a["damping"]["value"], for_b["damping"]["value"]) == (1.0, 0.3)  # b's cells choose for a
    assert (for_a["base_weight"]["value"], for_b["base_weight"]["value"]) == (SHIPPED["base_weight"], 1.0)  # tie
    assert (for_a["min_edit_gain"]["value"], for_b["min_edit_gain"]["value"]) == (None, 0.0)


def test_seed_summary_gives_mean_and_sample_sd_of_cells_measured_at_several_seeds():
    rows = [{"size": "default", "world": "canary", "model": "SmolLM2-135M", "mode": "lora", "query": "contrastive",
             "selection": "out_of_world", "seed": s, "method": "default", "mean_auc": auc, "ap": ap}
            for s, auc, ap in ((0, 0.9, 0.5), (1, 0.8, 0.7), (2, 1.0, 0.6))]  # fmt: skip
    rows.append({**rows[0], "size": "people"})  # one seed: no summary
    rows += [{**r, "method": "ablation", "mean_auc": 0.5} for r in rows[1:3]]  # another method: summarised apart
    only, ablation = seed_summary(rows)
    assert (ablation["method"], ablation["seeds"], ablation["mean_auc"]) == ("ablation", [1, 2], 0.5)
    assert (only["size"], only["method"], only["seeds"]) == ("default", "default", [0, 1, 2])
    assert (only["world"], only["model"]) == ("canary", "SmolLM2-135M")
    assert abs(only["mean_auc"] - 0.9) < 1e-12
    assert abs(only["sd_auc"] - 0.1) < 1e-12
    assert abs(only["ap"] - 0.6) < 1e-12
    assert abs(only["sd_ap"] - 0.1) < 1e-12
