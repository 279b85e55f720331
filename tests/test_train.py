import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES

from llama2 import load
from llama2.data import prepare_corpus
from llama2.train import load_train_config
from llama2.train.loop import lr_factor
from llama2.train.rundir import checkpoint_dirs

ROOT = Path(__file__).parent.parent
# PYTHONFAULTHANDLER: a native crash in a child (a rank of torchrun) prints its Python stack
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


@pytest.fixture(scope="module")
def shards(small_tokenizer, tmp_path_factory):
    text = (FIXTURES / "corpus.txt").read_text()
    docs = text.split("\n\n\n")
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_corpus(docs, small_tokenizer, out, val_every=10, workers=1, progress=False)
    return out


def _args(shards, steps, extra=()):
    return [
        f"data={shards}",
        "model=micro",
        "model_args={dim: 64, n_layers: 2, n_heads: 4}",
        f"steps={steps}",
        "batch_size=8",
        "seq_len=64",
        "lr=3e-3",
        "warmup_steps=4",
        "ckpt_every=10",
        "eval_every=10",
        "eval_batches=4",
        "threads=1",
        "keep_last=3",
        *extra,
    ]


def _pretrain(out, args, resume=False, procs=1, wait=True):
    cmd = [sys.executable, "-m", "llama2.cli", "pretrain", "--out", str(out), *args]
    if resume:
        cmd.insert(4, "--resume")
    if procs > 1:
        # --standalone: a free rendezvous port each time (no clash with a run just ended)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            *cmd[2:],
        ]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return p
    output, _ = p.communicate(timeout=1200)  # a guard against a hang, not a speed check
    assert p.returncode == 0, _failure(output)
    return output


