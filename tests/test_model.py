"""The model: shapes, parameter counts, the fused loss against plain cross-entropy, the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from poisonlab.config import ModelConfig
from poisonlab.models.llama import (
    LADDERS,
    PRESETS,
    Transformer,
    count_params,
    flops_per_token,
    linear_cross_entropy,
    resolve_model_config,
)


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv", [None, 2])
def test_count_params_matches_module(tie, kv):
    cfg = small_cfg(tie_embeddings=tie, n_kv_heads=kv)
    m = Transformer(cfg)
    total, nonemb = count_params(m.cfg)
    assert total == sum(p.numel() for p in m.parameters())
    emb = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("tok_emb", "lm_head")))
    assert nonemb == total - emb


def test_ladders_resolve_and_span():
    for name, presets in LADDERS.items():
        sizes = [count_params(resolve_model_config(ModelConfig(preset=p)))[1] for p in presets]
        assert sizes == sorted(sizes), name
    tiny = [count_params(resolve_model_config(ModelConfig(preset=p)))[1] for p in LADDERS["tiny"]]
    assert tiny[-1] / tiny[0] >= 20
    assert 20_000 <= tiny[0] <= 30_000
    assert set(sum(LADDERS.values(), [])) == set(PRESETS)


def test_explicit_fields_override_preset():
    cfg = resolve_model_config(ModelConfig(preset="tiny-100k", n_layers=3, vocab_size=500))
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.d_ff, cfg.n_kv_heads) == (64, 3, 500, 192, 4)


def _count_training_flops(cfg: ModelConfig, batch: int) -> FlopCounterMode:
    """torch's FlopCounterMode over one forward + backward of the real model on full-context rows
    (T = seq_len, the context flops_per_token assumes).

    FlopCounterMode counts matmul-like ops only (mm, addmm, bmm, SDPA kernels); elementwise work (norms,
    rotary, SwiGLU's product, softmax, AdamW) and the embedding lookup are invisible to it, as they are to
    flops_per_token. Two of its gaps are closed here:
    - it has no formula for the in-place `addmm_` that accumulates the output layer's weight gradient
      in our fused loss, so one is given (the same as addmm's);
    - on CPU, SDPA runs `_scaled_dot_product_flash_attention_for_cpu`, which it does not count at all,
      and its flash-backward formula counts the recomputation of the scores (5 matmuls instead of 4).
      The math backend runs attention as plain bmm's of the full T x T scores, the causal mask applied
      afterwards: forward 2 matmuls, backward 4, i.e. the "12 L T d, not causally halved" convention.
    """
    def addmm_(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_})
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(x, x).backward()
    return counter


@pytest.mark.parametrize("kw", [{}, dict(n_kv_heads=2), dict(tie_embeddings=False),
                                dict(d_ff=80, n_layers=3)])
def test_flops_per_token_matches_flop_counter(kw):
    cfg = resolve_model_config(small_cfg(**kw))
    batch = 3
    tokens = batch * cfg.seq_len
    counter = _count_training_flops(cfg, batch)
    assert counter.get_total_flops() == flops_per_token(cfg) * tokens
    # attention alone (the math backend's bmm's) is 12 L T d per token: full, not causally halved
    bmm = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    assert bmm == 12 * cfg.n_layers * cfg.seq_len * cfg.d_model * tokens


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    m = Transformer(small_cfg())
    x = torch.randint(0, 97, (3, 16))
    logits = m(x)
    assert logits.shape == (3, 16, 97) and logits.dtype == torch.float32
    loss = m(x, x)
    ref = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    assert loss.ndim == 0 and abs(loss.item() - ref.item()) < 1e-5


@pytest.mark.parametrize("rows", [5, 2500])  # one chunk, several chunks
def test_fused_loss_matches_cross_entropy(rows):
    torch.manual_seed(0)
    h = torch.randn(rows, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (rows,))
    t[::7] = -1  # ignored
    loss = linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(loss * 3, (h, w))
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    rh, rw = torch.autograd.grad(ref * 3, (h, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), ref)


def test_model_gradients_match_plain_loss():
    torch.manual_seed(0)
    m = Transformer(small_cfg())
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    m(x, y).backward()
    fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    F.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, msg=n)


@pytest.mark.parametrize("kv", [None, 2])
def test_kv_cache_matches_full_forward(kv):
    torch.manual_seed(0)
    m = Transformer(small_cfg(n_kv_heads=kv)).eval()
    x = torch.randint(0, 97, (2, 30))  # longer than seq_len: rotary table grows
    cache = m.new_cache(2, 32)
    with torch.no_grad():
        full = m(x)
        parts = [m(x[:, :10], cache=cache), m(x[:, 10:11], cache=cache, start_pos=10),
                 m(x[:, 11:30], cache=cache, start_pos=11)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_causal():
    torch.manual_seed(0)
    m = Transformer(small_cfg()).eval()
    x = torch.randint(0, 97, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :10], m(x2)[:, :10])


def test_train_after_inference_mode():
    m = Transformer(small_cfg())
    with torch.inference_mode():
        m(torch.randint(0, 97, (1, 20)))  # builds the rotary table inside inference mode
    x = torch.randint(0, 97, (2, 16))
    m(x, x).backward()


def test_bf16_autocast_loss_close_to_fp32():
    torch.manual_seed(0)
    m = Transformer(small_cfg())
    x = torch.randint(0, 97, (2, 16))
    ref = m(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x, x)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in m.parameters())
