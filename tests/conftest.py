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


def property_settings(max_examples: int):
    """Hypothesis settings for property tests that take pytest fixtures: no deadline (a CPU
    shared with other jobs), no example database (nothing written under the checkout)."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def micro_model(tokenizer, out: Path) -> Path:
    """A random micro model (seed 0) saved as an HF directory."""
    from llama2 import Transformer, get_preset, save_hf

    torch.manual_seed(0)
    cfg = get_preset("micro")
    return save_hf(out, cfg, Transformer(cfg).state_dict(), tokenizer)


def micro_policy_and_reward_model(tokenizer, d: Path, policy: str = "policy") -> tuple[Path, Path]:
    """A random micro policy (d/policy) and a random micro reward model with a scalar head
    (d/rm)."""
    from llama2 import Transformer, get_preset, save_hf

    policy = micro_model(tokenizer, d / policy)
    cfg = get_preset("micro")
    rm = Transformer(cfg)
    rm.output = torch.nn.Linear(cfg.dim, 1, bias=False)
    return policy, save_hf(d / "rm", cfg, rm.state_dict(), tokenizer, head="score")


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
    shape = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2)
    cfg = ModelConfig(**shape, vocab_size=512, multiple_of=32, max_seq_len=256)
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


@pytest.fixture(scope="session")
def stage_inputs(small_tokenizer, tmp_path_factory):
    """What the training verbs need, tiny: a micro model with the small tokenizer, a reward
    model made from it, and a few rows of each stage's data (SFT dialogs, preference pairs,
    prompts, GAtt dialogs)."""
    import json
    from types import SimpleNamespace

    d = tmp_path_factory.mktemp("inputs")
    model, rm = micro_policy_and_reward_model(small_tokenizer, d, policy="model")

    def jsonl(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d / name

    chat = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(12)
    ]
    return SimpleNamespace(
        dir=d,
        model=model,
        rm=rm,
        sft=jsonl("sft.jsonl", [{"messages": m} for m in chat]),
        pairs=jsonl(
            "pairs.jsonl",
            [
                {"prompt": f"p{i}", "chosen": "yes", "rejected": "no", "rating": "better"}
                for i in range(12)
            ],
        ),
        prompts=jsonl("prompts.jsonl", [{"prompt": f"p{i}"} for i in range(12)]),
        gatt=jsonl("gatt.jsonl", [{"turns": [f"t{i}", "u"]} for i in range(6)]),
        # fast settings for every loop stage
        quick=[
            "threads=1",
            "steps=2",
            "batch_size=2",
            "seq_len=32",
            "warmup_steps=0",
            "eval_every=1",
            "ckpt_every=1",
        ],
    )


def files_under(root) -> set[str]:
    """Every file, directory and link under `root` (relative paths)."""
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def refused(capsys):
    """`refused(argv, *parts, watch=DIR)`: run the CLI in-process on input it must refuse and
    check the standard: exit status 1, one error line naming what is wrong (each of `parts`
    appears in it), no traceback, and nothing new (nor anything gone) under `watch`. Returns
    the error line."""
    from llama2.cli import main

    def check(argv, *parts, watch):
        before = files_under(watch)
        capsys.readouterr()
        code = main([str(a) for a in argv])  # any exception but SystemExit fails the test
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if ": error: " in line]
        assert code == 1, (code, err[-2000:])
        assert "Traceback" not in err
        assert len(lines) == 1, err[-2000:]
        for part in parts:
            assert str(part) in lines[0], (part, lines[0])
        assert files_under(watch) == before, sorted(files_under(watch) ^ before)
        return lines[0]

    return check
