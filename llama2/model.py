"""The Llama 2 Transformer, as Meta's reference `llama/model.py` computes it.

Pre-norm blocks `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`, RMSNorm in fp32, rotary
position embeddings, grouped-query attention, SwiGLU feed-forward, untied output head, no
biases. Parameter names follow Meta's checkpoints. One difference of layout, not of maths:
the rows of `wq`/`wk` are stored in Hugging Face's order (each head's rotary pairs split into
halves rather than interleaved), so our on-disk HF checkpoints map without copying;
`checkpoint.py` permutes when reading or writing Meta's files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles for integer `positions` (any shape), in fp32, laid out
    [..., head_dim] with the frequencies repeated for the two halves."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (
        torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd
    )
    pos = positions.float()
    if cfg.rope_scaling is not None:
        pos = pos / cfg.rope_scaling
    angles = pos[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd]; cos/sin: [B or 1, T, hd]. Rotates (x_i, x_{i+hd/2}) pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x.float() * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values, [batch, n_kv_heads, max_seq_len, head_dim]."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v ([B, T, H, hd]) at per-row `positions` ([B, T]); return the cache rows."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, positions] = k.to(self.k.dtype)
        self.v[rows, :, positions] = v.to(self.v.dtype)
        return self.k[: k.shape[0]], self.v[: k.shape[0]]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, positions=None, mask=None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = q.transpose(1, 2)
        if self.cache is not None:
            k, v = self.cache.update(positions, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.n_kv_heads != self.n_heads:  # grouped-query: each kv head serves n_rep q heads
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, positions=None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # (an explicit weight skips nn.Embedding's own init, which on the meta device costs a
        # second of imports; init_weights below initialises it)
        weight = torch.empty(cfg.vocab_size, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=weight)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if self.output.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None) -> None:
        """Preallocate a KV cache; afterwards `forward` needs `start_pos`."""
        cfg = self.config
        max_seq_len = max_seq_len or cfg.max_seq_len
        weight = self.output.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(
                batch_size,
                cfg.n_kv_heads,
                max_seq_len,
                cfg.head_dim,
                dtype or weight.dtype,
                weight.device,
            )

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def cache_len(self) -> int:
        cache = self.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[2]

    def forward(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, T] -> float32 logits [B, T, vocab].

        Without a cache, a plain causal pass over the whole sequence (training). With one,
        `start_pos` (an int, or a [B] tensor of per-row offsets) says where each row's tokens go;
        each query sees the cached keys at positions up to its own.
        """
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)
        cached = self.layers[0].attention.cache is not None
        if cached:
            if start_pos is None:
                raise ValueError("a KV cache is set up: forward needs start_pos")
            start = torch.as_tensor(start_pos, device=tokens.device).reshape(-1, 1)
            if int(start.min()) < 0:
                raise ValueError(f"start_pos must be >= 0, got {start_pos}")
            positions = start + torch.arange(T, device=tokens.device)  # [B or 1, T]
            positions = positions.expand(B, T)
            if int(positions.max()) >= self.cache_len:
                raise ValueError(
                    f"position {int(positions.max())} is past the KV cache length {self.cache_len}"
                )
            keys = torch.arange(self.cache_len, device=tokens.device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, S]
        else:
            if start_pos is not None and bool(torch.as_tensor(start_pos).ne(0).any()):
                raise ValueError("start_pos needs a KV cache (call setup_cache first)")
            if T > self.config.max_seq_len:
                raise ValueError(
                    f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}"
                )
            positions, mask = torch.arange(T, device=tokens.device)[None], None
        cos, sin = rope_cos_sin(self.config, positions)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask)
        return self.output(self.norm(h)).float()
