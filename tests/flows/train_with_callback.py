"""A user's training script in miniature: the Hugging Face Trainer on a JSONL file, plus the one line that
announces its checkpoints (:class:`flows.callback.LineageCallback`).

``python -m tests.flows.train_with_callback BASE TRAIN RUN_DIR [--epochs N] [--times FILE] [--no-callback]
[--pause-after-save S]`` writes to ``--times`` (JSON) the wall seconds of ``trainer.train()`` and the unix time
of every save; ``--pause-after-save`` spaces the checkpoints out (the event benchmark times each on an idle
deployment).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import TrainerCallback

from flows.callback import LineageCallback
from tasks.demo import fine_tune
from tasks.models import load_base_model


class SaveClock(TrainerCallback):  # type: ignore[misc]
    """Records ``(step, unix time)`` at every save (first in the list), or sleeps ``pause_s`` (last in it)."""

    def __init__(self, pause_s: float = 0.0) -> None:
        self.saves: list[tuple[int, float]] = []
        self.pause_s = pause_s

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.saves.append((state.global_step, time.time()))
        time.sleep(self.pause_s)


def train(
    base: str, train_file: str, run_dir: Path, epochs: int, announce: bool, lr: float = 3e-3, pause_s: float = 0.0
) -> dict[str, Any]:
    """Fine-tune ``base`` on ``train_file`` with the Trainer (a checkpoint per epoch); what was timed."""
    model, tokenizer = load_base_model(base)
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines() if line.strip()]
    samples = [SimpleNamespace(sample_id=r.get("id") or f"s{i}", prompt=r["prompt"], response=r["response"])
               for i, r in enumerate(rows)]  # fmt: skip
    clock = SaveClock()
    callback = LineageCallback() if announce else None
    started = time.perf_counter()
    fine_tune(model, tokenizer, samples, run_dir, epochs, lr, seed=0, log=lambda _: None,
              callbacks=[clock, *([callback] if callback else []), SaveClock(pause_s)])  # fmt: skip
    return {"train_s": time.perf_counter() - started, "saves": clock.saves,
            "announced": callback.announced if callback else []}  # fmt: skip


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("base")
    p.add_argument("train")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--times", type=Path)
    p.add_argument("--no-callback", action="store_true")
    p.add_argument("--pause-after-save", type=float, default=0.0)
    a = p.parse_args()
    out = train(a.base, a.train, a.run_dir, a.epochs, announce=not a.no_callback, pause_s=a.pause_after_save)
    if a.times:
        a.times.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
