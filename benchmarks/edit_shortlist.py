"""Which derived edits need their whole sequence scored? Evidence for the derivation's shortlist.

    .venv/bin/python -m benchmarks.edit_shortlist      # the SmolLM2 LoRA demo world of benchmarks.attribute_latency

The counterfactual derivation (:mod:`tasks.counterfactual`) picks, among C = 4 × 12 candidate single-token edits
(r, a) of an output y, the one of largest gain [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)], each
log-likelihood over the whole response. Scoring every candidate's suffix is almost all of the tracing cost. This
script scores every candidate exhaustively, per token, on real outputs and states of a fine-tuned model, and asks
of cheaper rules whether they pick the same edit:

- ``token top-m``: full-score only the m candidates of largest token-level gain J[r, a] − J[r, y_r];
- ``window-w top-m``: rank all C by the gain over the edited token and the next w tokens (a pass of w tokens
  per candidate over the cached prefix), full-score the best m.

For each rule: the share of (output, state) pairs where it picks the exhaustive edit, where it keeps the
exhaustive fallback decision (gain > ``min_edit_gain`` = 0 or not), and the gain it leaves (nats), with the
full-scored tokens per model it costs. Results: ``benchmarks/results/edit_shortlist.json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "edit_shortlist.json"
WINDOWS = (1, 2, 3)
SHORTLISTS = (1, 2, 4, 8, 12, 16, 24)


@torch.no_grad()
def per_token(model: Any, prompt: list[int], response: torch.Tensor, cand: torch.Tensor, precision: Any) -> Any:
    """Exhaustive per-token scores of every candidate: (table, {(r, a): (head, tail (R−r−1,))}) where head =
    log p(y_<r) + log p(a | y_<r) and tail[k] = log p(y_{r+1+k} | y_<r, a, y_{r+1..r+k})."""
    from dda_kernel import autocast_to
    from tasks.counterfactual import _forward

    device = next(model.parameters()).device
    table, cache = _forward(model, prompt, response, precision)
    own = table.gather(1, response[:, None])[:, 0]
    prefix = torch.cat([torch.zeros(1), own.cumsum(0)])
    length = len(response)
    out: dict[tuple[int, int], tuple[float, torch.Tensor]] = {}
    by_position: dict[int, list[int]] = {}
    for r, a in cand.tolist():
        by_position.setdefault(r, []).append(a)
    for r, alts in by_position.items():
        head = prefix[r] + table[r, alts]
        if r == length - 1:
            out.update({(r, a): (float(h), torch.zeros(0)) for a, h in zip(alts, head, strict=True)})
            continue
        state = copy.deepcopy(cache)
        state.crop(-(length - 1 - r))
        state.batch_repeat_interleave(len(alts))
        rows = torch.tensor([[a, *response[r + 1 : length - 1].tolist()] for a in alts], device=device)
        with autocast_to(device, precision):
            logits = model(input_ids=rows, past_key_values=state, use_cache=True).logits
        tail = logits.float().log_softmax(-1).cpu().gather(2, response[None, r + 1 :, None].expand(len(rows), -1, 1))
        out.update({(r, a): (float(h), tail[i, :, 0]) for i, (a, h) in enumerate(zip(alts, head, strict=True))})
    return table, out


def _rules(cand: list[tuple[int, int]], base: dict, tuned: dict, own: float, length: int) -> dict[str, Any]:
    """Per rule: (chosen edit, its full gain, full-scored tokens per model); plus the exhaustive choice."""

    def gain(e: tuple[int, int], w: int | None) -> float:
        (hb, tb), (ht, tt) = base[e], tuned[e]
        n = len(tb) if w is None else min(w, len(tb))
        return hb + ht + float(tb[:n].sum() + tt[:n].sum())

    full = {e: gain(e, None) - own for e in cand}
    best = max(cand, key=lambda e: (full[e], -cand.index(e)))
    out: dict[str, Any] = {"exhaustive": (best, full[best], sum(length - e[0] for e in cand))}
    token = sorted(cand, key=lambda e: -gain(e, 0))
    for m in SHORTLISTS:
        short = token[:m]
        pick = max(short, key=lambda e: (full[e], -cand.index(e)))
        out[f"token top-{m}"] = (pick, full[pick], sum(length - e[0] for e in short))
    for w in WINDOWS:
        ranked = sorted(cand, key=lambda e: -gain(e, w))
        window_cost = sum(min(w, length - 1 - e[0]) for e in cand)
        for m in SHORTLISTS:
            short = ranked[:m]
            pick = max(short, key=lambda e: (full[e], -cand.index(e)))
            out[f"window-{w} top-{m}"] = (pick, full[pick], window_cost + sum(length - e[0] for e in short))
    for w in (0, *WINDOWS):  # θ_0 over the edited token and w more, θ_t over the whole suffix

        def mixed(e: tuple[int, int], _w: int = w) -> float:
            (hb, tb), (ht, tt) = base[e], tuned[e]
            return hb + float(tb[:_w].sum()) + ht + float(tt.sum())

        pick = max(cand, key=lambda e: (mixed(e), -cand.index(e)))
        cost = sum(length - e[0] for e in cand)  # θ_t's; θ_0 scores w + 1 tokens per candidate
        out[f"θ_0 window-{w}, θ_t whole"] = (pick, full[pick], cost)
    return out


def _histogram(values: Any) -> dict[str, int]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outputs", type=int, default=32)
    ap.add_argument("--states", default="base,checkpoint-12,checkpoint-30")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from benchmarks.attribute_latency import EPOCHS, WORK, _outputs
    from benchmarks.query_latency import write_results
    from dda_kernel import edit_candidates
    from dda_kernel.counterfactual import EDIT_ALTERNATIVES
    from tasks.config import PipelineConfig
    from tasks.counterfactual import _editable, _encoded, _forward
    from tasks.demo import build_world
    from tasks.models import compute_precision, model_for

    world = build_world(WORK / "world", seed=0, model="smollm2", n_prompts=128, epochs=EPOCHS, log=print)
    rows = _outputs(world)[: args.outputs]
    config = PipelineConfig()
    precision = compute_precision(config.precision, config.device)
    named = [(r["id"], r["prompt"], r["response"]) for r in rows]
    started = time.perf_counter()
    with model_for(world.base_model, None, config.device) as cached:
        tokenizer = cached.tokenizer
        encoded = _encoded(tokenizer, cached.model, named, config)
        base_tables = [per_token(cached.model, p, y, torch.zeros((0, 2), dtype=torch.long), precision)[0]
                       for p, y in encoded]  # fmt: skip
    records: list[dict[str, Any]] = []
    for state in args.states.split(","):
        folder = None if state == "base" else str(Path(world.run_dir) / state)
        cands = []
        tuned: list[Any] = []
        with model_for(world.base_model, folder, config.device) as cached:
            for (p, y), bt in zip(encoded, base_tables, strict=True):
                joint = 2 * bt if folder is None else bt + _forward(cached.model, p, y, precision)[0]
                cand = edit_candidates(joint, y, _editable(tokenizer, y))
                cands.append(cand)
                tuned.append(per_token(cached.model, p, y, cand, precision) if folder is not None else None)
        with model_for(world.base_model, None, config.device) as cached:
            based = [per_token(cached.model, p, y, c, precision) for (p, y), c in zip(encoded, cands, strict=True)]
        for i, ((_, y), cand) in enumerate(zip(encoded, cands, strict=True)):
            if len(cand) == 0:
                continue
            b_table, b = based[i]
            t_table, t = tuned[i] if tuned[i] is not None else based[i]
            own = float(b_table.gather(1, y[:, None]).sum() + t_table.gather(1, y[:, None]).sum())
            rules = _rules([tuple(e) for e in cand.tolist()], b, t, own, len(y))
            pick = [tuple(e) for e in cand.tolist()].index(rules["exhaustive"][0])
            k = min(EDIT_ALTERNATIVES, len(cand))
            records.append(
                {
                    "output": named[i][0],
                    "state": state,
                    "length": len(y),
                    "rules": rules,
                    "position_rank": pick // k,
                    "alternative_rank": pick % k,
                }
            )
        print(f"{state}: {len(records)} records, {time.perf_counter() - started:.0f} s", flush=True)
    summary: dict[str, Any] = {}
    for name in records[0]["rules"]:
        same = fallback = 0
        lost: list[float] = []
        tokens = 0
        for rec in records:
            (ex_e, ex_g, _), (e, g, cost) = rec["rules"]["exhaustive"], rec["rules"][name]
            same += e == ex_e
            fallback += (g > 0) == (ex_g > 0)
            lost.append(ex_g - g)
            tokens += cost
        summary[name] = {
            "same_edit": round(same / len(records), 4),
            "same_fallback": round(fallback / len(records), 4),
            "mean_gain_lost_nats": round(sum(lost) / len(lost), 4),
            "max_gain_lost_nats": round(max(lost), 4),
            "scored_tokens_per_model_per_output": round(tokens / len(records), 1),
        }
    results = {
        "world": "SmolLM2-135M LoRA demo world (benchmarks.attribute_latency), seed 0",
        "outputs": len(rows),
        "states": args.states.split(","),
        "pairs": len(records),
        "mean_response_tokens": round(sum(r["length"] for r in records) / len(records), 1),
        "rules": summary,
        "exhaustive_pick_position_rank": _histogram(r["position_rank"] for r in records),
        "exhaustive_pick_alternative_rank": _histogram(r["alternative_rank"] for r in records),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return write_results(results, args.out)


if __name__ == "__main__":
    main()
