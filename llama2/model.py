"""The Llama 2 Transformer, as Meta's reference `llama/model.py` computes it.

Pre-norm blocks `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`, RMSNorm in fp32, rotary
position embeddings, grouped-query attention, SwiGLU feed-forward, untied output head, no
biases. Parameter names follow Meta's checkpoints. One difference of layout, not of maths:
the rows of `wq`/`wk` are stored in Hugging Face's order (each head's rotary pairs split into
halves rather than interleaved), so our on-disk HF checkpoints map without copying;
`checkpoint/meta.py` and `checkpoint/gguf.py` permute when reading or writing Meta's files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


Start = int | Tensor | None  # where a forward's tokens go in the cache: for all rows, or per row


@dataclass(kw_only=True)
class Context:
    """What a forward needs beyond its tokens and start positions, built by the caller.

    `segments` ([B, T] example ids, no cache): several examples packed in a row, each token
    attending within its own example only, at positions counted from the example's start.
    `slots` ([B], with a cache): the cache row of each batch row, so that sequences of a shared
    cache run together whatever their rows. `kv_len` (with a cache): how many cache positions
    attention reads, at least every row's last position + 1; without it, it is worked out from
    the positions (a host sync), which are checked too. `output_index` ([B]): the one position
    per row whose output is wanted, so the output head runs on one row per sequence."""

    segments: torch.Tensor | None = None
    slots: torch.Tensor | Sequence[int] | None = None
    kv_len: int | None = None
    output_index: torch.Tensor | None = None


@dataclass
class Layout:
    """Where a forward's tokens sit, worked out once for all layers."""

    positions: torch.Tensor  # [B or 1, T]
    mask: torch.Tensor | None  # [B or 1, 1, T, keys] bool; None: causal over the fresh keys
    kv_len: int = 0  # with a cache: the cached positions attention reads (0 .. kv_len-1)
    rows: torch.Tensor | None = None  # with a cache: the cache rows of the batch rows (slots)
    start: int | None = None  # the rows' common first position, when known on the host


