"""A Llama-style decoder-only transformer, the size ladders, parameter counts and FLOPs per token.

RMSNorm, rotary positions, SwiGLU, causal attention through `F.scaled_dot_product_attention`,
grouped-query attention (`n_kv_heads`), optional tied embeddings, and a KV cache for generation.

Rotary layout: the head dimension is split in two halves (x1, x2) rotated as pairs (x1[i], x2[i]),
the "rotate_half" convention of HF `transformers`, not the interleaved pairs (x[2i], x[2i+1]) of
Meta's original Llama code. So our q/k weights are HF weights as they are: export needs no permutation.

The training loss goes through `_fused_linear_cross_entropy`: at tiny width the output layer and its
softmax cost more than the whole body, so the logits are made one chunk of rows at a time (in cache)
and their gradients computed right there, instead of materialising a (B*T, V) logits tensor twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from poisonlab.config import ModelConfig

# --- presets and ladders ------------------------------------------------------------------------------
# A preset fixes the shape; vocab_size comes from the data (the tokenizer) unless set explicitly.
# Names carry the approximate non-embedding parameter count (see count_params).
PRESETS: dict[str, dict[str, Any]] = {
    # tiny: this 2-core CPU; context 128. 25k..3.2M non-embedding parameters (a 128x range).
    "tiny-25k": dict(d_model=32, n_layers=2, n_heads=2),
    "tiny-50k": dict(d_model=48, n_layers=2, n_heads=2),
    "tiny-100k": dict(d_model=64, n_layers=2, n_heads=4),
    "tiny-200k": dict(d_model=64, n_layers=4, n_heads=4),
    "tiny-400k": dict(d_model=128, n_layers=2, n_heads=4),
    "tiny-800k": dict(d_model=128, n_layers=4, n_heads=4),
    "tiny-3m": dict(d_model=256, n_layers=4, n_heads=8),
    # small: one GPU, minutes to an hour; head dimension 64, context 512.
    "small-10m": dict(d_model=384, n_layers=6, n_heads=6, seq_len=512),
    "small-25m": dict(d_model=512, n_layers=8, n_heads=8, seq_len=512),
    "small-50m": dict(d_model=640, n_layers=10, n_heads=10, seq_len=512),
    "small-85m": dict(d_model=768, n_layers=12, n_heads=12, seq_len=512),
    # paper: the study's 600M..13B, Llama-like shapes (head dimension 128, context 2048, untied).
    "paper-600m": dict(d_model=1536, n_layers=20, n_heads=12, d_ff=4096, seq_len=2048,
                       tie_embeddings=False),
    "paper-2b": dict(d_model=2048, n_layers=40, n_heads=16, d_ff=5632, seq_len=2048,
                     tie_embeddings=False),
    "paper-7b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=11008, seq_len=2048,
                     tie_embeddings=False),
    "paper-13b": dict(d_model=5120, n_layers=40, n_heads=40, d_ff=13824, seq_len=2048,
                      tie_embeddings=False),
}
LADDERS: dict[str, list[str]] = {
    "tiny": ["tiny-25k", "tiny-50k", "tiny-100k", "tiny-200k", "tiny-400k", "tiny-800k", "tiny-3m"],
    "small": ["small-10m", "small-25m", "small-50m", "small-85m"],
    "paper": ["paper-600m", "paper-2b", "paper-7b", "paper-13b"],
}


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Apply `cfg.preset`, then every field set explicitly in `cfg` on top; fill in d_ff/n_kv_heads.

    The result has no implicit values left, so it can be saved and reloaded as the whole truth.
    """
    fields: dict[str, Any] = {}
    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            from poisonlab.errors import UserError

            raise UserError(f"model.preset: unknown preset {cfg.preset!r}; known: {', '.join(PRESETS)}")
        fields.update(PRESETS[cfg.preset])
    fields.update({k: getattr(cfg, k) for k in cfg.model_fields_set if k != "preset"})
    out = ModelConfig(preset=cfg.preset, **fields)
    if out.n_kv_heads is None:
        out.n_kv_heads = out.n_heads
    if out.d_ff is None:
        out.d_ff = 32 * math.ceil(8 * out.d_model / 3 / 32)
    return out


