from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA2_GGUF = FIXTURES / "ggml-vocab-llama-spm.gguf"

torch.set_num_threads(min(2, torch.get_num_threads()))


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
