import os
import tempfile
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA2_GGUF = FIXTURES / "ggml-vocab-llama-spm.gguf"

torch.set_num_threads(min(2, torch.get_num_threads()))
# the kernels' measured choices: one file for the whole run and the processes it starts
# (so a resumed run rounds as the run it continues), not the user's cache
os.environ.setdefault("LLAMA2_KERNEL_CACHE", str(Path(tempfile.mkdtemp()) / "kernels.json"))


def hf_model(config, state_dict):
    """transformers' LlamaForCausalLM holding the same weights (fp32, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2.checkpoint import to_hf_name

    hf_cfg = LlamaConfig.from_dict(config.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(
        {to_hf_name(k): v for k, v in state_dict.items()}, strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


@pytest.fixture(scope="session")
def llama2_tokenizer():
    from llama2 import Tokenizer

    return Tokenizer.from_file(LLAMA2_GGUF)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer trained with Llama 2's settings on a fixed corpus (Python code)."""
    from llama2 import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    return train_tokenizer([FIXTURES / "corpus.txt"], 512, out)


def perplexity(model, ids, seq_len: int = 128) -> float:
    """Perplexity of `model` over a token stream, in non-overlapping windows."""
    import math

    n = (len(ids) - 1) // seq_len * seq_len
    x = torch.tensor(ids[:n]).view(-1, seq_len)
    y = torch.tensor(ids[1 : n + 1]).view(-1, seq_len)
    with torch.no_grad():
        logits = model(x)
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())


@pytest.fixture(scope="session")
def trained(small_tokenizer):
    """A small model trained for a few seconds on the fixture corpus: (model, held-out ids).
    Quantization is judged on it, since random weights say little about real ones."""
    from llama2 import ModelConfig, Transformer

    ids = small_tokenizer.encode((FIXTURES / "corpus.txt").read_text())
    split = int(len(ids) * 0.9)
    train, held_out = torch.tensor(ids[:split]), ids[split:]
    cfg = ModelConfig(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        multiple_of=32,
        max_seq_len=256,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, len(train) - 65, (16,), generator=g)
        batch = torch.stack([train[s : s + 65] for s in starts])
        loss = torch.nn.functional.cross_entropy(
            model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), held_out
