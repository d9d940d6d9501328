"""Gradient-embedding throughput against a plain training step, and peak memory (benchmarks/README.md).

    .venv/bin/python -m benchmarks.embed_throughput --world --json benchmarks/results/embed_throughput_smollm2.json
    .venv/bin/python -m benchmarks.embed_throughput --model tiny
    .venv/bin/python -m benchmarks.embed_throughput --model smollm2 --batch 8 --repeats 3

``--world`` is the indexing benchmark of record (``benchmarks/embed_world.py``): SmolLM2-135M on the
hallucination benchmark's real samples through ``tasks.indexing.embed_rows``, float32 vs bfloat16, batches
by count vs by token budget, against a float32 training step on the same batches, plus the score
agreement of bfloat16 with float32 on the demo world. Its figures are in the README. The synthetic modes
below predate it (random tokens, fixed length 64, float32) and are kept for the kernel alone.

For one model, batch and sequence length, in one process, it times (median of ``--repeats`` after
one warm-up): a plain training step (forward + backward with weight gradients), a LoRA training
step (r = 8 on q/v), and ``dda_kernel.embed_batch`` at the default projection. It reports
samples/s, tokens/s and the ratio embed / training step. ``--memory`` reruns each mode in a fresh
subprocess and reports its peak RSS above the loaded model, for several batch sizes and for 1 vs 4
batches, to show memory is bounded by the batch and not by how much data is embedded.

Measured 2026-11-21 on the project machine (2 CPUs, torch 2.13 CPU, float32, seq 64, default
projection k_in = k_out = 8 over every block linear; results/embed_throughput_tiny.json; the SmolLM2
file now holds the ``--world`` run):

| model | batch | D | train step | LoRA step | embed | embed / train step | embed / LoRA step |
| --- | --- | --- | --- | --- | --- | --- | --- |
| tiny LLaMA 6.0 M | 16 | 1 792 | 69.4 samples/s | 95.8 | 94.0 | 1.35 | 0.98 |
| SmolLM2-135M | 8 | 13 440 | 2.17 samples/s | 3.70 | 3.57 | 1.65 | 0.96 |

Measured 2026-11-22 at the default chosen by the hallucination benchmark (8×8 on ``o_proj`` +
``down_proj``; same command, SmolLM2-135M, batch 8): D = 3 840, train step 2.1 samples/s, LoRA step
2.9, embed 3.2, **embed / train step 1.50**, embed / LoRA step 1.10 (printed only).

Peak RSS above the loaded model, SmolLM2, embed: batch 2 → 294 MiB, 4 → 499, 8 → 1 024; 4 batches
of 8 → 1 294 (the train step: 873 / 1 041 / 1 288 / 1 447). Memory grows with the batch, not with
the number of batches (the 4-batch figure is allocator high-water, not retained data).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from dda_kernel import ProjectionSpec, build_projector, embed_batch, layout_for, pad_batch, per_sample_loss
from dda_kernel.gradients import TokenBatch
from tasks.models import load_smollm2, tiny_llama


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> TokenBatch:
    """Random tokens: the first half of each sequence is the prompt, the second half the response."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids = torch.randint(3, vocab, (seq,), generator=gen).tolist()
        rows.append((ids, [-100] * (seq // 2) + ids[seq // 2 :]))
    return pad_batch(rows, pad_id=0)


def load(name: str) -> torch.nn.Module:
    if name == "tiny":
        return tiny_llama(vocab_size=4096, hidden=256, layers=4, heads=8, intermediate=1024)
    model, _ = load_smollm2()
    return model


def train_step(model: torch.nn.Module, batch: TokenBatch) -> None:
    """One plain training step: forward, response loss, backward into the weight gradients."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_sample_loss(logits, batch.labels)[0].mean().backward()
    model.zero_grad(set_to_none=True)


def runners(model: torch.nn.Module, batch: TokenBatch) -> dict[str, Callable[[], None]]:
    spec = ProjectionSpec()
    projector = build_projector(layout_for(model, spec), torch.float32)

    def embed() -> None:
        embed_batch(model, batch, projector)

    return {"train_step": lambda: train_step(model, batch), "embed": embed}


def lora_runner(model: torch.nn.Module, batch: TokenBatch) -> Callable[[], None]:
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    return lambda: train_step(lora, batch)


def timed(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """VmHWM of this process (peak resident set size since the last reset), in MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def memory_child(model_name: str, mode: str, batch: int, seq: int, n_batches: int) -> None:
    """Run ``mode`` on ``n_batches`` batches; print JSON with peak RSS above the loaded model (MiB)."""
    model = load(model_name)
    vocab = model.get_input_embeddings().num_embeddings
    data = [make_batch(vocab, batch, seq, seed=i) for i in range(n_batches)]
    before = rss_mib()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (the peak RSS) to the current RSS
        f.write("5")
    for b in data:
        fn = lora_runner(model, b) if mode == "lora_step" else runners(model, b)[mode]
        fn()
    peak = peak_rss_mib()
    print(json.dumps({"mode": mode, "batch": batch, "n_batches": n_batches, "peak_above_model_mib": peak - before}))


def memory_table(model_name: str, seq: int, batches: list[int]) -> list[dict[str, float]]:
    rows = []
    for mode in ("train_step", "embed"):
        for batch, n_batches in [(b, 1) for b in batches] + [(batches[-1], 4)]:
            cmd = [sys.executable, "-m", "benchmarks.embed_throughput", "--model", model_name, "--seq", str(seq)]
            cmd += ["--child", mode, "--batch", str(batch), "--n-batches", str(n_batches)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(f"  memory {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--child", choices=["train_step", "embed", "lora_step"])
    parser.add_argument("--n-batches", type=int, default=1)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument(
        "--world", action="store_true", help="real samples and score agreement (benchmarks/embed_world.py)"
    )
    parser.add_argument("--world-child", nargs=2, metavar=("PRECISION", "BATCHING"), help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=512, help="token budget of a batch (--world)")
    parser.add_argument("--memory-sweep", action="store_true", help="peak RSS per token budget (bfloat16)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_sweep or args.memory_child:
        from benchmarks import embed_world

        if args.memory_child:
            print(json.dumps(embed_world.memory_child(args.memory_child)))
        else:
            embed_world.memory_sweep(Path(args.json) if args.json else None)
        return
    if args.world or args.world_child:
        from benchmarks import embed_world

        if args.world_child:
            print(json.dumps(embed_world.child(*args.world_child, args.max_tokens)))
        else:
            embed_world.run(Path(args.json) if args.json else None, args.max_tokens)
        return
    if args.child:
        memory_child(args.model, args.child, args.batch, args.seq, args.n_batches)
        return
    torch.manual_seed(0)
    model = load(args.model)
    vocab = model.get_input_embeddings().num_embeddings
    batch = make_batch(vocab, args.batch, args.seq)
    layout = layout_for(model, ProjectionSpec())
    print(
        f"model={args.model} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M batch={args.batch} "
        f"seq={args.seq} threads={torch.get_num_threads()} tracked_modules={len(layout.slots)} dim={layout.dim}"
    )
    seconds = {name: timed(fn, args.repeats) for name, fn in runners(model, batch).items()}
    seconds["lora_step"] = timed(lora_runner(model, batch), args.repeats)
    report: dict[str, object] = {"model": args.model, "batch": args.batch, "seq": args.seq, "dim": layout.dim}
    for name, s in seconds.items():
        report[name] = {
            "seconds_per_batch": s,
            "samples_per_s": args.batch / s,
            "tokens_per_s": args.batch * args.seq / s,
        }
        print(
            f"  {name:10s} {s * 1e3:9.1f} ms/batch  {args.batch / s:8.1f} samples/s  "
            f"{args.batch * args.seq / s:9.0f} tokens/s"
        )
    report["ratio_embed_vs_train_step"] = seconds["train_step"] / seconds["embed"]
    report["ratio_embed_vs_lora_step"] = seconds["lora_step"] / seconds["embed"]
    print(
        f"  throughput ratio embed / train step = {report['ratio_embed_vs_train_step']:.2f}   "
        f"embed / LoRA step = {report['ratio_embed_vs_lora_step']:.2f}"
    )
    if args.memory:
        report["memory"] = memory_table(
            args.model, args.seq, [max(1, args.batch // 4), max(1, args.batch // 2), args.batch]
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
