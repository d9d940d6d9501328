"""OpenLineage run events for every index, attribute and report run, so that a data catalog (Marquez, DataHub, …)
shows what each checkpoint was trained on and where each traced output comes from, without reading our SQL.

Off unless configured by the client's own conventions (:func:`flows.runs.openlineage_configured`):
``OPENLINEAGE_URL``, ``OPENLINEAGE_CONFIG``, an ``openlineage.yml`` in the working folder or ``~/.openlineage``,
or ``OPENLINEAGE__TRANSPORT__TYPE`` (with the other ``OPENLINEAGE__TRANSPORT__…`` variables);
``OPENLINEAGE_DISABLED=true`` turns it off. Per run (``run_id`` = the Prefect flow-run id, or the id the ``runs``
table records for a run without a server):

- START, then COMPLETE, FAIL (with the error message) or ABORT (interrupted); job = the flow's name in the
  namespace ``OPENLINEAGE_NAMESPACE`` (default ``dda-lineage``);
- inputs: each training dataset (namespace = the job namespace, name ``datasets/<name>``, version = the governance
  report's dataset version) and each indexed model state (``file`` + its folder, or ``huggingface`` + a hub name;
  version = its content fingerprint);
- outputs: the store's Lance tables the run changed (``file`` + ``<store>/lance/<table>.lance``, version = the Lance
  version after the run); a report run's outputs are its HTML and Markdown files, its inputs also the tables read;
- attribute and refresh runs: the run facet ``ddaLineage`` (:class:`DDALineageRunFacet`, schema
  ``docs/openlineage/DDALineageRunFacet.json``) with the traced output ids and each one's top sources.

Emitting never fails a run: a catalog that cannot be reached costs one log line per event.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    DatasetFacet,
    RunFacet,
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    processing_engine_run,
)

from flows.settings import DDASettings, code_version
from storage.provenance import Provenance, read_provenance, top_sources
from storage.store import LineageStore, store_exists, where_equal

log = logging.getLogger("dda.openlineage")
DEFAULT_NAMESPACE = "dda-lineage"
FACET_KEY = "ddaLineage"
FACET_SCHEMA_FILE = "docs/openlineage/DDALineageRunFacet.json"
FACET_MAX_OUTPUTS = 100
TOP_SOURCES = 3
ATTRIBUTE_JOBS = ("dda-attribute", "dda-refresh-lineage")
REPORT_JOBS = ("dda-report",)


def project_url() -> str:
    """The project's home (``[project.urls] Homepage`` of pyproject.toml), the producer of every event."""
    for entry in metadata.metadata("dda-lineage").get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "homepage":
            return url.strip()
    raise RuntimeError("pyproject.toml names no Homepage under [project.urls]")


def facet_schema_url() -> str:
    """Where the ``ddaLineage`` facet's JSON schema is published: the repository's :data:`FACET_SCHEMA_FILE`."""
    return f"{project_url()}/blob/main/{FACET_SCHEMA_FILE}#/$defs/DDALineageRunFacet"


@attr.define
class DDALineageRunFacet(RunFacet):  # type: ignore[misc]
    """The outputs a run traced: ``outputs`` = [{queryId, topSources: [{source, share, totalScore, nSamples}]}]
    under ``settingsFingerprint``; ``nOutputs`` counts them all (at most :data:`FACET_MAX_OUTPUTS` are listed)."""

    settingsFingerprint: str  # noqa: N815
    nOutputs: int  # noqa: N815
    outputs: list[dict[str, Any]]

    @staticmethod
    def _get_schema() -> str:
        return facet_schema_url()


def _version(value: str) -> dict[str, DatasetFacet]:
    return {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=value)}


def _inputs(namespace: str, prov: Provenance) -> list[InputDataset]:
    """Training datasets (with versions) and indexed model states (with fingerprints)."""
    datasets = [InputDataset(namespace, f"datasets/{d['dataset']}", facets=_version(str(d["version"])))
                for d in prov.datasets]  # fmt: skip
    states = []
    for c in prov.checkpoints:
        local = Path(c["path"]).exists()
        name = str(Path(c["path"]).resolve()) if local else str(c["path"])
        states.append(InputDataset("file" if local else "huggingface", name, facets=_version(c["fingerprint"])))
    return datasets + states


def _tables(prov: Provenance, names: list[str], kind: type[Any] = OutputDataset) -> list[Any]:
    """The store's Lance tables ``names`` as datasets (``kind``: output or input) at their versions."""
    root = Path(prov.root) / "lance"
    return [kind("file", str(root / f"{n}.lance"), facets=_version(str(prov.tables[n]))) for n in names]


def _provenance(settings: DDASettings) -> Provenance:
    root = Path(settings.data_dir) / "store"
    if not store_exists(root):
        return Provenance(str(root), [], [], {})
    return read_provenance(LineageStore.open(root))