def _failure(output: str) -> str:
    """The end of a failed run's output, and first any native crash's Python stack (a rank's
    'Fatal Python error', which torchrun's summary would push out of view)."""
    crash = output.find("Fatal Python error")
    head = output[crash : crash + 4000] + "\n...\n" if crash >= 0 else ""
    return head + output[-3000:]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _kill_after(p: subprocess.Popen, out: Path, rows: int) -> list[int]:
    """SIGKILL a run once its metrics.jsonl has `rows` rows; the steps it had logged."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return [m["step"] for m in _metrics(out)]


def test_killed_run_resumes_bit_for_bit(shards, tmp_path):
    args = _args(shards, 40)
    _pretrain(tmp_path / "ref", args)
    ref = _metrics(tmp_path / "ref")
    # step 0: the validation before the first step, the curves' starting point
    assert [m["step"] for m in ref] == list(range(0, 41))
    assert "val_loss" in ref[0] and "loss" not in ref[0]

    p = _pretrain(tmp_path / "run", args, wait=False)
    # killed between the checkpoints of steps 10 and 20
    done = _kill_after(p, tmp_path / "run", rows=15)
    assert 14 <= done[-1] < 40, "the run was not killed mid-way"
    for ckpt in checkpoint_dirs(tmp_path / "run"):  # whatever was kept is whole
        assert (ckpt / "trainer.pt").exists() and (ckpt / "model" / "config.json").exists()
    assert "resuming from" in _pretrain(tmp_path / "run", args, resume=True)
    after = _metrics(tmp_path / "run")
    assert [m["step"] for m in after] == list(range(0, 41))  # none lost, none twice
    for a, b in zip(after, ref, strict=True):
        for key in ("loss", "lr", "grad_norm", "val_loss"):
            assert a.get(key) == b.get(key), (a["step"], key)  # bit for bit
    # the final checkpoint is a model directory llama2.load reads
    final = checkpoint_dirs(tmp_path / "run")[-1]
    assert final.name == "step_0000040" and len(checkpoint_dirs(tmp_path / "run")) == 3
    llm = load(final / "model")
    assert llm.generate("def", max_new_tokens=4, temperature=0).token_ids
    assert (tmp_path / "run" / "model").resolve() == (final / "model").resolve()
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_fsdp_two_processes_match_one_and_resume(shards, tmp_path):
    one = _args(shards, 8, ["ckpt_every=4", "eval_every=4"])
    _pretrain(tmp_path / "one", one)
    ref = _metrics(tmp_path / "one")
    # two processes (gloo, FSDP2): the first 4 steps, then a resumed run to step 8
    _pretrain(tmp_path / "two", _args(shards, 4, ["ckpt_every=4", "eval_every=4"]), procs=2)
    _pretrain(tmp_path / "two", one, resume=True, procs=2)
    two = _metrics(tmp_path / "two")
    assert [m["step"] for m in two] == list(range(0, 9))
    assert math.isclose(two[0]["val_loss"], ref[0]["val_loss"], rel_tol=1e-4)
    for a, b in zip(two[1:], ref[1:], strict=True):
        # same global batch; only the order of floating-point sums differs
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
    assert math.isclose(two[-1]["val_loss"], ref[-1]["val_loss"], rel_tol=1e-4)
    # a run moves from 2 processes to 1: resume the sharded checkpoint in one process
    _pretrain(tmp_path / "two", _args(shards, 10, ["ckpt_every=4", "eval_every=4"]), resume=True)
    assert _metrics(tmp_path / "two")[-1]["step"] == 10


def test_cosine_schedule_and_unknown_settings(tmp_path):
    cfg = load_train_config(None, ["steps=100", "warmup_steps=10", "lr=1e-3"])
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-3)  # decays to 10% of the peak
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)
    with pytest.raises(ValueError, match="unknown setting"):
        load_train_config(None, ["stepz=3"])
    bad = tmp_path / "c.yaml"
    bad.write_text("steps: 3\nbogus: 1\n")
    with pytest.raises(ValueError, match="c.yaml: unknown setting 'bogus'"):
        load_train_config(bad)
    with pytest.raises(ValueError, match="not a multiple of grad_accum"):
        load_train_config(None, ["batch_size=6", "grad_accum=4"])


@pytest.mark.slow
def test_pretraining_on_the_embedded_corpus_brings_the_loss_down(tmp_path):
    """A tiny-15m-shaped (narrower) model on the standard library sources."""
    args = [
        "vocab_size=2048",
        "model_args={dim: 192, n_layers: 4, n_heads: 4}",
        "steps=500",
        "batch_size=16",
        "seq_len=128",
        "lr=2e-3",
        "warmup_steps=30",
        "eval_every=100",
        "ckpt_every=500",
        "threads=2",
    ]
    t0 = time.time()
    out = _pretrain(tmp_path / "run", ["model=tiny-15m", *args])
    metrics = _metrics(tmp_path / "run")
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    print(f"{time.time() - t0:.0f}s; validation loss by 100 steps: {val}\n{out[-300:]}")
    # the first loss is about ln 2048 = 7.6 (uniform over the vocabulary)
    assert metrics[1]["loss"] > 7.0  # (metrics[0]: the validation before step 1)
    assert val[-1] < 4.5


def test_activation_checkpointing_and_accumulation_keep_the_losses(shards, tmp_path):
    from llama2.train.pretrain import pretrain

    def losses(name, *extra):
        cfg = load_train_config(None, _args(shards, 3, ["eval_every=100", *extra]))
        return [m["loss"] for m in pretrain(cfg, tmp_path / name) if m["step"] > 0]

    plain = losses("plain")
    assert losses("ckpt", "activation_checkpointing=true") == pytest.approx(plain, rel=1e-6)
    # 2 micro-batches of 4: the same global batch of 8, in two halves
    assert losses("accum", "grad_accum=2") == pytest.approx(plain, rel=1e-5)


def test_bf16_autocast_on_cpu_follows_the_fp32_loss_curve(shards, tmp_path):
    """autocast=bfloat16 on a CPU: bf16 products, fp32 weights and optimizer state; its
    losses stay within 2% of fp32's over 30 steps (bf16 keeps 8 bits of mantissa), and they
    are not fp32's (the products did run in bf16)."""
    from llama2.train.pretrain import pretrain

    def losses(name, autocast):
        cfg = load_train_config(None, _args(shards, 30, ["eval_every=30", f"autocast={autocast}"]))
        rows = pretrain(cfg, tmp_path / name)
        return [m["loss"] for m in rows if "loss" in m], rows[-1]["val_loss"]

    (fp32, val32), (bf16, val16) = losses("fp32", "none"), losses("bf16", "bfloat16")
    assert losses("auto", "auto")[0] == fp32  # auto: fp32 on a CPU
    assert fp32[-1] < 0.8 * fp32[0]  # (it learned something to follow)
    assert bf16 != fp32
    for a, b in zip(bf16, fp32, strict=True):
        assert a == pytest.approx(b, rel=0.02)
    assert val16 == pytest.approx(val32, rel=0.02)
    state = torch.load(checkpoint_dirs(tmp_path / "bf16")[-1] / "trainer.pt", weights_only=True)
    assert state["config"]["autocast"] == "bfloat16"
    weights = load(tmp_path / "bf16" / "model").model.state_dict().values()
    assert all(w.dtype == torch.float32 for w in weights)  # fp32 master weights saved


