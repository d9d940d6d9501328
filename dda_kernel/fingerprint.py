"""Stable fingerprints of specs and settings: the same value gives the same hex string everywhere."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any

# Field metadata key (a dataclass field's ``metadata``, a pydantic field's ``json_schema_extra``): leave the
# field out while it holds the value given (the behaviour from before the option existed), so that adding an
# option keeps the fingerprints, and with them the stored lineage, of every configuration that does not use it —
# also after the option's default changes.
OMIT_IF = "fingerprint_omit_if"


def canonical(obj: Any) -> Any:
    """Return a JSON-serialisable, order-stable form of ``obj``.

    Dataclasses and pydantic models become ``{"__type__": name, field: value}`` (a field marked :data:`OMIT_IF`
    — dataclass ``metadata``, pydantic ``json_schema_extra`` — is left out while it holds that value), tuples
    and lists become lists, sets and frozensets become sorted lists, floats keep their exact ``repr`` (so 0.1 and
    0.1000001 differ).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {
            f.name: canonical(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (OMIT_IF in f.metadata and getattr(obj, f.name) == f.metadata[OMIT_IF])
        }
        return {"__type__": type(obj).__name__, **fields}
    model_fields = getattr(type(obj), "model_fields", None)
    if isinstance(model_fields, dict) and hasattr(obj, "model_dump"):  # a pydantic model, duck-typed
        out = {}
        for name, info in model_fields.items():
            extra = getattr(info, "json_schema_extra", None)
            value = getattr(obj, name)
            if not (isinstance(extra, dict) and OMIT_IF in extra and value == extra[OMIT_IF]):
                out[name] = canonical(value)
        view = getattr(obj, "fingerprint_view", None)  # a renamed field keeps the name fingerprints knew it by
        return {"__type__": type(obj).__name__, **(view(out) if callable(view) else out)}
    if isinstance(obj, enum.Enum):
        return canonical(obj.value)
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(canonical(v) for v in obj)
    if isinstance(obj, float):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    raise TypeError(f"cannot fingerprint a value of type {type(obj).__name__}: {obj!r}")


def stable_fingerprint(obj: Any, length: int = 16) -> str:
    """SHA-256 of the canonical JSON of ``obj``, as ``length`` hex characters."""
    text = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
