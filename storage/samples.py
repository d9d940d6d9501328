"""Training samples and queries in: the input contract of docs/data.md, validated row by row."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from storage.errors import DatasetFormatError, SampleConflictError
from storage.keys import require_unique_keys
from storage.store import LineageStore, utcnow, where_equal, where_in


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class ContractRow(BaseModel):
    """An input row: fields beyond the contract are kept under ``meta`` (the row's own ``meta`` keys win)."""

    model_config = ConfigDict(extra="allow")
    meta: dict[str, Any] = Field(default_factory=dict)
    _extra_fields: tuple[str, ...] = PrivateAttr(default=())
    _where: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _extras_to_meta(self) -> ContractRow:
        extra = dict(self.__pydantic_extra__ or {})
        if extra:
            self.meta = {**extra, **self.meta}
            self.__pydantic_extra__ = {}
            self._extra_fields = tuple(sorted(extra))
        return self

    @property
    def extra_fields(self) -> tuple[str, ...]:
        """Names of the fields beyond the contract that this row carried (now under ``meta``)."""
        return self._extra_fields

    @property
    def where(self) -> str:
        """Where the row came from, for messages: ``<file> line <n>`` (row number for Parquet), or ``""``."""
        return self._where


def extra_fields(rows: Sequence[ContractRow]) -> list[str]:
    """Every field beyond the contract that any of ``rows`` carried, sorted (they are kept under ``meta``)."""
    return sorted({name for row in rows for name in row.extra_fields})


class SampleIn(ContractRow):
    """One training row: ``prompt`` + ``response``, or chat ``messages`` whose last assistant turn is the response."""

    id: str | None = Field(default=None, min_length=1)
    prompt: str = ""
    response: str = ""
    messages: list[Message] | None = None
    source: str | None = None
    license: str | None = None

    @model_validator(mode="after")
    def _resolve_chat(self) -> SampleIn:
        if self.messages is not None:
            if not self.messages or self.messages[-1].role != "assistant":
                raise ValueError("'messages' must end with an assistant turn (the response)")
            self.prompt = "".join(f"{m.role}: {m.content}\n" for m in self.messages[:-1])
            self.response = self.messages[-1].content
            self.meta = {**self.meta, "messages": [m.model_dump() for m in self.messages]}
        if not self.response.strip():
            raise ValueError("'response' is missing or empty")
        return self


GROUP_PREFIX = "group:"  # query ids of query groups: ``group:<name>``


class QueryIn(ContractRow):
    """One output to trace: ``prompt``, ``response`` (the output), optional ``corrected``, optional ``group``."""

    id: str | None = Field(default=None, min_length=1)
    prompt: str
    response: str
    corrected: str | None = None
    group: str | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _not_a_group_id(self) -> QueryIn:
        if self.id is not None and self.id.startswith(GROUP_PREFIX):
            raise ValueError(f"query ids starting with {GROUP_PREFIX!r} are reserved for query groups: rename it")
        return self

    @model_validator(mode="after")
    def _texts_not_blank(self) -> QueryIn:
        """An output is traced through its prompt and response tokens: neither may be empty or blank, and a
        correction, when given, must be a different non-blank response (the contrast would be zero)."""
        for name in ("prompt", "response"):
            if not getattr(self, name).strip():
                raise ValueError(f"'{name}' is empty or blank: give the output's {name} text")
        if self.corrected is not None:
            if not self.corrected.strip():
                raise ValueError("'corrected' is blank: give the corrected response, or leave the field out")
            if self.corrected == self.response:
                raise ValueError("'corrected' equals 'response': give the corrected response, or leave it out")
        return self

    @property
    def query_id(self) -> str:
        """The id the output is registered under: ``id``, or a content hash of prompt, response and correction."""
        return self.id or content_hash(self.prompt, self.response + "\x00" + (self.corrected or ""))


def content_hash(prompt: str, response: str) -> str:
    """SHA-256 of prompt ‖ NUL ‖ response, 32 hex characters: the default sample (and query) id."""
    return hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()[:32]


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed row or the JSONDecodeError) for each non-blank row of a JSONL/Parquet file."""
    if path.suffix == ".parquet":
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((line_no, e))
    return out


def read_rows(path: str | Path, model: type[SampleIn] | type[QueryIn]) -> list[Any]:
    """Validate every row of a JSONL or Parquet file; any bad row fails the whole file.

    Raises :class:`DatasetFormatError` listing every bad line (row number for Parquet) and why.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path} does not exist or is not a file")
    good, bad = [], []
    for line_no, raw in _rows(path):
        if isinstance(raw, json.JSONDecodeError):
            bad.append(f"line {line_no}: not valid JSON ({raw.msg})")
            continue
        try:
            row = model.model_validate(raw)
            row._where = f"{path} {'row' if path.suffix == '.parquet' else 'line'} {line_no}"
            good.append(row)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "row"
            bad.append(f"line {line_no}: {where}: {first['msg']}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DatasetFormatError(f"{path}: {len(bad)} malformed row(s), nothing ingested — {shown}")
    if not good:
        raise DatasetFormatError(f"{path} holds no rows")
    return good


@dataclass(frozen=True)
class IngestResult:
    """How many rows a call added and how many were already there unchanged."""

    added: int
    unchanged: int


def ingest_samples(store: LineageStore, samples: Sequence[SampleIn], dataset: str) -> IngestResult:
    """Register training samples; the same sample again adds nothing.

    Raises :class:`SampleConflictError` naming the id when a different sample arrives under an
    existing id (or twice in ``samples``); nothing is written then.
    """
    rows: dict[str, dict[str, Any]] = {}
    for s in samples:
        digest = content_hash(s.prompt, s.response)
        sid = s.id or digest
        if sid in rows and rows[sid]["content_hash"] != digest:
            raise SampleConflictError(
                f"sample id {sid!r} appears twice with different content: give each sample its own id"
            )
        rows[sid] = {
            "sample_id": sid, "dataset": dataset, "source": s.source, "license": s.license, "prompt": s.prompt,
            "response": s.response, "meta_json": json.dumps(s.meta, sort_keys=True), "content_hash": digest,
            "n_tokens": None, "ingested_at": utcnow(),
        }  # fmt: skip
    existing = store.read("samples", columns=["sample_id", "content_hash"])
    require_unique_keys("samples", existing["sample_id"].to_pylist())
    known = dict(zip(existing["sample_id"].to_pylist(), existing["content_hash"].to_pylist(), strict=True))
    for sid, row in rows.items():
        if sid in known and known[sid] != row["content_hash"]:
            raise SampleConflictError(
                f"sample id {sid!r} already names a different sample (content hash {known[sid]} vs "
                f"{row['content_hash']}): give the new sample another id"
            )
    new = [r for sid, r in rows.items() if sid not in known]
    store.upsert("samples", pa.Table.from_pylist(new))
    return IngestResult(added=len(new), unchanged=len(rows) - len(new))


def register_queries(store: LineageStore, queries: Sequence[QueryIn]) -> list[str]:
    """Register outputs to trace (by id, default id = content hash); returns their ids in order.

    The same output again is a no-op. An id that already names another output (other prompt, response or
    correction) — in the store or twice in ``queries`` — raises :class:`SampleConflictError` naming the row
    (:attr:`ContractRow.where`) and the fix; nothing is written then.
    """
    now = utcnow()
    rows: dict[str, dict[str, Any]] = {}
    for q in queries:
        row = {"query_id": q.query_id, "prompt": q.prompt, "response": q.response, "corrected": q.corrected,
               "meta_json": json.dumps(q.meta, sort_keys=True), "created_at": now}  # fmt: skip
        earlier = rows.get(q.query_id)
        if earlier is not None and _text(earlier) != _text(row):
            raise SampleConflictError(f"{_where(q)}query id {q.query_id!r} appears twice with different text: "
                                      "give each output its own id")  # fmt: skip
        rows.setdefault(q.query_id, row)
    known = store.read("queries", ["query_id", "prompt", "response", "corrected"], where_in("query_id", list(rows)))
    stored = {r["query_id"]: r for r in known.to_pylist()}
    for q in queries:
        old = stored.get(q.query_id)
        if old is not None and _text(old) != _text(rows[q.query_id]):
            field = next(f for f in ("prompt", "response", "corrected") if old[f] != rows[q.query_id][f])
            raise SampleConflictError(
                f"{_where(q)}query id {q.query_id!r} is already registered with another {field}: give the new "
                "output a new id (its lineage is kept apart), or leave the id out to key it by its content"
            )
    store.upsert("queries", pa.Table.from_pylist([r for qid, r in rows.items() if qid not in stored]))
    return [q.query_id for q in queries]


def _text(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return row["prompt"], row["response"], row["corrected"]


def _where(row: ContractRow) -> str:
    return f"{row.where}: " if row.where else ""


def group_id(name: str) -> str:
    """The query id of query group ``name``."""
    return GROUP_PREFIX + name


def _group_text(name: str, members: list[dict[str, Any]], field: str, shown: int = 5) -> str:
    texts = [str(m[field]) for m in members[:shown]]
    more = [f"... and {len(members) - shown} more"] if len(members) > shown else []
    return "\n".join(texts + more)


def register_groups(store: LineageStore, groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Register query groups {name: member query ids} (members registered already); returns the group ids.

    A group is a row of ``queries`` (id ``group:<name>``, its text the members' texts, ``corrected`` set
    when every member has one) plus one ``query_groups`` row per member. A group's members are fixed once
    registered: the same set again is a no-op, another set raises :class:`SampleConflictError` (name a new
    group), so a group's lineage always means the same outputs.
    """
    ids: list[str] = []
    for name, member_ids in sorted(groups.items()):
        gid, members = group_id(name), sorted(set(member_ids))
        stored = store.read("query_groups", ["query_id"], where_equal(group_id=gid))["query_id"].to_pylist()
        if stored and sorted(stored) != members:
            raise SampleConflictError(
                f"query group {name!r} already has {len(stored)} other members: a group's outputs are fixed once "
                "registered, give the new set another group name"
            )
        ids.append(gid)
        if stored:
            continue
        rows = store.read("queries", ["query_id", "prompt", "response", "corrected"], where_in("query_id", members))
        found = sorted(rows.to_pylist(), key=lambda r: r["query_id"])
        if len(found) != len(members):
            missing = sorted(set(members) - {r["query_id"] for r in found})
            raise KeyError(f"query {missing[0]!r} of group {name!r} is not registered")
        now = utcnow()
        fixed = all(r["corrected"] for r in found)
        store.upsert("queries", pa.Table.from_pylist([{
            "query_id": gid, "prompt": f"query group {name!r}: {len(found)} outputs",
            "response": _group_text(name, found, "response"),
            "corrected": _group_text(name, found, "corrected") if fixed else None,
            "meta_json": json.dumps({"group": name, "members": members}), "created_at": now,
        }]))  # fmt: skip
        store.upsert("query_groups", pa.Table.from_pylist(
            [{"group_id": gid, "query_id": m, "added_at": now} for m in members]
        ))  # fmt: skip
    return ids


def group_members(store: LineageStore, group_ids: Sequence[str]) -> dict[str, list[str]]:
    """{group id: sorted member query ids} for those of ``group_ids`` that are groups."""
    if not group_ids:
        return {}
    table = store.read("query_groups", ["group_id", "query_id"], where_in("group_id", list(group_ids)))
    out: dict[str, list[str]] = {}
    for g, q in zip(table["group_id"].to_pylist(), table["query_id"].to_pylist(), strict=True):
        out.setdefault(g, []).append(q)
    return {g: sorted(qs) for g, qs in out.items()}


def read_samples(store: LineageStore, sample_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """{sample_id: (prompt, response)} for ``sample_ids``; raises KeyError naming one that is not registered."""
    table = store.read("samples", ["sample_id", "prompt", "response"], where_in("sample_id", list(sample_ids)))
    found = dict(zip(table["sample_id"].to_pylist(), zip(table["prompt"].to_pylist(), table["response"].to_pylist(),
                     strict=True), strict=True))  # fmt: skip
    missing = [s for s in sample_ids if s not in found]
    if missing:
        raise KeyError(f"sample {missing[0]!r} is not registered: run dda ingest first")
    return found


def sample_ids(store: LineageStore) -> list[str]:
    """Every registered sample id, sorted."""
    return sorted(store.read("samples", ["sample_id"])["sample_id"].to_pylist())


def set_token_counts(store: LineageStore, counts: dict[str, int]) -> int:
    """Fill ``samples.n_tokens`` (response tokens under the base model's tokenizer) for the given ids."""
    if not counts:
        return 0
    rows = store.read("samples", where=where_in("sample_id", list(counts))).to_pylist()
    for row in rows:
        row["n_tokens"] = int(counts[row["sample_id"]])
    store.upsert("samples", pa.Table.from_pylist(rows))
    return len(rows)