def packed_layout(segments: torch.Tensor) -> Layout:
    """Attention for packed rows: causal within each run of equal segment ids, positions
    restarting at 0 for each run (so a packed example computes what it computes alone)."""
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = torch.where(new, idx, 0).cummax(dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return Layout(idx - starts, (same & causal)[:, None])


class KVCache(nn.Module):
    """Preallocated keys and values, [batch, n_kv_heads, max_seq_len, head_dim]."""

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype,
        device,
        gathered: dict | None = None,
    ):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # where the rows of a batch over chosen slots are gathered: one buffer for the keys
        # and one for the values, shared by the layers of a model (each layer's attention is
        # done with them before the next gathers), made on first use
        self.gathered = {} if gathered is None else gathered

    def update(self, at: Layout, k: torch.Tensor, v: torch.Tensor):
        """Write k, v ([B, H, T, hd]) at the layout's rows and positions; return those rows'
        keys and values of the first at.kv_len positions."""
        B, _, T, _ = k.shape
        if at.start is not None and at.rows is None:  # a slice: cheaper than a scatter
            self.k[:B, :, at.start : at.start + T] = k
            self.v[:B, :, at.start : at.start + T] = v
        else:
            rows = torch.arange(B, device=k.device) if at.rows is None else at.rows
            self.k[rows[:, None], :, at.positions] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows[:, None], :, at.positions] = v.transpose(1, 2).to(self.v.dtype)
        if at.rows is None:  # (a view, not a gather)
            return self.k[:B, :, : at.kv_len], self.v[:B, :, : at.kv_len]
        # index_select copies whole runs of kv_len * head_dim (faster than advanced indexing,
        # which a batched decode step pays in every layer), into buffers kept from step to
        # step: fresh ones of a few MB each would be new pages from the OS, faulted in and
        # zeroed, in every layer of every step
        return self._gather(self.k, at, "k"), self._gather(self.v, at, "v")

    def _gather(self, cache: torch.Tensor, at: Layout, name: str) -> torch.Tensor:
        buf = self.gathered.get(name)
        if buf is None or buf.numel() < cache.numel() or buf.dtype != cache.dtype:
            buf = self.gathered[name] = torch.empty(
                cache.numel(), dtype=cache.dtype, device=cache.device
            )
        shape = (at.rows.numel(), cache.shape[1], at.kv_len, cache.shape[3])
        out = buf[: math.prod(shape)].view(shape)
        return torch.index_select(cache[:, :, : at.kv_len], 0, at.rows, out=out)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, at: Layout):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.cache is not None:
            cached_k, cached_v = self.cache.update(at, k, v)
            if at.mask is not None:  # (a prefill from position 0 needs only its fresh keys)
                k, v = cached_k.to(q.dtype), cached_v.to(q.dtype)
        if self.n_kv_heads != self.n_heads:  # grouped-query: each kv head serves n_rep q heads
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, at.mask, is_causal=at.mask is None)
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

    def forward(self, x, cos, sin, at: Layout):
        h = x + self.attention(self.attention_norm(x), cos, sin, at)
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
        self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Preallocate a KV cache; afterwards `forward` needs `start_pos`."""
        cfg = self.config
        max_seq_len = max_seq_len or cfg.max_seq_len
        device = self.tok_embeddings.weight.device
        dtype = dtype or self.compute_dtype
        gathered: dict = {}
        self.kv_caches = [
            KVCache(batch_size, cfg.n_kv_heads, max_seq_len, cfg.head_dim, dtype, device, gathered)
            for _ in self.layers
        ]

    def clear_cache(self) -> None:
        """Back to plain forward passes."""
        self.kv_caches = None

    @property
    def kv_caches(self) -> list[KVCache] | None:
        """The layers' caches (None without one); settable, to reuse caches set up before."""
        if self.layers[0].attention.cache is None:
            return None
        return [layer.attention.cache for layer in self.layers]

    @kv_caches.setter
    def kv_caches(self, caches: list[KVCache] | None) -> None:
        for i, layer in enumerate(self.layers):
            layer.attention.cache = None if caches is None else caches[i]

    @property
    def cache_len(self) -> int:
        cache = self.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[2]

    def forward(
        self, tokens: Tensor, start_pos: Start = None, ctx: Context | None = None
    ) -> Tensor:
        """tokens [B, T] -> float32 logits [B, T, vocab] ([B, 1, vocab] with ctx.output_index).

        Without a cache, a plain causal pass over the whole sequence (training). With one,
        `start_pos` (an int, or a [B] tensor of per-row offsets) says where each row's tokens go;
        each query sees the cached keys at positions up to its own. `ctx`: see Context."""
        return self.output(self.hidden(tokens, start_pos, ctx)).float()

    def hidden(self, tokens: Tensor, start_pos: Start = None, ctx: Context | None = None) -> Tensor:
        """The final normed hidden states [B, T, dim] that `forward` applies the output head to
        (for a caller that applies the head itself)."""
        ctx = ctx or Context()
        B, T = tokens.shape
        device = tokens.device
        h = self.tok_embeddings(tokens).to(self.compute_dtype)
        if self.layers[0].attention.cache is not None:
            at = self._cache_layout(B, T, start_pos, device, ctx.slots, ctx.kv_len)
        else:
            if start_pos is not None and bool(torch.as_tensor(start_pos).ne(0).any()):
                raise ValueError("start_pos needs a KV cache (call setup_cache first)")
            if T > self.config.max_seq_len:
                raise ValueError(
                    f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}"
                )
            if ctx.segments is not None:
                at = packed_layout(ctx.segments.to(device))
            else:
                at = Layout(torch.arange(T, device=device)[None], None)
        cos, sin = rope_cos_sin(self.config, at.positions)
        for layer in self.layers:
            h = layer(h, cos, sin, at)
        if ctx.output_index is not None:
            h = h[torch.arange(B, device=h.device), ctx.output_index.to(h.device)][:, None]
        return self.norm(h)

    def _cache_layout(self, B, T, start_pos, device, slots, kv_len) -> Layout:
        """Positions per row from `start_pos`, and a mask from the positions: each query sees
        the cached keys at positions up to its own."""
        if start_pos is None:
            raise ValueError("a KV cache is set up: forward needs start_pos")
        rows = None if slots is None else torch.as_tensor(slots, device=device)
        if isinstance(start_pos, int) and start_pos == 0:
            # a prefill from position 0: plain causal attention over the fresh keys
            if T > self.cache_len:
                raise ValueError(f"position {T - 1} is past the KV cache length {self.cache_len}")
            return Layout(torch.arange(T, device=device)[None], None, T, rows, 0)
        start = torch.as_tensor(start_pos, device=device).reshape(-1, 1)
        if start.shape[0] not in (1, B):
            raise ValueError(f"start_pos has {start.shape[0]} entries for a batch of {B}")
        positions = start + torch.arange(T, device=device)
        common = None
        if kv_len is None:
            lo, kv_len = int(start.min()), int(start.max()) + T
            common = lo if lo + T == kv_len else None
            if lo < 0:
                raise ValueError(f"start_pos must be >= 0, got {start_pos}")
            if kv_len > self.cache_len:
                raise ValueError(
                    f"position {kv_len - 1} is past the KV cache length {self.cache_len}"
                )
        mask = (torch.arange(kv_len, device=device) <= positions[:, :, None])[:, None]
        return Layout(positions, mask, kv_len, rows, common)
