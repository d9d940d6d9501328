"""kronfluence's EK-FAC influence for one fine-tuning checkpoint; runs in the benchmark-only environment that holds
kronfluence (``benchmarks.kronfluence_ekfac`` calls it; it imports nothing of this project).

    <tda-venv>/bin/python benchmarks/kronfluence_worker.py SPEC.json

SPEC: ``base`` (the base model folder, with its tokenizer), ``checkpoint`` (a LoRA adapter folder), ``train`` and
``queries`` (lists of {prompt, response}), ``out`` (a folder), ``stage`` (``factors`` or ``scores``: each stage in its
own process keeps the peak memory of one). A pair is tokenised as the project tokenises it: prompt and response
ids without special tokens, then EOS; the loss is the summed cross-entropy of the response tokens. The tracked
modules are the adapter's ``lora_A`` / ``lora_B`` linears: the parameters fine-tuning changed. ``scores`` writes
``scores.npy`` (queries, training pairs): g_qᵀ (G + λI)⁻¹ g_i with the EK-FAC G of the training pairs, the measurement
being each query's loss (positive: training on the pair lowers the query's loss).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from peft import PeftModel
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE = -100


class Pairs(Dataset):
    """(prompt, response) pairs as input ids and labels (prompt masked), unpadded."""

    def __init__(self, tokenizer: Any, rows: list[dict[str, str]]) -> None:
        self.items = []
        for r in rows:
            p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            y = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            self.items.append((torch.tensor(p + y), torch.tensor([IGNORE] * len(p) + y)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (padding ignored) and the attention mask."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for k, (i, y) in enumerate(batch):
        ids[k, : len(i)], labels[k, : len(y)], mask[k, : len(i)] = i, y, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _token_losses(batch: dict[str, torch.Tensor], model: Any, sample: bool) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    if sample:  # the true Fisher: labels drawn from the model's own distribution at the response positions
        with torch.no_grad():
            drawn = torch.distributions.Categorical(logits=logits).sample()
        labels = torch.where(labels == IGNORE, labels, drawn)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum")


class ResponseLoss(Task):
    """Summed cross-entropy of the response tokens, for training pairs and queries alike."""

    def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> torch.Tensor:
        return _token_losses(batch, model, sample)

    def compute_measurement(self, batch: Any, model: Any) -> torch.Tensor:
        return _token_losses(batch, model, False)

    def get_influence_tracked_modules(self) -> list[str] | None:
        return TRACKED

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return batch["attention_mask"]


TRACKED: list[str] = []


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, spec["checkpoint"])
    TRACKED[:] = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" in n]
    task = ResponseLoss()
    model = prepare_model(model, task)
    out = Path(spec["out"])
    analyzer = Analyzer(analysis_name="ekfac", model=model, task=task, cpu=True, disable_tqdm=True, log_level=20,
                        output_dir=str(out))  # fmt: skip
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
    train = Pairs(tokenizer, spec["train"])
    started = time.perf_counter()
    if spec["stage"] == "factors":
        analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=8,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)  # fmt: skip
    else:
        queries = Pairs(tokenizer, spec["queries"])
        analyzer.compute_pairwise_scores("scores", factors_name="ekfac", query_dataset=queries, train_dataset=train,
                                         per_device_query_batch_size=8, per_device_train_batch_size=8,
                                         score_args=ScoreArguments(), overwrite_output_dir=True)  # fmt: skip
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        np.save(out / "scores.npy", scores.double().numpy())
    print(json.dumps({"stage": spec["stage"], "seconds": time.perf_counter() - started, "tracked": len(TRACKED)}))


if __name__ == "__main__":
    main(sys.argv[1])
