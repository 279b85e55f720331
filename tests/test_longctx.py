"""Long-context fine-tuning (Code Llama, section 2.4): init_from with a new RoPE base and a
longer seq_len, attention without a T x T matrix, and the long-context evaluation."""

import json
import math
import random

import pytest
import torch
from conftest import FIXTURES

from llama2 import ModelConfig, Transformer, load
from llama2.data import PackedShards, prepare_corpus
from llama2.eval.longctx import KEY_LINE, key_retrieval, loss_by_position, retrieval_example
from llama2.train import load_train_config
from llama2.train.pretrain import next_token_loss, pretrain

TINY = ["model=micro", "model_args={dim: 64, n_layers: 2, n_heads: 4}", "threads=1"]


@pytest.fixture(scope="module")
def shards(small_tokenizer, tmp_path_factory):
    docs = (FIXTURES / "corpus.txt").read_text().split("\n\n\n")
    out = tmp_path_factory.mktemp("lcdata") / "shards"
    prepare_corpus(docs, small_tokenizer, out, val_every=10, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def base(shards, tmp_path_factory):
    """A model pretrained for a few steps at 64 tokens, RoPE base 10,000."""
    out = tmp_path_factory.mktemp("base")
    args = [f"data={shards}", *TINY, "steps=6", "batch_size=4", "seq_len=64", "lr=3e-3"]
    args += ["warmup_steps=2", "eval_every=6", "ckpt_every=6", "eval_batches=2"]
    pretrain(load_train_config(None, args), out)
    return out / "model"


def test_lcft_continues_a_checkpoint_with_a_new_rope_base_at_a_longer_length(
    base, shards, tmp_path
):
    assert load(base).config.rope_theta == 10000.0 and load(base).config.max_seq_len < 256
    args = [f"data={shards}", f"init_from={base}", "rope_theta=1000000", "seq_len=256"]
    args += ["threads=1", "steps=2", "batch_size=4", "lr=1e-4", "warmup_steps=0"]
    args += ["eval_every=2", "ckpt_every=2", "eval_batches=2"]
    rows = pretrain(load_train_config(None, args), tmp_path / "lcft")
    tuned = load(tmp_path / "lcft" / "model").config
    assert tuned.rope_theta == 1e6 and tuned.max_seq_len == 256
    # the first step trained the base's weights, at the new base and length, on the run's batch
    start = load(base)
    start.model.config = start.config.replace(rope_theta=1e6, max_seq_len=256)
    batch = PackedShards(shards).batch(0, 4, 256, seed=0)
    expected = next_token_loss(start.model, batch).item()
    # the old base on the same batch gives another loss (close: the base trained 6 steps)
    old = load(base)
    old.model.config = old.config.replace(max_seq_len=256)
    old_loss = next_token_loss(old.model, batch).item()
    assert abs(rows[1]["loss"] - expected) < abs(old_loss - expected) / 10, (rows[1], old_loss)
    assert rows[1]["peak_mem_mb"] > 0  # memory per step, reported


def test_long_sequences_never_hold_the_attention_matrix():
    """Training-shaped forward and backward at 4096 tokens: SDPA's flash kernel, and no
    allocation anywhere near the T x T scores (8 heads x 4096^2 x 4 bytes = 512 MiB)."""
    from torch.profiler import profile

    cfg = ModelConfig(
        dim=64, n_layers=1, n_heads=8, vocab_size=256, multiple_of=32, max_seq_len=4096
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 256, (1, 4096))
    with profile(profile_memory=True) as prof:
        model(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert any("flash_attention" in n or "efficient_attention" in n for n in names), names
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < 8 * 4096 * 4096 * 4 / 16, largest


def test_key_retrieval_examples(small_tokenizer):
    lines = [ln + "\n" for ln in (FIXTURES / "corpus.txt").read_text().splitlines() if ln]
    rng = random.Random(0)
    for length in (128, 512, 1024):
        for depth in (0.0, 0.5, 1.0):
            prompt, answer = retrieval_example(small_tokenizer, lines, length, depth, rng)
            assert length - 8 <= len(prompt) + len(answer) - 1 <= length
            key = small_tokenizer.decode(answer).strip()
            assert len(key) == 4 and key.isdigit()
            text = small_tokenizer.decode(prompt)
            key_line = KEY_LINE.format(key=key)
            assert text.endswith("\n# the secret key is") and text.count(key_line) == 1
            before, after = text.split(key_line)
            # the key sits on a line of its own, at its depth of the code (to a line or so)
            assert before == "" or before.endswith("\n")
            if length >= 512:
                assert abs(len(before) / (len(before) + len(after)) - depth) < 0.1


def test_an_oracle_retrieves_every_key_and_loss_runs_past_the_trained_length(small_tokenizer):
    """A stand-in model that predicts the key's digits after the question scores 100%, one
    that predicts anything else 0%: the scoring is the greedy answer, whole."""
    lines = [ln + "\n" for ln in (FIXTURES / "corpus.txt").read_text().splitlines() if ln]

    class Oracle(torch.nn.Module):
        def __init__(self, right: bool):
            super().__init__()
            self.config = ModelConfig(dim=8, n_layers=1, n_heads=1, vocab_size=512, max_seq_len=64)
            self.right = right

        def forward(self, ids):
            # after the question, copy what followed the same words in the key line
            logits = torch.zeros(1, ids.shape[1], 512)
            row = ids[0].tolist()
            marker = small_tokenizer.encode("# the secret key is", dummy_prefix=False)
            n = len(marker)
            at = [i + n for i in range(len(row)) if row[i : i + n] == marker]
            first, last = at[0], at[-1]
            for j in range(last - 1, ids.shape[1]):
                target = row[first + (j - last + 1)]
                logits[0, j, target if self.right else (target + 1) % 512] = 1.0
            return logits

    acc = key_retrieval(Oracle(True), small_tokenizer, lines, [128, 256], [0.0, 1.0], 3)
    assert acc == {"128": {"0.0": 1.0, "1.0": 1.0}, "256": {"0.0": 1.0, "1.0": 1.0}}
    acc = key_retrieval(Oracle(False), small_tokenizer, lines, [128], [0.5], 3)
    assert acc == {"128": {"0.5": 0.0}}

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=32)
    model = Transformer(cfg.replace(max_seq_len=64))
    stream = torch.tensor(small_tokenizer.encode((FIXTURES / "corpus.txt").read_text()))
    r = loss_by_position(model, stream, 256, rows=2)  # 4x its context
    assert len(r["loss"]) == 256 and r["rows"] == 2 and r["peak_memory_mb"] > 0
    # a random model: about ln(vocab) everywhere
    assert all(abs(x - math.log(512)) < 1.0 for x in r["loss"])


def test_eval_longctx_cli(base, tmp_path, capsys):
    from llama2.cli import main

    held = tmp_path / "held.txt"
    held.write_text((FIXTURES / "corpus.txt").read_text()[-30000:])
    argv = ["eval", "longctx", str(base), "--data", str(held), "--out", str(tmp_path / "ev")]
    argv += ["--lengths", "64,256", "--depths", "0,1", "--trials", "2", "--rows", "2"]
    assert main(argv) == 0
    assert "| " + base.parent.name + " | 10000 |" in capsys.readouterr().out
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    m = r["models"][base.parent.name]
    assert set(m["key_retrieval"]) == {"64", "256"} and m["rope_theta"] == 10000.0
    assert len(m["loss_by_position"]) == 256 // 64 and m["peak_memory_mb"] > 0
    for png in ("loss_by_position.png", "key_retrieval.png"):
        assert (tmp_path / "ev" / png).read_bytes()[:4] == b"\x89PNG"
    assert main([*argv, "--lengths", "64,x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llama2 eval: error: --lengths") and "Traceback" not in "".join(err)
