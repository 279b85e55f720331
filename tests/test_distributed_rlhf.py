"""Rejection sampling, PPO and GAtt's sampling under torchrun: 2 gloo processes on the CPU
(FSDP2) against 1 process, and PPO's checkpoints moved between process counts and resumed
after a SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import micro_policy_and_reward_model

ROOT = Path(__file__).parent.parent
# PYTHONFAULTHANDLER: a native crash in a rank prints its Python stack
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
TOPICS = ["sockets", "threads", "regex", "files", "json", "sorting", "classes", "tests", "bytes"]
TOPICS += ["generators", "decorators", "paths"]
PPO_KEYS = (
    "reward",
    "kl",
    "kl_logratio",
    "response_length",
    "policy_loss",
    "value_loss",
    "clip_frac",
    "entropy",
    "held_out_reward",
)


def _command(stage: str, out: Path, args: list[str], procs: int, resume: bool) -> list[str]:
    cmd = ["-m", "llama2.cli", stage, "--out", str(out), *args, *(["--resume"] if resume else [])]
    if procs > 1:  # --standalone: a free rendezvous port each time
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd]
    return [sys.executable, *cmd]


def _run(stage, out, args, procs=1, resume=False, wait=True) -> subprocess.Popen:
    # a session of its own: a SIGKILL reaches torchrun and its ranks together
    p = subprocess.Popen(
        _command(stage, out, args, procs, resume),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if wait:
        output, _ = p.communicate(timeout=600)  # a guard against a hang, not a speed check
        assert p.returncode == 0, output[-4000:]
    return p


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _close(a: dict, b: dict, keys=PPO_KEYS, rel=1e-4, abs_=1e-5) -> None:
    """Two metrics rows alike up to the order of floating-point sums."""
    assert a["step"] == b["step"]
    for k in keys:
        assert (k in a) == (k in b), (a["step"], k)
        if k in a:
            assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=abs_), (a["step"], k, a[k], b[k])


@pytest.fixture(scope="module")
def models(small_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    policy, rm = micro_policy_and_reward_model(small_tokenizer, d)
    prompts = d / "prompts.jsonl"
    rows = [{"prompt": f"Explain {t}.", "is_safety": i % 3 == 0} for i, t in enumerate(TOPICS)]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    return {"policy": policy, "rm": rm, "prompts": prompts}


def _inputs(models) -> list[str]:
    return [
        f"init_from={models['policy']}",
        f"data={models['prompts']}",
        f"reward_model={models['rm']}",
        f"safety_model={models['rm']}",
    ]


def _ppo_args(models, steps: int) -> list[str]:
    settings = (
        "batch_size=4 minibatch=2 ppo_epochs=2 max_new_tokens=6 temperature=1.0 lr=1e-4 "
        "ckpt_every=2 eval_every=2 threads=1 keep_last=3"
    )
    return [*_inputs(models), f"steps={steps}", *settings.split()]


@pytest.fixture(scope="module")
def ppo_runs(models, tmp_path_factory):
    """An uninterrupted PPO run of 4 iterations in 1 process, and one in 2."""
    d = tmp_path_factory.mktemp("ppo")
    _run("ppo", d / "one", _ppo_args(models, 4))
    _run("ppo", d / "two", _ppo_args(models, 4), procs=2)
    return _rows(d / "one" / "metrics.jsonl"), _rows(d / "two" / "metrics.jsonl")


def test_ppo_two_processes_follow_the_one_process_run(ppo_runs):
    one, two = ppo_runs
    assert [m["step"] for m in two] == [0, 1, 2, 3, 4] == [m["step"] for m in one]
    assert "held_out_reward" in two[0] and "held_out_reward" in two[2]
    assert any(m["kl"] > 0 for m in two[2:])  # the policy moved: the runs are not trivial
    for a, b in zip(two, one, strict=True):
        _close(a, b)


def test_ppo_two_process_checkpoint_resumes_in_one_process(models, ppo_runs, tmp_path):
    one, two = ppo_runs
    out = tmp_path / "moved"
    _run("ppo", out, _ppo_args(models, 2), procs=2)
    assert (out / "checkpoints" / "step_0000002" / "state" / ".metadata").exists()
    _run("ppo", out, _ppo_args(models, 4), resume=True)  # one process continues it
    moved = _rows(out / "metrics.jsonl")
    assert [m["step"] for m in moved] == [0, 1, 2, 3, 4]
    assert moved[:3] == two[:3]  # the 2-process part, as the 2-process run logged it
    for a, b in zip(moved, one, strict=True):  # and on as the uninterrupted run
        _close(a, b)


def test_sigkilled_two_process_ppo_resumes_exactly(models, ppo_runs, tmp_path):
    _, two = ppo_runs
    out = tmp_path / "killed"
    p = _run("ppo", out, _ppo_args(models, 4), procs=2, wait=False)
    log, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline:  # past the checkpoint of iteration 2
        if log.exists() and len(log.read_text().splitlines()) >= 4 or p.poll() is not None:
            break
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks
    p.wait()
    assert 4 <= len(_rows(log)) < 5, "not killed mid-way"
    _run("ppo", out, _ppo_args(models, 4), procs=2, resume=True)
    assert _rows(log) == two  # every number, bit for bit


def _rejection_args(models) -> list[str]:
    # sample_rows=8: 4 prompts a batch, 3 batches of the 11 training prompts, dealt 2 and 1
    settings = (
        "samples_per_prompt=2 sample_rows=8 temperature=1.0 max_new_tokens=6 steps=2 "
        "batch_size=2 seq_len=64 lr=1e-3 warmup_steps=1 ckpt_every=2 eval_every=2 threads=1"
    )
    return [*_inputs(models), *settings.split()]


def test_rejection_sampling_writes_the_same_best_in_two_processes(models, tmp_path):
    args = _rejection_args(models)
    _run("rejection", tmp_path / "one", args)
    _run("rejection", tmp_path / "two", args, procs=2)
    for name in ("samples.jsonl", "best.jsonl", "sft.jsonl"):  # the same batches, the same seeds
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    best = _rows(tmp_path / "two" / "best.jsonl")
    assert [b["prompt_index"] for b in best] == [i for i in range(len(TOPICS)) if i != 9]
    assert len({b["answer"] for b in best}) > 1
    # the fine-tuning on the winners ran, under torchrun, on both ranks (the loop's own
    # 1-vs-N agreement is tests/test_train.py's)
    sft_two = [m for m in _rows(tmp_path / "two" / "sft" / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in sft_two] == [1, 2]
    evals = [json.loads((tmp_path / r / "eval.json").read_text()) for r in ("one", "two")]
    assert evals[0].keys() == evals[1].keys() and "tuned_held_out_reward" in evals[1]
    assert evals[0]["samples_reward"] == evals[1]["samples_reward"]
    assert (tmp_path / "two" / "model").resolve() == (tmp_path / "two" / "sft" / "model").resolve()


def test_gatt_samples_the_same_dialogs_in_two_processes(small_tokenizer, tmp_path):
    import torch

    from llama2 import Transformer, get_preset, save_hf

    torch.manual_seed(0)
    cfg = get_preset("micro", max_seq_len=1024)
    base = save_hf(tmp_path / "chat", cfg, Transformer(cfg).state_dict(), small_tokenizer)
    data = tmp_path / "turns.jsonl"
    rows = [{"turns": ["What is a list?", "And a dict?", "Thanks!"]}, {"turns": ["Hi", "Why?"]}]
    data.write_text("\n".join(json.dumps(r) for r in rows * 3))
    settings = (
        "steps=2 batch_size=2 seq_len=128 lr=1e-3 warmup_steps=1 ckpt_every=2 eval_every=2 "
        "threads=1 max_new_tokens=5 temperature=0.8 keep_adherent=false sample_rows=2"
    )  # 3 batches of 2 dialogs a turn (the third turn: 2 batches), dealt unevenly to 2 ranks
    args = [f"init_from={base}", f"data={data}", *settings.split()]
    _run("gatt", tmp_path / "one", args)
    _run("gatt", tmp_path / "two", args, procs=2)
    for name in ("gatt.jsonl", "train.jsonl"):  # the same batches, the same seeds
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    # the adherence of the tuned model, measured with both ranks sharing the dialogs
    report = json.loads((tmp_path / "two" / "adherence.json").read_text())
    assert report["dialogs"] == 6 and len(report["adherence_by_turn"]) == 3
    dialogs = _rows(tmp_path / "two" / "gatt.jsonl")
    answers = [m["content"] for d in dialogs for m in d["messages"] if m["role"] == "assistant"]
    assert len(answers) == 15 and len(set(answers)) > 1
