"""The ``dda.checkpoint.saved`` Prefect event: what :class:`flows.callback.LineageCallback` announces and what the
event-triggered deployment (``dda-on-checkpoint``) reads. Standard library only: the training process imports it.

One event per saved checkpoint:

- ``event``: :data:`EVENT`;
- ``resource``: ``prefect.resource.id`` = ``dda.checkpoint.<absolute checkpoint folder>``, ``prefect.resource.name``
  = the folder name (``checkpoint-<step>``), ``dda.run_dir`` and ``dda.step`` (strings, as Prefect labels are);
- ``payload``: ``run_dir``, ``checkpoint`` (absolute folders), ``step`` (int), ``epoch`` (float or null).

The deployment's trigger matches the event name and the resource id prefix and passes ``checkpoint`` and
``run_dir`` of the payload as the flow's parameters (:data:`TRIGGER_PARAMETERS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EVENT = "dda.checkpoint.saved"
RESOURCE_PREFIX = "dda.checkpoint."
TRIGGER_PARAMETERS = {"checkpoint_path": "{{ event.payload.checkpoint }}", "run_dir": "{{ event.payload.run_dir }}"}


def checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    """The folder the Hugging Face Trainer writes at ``step``: ``<output_dir>/checkpoint-<step>``, absolute."""
    return (Path(output_dir) / f"checkpoint-{step}").resolve()


def resource(folder: Path, run_dir: Path, step: int) -> dict[str, str]:
    """The event's resource: the checkpoint folder, labelled with its run folder and step."""
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{folder}",
        "prefect.resource.name": folder.name,
        "dda.run_dir": str(run_dir),
        "dda.step": str(step),
    }


def payload(folder: Path, run_dir: Path, step: int, epoch: float | None) -> dict[str, Any]:
    """The event's payload: what the triggered flow needs (``checkpoint``, ``run_dir``) and what a person reads."""
    return {"checkpoint": str(folder), "run_dir": str(run_dir), "step": step, "epoch": epoch}