def test_config_values_are_typed_and_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 3e-4\neps: 1e-5\nsteps: 10\nmodel_args: {dim: 96}\n")
    cfg = load_train_config(f, ["compile=true", "warmup_steps=2"])
    assert cfg.lr == 3e-4 and cfg.eps == 1e-5 and cfg.compile is True and cfg.warmup_steps == 2
    for bad, message in [
        (["lr=fast"], "setting 'lr': 'fast' is not a float"),
        (["steps=2.5"], "setting 'steps'"),
        (["eval_every=0"], "eval_every must be >= 1"),
        (["warmup_steps=-3"], "warmup_steps"),
        (["model_args={dmi: 32}"], r"model_args: unknown \['dmi'\]"),
        (["model_args=5"], "setting 'model_args'"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_train_config(None, bad)


def test_each_stage_refuses_settings_it_does_not_use(tmp_path):
    with pytest.raises(ValueError, match=r"sft has no setting 'kl_beta' \(a setting of ppo\)"):
        load_train_config(None, ["kl_beta=0.1"], stage="sft")
    f = tmp_path / "c.yaml"
    f.write_text("steps: 3\nwarmup_steps: 2\n")
    with pytest.raises(ValueError, match=r"c.yaml: ppo has no setting 'warmup_steps'"):
        load_train_config(f, stage="ppo")
    with pytest.raises(ValueError, match=r"reward has no setting 'model_args'"):
        load_train_config(None, ["model_args.dim=64"], stage="reward")
    with pytest.raises(ValueError, match="unknown stage 'sfts'"):
        load_train_config(None, [], stage="sfts")
    assert load_train_config(f, stage="sft").warmup_steps == 2


def test_every_shipped_config_loads_for_its_stage():
    from llama2.config import get_preset
    from llama2.train import STAGE_CONFIGS

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    stages_seen = set()
    for path in configs:
        # the stage is the file name's first word (sft-tiny.yaml), else pretraining (7b.yaml);
        # the recipe's configs hold every stage's settings (tests/test_recipe.py loads them)
        first = path.stem.split("-")[0]
        if first == "recipe":
            continue
        stage = first if first in STAGE_CONFIGS else "pretrain"
        cfg = load_train_config(path, stage=stage)  # a setting the stage lacks is an error
        assert type(cfg).stage == stage
        stages_seen.add(stage)
        if path.stem.endswith("-tiny"):  # sized for the base configs/tiny-15m.yaml trains
            context = get_preset("tiny-15m").max_seq_len
            assert getattr(cfg, "seq_len", 0) <= context, path.name
            assert 1e-4 <= cfg.lr <= 1e-3 or stage == "ppo", path.name
    assert stages_seen == set(STAGE_CONFIGS)
    for stage in set(STAGE_CONFIGS) - {"pretrain"}:
        assert (ROOT / "configs" / f"{stage}-tiny.yaml").exists(), stage


def test_ppo_kl_beta_follows_the_paper_by_model_size():
    # section 3.2.3: beta 0.01 for 7B and 13B, 0.005 for 34B and 70B
    assert load_train_config(ROOT / "configs" / "ppo.yaml", stage="ppo").kl_beta == 0.01
    assert load_train_config(ROOT / "configs" / "ppo-70b.yaml", stage="ppo").kl_beta == 0.005


def _toy_stage(batch_tokens=None, val=True):
    """A stage the loop can run in milliseconds: a linear model, fixed batches."""
    import torch

    from llama2.train.loop import Stage

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)

    def loss(m, b):
        return m(b[0]).pow(2).mean()

    return Stage(
        model=model,
        batch=lambda step, part, parts: (x[part::parts],),
        loss=loss,
        save_model=lambda sd, path: path.mkdir(parents=True),
        val_batches=(lambda rank, world: [(x[:4],)]) if val else None,
        tokens_per_step=1000,
        batch_tokens=batch_tokens,
        loss_label="ranking loss",
        perplexity=False,
    )


def test_loop_evaluates_at_step_0_counts_real_tokens_and_resumes_without_duplicates(
    tmp_path, monkeypatch
):
    from llama2.train import loop
    from llama2.train.config import LoopConfig

    labels = []
    monkeypatch.setattr(loop, "plot_metrics", lambda rows, path, **kw: labels.append(kw))
    args = {"batch_size": 8, "warmup_steps": 0, "eval_every": 2, "ckpt_every": 2, "lr": 1e-2}
    # a stage that reports no real tokens in its batches: tokens_per_s follows it, not the
    # fixed tokens_per_step (padding counted)
    rows = loop.train(LoopConfig(steps=2, **args), tmp_path / "a", lambda d, _: _toy_stage(len))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"step", "val_loss"}  # the starting point, before any step
    assert all(r["tokens_per_s"] > 0 for r in rows[1:])  # len(batch) = 1 tensor a micro-batch
    assert not any("val_ppl" in r for r in rows)  # not a token cross-entropy
    assert labels and all(kw["ylabel"] == "ranking loss" for kw in labels)
    zero = loop.train(
        LoopConfig(steps=1, **args), tmp_path / "z", lambda d, _: _toy_stage(lambda b: 0)
    )
    assert zero[1]["tokens_per_s"] == 0
    # resumed to step 4: step 0 stays once, the rows continue
    more = loop.train(
        LoopConfig(steps=4, **args), tmp_path / "a", lambda d, _: _toy_stage(len), resume=True
    )
    assert [r["step"] for r in more] == [0, 1, 2, 3, 4] and more[:3] == rows
    assert [r["step"] for r in _metrics(tmp_path / "a")] == [0, 1, 2, 3, 4]
    # without validation, no step-0 row
    plain = loop.train(
        LoopConfig(steps=1, **args), tmp_path / "b", lambda d, _: _toy_stage(val=False)
    )
    assert [r["step"] for r in plain] == [1]


