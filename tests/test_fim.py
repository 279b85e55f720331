"""Fill-in-the-middle training (Code Llama, section 2.3): the layouts against the inference
encoder, the transform's draws, batches, and a FIM run killed and resumed."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from test_train import _kill_after, _metrics, _pretrain

from llama2.data import PackedShards, prepare_corpus
from llama2.data.fim import FimTransform, fim_ids
from llama2.formats import encode_infill, infill_ids
from llama2.tokenizer import train_tokenizer

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A Llama 2-style tokenizer with Code Llama's infilling pieces reserved."""
    out = tmp_path_factory.mktemp("fimtok") / "tokenizer.model"
    return train_tokenizer([FIXTURES / "corpus.txt"], 512, out, infill_pieces=True)


@pytest.fixture(scope="module")
def docs():
    return (FIXTURES / "corpus.txt").read_text().split("\n\n\n")


@pytest.fixture(scope="module")
def fim_shards(tok, docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fimdata") / "shards"
    prepare_corpus(docs, tok, out, val_every=10, workers=1, progress=False)
    return out


CASES = [
    ("def add(a, b):\n    ", "c = a + b", "\n    return c\n"),
    ("", "import os\n", "print(os.sep)"),  # empty prefix
    ("x = 1\n", "", "y = 2"),  # empty middle
    ("for i in range(3):\n", "    print(i)", ""),  # empty suffix
    ("s = 'é ☺", " 漢字 ", "  '\n"),  # byte fallback, spaces at the cuts
]


@pytest.mark.parametrize("suffix_first", [False, True])
@pytest.mark.parametrize("prefix,middle,suffix", CASES)
def test_layout_is_the_inference_prompt_then_the_middle(tok, prefix, middle, suffix, suffix_first):
    ids = fim_ids(tok, prefix, middle, suffix, suffix_first)
    t = infill_ids(tok)
    prompt = encode_infill(tok, prefix, suffix, suffix_first=suffix_first)
    # token by token: what inference feeds the model, then what it should generate
    assert ids[: len(prompt)] == prompt
    assert ids[len(prompt) :] == tok.encode(middle, dummy_prefix=False) + [t["eot"]]
    # and the layout itself, spelled out (Code Llama, section 2.3)
    pre, suf = tok.encode(prefix), tok.encode(suffix, dummy_prefix=False)
    mid = tok.encode(middle, dummy_prefix=False)
    if suffix_first:
        expected = [tok.bos_id, t["prefix"], t["suffix"], *suf, t["middle"], *pre, *mid]
    else:
        expected = [tok.bos_id, t["prefix"], *pre, t["suffix"], *suf, t["middle"], *mid]
    assert ids == expected + [t["eot"]]
    # the pieces decode back to the document
    assert tok.decode(pre) + tok.decode(mid, continuation=True) == prefix + middle
    assert tok.decode(suf, continuation=True) == suffix


def _parse(tok, ids) -> tuple[str | None, str, str, bool]:
    """(prefix, middle, suffix, spm) of a FIM document's ids; in SPM order the prefix's and
    the middle's tokens follow each other, so there it gives (None, prefix + middle, ...)."""
    t = infill_ids(tok)
    ids = list(ids)
    assert ids[:2] == [tok.bos_id, t["prefix"]] and ids[-1] == t["eot"]
    s, m = ids.index(t["suffix"]), ids.index(t["middle"])
    if s == 2:  # SPM
        suffix, rest = ids[3:m], ids[m + 1 : -1]
        return None, tok.decode(rest), tok.decode(suffix, continuation=True), True
    pre, suffix, mid = ids[2:s], ids[s + 1 : m], ids[m + 1 : -1]
    return tok.decode(pre), tok.decode(mid, True), tok.decode(suffix, True), False


def test_transform_rates_and_uniform_split_points(tok, docs):
    doc_ids = [np.asarray(tok.encode(d, bos=True, eos=True)) for d in docs[:40]]
    fim = FimTransform(tok, rate=0.9, spm_rate=0.5)
    rng = np.random.default_rng(0)
    n = fim_count = spm_count = 0
    cuts = []
    for _ in range(25):
        for d, ids in zip(docs[:40], doc_ids, strict=True):
            out = fim(ids, rng)
            n += 1
            if out is ids:
                continue
            fim_count += 1
            prefix, middle, suffix, is_spm = _parse(tok, out)
            assert (prefix or "") + middle + suffix == d  # nothing lost or added
            spm_count += is_spm
            if not is_spm:
                cuts += [len(prefix) / len(d), (len(prefix) + len(middle)) / len(d)]
    assert abs(fim_count / n - 0.9) < 0.03  # 1000 documents: 4.7 standard deviations
    assert abs(spm_count / fim_count - 0.5) < 0.06
    # the sorted pair of two uniform points: the first has mean 1/3, the second 2/3
    # (about 450 PSM documents: a standard error of 0.011 on each mean)
    assert abs(np.mean(cuts[0::2]) - 1 / 3) < 0.04 and abs(np.mean(cuts[1::2]) - 2 / 3) < 0.04
    # rate 0: untouched; rate 1 and spm_rate 0 / 1: always PSM / SPM
    assert FimTransform(tok, 0.0)(doc_ids[0], rng) is doc_ids[0]
    assert not _parse(tok, FimTransform(tok, 1.0, 0.0)(doc_ids[0], rng))[3]
    assert _parse(tok, FimTransform(tok, 1.0, 1.0)(doc_ids[0], rng))[3]


def test_fim_batches_are_drawn_from_seed_and_step(tok, fim_shards):
    shards = PackedShards(fim_shards)
    fim = FimTransform(tok, 0.9, 0.5)
    a = shards.transformed_batch(3, 8, 64, fim, seed=1)
    b = shards.transformed_batch(3, 8, 64, fim, seed=1)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert (a[0][:, 1:] == a[1][:, :-1]).all()  # targets are the inputs shifted
    # however the batch is cut (processes, accumulation), its rows are the same
    halves = [shards.transformed_batch(3, 8, 64, fim, seed=1, part=p, parts=2) for p in (0, 1)]
    assert (np.concatenate([h[0] for h in halves]) == a[0].numpy()).all()
    assert not (shards.transformed_batch(4, 8, 64, fim, seed=1)[0] == a[0]).all()
    assert not (shards.transformed_batch(3, 8, 64, fim, seed=2)[0] == a[0]).all()
    t = infill_ids(tok)
    # (the fixture's documents are long: a 64-token row often sits inside one)
    rows = np.concatenate([shards.transformed_batch(s, 8, 64, fim, seed=1)[0] for s in range(10)])
    assert (rows == t["middle"]).any() and (rows == t["eot"]).any()
    # documents left as they are give back the plain batch exactly
    plain = shards.batch(3, 8, 64, seed=1)
    same = shards.transformed_batch(3, 8, 64, lambda doc, rng: doc, seed=1)
    assert all((x == y).all() for x, y in zip(plain, same, strict=True))


def test_a_tokenizer_without_infilling_pieces_is_refused(small_tokenizer, tmp_path, capsys):
    from llama2.cli import main

    with pytest.raises(ValueError, match="needs Code Llama's infilling pieces"):
        FimTransform(small_tokenizer, 0.9)
    data = tmp_path / "shards"
    prepare_corpus(["def f():\n    pass\n"] * 50, small_tokenizer, data, val_every=0, workers=1)
    argv = ["pretrain", "--out", str(tmp_path / "run"), f"data={data}", "model=micro"]
    argv += ["steps=1", "seq_len=16", "threads=1"]
    assert main([*argv, "fim_rate=0.9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "needs Code Llama's infilling pieces" in err[-1] and "Traceback" not in "".join(err)
    assert main([*argv, "fim_rate=1.5"]) == 1
    assert "fim_rate must be in [0, 1]" in capsys.readouterr().err


def test_killed_fim_run_resumes_bit_for_bit(fim_shards, tmp_path):
    args = [
        f"data={fim_shards}",
        "model=micro",
        "model_args={dim: 64, n_layers: 2, n_heads: 4}",
        "steps=24",
        "batch_size=8",
        "seq_len=64",
        "lr=3e-3",
        "warmup_steps=4",
        "ckpt_every=6",
        "eval_every=6",
        "eval_batches=4",
        "threads=1",
        "fim_rate=0.9",
        "fim_spm_rate=0.5",
    ]
    _pretrain(tmp_path / "ref", args)
    ref = _metrics(tmp_path / "ref")
    p = _pretrain(tmp_path / "run", args, wait=False)
    done = _kill_after(p, tmp_path / "run", rows=10)  # between two checkpoints
    assert 9 <= done[-1] < 24, "the run was not killed mid-way"
    assert "resuming from" in _pretrain(tmp_path / "run", args, resume=True)
    after = _metrics(tmp_path / "run")
    assert [m["step"] for m in after] == list(range(0, 25))
    for a, b in zip(after, ref, strict=True):
        for key in ("loss", "lr", "grad_norm", "val_loss"):
            assert a.get(key) == b.get(key), (a["step"], key)  # bit for bit


def test_fim_changes_training_batches_only(fim_shards, tmp_path):
    """Validation stays the same left-to-right text; training rows are transformed."""
    import dataclasses

    import torch

    from llama2.train import load_train_config
    from llama2.train.loop import Dist
    from llama2.train.pretrain import build_pretraining

    args = [f"data={fim_shards}", "model=micro", "seq_len=64", "batch_size=8"]
    args += ["eval_batches=4", "fim_rate=0.9"]
    cfg = load_train_config(None, args)
    cpu = torch.device("cpu")
    fim = build_pretraining(cfg, tmp_path, cpu, Dist())
    plain = build_pretraining(dataclasses.replace(cfg, fim_rate=0.0), tmp_path, cpu, Dist())
    pairs = list(zip(fim.val_batches(0, 1), plain.val_batches(0, 1), strict=True))
    assert len(pairs) == 4
    assert all((x == y).all() for a, b in pairs for x, y in zip(a, b, strict=True))
    assert not (fim.batch(0, 0, 1)[0] == plain.batch(0, 0, 1)[0]).all()


@pytest.mark.slow
def test_fim_under_fsdp_two_processes_matches_one(fim_shards, tmp_path):
    args = [
        f"data={fim_shards}",
        "model=micro",
        "model_args={dim: 64, n_layers: 2, n_heads: 4}",
        "steps=4",
        "batch_size=8",
        "seq_len=64",
        "warmup_steps=2",
        "ckpt_every=4",
        "eval_every=4",
        "eval_batches=4",
        "threads=1",
        "fim_rate=0.9",
    ]
    _pretrain(tmp_path / "one", args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "llama2.cli", "pretrain", "--out", str(tmp_path / "two"), *args]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in two] == list(range(5))
    for a, b in zip(two[1:], one[1:], strict=True):
        # each process built its rows of the same global batch; only summation order differs
        assert abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"], (a, b)
    assert abs(two[-1]["val_loss"] - one[-1]["val_loss"]) < 1e-4 * one[-1]["val_loss"]