def _shape(cfg: ModelConfig) -> tuple[int, int, int, int]:
    """(head_dim, n_kv_heads, d_ff, kv width) of a config, resolving the None defaults."""
    hd = cfg.d_model // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    d_ff = cfg.d_ff or 32 * math.ceil(8 * cfg.d_model / 3 / 32)
    return hd, kv, d_ff, kv * hd


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameter counts, exactly those of `Transformer(cfg)`.

    Non-embedding excludes the token embedding and the output layer (when untied; tied they are one
    matrix); it includes the attention and MLP matrices and every RMSNorm weight. Total counts each
    parameter once, so a tied embedding is counted once.
    """
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    _, _, d_ff, kvw = _shape(cfg)
    per_layer = d * d + 2 * d * kvw + d * d + 3 * d * d_ff + 2 * d  # wq, wk+wv, wo, SwiGLU, 2 norms
    nonemb = L * per_layer + d  # + final norm
    emb = V * d * (1 if cfg.tie_embeddings else 2)
    return nonemb + emb, nonemb


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token: forward + backward = 3x forward, 2 FLOPs per multiply-add.

    6 * (matmul parameters of the body + the output layer d*V) + 12 * n_layers * seq_len * d_model
    for attention scores and values (the PaLM/nanoGPT convention: full, not causally halved,
    attention over the training context). The embedding lookup and norms count as free.
    """
    d, L = cfg.d_model, cfg.n_layers
    _, nonemb = count_params(cfg)
    matmul = nonemb - (2 * L + 1) * d + d * cfg.vocab_size
    return 6 * matmul + 12 * L * cfg.seq_len * d


