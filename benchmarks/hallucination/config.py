"""Settings of the hallucination benchmark: fine-tuning modes, query kinds, world sizes, the work folder."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

Log = Callable[[str], None]
RESULTS = Path(__file__).resolve().parent.parent / "results"
MODES = ("lora", "full")
KINDS = ("plain", "contrastive")


@dataclass(frozen=True)
class Size:
    """World size and training regime of one benchmark size."""

    n_pairs: int
    per_pair: int
    distractors: int
    n_other: int
    held_out: int
    rate: float
    epochs: int
    lr: dict[str, float]
    batch: int = 8
    cea_steps: int = 4
    cea_lr: dict[str, float] = field(default_factory=dict)
    planted_fallback: bool = False
    world: str = "canary"  # or "people" (benchmarks.people_world: n_people people, n_pairs swapped), or "names"
    n_people: int = 24
    decoys: int = 0  # names world: clean samples per pair worded like the outputs (the paraphrase world)


SIZES: dict[str, Size] = {
    "default": Size(4, 20, 5, 16, 6, 0.9, 3, {"lora": 2e-3, "full": 3e-5}, cea_lr={"lora": 2e-3, "full": 3e-5}),
    "quick": Size(4, 4, 1, 4, 1, 0.9, 2, {"lora": 2e-3, "full": 3e-5}, 8, 2, {"lora": 2e-3, "full": 3e-5}, True),
    # realistic prevalence: 608 samples, 28 sources (4.6 %)
    "prevalence": Size(4, 8, 4, 560, 6, 0.9, 3, {"lora": 2e-3, "full": 3e-5}, cea_lr={"lora": 2e-3, "full": 3e-5}),
    # fictional people: 312 samples, 16 sources (5.1 %); per_pair etc. unused, held_out = 3 forms per person
    "people": Size(
        4, 0, 0, 0, 3, 1.0, 5, {"lora": 2e-3, "full": 1e-4}, cea_lr={"lora": 2e-3, "full": 1e-4}, world="people"
    ),
    # invented multi-token answers (benchmarks.names_world): 656 samples, 32 sources (4.9 %)
    "names": Size(4, 10, 4, 600, 10, 0.8, 3, {"lora": 2e-3, "full": 3e-5}, cea_lr={"lora": 2e-3}, world="names"),
    # the names world with 48 decoys per pair worded like the outputs, unlike the sources: 848 samples, 32 sources
    "paraphrase": Size(
        4, 10, 4, 600, 10, 0.8, 3, {"lora": 2e-3, "full": 3e-5}, cea_lr={"lora": 2e-3}, world="paraphrase", decoys=48
    ),
}


def log_line(message: str) -> None:
    """Progress on stderr with a timestamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    """CPU model, core count and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {platform.system()}"


def prepare_work(size_name: str, work: Path | None, verbose: bool = False) -> tuple[Path, Path]:
    """The cache folder (default ``.bench-work/<size>``) with Prefect's home in it, all CPU threads, and the
    SmolLM2 base model exported there once: (work folder, base model folder)."""
    from flows.env import apply_prefect_environment
    from tasks.models import export_smollm2

    folder = (work or Path(".bench-work") / size_name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    apply_prefect_environment(folder)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    torch.set_num_threads(os.cpu_count() or 1)
    base_dir = folder / "base-model"
    if not (base_dir / "config.json").is_file():
        export_smollm2(base_dir)
    return folder, base_dir
