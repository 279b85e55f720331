"""The Llama 2 Transformer, as Meta's reference `llama/model.py` computes it.

Pre-norm blocks `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`, RMSNorm in fp32, rotary
position embeddings, grouped-query attention, SwiGLU feed-forward, untied output head, no
biases. Parameter names follow Meta's checkpoints. One difference of layout, not of maths:
the rows of `wq`/`wk` are stored in Hugging Face's order (each head's rotary pairs split into
halves rather than interleaved), so our on-disk HF checkpoints map without copying;
`checkpoint.py` permutes when reading or writing Meta's files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels import Linear


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
    """cos and sign-folded sin of the rotary angles for integer `positions` ([B or 1, T]), in
    fp32, each [B or 1, T, 1, head_dim]: frequencies repeated for the two halves, sin negated
    on the first half so that `apply_rope` needs no negation."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (
        torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd
    )
    pos = positions.float()
    if cfg.rope_scaling is not None:
        pos = pos / cfg.rope_scaling
    angles = pos[..., None] * inv_freq
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos()[:, :, None], torch.cat((-sin, sin), -1)[
        :, :, None
    ]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd]. Rotates each pair (x_i, x_{i+hd/2}) by its angle (HF's half-split
    order; Meta's interleaved pairs are the same maths on permuted wq/wk rows)."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


@dataclass
class AttentionContext:
    """Where this forward's tokens sit, worked out once for all layers."""

    positions: torch.Tensor  # [B or 1, T]
    start: int | None  # the common start position when every row has the same one
    kv_len: int  # cached keys to attend over
    mask: torch.Tensor | None  # [B, 1, T, kv_len] bool, or None
    is_causal: bool
    rows: torch.Tensor | None = None  # the cache rows (slots) of the batch rows, if not 0..B-1


def segment_context(segments: torch.Tensor) -> AttentionContext:
    """Attention for packed rows: causal within each run of equal segment ids, positions
    restarting at 0 for each run (so a packed example computes what it computes alone)."""
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = torch.where(new, idx, 0).cummax(dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return AttentionContext(idx - starts, None, T, (same & causal)[:, None], is_causal=False)


class KVCache(nn.Module):
    """Preallocated keys and values, [batch, n_kv_heads, max_seq_len, head_dim]."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, ctx: AttentionContext, k: torch.Tensor, v: torch.Tensor):
        """Write k, v ([B, H, T, hd]) at the context's positions; return keys and values of the
        first ctx.kv_len positions."""
        B, _, T, _ = k.shape
        if ctx.rows is not None:  # a batch of slots of a shared cache (serving)
            rows = ctx.rows[:, None]
            self.k[rows, :, ctx.positions] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows, :, ctx.positions] = v.transpose(1, 2).to(self.v.dtype)
            return self.k[ctx.rows, :, : ctx.kv_len], self.v[ctx.rows, :, : ctx.kv_len]
        if ctx.start is not None:
            self.k[:B, :, ctx.start : ctx.start + T] = k
            self.v[:B, :, ctx.start : ctx.start + T] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]
            self.k[rows, :, ctx.positions] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows, :, ctx.positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:B, :, : ctx.kv_len], self.v[:B, :, : ctx.kv_len]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, ctx: AttentionContext | None = None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.cache is not None:
            cached_k, cached_v = self.cache.update(ctx, k, v)
            if not ctx.is_causal:  # (a prefill from position 0 needs only its own fresh keys)
                k, v = cached_k.to(q.dtype), cached_v.to(q.dtype)
        if self.n_kv_heads != self.n_heads:  # grouped-query: each kv head serves n_rep q heads
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if ctx is None or ctx.is_causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, ctx=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, ctx)
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
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.static_cache = False
        self._spare_cache: list[KVCache] | None = None
        if self.output.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activations' dtype: the weights', except fp16 weights on a CPU compute in fp32 (CPUs
        without native fp16 arithmetic are slow at it; see kernels.py)."""
        w = self.tok_embeddings.weight
        if w.dtype == torch.float16 and w.device.type == "cpu":
            return torch.float32
        return w.dtype

    def setup_cache(
        self, batch_size: int, max_seq_len: int | None = None, dtype=None, static: bool = False
    ) -> None:
        """Preallocate a KV cache; afterwards `forward` needs `start_pos`.

        With a `static` cache, compiled forwards attend over the whole cache under a mask built
        from tensors alone (no host sync, fixed shapes): what torch.compile wants. A static
        cache of the same shape is reused by the next setup.
        """
        cfg = self.config
        max_seq_len = max_seq_len or cfg.max_seq_len
        device = self.tok_embeddings.weight.device
        dtype = dtype or self.compute_dtype
        self.static_cache = static
        spare = self._spare_cache
        if static and spare and spare[0].k.shape[:3] == (batch_size, cfg.n_kv_heads, max_seq_len):
            if spare[0].k.dtype == dtype:
                for layer, cache in zip(self.layers, spare, strict=True):
                    layer.attention.cache = cache
                return
        for layer in self.layers:
            layer.attention.cache = KVCache(
                batch_size, cfg.n_kv_heads, max_seq_len, cfg.head_dim, dtype, device
            )

    def clear_cache(self) -> None:
        """Back to plain forward passes (a static cache is kept aside for the next setup)."""
        if self.static_cache:
            self._spare_cache = [layer.attention.cache for layer in self.layers]
        for layer in self.layers:
            layer.attention.cache = None
        self.static_cache = False

    @property
    def cache_len(self) -> int:
        cache = self.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[2]

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor | None = None,
        output_index: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        slots: list[int] | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> float32 logits [B, T, vocab].

        Without a cache, a plain causal pass over the whole sequence (training). With one,
        `start_pos` (an int, or a [B] tensor of per-row offsets) says where each row's tokens go;
        each query sees the cached keys at positions up to its own. `output_index` ([B]) asks
        for the logits of one position per row only ([B, 1, vocab]), sparing the output head.
        `segments` ([B, T] example ids, no cache) packs several examples in a row: each token
        attends within its own example only, at positions counted from the example's start.
        `slots` (with a cache) names the cache row of each batch row: requests of a shared
        cache run together whatever their rows (continuous batching). `kv_len` (compiled steps
        over a static cache) bounds the cache positions attention reads: at least every row's
        last position + 1 (eager forwards work it out themselves).
        """
        B, T = tokens.shape
        h = self.tok_embeddings(tokens).to(self.compute_dtype)
        ctx = None
        if self.layers[0].attention.cache is not None:
            ctx = self._context(B, T, start_pos, tokens.device, slots, kv_len)
            positions = ctx.positions
        else:
            if start_pos is not None and bool(torch.as_tensor(start_pos).ne(0).any()):
                raise ValueError("start_pos needs a KV cache (call setup_cache first)")
            if T > self.config.max_seq_len:
                raise ValueError(
                    f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}"
                )
            positions = torch.arange(T, device=tokens.device)[None]
            if segments is not None:
                ctx = segment_context(segments.to(tokens.device))
                positions = ctx.positions
        cos, sin = rope_cos_sin(self.config, positions)
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        if output_index is not None:
            h = h[torch.arange(B, device=h.device), output_index.to(h.device)][:, None]
        return self.output(self.norm(h)).float()

    def _context(
        self, B: int, T: int, start_pos, device, slots=None, kv_len: int | None = None
    ) -> AttentionContext:
        if start_pos is None:
            raise ValueError("a KV cache is set up: forward needs start_pos")
        if slots is not None:
            starts = torch.as_tensor(start_pos, device=device).reshape(-1).expand(B)
            positions = starts[:, None] + torch.arange(T, device=device)
            hi = int(positions.max()) + 1
            if hi > self.cache_len or int(starts.min()) < 0:
                raise ValueError(f"positions outside the KV cache of {self.cache_len}")
            keys = torch.arange(hi, device=device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
            rows = torch.as_tensor(slots, device=device)
            return AttentionContext(positions, None, hi, mask, is_causal=False, rows=rows)
        if self.static_cache and torch.compiler.is_compiling():
            # tensors only (the caller keeps positions inside the cache): no host sync; eager
            # calls on a static cache (the prefill) take the paths below. Reading only the
            # first kv_len positions (a dynamic size) spares streaming the unused cache.
            start = torch.as_tensor(start_pos, device=device).reshape(-1, 1)
            positions = (start + torch.arange(T, device=device)).expand(B, T)
            n = kv_len or self.cache_len
            keys = torch.arange(n, device=device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
            return AttentionContext(positions, None, n, mask, is_causal=False)
        if isinstance(start_pos, torch.Tensor):
            starts = start_pos.reshape(-1).tolist()
            start_pos = starts[0] if len(set(starts)) == 1 else starts
        if isinstance(start_pos, int):
            lo, hi = start_pos, start_pos + T
        else:
            if len(start_pos) != B:
                raise ValueError(f"start_pos has {len(start_pos)} entries for a batch of {B}")
            lo, hi = min(start_pos), max(start_pos) + T
        if lo < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if hi > self.cache_len:
            raise ValueError(f"position {hi - 1} is past the KV cache length {self.cache_len}")
        if isinstance(start_pos, int):
            positions = torch.arange(lo, hi, device=device)[None]
            # one row layout: no mask for a single new token, plain causal from position 0
            if T == 1 or lo == 0:
                return AttentionContext(positions, lo, hi, None, is_causal=T > 1)
            start = lo
        else:
            positions = torch.tensor(start_pos, device=device)[:, None] + torch.arange(
                T, device=device
            )
            start = None
        keys = torch.arange(hi, device=device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B or 1, 1, T, kv]
        return AttentionContext(positions, start, hi, mask, is_causal=False)