def test_pick_device_needs_no_training_config():
    from llama2.device import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device() == pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device=cuda:99 is not available"):
        pick_device("cuda:99")


def test_run_log_writes_the_config_metrics_and_a_step_0_row_only_on_a_fresh_run(tmp_path):
    from llama2.train.config import LoopConfig
    from llama2.train.rundir import RunLog, due

    cfg = LoopConfig(steps=3)
    with RunLog(tmp_path, cfg, 0) as log:
        log.first(lambda: {"val_loss": 2.0})
        for step in (1, 2):
            log.log({"step": step, "loss": 1.0 / step}, loss="1")
    assert [r["step"] for r in _metrics(tmp_path)] == [0, 1, 2]
    assert (tmp_path / "config.yaml").exists()
    # resumed at step 1 (a checkpoint there): the rows after it go, step 0 is not logged again
    with RunLog(tmp_path, cfg, 1, ckpt=tmp_path) as log:
        log.first(lambda: pytest.fail("a resumed run keeps its step-0 row"))
        log.log({"step": 2, "loss": 0.4})
    rows = _metrics(tmp_path)
    assert [(r["step"], r.get("loss")) for r in rows] == [(0, None), (1, 1.0), (2, 0.4)]
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]


def test_eval_never_imports_train():
    """The folders import one way: train/ may use eval/ (grading), eval/ never train/."""
    import ast

    for path in (ROOT / "llama2" / "eval").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert not module.startswith(("..train", "llama2.train")), (path.name, module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("llama2.train") for a in node.names), path.name
