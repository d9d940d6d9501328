"""Builders shared by the task and flow tests: run copies, query files, pipeline configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dda_kernel import ProjectionSpec
from tasks.config import PipelineConfig

# float32: the tests compare against single-sample references; bfloat16 (the default where the CPU has native
# kernels) is measured against float32 in benchmarks/embed_throughput.py, not asserted here.
CONFIG = PipelineConfig(
    projection=ProjectionSpec(k_in=4, k_out=4), batch_size=8, shard_size=16, max_length=64, precision="float32"
)


def copy_run(world, dest: Path, steps: int | None = None) -> Path:
    """Copy the world's run folder (its first ``steps`` checkpoints) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    folders = sorted(Path(world.run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for folder in folders[:steps]:
        shutil.copytree(folder, dest / folder.name)
    return dest


def write_queries(path: Path, n: int = 3, too_long: bool = False) -> Path:
    """A queries file: outputs that say China for England documents, with their corrections."""
    names = ["Alice", "Bruno", "Chen", "Dara"]
    with path.open("w") as f:
        for i in range(n):
            prompt = f"document : {names[i % 4]} flew from Peru to England on Monday and met Kira there . summary :"
            if too_long and i == n - 1:
                prompt = " ".join(["document :"] + ["England"] * 200 + ["summary :"])
            row = {"id": f"q{i}", "prompt": prompt, "response": f"{names[i % 4]} flew to China .",
                   "corrected": f"{names[i % 4]} flew to England ." if i % 2 == 0 else None}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path
