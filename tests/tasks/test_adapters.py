"""PEFT adapter checkpoints: loaded onto the base model, identical to the merged model; a foreign adapter is refused."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tasks.checkpoints import CheckpointError, inspect_checkpoint
from tasks.models import load_base_model, load_checkpoint, tiny_llama

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def _adapter(model: torch.nn.Module, folder, seed: int = 0) -> torch.nn.Module:
    peft_model = get_peft_model(model, LORA)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(folder)
    return peft_model


def test_adapter_checkpoint_loads_as_the_merged_model(small_world, tmp_path):
    base, tokenizer = load_base_model(small_world.base_model)
    folder = tmp_path / "checkpoint-3"
    merged = _adapter(base, folder).merge_and_unload()
    info = inspect_checkpoint(folder)
    assert (info.kind, info.status, info.step) == ("adapter", "complete", 3)
    loaded, loaded_tokenizer = load_checkpoint(small_world.base_model, folder)
    ids = torch.tensor([tokenizer("document : Alice flew to England . summary :")["input_ids"]])
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base_logits = load_base_model(small_world.base_model)[0](input_ids=ids).logits
    assert not torch.allclose(got, base_logits, atol=1e-3)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_adapter_of_another_base_model_is_refused(small_world, tmp_path):
    folder = tmp_path / "checkpoint-1"
    _adapter(tiny_llama(50, hidden=32, layers=2, heads=4), folder)
    with pytest.raises(CheckpointError, match="does not fit base model"):
        load_checkpoint(small_world.base_model, folder)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda tensors: {k: v for k, v in tensors.items() if "down_proj" not in k},  # dropped keys
        lambda tensors: {k.replace("layers.", "blocks."): v for k, v in tensors.items()},  # other module names
    ],
    ids=["dropped-keys", "other-module-names"],
)
def test_adapter_whose_tensors_do_not_load_is_refused(small_world, tmp_path, tamper):
    """Such an adapter would load as the base model (lora_B initialises to zero), with only a warning from peft."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "checkpoint-2"
    _adapter(load_base_model(small_world.base_model)[0], folder)
    save_file(tamper(load_file(folder / "adapter_model.safetensors")), folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"did not load onto the base model \(\d+ of \d+ LoRA weights missing"):
        load_checkpoint(small_world.base_model, folder)


def test_adapter_that_changes_nothing_is_refused(small_world, tmp_path):
    folder = tmp_path / "checkpoint-1"
    get_peft_model(load_base_model(small_world.base_model)[0], LORA).save_pretrained(folder)  # lora_B = 0
    with pytest.raises(CheckpointError, match="leaves the base model unchanged"):
        load_checkpoint(small_world.base_model, folder)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_switch_on_the_resident_base_model_as_fresh_loads_would(small_world, tmp_path, monkeypatch):
    """model_for serves base → adapter 1 → base → adapter 2 → adapter 1 from one resident base model: each state's
    outputs equal a fresh load of that state, θ_0 with the adapter disabled equals the base model, and the base
    model is read from disk once."""
    import tasks.models as models

    folders = [tmp_path / f"checkpoint-{i}" for i in (1, 2)]
    for seed, folder in enumerate(folders):
        _adapter(load_base_model(small_world.base_model)[0], folder, seed=seed)
    base, tokenizer = load_base_model(small_world.base_model)
    ids = torch.tensor([tokenizer("document : Alice flew to England . summary :")["input_ids"]])
    want = {None: _logits(base, ids)} | {
        f: _logits(load_checkpoint(small_world.base_model, f)[0], ids) for f in folders
    }
    models._BASE.clear()
    loads: list[str] = []
    real = models.load_base_model
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: loads.append("base") or real(*a, **k))
    for state in (None, folders[0], None, folders[1], folders[0], None):
        with models.model_for(small_world.base_model, None if state is None else str(state)) as cached:
            torch.testing.assert_close(_logits(cached.model, ids), want[state], rtol=1e-5, atol=1e-5)
    assert loads == ["base"]
    assert not torch.allclose(want[folders[0]], want[folders[1]], atol=1e-3)


def test_a_bad_adapter_is_refused_by_model_for_and_nothing_half_attached_is_served(small_world, tmp_path):
    import tasks.models as models

    good, bad = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    _adapter(load_base_model(small_world.base_model)[0], good)
    get_peft_model(load_base_model(small_world.base_model)[0], LORA).save_pretrained(bad)  # lora_B = 0
    base, tokenizer = load_base_model(small_world.base_model)
    ids = torch.tensor([tokenizer("document : Bruno flew to England . summary :")["input_ids"]])
    tuned = _logits(load_checkpoint(small_world.base_model, good)[0], ids)
    models._BASE.clear()
    with models.model_for(small_world.base_model, str(good)) as cached:
        torch.testing.assert_close(_logits(cached.model, ids), tuned, rtol=1e-5, atol=1e-5)
    with (
        pytest.raises(CheckpointError, match="leaves the base model unchanged"),
        models.model_for(small_world.base_model, str(bad)),
    ):
        pass
    with models.model_for(small_world.base_model, str(good)) as cached:
        torch.testing.assert_close(_logits(cached.model, ids), tuned, rtol=1e-5, atol=1e-5)
    with models.model_for(small_world.base_model, None) as cached:
        torch.testing.assert_close(_logits(cached.model, ids), _logits(base, ids), rtol=1e-5, atol=1e-5)
