"""Per-sample gradient embeddings against exact float64 references on a tiny LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from dda_kernel import (
    EmptyResponseError,
    LayoutMismatchError,
    NonFiniteLossError,
    NoTrackedModulesError,
    ProjectionSpec,
    build_projector,
    contrastive_query,
    embed_batch,
    finetune_delta_weights,
    layout_for,
    linear_modules,
    pad_batch,
    project_gradient,
    response_log_probs,
)
from tests.conftest import tiny_llama

ALL_LINEARS = (r"(^|\.)layers\.\d+\.",)  # every linear of the blocks, not only the default o_proj/down_proj
EXACT = ProjectionSpec(identity=True, include=ALL_LINEARS)


def reference_gradients(model: torch.nn.Module, samples, names: list[str]) -> torch.Tensor:
    """Loop of single-sample ``loss.backward()``: rows = concat vec(∂l/∂W_m).

    The loss is written out here (mean response-token NLL from ``log_softmax``), in float64
    throughout; Hugging Face's built-in loss upcasts logits to float32, too coarse for a 1e-9 check.
    """
    weights = {n: m.weight for n, m, _, _ in linear_modules(model)}
    for p in model.parameters():
        p.requires_grad_(True)
    rows = []
    for ids, labels in samples:
        model.zero_grad()
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        targets = torch.tensor(labels[1:])
        keep = targets != -100
        logp = torch.log_softmax(logits[:-1][keep], dim=-1)
        loss = -logp.gather(1, targets[keep][:, None]).mean()
        loss.backward()
        rows.append(torch.cat([weights[n].grad.flatten() for n in names]))
    return torch.stack(rows)


def embed(model, samples, spec=EXACT, side="right", batch_size=None):
    layout = layout_for(model, spec)
    projector = build_projector(layout, dtype=torch.float64)
    size = batch_size or len(samples)
    parts = [
        embed_batch(model, pad_batch(samples[i : i + size], pad_id=0, side=side), projector).vectors
        for i in range(0, len(samples), size)
    ]
    return torch.cat(parts), layout


def test_identity_projection_equals_single_sample_backward(model64, samples):
    got, layout = embed(model64, samples)
    names = [s.name for s in layout.slots]
    assert "lm_head" not in names
    assert len(names) == 14
    want = reference_gradients(model64, samples, names)
    assert got.shape == want.shape == (len(samples), layout.dim)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_batch_size_padding_side_and_order_invariance(model64, samples, side, batch_size):
    ref, _ = embed(model64, samples, batch_size=len(samples))
    got, _ = embed(model64, samples, side=side, batch_size=batch_size)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    order = [3, 0, 5, 1, 4, 2]
    shuffled, _ = embed(model64, [samples[i] for i in order], side=side, batch_size=batch_size)
    torch.testing.assert_close(shuffled, ref[order], rtol=1e-9, atol=1e-12)


def test_projected_equals_projection_of_exact_gradient(model64, samples):
    spec = ProjectionSpec(k_in=5, k_out=3, seed=7, include=ALL_LINEARS)
    got, layout = embed(model64, samples, spec=spec)
    exact, exact_layout = embed(model64, samples)
    projector = build_projector(layout, dtype=torch.float64)
    parts = []
    for j, (slot, eslot) in enumerate(zip(layout.slots, exact_layout.slots, strict=True)):
        grad = exact[:, exact_layout.slice_of(eslot)].reshape(-1, slot.d_out, slot.d_in)
        parts.append(project_gradient(projector, j, grad))
    assert got.shape == (len(samples), 14 * 15)
    torch.testing.assert_close(got, torch.cat(parts, dim=1), rtol=1e-9, atol=1e-12)


def test_lora_effective_weight_gradients_equal_merged_model(samples):
    base = tiny_llama(seed=3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(11)
    lora = get_peft_model(copy.deepcopy(base), config)
    merged = copy.deepcopy(lora).merge_and_unload()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    got, lora_layout = embed(lora, samples)
    want, merged_layout = embed(merged, samples)
    assert lora_layout.fingerprint == merged_layout.fingerprint == layout_for(base, EXACT).fingerprint
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    names = [s.name for s in merged_layout.slots]
    torch.testing.assert_close(got, reference_gradients(merged, samples, names), rtol=1e-9, atol=1e-12)


def test_embedding_leaves_model_state_untouched(samples):
    model = tiny_llama()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    embed(model, samples)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_float32_matches_float64(samples):
    spec = ProjectionSpec(k_in=4, k_out=4, include=ALL_LINEARS)
    v64, _ = embed(tiny_llama(), samples, spec=spec)
    model32 = tiny_llama(dtype=torch.float32)
    layout = layout_for(model32, spec)
    v32 = embed_batch(model32, pad_batch(samples, 0), build_projector(layout, torch.float32)).vectors
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-6)


def test_contrastive_query_is_difference_of_gradients(model64, samples):
    halluc = samples[:3]
    fixed = [([*ids[:-1], ids[-1] % 60 + 1], [*labels[:-1], ids[-1] % 60 + 1]) for ids, labels in halluc]
    g_h, _ = embed(model64, halluc)
    g_c, _ = embed(model64, fixed)
    q = contrastive_query(g_h, g_c)
    torch.testing.assert_close(q, g_h - g_c)
    assert float(q.norm()) > 0


def test_empty_response_names_the_sample(model64):
    batch = pad_batch([([1, 2, 3], [-100, 5, 6]), ([4, 5, 6], [-100, -100, -100])], pad_id=0)
    projector = build_projector(layout_for(model64, EXACT), torch.float64)
    with pytest.raises(EmptyResponseError, match="'b'.*no response token"):
        embed_batch(model64, batch, projector, names=["a", "b"])


def test_no_matching_module_is_an_error(model64):
    with pytest.raises(NoTrackedModulesError, match="no linear module matches.*fix the module patterns"):
        layout_for(model64, ProjectionSpec(include=(r"does_not_exist",)))


def test_non_finite_loss_names_the_sample(samples):
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[samples[1][0][0]] = float("nan")
    projector = build_projector(layout_for(model, EXACT), torch.float64)
    with pytest.raises(NonFiniteLossError, match="'s1'.*non-finite"):
        embed_batch(model, pad_batch(samples[:3], 0), projector, names=["s0", "s1", "s2"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(samples):
    spec = ProjectionSpec(k_in=4, k_out=4, include=ALL_LINEARS)
    cpu, layout = embed(tiny_llama(), samples, spec=spec)
    model = tiny_llama().cuda()
    projector = build_projector(layout, torch.float64)  # CPU matrices: moved to the model's device on use
    gpu = embed_batch(model, pad_batch(samples, 0), projector).vectors
    assert gpu.is_cuda
    # float64 throughout, but transformers builds the rotary cos/sin tables in float32 on each device, and CPU and
    # CUDA round them differently: measured on an H100, max |diff| 1.4e-7 against max |ĝ| of order 1.
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6 * float(cpu.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_stays_close_to_float32(samples):
    model = _bigger_float32_llama().cuda()
    projector = build_projector(layout_for(model, ProjectionSpec(k_in=8, k_out=8)), torch.float32, "cuda")
    batch = pad_batch(samples, 0)
    ref = embed_batch(model, batch, projector).vectors
    got = embed_batch(model, batch, projector, precision=torch.bfloat16).vectors
    assert got.is_cuda
    assert got.dtype == torch.float32
    assert float(torch.nn.functional.cosine_similarity(got, ref, dim=1).min()) > 0.99


def test_modules_registered_in_another_order_than_they_run_are_paired_by_module(model64, samples):
    """``mlp`` registered before ``self_attn``: the hooks must pair inputs and output gradients by module."""
    for layer in model64.model.layers:
        layer._modules["self_attn"] = layer._modules.pop("self_attn")  # registered last, still run first
    got, layout = embed(model64, samples)
    names = [s.name for s in layout.slots]
    assert names[0].endswith("mlp.gate_proj")
    want = reference_gradients(model64, samples, names)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    projected, playout = embed(model64, samples, spec=ProjectionSpec(4, 4, include=ALL_LINEARS))
    projector = build_projector(playout, dtype=torch.float64)
    parts, start = [], 0
    for j, slot in enumerate(playout.slots):
        size = slot.d_out * slot.d_in
        parts.append(project_gradient(projector, j, want[:, start : start + size].reshape(-1, slot.d_out, slot.d_in)))
        start += size
    torch.testing.assert_close(projected, torch.cat(parts, dim=1), rtol=1e-9, atol=1e-12)


def test_a_module_that_runs_twice_or_never_is_an_error(samples):
    shared = tiny_llama()
    shared.model.layers[1].mlp.down_proj = shared.model.layers[0].mlp.down_proj  # one module, two calls
    with pytest.raises(LayoutMismatchError, match=r"layers\.0\.mlp\.down_proj ran 2 times"):
        embed(shared, samples)
    unused = tiny_llama()
    unused.model.layers[0].extra = torch.nn.Linear(24, 24, dtype=torch.float64)  # tracked, never called
    with pytest.raises(LayoutMismatchError, match=r"layers\.0\.extra ran 0 times"):
        embed(unused, samples)


def _bigger_float32_llama() -> torch.nn.Module:
    from tasks.models import tiny_llama as llama

    return llama(61, hidden=64, layers=2, heads=4, seed=2, max_positions=64, intermediate=128, dtype=torch.float32)


def test_bfloat16_autocast_stays_close_to_float32_and_accumulates_in_float32(samples):
    model = _bigger_float32_llama()
    projector = build_projector(layout_for(model, ProjectionSpec(k_in=8, k_out=8)), torch.float32)
    batch = pad_batch(samples, 0)
    ref = embed_batch(model, batch, projector).vectors
    got = embed_batch(model, batch, projector, precision=torch.bfloat16)
    assert got.vectors.dtype == torch.float32
    assert got.loss.dtype == torch.float32
    assert not torch.equal(got.vectors, ref)  # the forward really ran in bfloat16
    cosine = torch.nn.functional.cosine_similarity(got.vectors, ref, dim=1)
    assert float(cosine.min()) > 0.99
    rel = (got.vectors - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.max()) < 0.1  # bfloat16 has 8 mantissa bits: errors of a few 2^-8 per op
    assert [p.dtype for p in model.parameters()] == [torch.float32] * len(list(model.parameters()))


def test_backward_stops_at_the_first_tracked_layer(model64, samples):
    """Tracking layer 1 only: layer 0 runs without autograd, and the vectors are still the exact gradients."""
    spec = ProjectionSpec(identity=True, include=(r"layers\.1\.",))
    seen = []
    handle = model64.model.layers[0].register_forward_hook(lambda _m, _a, out: seen.append(out[0].requires_grad))
    got, layout = embed(model64, samples, spec=spec)
    handle.remove()
    assert seen == [False]
    names = [s.name for s in layout.slots]
    assert names
    assert all(".layers.1." in n for n in names)
    torch.testing.assert_close(got, reference_gradients(model64, samples, names), rtol=1e-9, atol=1e-12)


def test_output_head_sees_response_positions_only(model64, samples):
    rows = []
    handle = model64.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(tuple(args[0].shape)))
    embed(model64, samples)
    handle.remove()
    n_response = sum(sum(label != -100 for label in labels[1:]) for _, labels in samples)
    assert rows == [(n_response, 24)]


def test_finetune_delta_weights_by_hand():
    log_probs = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0], dtype=torch.float64)
    reference = torch.tensor([-1.5, -1.0, -2.0, -2.0, -0.5], dtype=torch.float64)
    rows = torch.tensor([0, 0, 0, 1, 1])
    # sample 0: δ = (0.5, 0, 1.5), mean-1 weights 3·δ/2; sample 1: fine-tuning raised no token, so w = 1.
    want = torch.tensor([0.75, 0.0, 2.25, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(finetune_delta_weights(log_probs, reference, rows, 2), want)


def test_query_side_debias_equals_the_token_weighted_backward(model64, samples):
    """ĝ with reference log-probs of another model = the exact gradient of Σ_t w_t nll_t / n, with w_t computed
    here per token from the two models' log-probabilities (float64, single-sample loops)."""
    base = tiny_llama(seed=7)
    layout = layout_for(model64, EXACT)
    names = [s.name for s in layout.slots]
    batch = pad_batch(samples, pad_id=0, side="left")
    got = embed_batch(
        model64, batch, build_projector(layout, dtype=torch.float64),
        reference_log_probs=response_log_probs(base, batch),
    ).vectors  # fmt: skip
    weights = {n: m.weight for n, m, _, _ in linear_modules(model64)}
    for p in model64.parameters():
        p.requires_grad_(True)
    rows = []
    for ids, labels in samples:
        targets = torch.tensor(labels[1:])
        keep = targets != -100

        def token_log_probs(net, ids=ids, targets=targets, keep=keep):
            logp = torch.log_softmax(net(input_ids=torch.tensor([ids])).logits[0][:-1][keep], dim=-1)
            return logp.gather(1, targets[keep][:, None])[:, 0]

        with torch.no_grad():
            delta = (token_log_probs(model64) - token_log_probs(base)).clamp(min=0)
        w = delta * len(delta) / delta.sum() if delta.sum() > 0 else torch.ones_like(delta)
        model64.zero_grad()
        (-(w * token_log_probs(model64)).mean()).backward()
        rows.append(torch.cat([weights[n].grad.flatten() for n in names]))
    want = torch.stack(rows)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    plain = embed(model64, samples)[0]
    assert (got - plain).abs().max() > 1e-3 * plain.abs().max()  # the weighting changed the vectors