class _Emitter:
    """One run's events: START on creation, then :meth:`finish` with the final state."""

    def __init__(self, settings: DDASettings, job: str, run_id: str) -> None:
        self.settings, self.job, self.run_id = settings, job, run_id
        self.namespace = os.environ.get("OPENLINEAGE_NAMESPACE", DEFAULT_NAMESPACE)
        self.client = OpenLineageClient()
        self.before = _provenance(settings)
        self._emit(RunState.START, _inputs(self.namespace, self.before), [], {})

    def _emit(self, state: RunState, inputs: list[InputDataset], outputs: list[OutputDataset],
              facets: dict[str, RunFacet]) -> None:  # fmt: skip
        engine = processing_engine_run.ProcessingEngineRunFacet(version=code_version(), name="dda-lineage")
        job_type = job_type_job.JobTypeJobFacet(processingType="BATCH", integration="DDA_LINEAGE", jobType="FLOW")
        event = RunEvent(
            eventType=state, eventTime=datetime.now(UTC).isoformat(), producer=project_url(),
            run=Run(runId=self.run_id, facets={"processing_engine": engine, **facets}),
            job=Job(namespace=self.namespace, name=self.job, facets={"jobType": job_type}),
            inputs=inputs, outputs=outputs,
        )  # fmt: skip
        try:
            self.client.emit(event)
        except Exception as e:  # a catalog that is down must not fail the run
            log.warning("OpenLineage %s event of %s not delivered: %s", state.value, self.job, e)

    def finish(self, state: RunState, wrote: dict[str, Any], error: BaseException | None) -> None:
        """Emit the final event: inputs, outputs (what the run changed or wrote) and the run's facets."""
        after = _provenance(self.settings)
        changed = [n for n, v in after.tables.items() if self.before.tables.get(n) != v]
        inputs, outputs = _inputs(self.namespace, after), _tables(after, changed)
        facets: dict[str, RunFacet] = {}
        if self.job in REPORT_JOBS:
            inputs += _tables(after, sorted(after.tables), InputDataset)
            outputs = [OutputDataset("file", str(Path(wrote[k]).resolve())) for k in ("html", "markdown") if k in wrote]
        if error is not None:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=message, programmingLanguage="python"
            )
        elif self.job in ATTRIBUTE_JOBS:
            facets[FACET_KEY] = self._traced(wrote)
        self._emit(state, inputs, outputs, facets)

    def _traced(self, wrote: dict[str, Any]) -> DDALineageRunFacet:
        """The facet of the outputs an attribute (or refresh) run traced, with their top sources."""
        store = LineageStore.open(Path(self.settings.data_dir) / "store")
        fp = self.settings.fingerprint
        if not (ids := list(wrote.get("query_ids") or [])):  # a refresh: every output with lineage under fp
            states = store.read("dda_state", ["query_id"], where=where_equal(settings_fingerprint=fp))
            ids = sorted(set(states["query_id"].to_pylist()))
        tops = top_sources(store, fp, ids[:FACET_MAX_OUTPUTS], TOP_SOURCES)
        outputs = [{"queryId": q, "topSources": [
            {"source": t["source"], "share": t["share"], "totalScore": t["total_score"], "nSamples": t["n_samples"]}
            for t in tops.get(q, [])]} for q in ids[:FACET_MAX_OUTPUTS]]  # fmt: skip
        return DDALineageRunFacet(settingsFingerprint=fp, nOutputs=len(ids), outputs=outputs)


def _start(settings: DDASettings, job: str, run_id: str) -> _Emitter | None:
    try:
        return _Emitter(settings, job, run_id)
    except Exception as e:  # a broken configuration must not fail the run either
        log.warning("OpenLineage events of %s are off for this run: %s", job, e)
        return None


@contextmanager
def run_events(settings: DDASettings, job: str, run_id: str, wrote: dict[str, Any]) -> Iterator[None]:
    """Emit START now and COMPLETE, FAIL or ABORT when the ``with`` block ends (:func:`flows.runs.observed` calls
    it only when OpenLineage is configured).

    ``wrote`` is filled by the block (what the run did: ``query_ids`` of traced outputs, report files, …).
    """
    emitter = _start(settings, job, run_id)
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as e:
        if emitter is not None:
            _finish(emitter, RunState.ABORT, wrote, e)
        raise
    except BaseException as e:
        if emitter is not None:
            _finish(emitter, RunState.FAIL, wrote, e)
        raise
    if emitter is not None:
        _finish(emitter, RunState.COMPLETE, wrote, None)


def _finish(emitter: _Emitter, state: RunState, wrote: dict[str, Any], error: BaseException | None) -> None:
    try:
        emitter.finish(state, wrote, error)
    except Exception as e:
        log.warning("OpenLineage %s event of %s not built: %s", state.value, emitter.job, e)