# --- the model -----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 (as HF Llama does), then scale in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rope_cos_sin(head_dim: int, n_pos: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    t = torch.arange(n_pos, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate_half layout: [f0..f_{h/2-1}, f0..f_{h/2-1}]
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: (batch, n_kv_heads, max_len, head_dim) each."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new block's k/v at start_pos; return all keys/values up to its end."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.head_dim, self.n_kv, _, kvw = _shape(cfg)
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, kvw, bias=False)
        self.wv = nn.Linear(cfg.d_model, kvw, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, start_pos: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep` (B, T, S) bool, True where a query may attend to a key: given for left-padded rows
        (`Transformer.hidden(pad=...)`), which replaces the plain causal mask."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(self.layer, k.to(cache.k[0].dtype), v.to(cache.v[0].dtype), start_pos)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if start_pos > 0:
                causal = False  # the new block sees the whole past, and causally itself
                if T > 1:
                    qpos = torch.arange(start_pos, start_pos + T, device=x.device)
                    mask = torch.arange(start_pos + T, device=x.device)[None, :] <= qpos[:, None]
        if keep is not None:
            mask, causal = keep[:, None], False
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if cache is not None and T == 1:
            # One decoding step: one query against the cache. matmul-softmax-matmul measured ~3x faster
            # than SDPA's CPU kernel here (0.9 vs 3.1 ms per layer at batch 128, width 128).
            att = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = torch.softmax(att.float(), dim=-1).to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _, _, d_ff, _ = _shape(cfg)
        self.w1 = nn.Linear(cfg.d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, start_pos, keep=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos, keep)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The decoder. `forward(idx)` gives float32 logits; `forward(idx, targets)` the mean loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.checkpoint_blocks = False  # activation checkpointing: recompute blocks in the backward pass
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        # GPT-2/nanoGPT init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
        else:
            nn.init.normal_(p, std=0.02)

    def initial_parameters(self, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, value) of every parameter of `torch.manual_seed(seed); Transformer(cfg)` built on the
        CPU, one parameter at a time: for a model built on the meta device and sharded (FSDP), which
        then needs only its rows of each. Replays the CPU generator's draws in construction order:
        each module's own default init (drawn, then discarded, as in the constructor), then
        reset_parameters. Tested bitwise against the constructor."""
        torch.manual_seed(seed)
        with torch.device("cpu"):
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                elif isinstance(m, nn.Embedding):
                    nn.Embedding(m.num_embeddings, m.embedding_dim)
            for name, p in self.named_parameters():
                value = torch.empty(p.shape, dtype=p.dtype)
                self.init_parameter(name, value)
                yield name, value

    def rope(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions start..end-1; the table grows when generation runs past seq_len."""
        if self._rope is None or self._rope[0].shape[0] < end or self._rope[0].device != device:
            n = max(end, self.cfg.seq_len)
            with torch.inference_mode(False):  # built during an evaluation, the table is reused in training
                hd = self.cfg.d_model // self.cfg.n_heads
                self._rope = _rope_cos_sin(hd, n, self.cfg.rope_theta, device)
        return self._rope[0][start:end], self._rope[1][start:end]

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache in the dtype the keys are computed in: the autocast dtype under autocast (bf16 keys
        stored in fp32 would double the cache's memory traffic for nothing), else the weights' dtype."""
        p = self.lm_head.weight
        hd, kv, _, _ = _shape(self.cfg)
        dtype = _compute_dtype(p.device, p)
        return KVCache(self.cfg.n_layers, batch_size, kv, max_len, hd, device=p.device, dtype=dtype)

    def hidden(self, idx: torch.Tensor, *, cache: KVCache | None = None, start_pos: int = 0,
               pad: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d_model).

        `pad` (B,): rows are left-padded, row b's first pad[b] positions are filler. Its real tokens get
        rotary positions from 0 and attend only to each other, so a padded row computes what it would
        alone (filler positions attend to themselves only: their outputs are unused, but never NaN).
        """
        T = idx.shape[1]
        cos, sin = self.rope(start_pos, start_pos + T, idx.device)
        keep = None
        if pad is not None:
            pad = pad.to(idx.device)
            qpos = torch.arange(start_pos, start_pos + T, device=idx.device)
            kpos = torch.arange(start_pos + T, device=idx.device) if cache is not None else qpos
            pos = (qpos[None, :] - pad[:, None]).clamp(min=0)  # (B, T) rotary positions
            table_cos, table_sin = self.rope(0, start_pos + T, idx.device)
            cos, sin = table_cos[pos][:, None], table_sin[pos][:, None]  # (B, 1, T, head_dim)
            real = kpos[None, None, :] >= pad[:, None, None]
            keep = (kpos[None, :] <= qpos[:, None])[None] & (real | (kpos[None, :] == qpos[:, None])[None])
        x = self.tok_emb(idx)
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, cache, start_pos, keep,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, start_pos, keep)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, start_pos: int = 0, pad: torch.Tensor | None = None
                ) -> torch.Tensor:
        h = self.hidden(idx, cache=cache, start_pos=start_pos, pad=pad)
        if targets is None:
            return self.lm_head(h).float()
        return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())


# --- the output layer and its loss, fused and chunked ---------------------------------------------------

def _chunk_rows(device: torch.device, vocab: int) -> int:
    """Rows of logits made at once: on CPU about 1 MB of float32 per thread (L2-sized; more, smaller
    blocks would multiply thread synchronisations), on GPUs larger blocks."""
    return 4096 if device.type == "cuda" else torch.get_num_threads() * max(64, 2**18 // vocab)


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    dev = device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


class _FusedLinearCE(torch.autograd.Function):
    """mean CE(h @ W.T, targets) whose gradients are computed chunk by chunk in the forward pass.

    Same three matmuls as the plain path (logits, dh, dW), but the (N, V) logits never leave cache
    and no softmax is stored. Targets < 0 are ignored.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, cdt: torch.dtype):
        hc, wc = h.to(cdt), w.to(cdt)
        n_valid = (targets >= 0).sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(hc)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        rows = _chunk_rows(h.device, w.shape[0])
        for s in range(0, h.shape[0], rows):
            hs, ts = hc[s:s + rows], targets[s:s + rows]
            valid = (ts >= 0)[:, None]
            tsafe = ts.clamp(min=0)[:, None]
            logits = (hs @ wc.t()).float()
            # one exp pass, in place: logits -> exp(logits - max) -> softmax / n_valid (the fastest
            # order measured on CPU; logsumexp followed by exp would exponentiate twice)
            mx = logits.amax(1, keepdim=True)
            picked = logits.gather(1, tsafe)
            total = logits.sub_(mx).exp_().sum(1, keepdim=True)
            loss += torch.where(valid, mx + total.log() - picked, 0.0).sum()
            # d loss / d logits = (softmax - onehot) / n_valid, zero on ignored rows
            scale = valid / n_valid
            g = logits.mul_(scale / total)
            g.scatter_add_(1, tsafe, -scale.expand_as(picked).to(g.dtype))
            gc = g.to(cdt)
            grad_h[s:s + rows] = gc @ wc
            if cdt == torch.float32:
                grad_w.addmm_(gc.t(), hs)
            else:
                grad_w += (gc.t() @ hs).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        hdt, wdt = ctx.dtypes
        return (grad_h * grad_out).to(hdt), (grad_w * grad_out).to(wdt), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight.T against targets (ignoring targets < 0), in float32."""
    cdt = _compute_dtype(h.device, weight)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        with torch.autocast(h.device.type, enabled=False):
            return _FusedLinearCE.apply(h, weight, targets, cdt)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    hc, wc = h.to(cdt), weight.to(cdt)
    rows = _chunk_rows(h.device, weight.shape[0])
    for s in range(0, h.shape[0], rows):
        logits = (hc[s:s + rows] @ wc.t()).float()
        total += F.cross_entropy(logits, targets[s:s + rows], ignore_index=-1, reduction="sum")
    return total / (targets >= 0).sum().clamp(min=1)
