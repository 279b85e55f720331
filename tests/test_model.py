import pytest
import torch

from llama2 import ModelConfig, Transformer, get_preset
from llama2.model import Context

CONFIGS = {
    "multi-head": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=32),
    "grouped-query": ModelConfig(
        dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=160, multiple_of=16
    ),
    # fmt: off
    "ffn-multiplier-theta-1e6": ModelConfig(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        vocab_size=100,
        multiple_of=64,
        ffn_dim_multiplier=1.3,
        rope_theta=1e6,
    ),
    # fmt: on
    "linear-rope-scaling": ModelConfig(
        dim=64, n_layers=2, n_heads=2, vocab_size=90, multiple_of=32, rope_scaling=4.0
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    from conftest import hf_model

    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    with torch.no_grad():  # random norm weights too, so a wrong norm cannot hide
        for layer in ours.layers:
            layer.attention_norm.weight.uniform_(0.5, 1.5)
            layer.ffn_norm.weight.uniform_(0.5, 1.5)
    theirs = hf_model(cfg, ours.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        expected = theirs(tokens).logits
        full = ours(tokens)
        assert full.dtype == torch.float32 and full.shape == (2, 37, cfg.vocab_size)
        assert (full - expected).abs().max() < 1e-4
        assert torch.equal(ours.output(ours.hidden(tokens)).float(), full)  # forward = head(hidden)

        # token by token through the KV cache, after a 5-token prefill
        ours.setup_cache(batch_size=2, max_seq_len=64)
        steps = [ours(tokens[:, :5], start_pos=0)]
        for t in range(5, tokens.shape[1]):
            steps.append(ours(tokens[:, t : t + 1], start_pos=t))
        ours.clear_cache()
    incremental = torch.cat(steps, dim=1)
    assert (incremental - expected).abs().max() < 1e-4


def test_per_row_start_positions_match_separate_runs():
    """Rows at different positions in one batch compute what each computes alone."""
    cfg = CONFIGS["grouped-query"]
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    a, b = torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 4))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0, -1], model(b)[0, -1]
        model.setup_cache(batch_size=2, max_seq_len=16)
        # right-padded prefill, then one more token for b at its own position
        padded = torch.cat(
            [a[:, :8], torch.cat([b[:, :3], torch.zeros(1, 5, dtype=torch.long)], 1)]
        )
        model(padded, start_pos=0)
        out = model(torch.cat([a[:, 8:], b[:, 3:]]), start_pos=torch.tensor([8, 3]))
    assert (out[0, -1] - ref_a).abs().max() < 1e-4
    assert (out[1, -1] - ref_b).abs().max() < 1e-4


def test_rows_in_chosen_cache_slots_match_separate_runs():
    """A batch whose rows live in chosen cache slots (out of order, a gap between them), each at
    its own position, computes what each row computes alone, step after step; the layers
    gather those slots' keys and values into one pair of buffers kept across steps."""
    cfg = CONFIGS["grouped-query"]
    torch.manual_seed(2)
    model = Transformer(cfg).eval()
    seqs = [torch.randint(0, cfg.vocab_size, (1, n)) for n in (7, 3, 5)]
    slots = [3, 0, 2]
    with torch.no_grad():
        refs = [model(s)[0, -2:] for s in seqs]  # the last two positions' logits
        model.setup_cache(batch_size=4, max_seq_len=16)
        for s, slot in zip(seqs, slots, strict=True):
            model(s[:, :-2], 0, Context(slots=[slot]))
        buffers = []
        for step in (2, 1):  # two decode steps, all three rows together
            tokens = torch.cat([s[:, -step : s.shape[1] - step + 1] for s in seqs])
            start = torch.tensor([s.shape[1] - step for s in seqs])
            out = model(tokens, start, Context(slots=slots))[:, 0]
            for row, ref in enumerate(refs):
                assert (out[row] - ref[2 - step]).abs().max() < 1e-4
            buffers.append({k: b.data_ptr() for k, b in model.kv_caches[0].gathered.items()})
    assert buffers[0] == buffers[1] and set(buffers[0]) == {"k", "v"}
    assert all(c.gathered is model.kv_caches[0].gathered for c in model.kv_caches)


@pytest.mark.parametrize(
    "name,billions", [("llama2-7b", 6.74), ("llama2-13b", 13.02), ("llama2-70b", 68.98)]
)
def test_preset_parameter_counts(name, billions):
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e9, 2) == billions
    assert count == model.config.num_params()


@pytest.mark.parametrize(
    "name,hidden",
    [("llama2-7b", 11008), ("llama2-13b", 13824), ("llama2-70b", 28672), ("codellama-34b", 22016)],
)
def test_ffn_hidden_dims(name, hidden):
    assert get_preset(name).hidden_dim == hidden


def test_codellama_presets():
    for size in ("7b", "13b", "34b"):
        cfg = get_preset(f"codellama-{size}")
        assert cfg.rope_theta == 1e6
        assert cfg.vocab_size == (32000 if size == "34b" else 32016)
    assert get_preset("codellama-34b").n_kv_heads == 8


def test_meta_and_hf_config_round_trip():
    for name in ("llama2-70b", "codellama-34b", "tiny-15m", "micro"):
        cfg = get_preset(name)
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
        back = ModelConfig.from_meta_params(cfg.to_meta_params())
        assert back.hidden_dim == cfg.hidden_dim and back.n_kv_heads == cfg.n_kv_heads
    # an intermediate size Meta's formula cannot express with the default multiple_of
    odd = ModelConfig(dim=64, n_layers=1, n_heads=4, hidden_dim=100)
    assert ModelConfig.from_meta_params(odd.to_meta_params()).hidden_dim == 100


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="n_heads 6 is not divisible by n_kv_heads 4"):
        ModelConfig(dim=96, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="missing required field 'dim'"):
        ModelConfig.from_meta_params({"n_layers": 2, "n_heads": 2})
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("llama3-8b")
