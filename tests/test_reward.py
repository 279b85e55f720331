import json
import math

import pytest
import torch
from conftest import micro_model, micro_policy_and_reward_model

from llama2 import get_preset, load, save_hf
from llama2.data.preferences import read_preferences
from llama2.data.sft import encode_for_training
from llama2.formats import DialogError
from llama2.train import load_train_config
from llama2.train.reward import pad, reward, scores

TOPICS = [
    "parsing",
    "sockets",
    "threads",
    "strings",
    "lists",
    "files",
    "classes",
    "tests",
    "imports",
    "loops",
    "dicts",
    "sets",
    "json",
    "paths",
    "regex",
    "bytes",
    "time",
    "math",
    "sorting",
    "logging",
]


def test_reward_model_learns_separable_pairs_and_loads_in_transformers(small_tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    base = micro_model(small_tokenizer, tmp_path / "base")
    ratings = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    rows = [
        {
            "prompt": f"Tell me about {t} in Python.",
            "chosen": f"Good: {t} work well here.",
            "rejected": f"Bad bad bad {t} never worked.",
            "rating": ratings[i % 4],
        }
        for i, t in enumerate(TOPICS * 3)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    settings = (
        "steps=40 batch_size=8 seq_len=64 lr=3e-3 warmup_steps=4 eval_every=20 ckpt_every=40 "
        "threads=1 margin=small"
    )
    overrides = [f"init_from={base}", f"data={data}", *settings.split()]
    metrics = reward(load_train_config(None, overrides, stage="reward"), tmp_path / "rm")
    # held out: every 10th pair (6 of 60); step 0: their accuracy before training
    assert metrics[0]["step"] == 0 and "val_accuracy" in metrics[0]
    assert metrics[-1]["val_accuracy"] >= 0.99
    assert metrics[-1]["loss"] < 0.2 < metrics[1]["loss"]
    assert not any("val_ppl" in m for m in metrics)  # exp of a ranking loss means nothing

    rm = load(tmp_path / "rm" / "model")
    assert rm.head == "score" and rm.model.output.weight.shape == (1, get_preset("micro").dim)
    theirs = LlamaForSequenceClassification.from_pretrained(
        tmp_path / "rm" / "model", attn_implementation="eager"
    ).eval()
    seqs = [
        small_tokenizer.encode("def good(): pass", bos=True, eos=True),
        small_tokenizer.encode("x", bos=True, eos=True),
    ]
    tokens, lengths = pad(seqs)  # right-padded with 0, transformers' pad_token_id
    with torch.no_grad():
        ours = scores(rm.model, tokens, lengths)
        hf = theirs(tokens).logits[:, 0]
    assert (ours - hf).abs().max() < 1e-4


def test_preference_records_are_validated(tmp_path):
    f = tmp_path / "p.jsonl"
    ok = {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5, "is_safety": True}
    f.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "rating": "much_better"}))
    with pytest.raises(DialogError, match=r"p.jsonl:2: field 'rating' must be one of"):
        read_preferences(f)
    f.write_text(json.dumps({**ok, "chosen": None}))
    with pytest.raises(DialogError, match=r"p.jsonl:1: field 'chosen' must be text"):
        read_preferences(f)
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "more"},
    ]
    f.write_text(json.dumps({**ok, "prompt": msgs}))
    (p,) = read_preferences(f)
    assert p.prompt == msgs and p.margin == 1.5 and p.is_safety
    # is_safety: JSON true/false only (bool("no") would be True), absent or null = false
    for text in ("no", "false", 1):
        f.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "is_safety": text}))
        with pytest.raises(DialogError, match=r"p.jsonl:2: field 'is_safety' must be true or"):
            read_preferences(f)
    f.write_text(json.dumps({k: v for k, v in ok.items() if k != "is_safety"}))
    assert read_preferences(f)[0].is_safety is False


def test_prompt_records_are_strict_about_is_safety_and_check(tmp_path):
    from llama2.data.jsonl import read_prompts

    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": "q", "is_safety": True, "check": {"answer": "4"}}))
    assert read_prompts(f) == [
        {"prompt": [{"role": "user", "content": "q"}], "is_safety": True, "check": {"answer": "4"}}
    ]
    f.write_text(
        json.dumps({"prompt": "q"}) + "\n" + json.dumps({"prompt": "q", "is_safety": "no"})
    )
    with pytest.raises(DialogError, match=r"prompts.jsonl:2: field 'is_safety' must be true or"):
        read_prompts(f)
    f.write_text(json.dumps({"prompt": "q", "check": "4"}))
    with pytest.raises(DialogError, match=r"prompts.jsonl:1: field 'check' must be a JSON object"):
        read_prompts(f)
    f.write_text(json.dumps({"prompt": "q"}))
    assert read_prompts(f)[0]["is_safety"] is False and "check" not in read_prompts(f)[0]


def test_reward_accuracy_by_kind_and_real_token_counts(small_tokenizer, tmp_path):
    from llama2.train.loop import Dist
    from llama2.train.reward import build_reward

    base = micro_model(small_tokenizer, tmp_path / "base")
    rows = [
        {
            "prompt": f"Tell me about {t}.",
            "chosen": f"{t} work." * (1 + i % 3),
            "rejected": "No.",
            "is_safety": i == 19,  # held out: pairs 9 (helpful) and 19 (safety)
        }
        for i, t in enumerate(TOPICS)
    ]
    data = _prompts_file(tmp_path / "pairs.jsonl", rows)
    args = [f"init_from={base}", f"data={data}", "seq_len=64", "batch_size=4"]
    stage = build_reward(load_train_config(None, args, stage="reward"), torch.device("cpu"), Dist())
    with torch.no_grad():
        got = stage.val_metrics(stage.model)
    right = []
    for row in (rows[9], rows[19]):
        seqs = [
            encode_for_training(
                small_tokenizer,
                [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": a}],
            )[0]
            for a in (row["chosen"], row["rejected"])
        ]
        with torch.no_grad():
            s = [stage.model(torch.tensor([ids]))[0, -1, 0].item() for ids in seqs]
        right.append(float(s[0] > s[1]))
    assert got["val_accuracy_helpful"] == right[0] and got["val_accuracy_safety"] == right[1]
    # one kind only among the held-out pairs: no split
    data = _prompts_file(tmp_path / "pairs.jsonl", [{**r, "is_safety": False} for r in rows])
    stage = build_reward(load_train_config(None, args, stage="reward"), torch.device("cpu"), Dist())
    with torch.no_grad():
        assert "val_accuracy_safety" not in stage.val_metrics(stage.model)
    # tokens_per_s counts the pairs' real tokens, not the padding
    batch = stage.batch(0, 0, 1)
    tokens, lengths, _ = batch
    assert stage.batch_tokens(batch) == int(lengths.sum()) < tokens.numel()
    assert stage.loss_label == "ranking loss" and not stage.perplexity


def test_dpo_stage_prefers_the_chosen_answers(small_tokenizer, tmp_path):
    from llama2.train.dpo import dpo

    base = micro_model(small_tokenizer, tmp_path / "base")
    rows = [
        {
            "prompt": f"Tell me about {t}.",
            "chosen": f"{t} work well.",
            "rejected": f"Bad bad {t} fail.",
            "rating": "better",
        }
        for t in TOPICS * 2
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    settings = (
        "steps=30 batch_size=8 seq_len=64 lr=3e-3 warmup_steps=3 eval_every=10 ckpt_every=30 "
        "threads=1 beta=0.1"
    )
    overrides = [f"init_from={base}", f"data={data}", *settings.split()]
    metrics = dpo(load_train_config(None, overrides, stage="dpo"), tmp_path / "dpo")
    assert metrics[1]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference
    assert metrics[0]["val_reward_accuracy"] <= 1.0 and "val_ppl" not in metrics[-1]
    assert metrics[-1]["loss"] < 0.3 and metrics[-1]["val_reward_accuracy"] == 1.0
    tuned = load(tmp_path / "dpo" / "model")
    assert tuned.head == "lm" and tuned.generate("x", max_new_tokens=2, temperature=0).token_ids


def _policy_and_reward_model(small_tokenizer, tmp_path):
    return micro_policy_and_reward_model(small_tokenizer, tmp_path)


def test_rejection_sampling_keeps_the_best_of_every_round(small_tokenizer, tmp_path):
    from llama2.train.rejection import rejection

    policy, rm_dir = _policy_and_reward_model(small_tokenizer, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Explain {t}."}) for t in TOPICS[:4]))
    common = [
        f"init_from={policy}",
        f"data={prompts}",
        f"reward_model={rm_dir}",
        f"safety_model={rm_dir}",
        "samples_per_prompt=3",
        "temperature=1.0",
        "max_new_tokens=6",
        "steps=2",
        "batch_size=2",
        "seq_len=64",
        "lr=1e-3",
        "warmup_steps=1",
        "ckpt_every=2",
        "eval_every=2",
        "threads=1",
    ]
    rejection(load_train_config(None, common, stage="rejection"), tmp_path / "r1")
    samples = [json.loads(x) for x in (tmp_path / "r1" / "samples.jsonl").read_text().splitlines()]
    best = [json.loads(x) for x in (tmp_path / "r1" / "best.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and len(best) == 4
    for b in best:  # the winner of each prompt is its highest-scoring sample
        mine = [s for s in samples if s["prompt_index"] == b["prompt_index"]]
        assert b["score"] == max(s["score"] for s in mine) and b["round"] == 0
    assert load(tmp_path / "r1" / "sft" / "model").head == "lm"
    # RUN/model, as in every run directory: the tuned model, for generate and the next stage
    run_model = (tmp_path / "r1" / "model").resolve()
    assert run_model == (tmp_path / "r1" / "sft" / "model").resolve() and load(run_model)
    quality = json.loads((tmp_path / "r1" / "eval.json").read_text())
    assert quality["samples_reward"] == pytest.approx(sum(x["score"] for x in samples) / 12)
    # round 2 with another seed: an earlier winner that still scores higher stays
    round2 = [*common, "seed=5", f"previous={tmp_path / 'r1' / 'best.jsonl'}"]
    rejection(load_train_config(None, round2, stage="rejection"), tmp_path / "r2")
    best2 = [json.loads(x) for x in (tmp_path / "r2" / "best.jsonl").read_text().splitlines()]
    new = [json.loads(x) for x in (tmp_path / "r2" / "samples.jsonl").read_text().splitlines()]
    for b1, b2 in zip(best, best2, strict=True):
        top_new = max(s["score"] for s in new if s["prompt_index"] == b1["prompt_index"])
        # (the old winner is rescored in another batch: equal up to the kernels' rounding)
        assert b2["score"] == pytest.approx(max(b1["score"], top_new), rel=1e-5, abs=1e-5)
        assert b2["answer"] == (b1["answer"] if b1["score"] > top_new else b2["answer"])


def _ppo_setup(small_tokenizer, tmp_path):
    policy, rm_dir = _policy_and_reward_model(small_tokenizer, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Explain {t}.", "is_safety": i % 3 == 0} for i, t in enumerate(TOPICS)]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    return [
        f"init_from={policy}",
        f"data={prompts}",
        f"reward_model={rm_dir}",
        f"safety_model={rm_dir}",
        "steps=12",
        "batch_size=4",
        "minibatch=2",
        "ppo_epochs=2",
        "max_new_tokens=6",
        "lr=1e-4",
        "ckpt_every=4",
        "eval_every=4",
        "threads=1",
        "keep_last=2",
    ]


def test_ppo_killed_and_resumed_continues_with_the_same_metrics(small_tokenizer, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    args = _ppo_setup(small_tokenizer, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}

    def run(out, resume=False, wait=True):
        cmd = [sys.executable, "-m", "llama2.cli", "ppo", "--out", str(out), *args]
        if resume:
            cmd.append("--resume")
        p = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if wait:
            output, _ = p.communicate(timeout=300)
            assert p.returncode == 0, output[-3000:]
        return p

    def metrics(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    run(tmp_path / "ref")
    ref = metrics(tmp_path / "ref")
    assert len(ref) == 13  # step 0 (the held-out evaluation before training), then 12
    assert set(ref[0]) == {"step", "held_out_reward"} and ref[0]["step"] == 0
    for key in (
        "reward",
        "kl",
        "entropy",
        "response_length",
        "clip_frac",
        "policy_loss",
        "value_loss",
    ):
        assert all(math.isfinite(m[key]) for m in ref[1:]), key
    assert "held_out_reward" in ref[4] and ref[1]["kl"] == pytest.approx(0, abs=1e-5)
    assert all(m["kl"] >= 0 for m in ref[1:])  # k3: never negative, unlike kl_logratio

    p = run(tmp_path / "run", wait=False)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill between the checkpoints of iterations 4 and 8
        if log.exists() and len(log.read_text().splitlines()) >= 7:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert 7 <= len(metrics(tmp_path / "run")) < 13, "not killed mid-way"
    run(tmp_path / "run", resume=True)
    after = metrics(tmp_path / "run")
    assert [m["step"] for m in after] == list(range(0, 13))
    for a, b in zip(after, ref, strict=True):
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}, a["step"]
    assert load(tmp_path / "run" / "model").head == "lm"


def test_ppo_stops_early_when_held_out_reward_stalls(small_tokenizer, tmp_path):
    from llama2.train.ppo import ppo

    args = _ppo_setup(small_tokenizer, tmp_path)
    # a learning rate too small to move: the held-out reward cannot improve after the first look
    cfg = load_train_config(None, [*args, "lr=1e-12", "patience=1"], stage="ppo")
    metrics = ppo(cfg, tmp_path / "stall")
    assert len(metrics) == 9 and metrics[-1]["early_stop"] is True  # steps 0 to 8
    assert metrics[4]["held_out_reward"] == metrics[8]["held_out_reward"]
    assert (tmp_path / "stall" / "checkpoints" / "step_0000008").is_dir()


def _grade(check: dict, answer: str) -> dict[str, float]:
    """A hand-written grader with llama2.eval.judges.grade's signature."""
    out = {"task_accuracy": float(check["word"] in answer)}
    if check.get("unsafe"):
        out["safety_violation"] = float(len(answer) > 3)
    return out


def test_ppo_grades_held_out_greedy_answers_at_iteration_0_and_each_evaluation(
    small_tokenizer, tmp_path
):
    from llama2.train.ppo import ppo
    from llama2.train.scoring import score

    args = _ppo_setup(small_tokenizer, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    for i, r in enumerate(rows):  # checks on all but one held-out prompt (9 and 19)
        if i != 19:
            r["check"] = {"word": "e", "unsafe": i == 9}
    _prompts_file(prompts, rows)
    cfg = load_train_config(None, [*args, "steps=2", "eval_every=2", "ckpt_every=2"], stage="ppo")
    metrics = ppo(cfg, tmp_path / "run", grade=_grade)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    keys = {"held_out_reward", "held_out_task_accuracy", "held_out_safety_violation"}
    assert keys <= set(metrics[0]) and keys <= set(metrics[2]) and "reward" not in metrics[0]
    # step 0: the initial policy's greedy answers, graded and scored (the same answers)
    policy, helpful = load(cfg.init_from), load(cfg.reward_model, dtype=torch.float32)
    held = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "is_safety": r["is_safety"]}
        for r in (rows[9], rows[19])
    ]
    answers = [
        policy.chat(p["prompt"], temperature=0, max_new_tokens=cfg.max_new_tokens).text
        for p in held
    ]
    graded = _grade(rows[9]["check"], answers[0])  # the only held-out prompt with a check
    assert metrics[0]["held_out_task_accuracy"] == graded["task_accuracy"]
    assert metrics[0]["held_out_safety_violation"] == graded["safety_violation"]
    want = float(score(helpful, helpful, held, answers).mean())
    assert metrics[0]["held_out_reward"] == pytest.approx(want, abs=1e-4)


def _scale_reward_head(rm_dir, factor: float, name: str = "rm-scaled"):
    """A copy of a reward model with its scalar head times `factor` (a different reward model;
    with a large factor, scores far past sigmoid's saturation)."""
    rm = load(rm_dir, dtype=torch.float32)
    state = rm.model.state_dict()
    state["output.weight"] = state["output.weight"] * factor
    return save_hf(rm_dir.parent / name, rm.config, state, rm.tokenizer, head="score")


def test_score_answers_returns_raw_scores(small_tokenizer, tmp_path):
    from llama2.data.sft import encode_for_training
    from llama2.train.scoring import score_answers

    _, rm_dir = _policy_and_reward_model(small_tokenizer, tmp_path)
    rm = load(_scale_reward_head(rm_dir, 1000.0), dtype=torch.float32)
    dialogs = [[{"role": "user", "content": f"Explain {t}."}] for t in TOPICS[:4]]
    answers = ["Yes.", "No, never.", "It is def f(): pass", "x"]
    got = score_answers(rm, dialogs, answers)
    expected = []
    for d, a in zip(dialogs, answers, strict=True):  # one unpadded row at a time
        ids = encode_for_training(small_tokenizer, [*d, {"role": "assistant", "content": a}])[0]
        with torch.no_grad():
            expected.append(rm.model(torch.tensor([ids]))[0, -1, 0].item())
    assert max(abs(e) for e in expected) > 20  # past where a float32 sigmoid is 1.0
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert len(set(got)) == len(got)


def _prompts_file(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_ppo_rollout_numbers_derived_independently(small_tokenizer, tmp_path, monkeypatch):
    """PPO's real rollout on a micro model, every number re-derived one unpadded row at a
    time: the prompt-masked, right-padded batch, log-probs at the sampling temperature, KL,
    values, R_c on the last response token, GAE by a plain loop, and ratio 1 at the start."""
    from llama2.data.sft import encode_for_training
    from llama2.data.split import derive_seed
    from llama2.formats import encode_chat
    from llama2.train import ppo as ppo_module
    from llama2.train.ppo import PPO

    policy, rm_dir = _policy_and_reward_model(small_tokenizer, tmp_path)
    long_dialog = [
        {"role": "user", "content": "Explain sockets and threads in Python, briefly."},
        {"role": "assistant", "content": "Sockets talk; threads run."},
        {"role": "user", "content": "And files?"},
    ]
    rows = [
        {"prompt": "Hi.", "is_safety": True},
        {"prompt": long_dialog},
        {"prompt": "Explain the regex module and its flags.", "is_safety": False},
    ]
    temperature, beta, lam = 0.7, 0.05, 0.9
    args = [
        f"init_from={policy}",
        f"data={_prompts_file(tmp_path / 'prompts.jsonl', rows)}",
        f"reward_model={rm_dir}",
        "batch_size=4",
        "minibatch=2",
        "max_new_tokens=5",
        f"temperature={temperature}",
        f"kl_beta={beta}",
        f"gae_lambda={lam}",
        "threads=1",
    ]
    run = PPO(load_train_config(None, args, stage="ppo"))
    torch.manual_seed(1)
    with torch.no_grad():  # the policy moves away from its reference: a non-zero KL
        for p in run.policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ro = run.rollout(0)
    tok = small_tokenizer
    tokens, mask = ro["tokens"], ro["mask"]
    B = tokens.shape[0]
    assert B == 4 and mask.shape == (B, tokens.shape[1] - 1)

    # the same draw of prompts and the same sampling, redone
    g = torch.Generator().manual_seed(derive_seed(0, "prompts", 0))
    idx = torch.randint(0, len(rows), (B,), generator=g).tolist()
    dialogs = [run.prompts[i]["prompt"] for i in idx]
    outs = run.policy.chat(
        dialogs,
        temperature=temperature,
        max_new_tokens=5,
        seed=derive_seed(0, "rollouts", 0),
    )

    def forward(model, seq):
        with torch.no_grad():
            return model(torch.tensor([seq]))[0].float()

    widths, logps, refs, values, scores = [], [], [], [], []
    for i, (d, o) in enumerate(zip(dialogs, outs, strict=True)):
        prompt = encode_chat(tok, d)
        answer = o.token_ids + ([tok.eos_id] if o.finish_reason == "stop" else [])
        seq = prompt + answer
        P, A = len(prompt), len(answer)
        assert tokens[i, : P + A].tolist() == seq  # prompt, then the sampled answer
        assert tokens[i, P + A :].eq(0).all()  # right-padded
        # mask[t] covers the prediction of token t + 1: exactly the answer's tokens
        expect = [1.0 if P - 1 <= t < P + A - 1 else 0.0 for t in range(mask.shape[1])]
        assert mask[i].tolist() == expect
        pos = range(P - 1, P + A - 1)
        lp = torch.log_softmax(forward(run.policy.model, seq[:-1]) / temperature, -1)
        rp = torch.log_softmax(forward(run.reference, seq[:-1]) / temperature, -1)
        logps.append([lp[t, seq[t + 1]].item() for t in pos])
        refs.append([rp[t, seq[t + 1]].item() for t in pos])
        values.append([forward(run.value, seq[:-1])[t, 0].item() for t in pos])
        ids = encode_for_training(tok, [*d, {"role": "assistant", "content": o.text}])[0]
        scores.append(forward(run.helpful.model, ids)[-1, 0].item())
        widths.append(pos)

    for i, pos in enumerate(widths):
        got = [ro["logp"][i, t].item() for t in pos]
        assert got == pytest.approx(logps[i], abs=1e-4), "log-probs at the sampling temperature"
        kl = [a - b for a, b in zip(logps[i], refs[i], strict=True)]
        assert [ro["kl"][i, t].item() for t in pos] == pytest.approx(kl, abs=1e-4)
        k3 = [math.exp(-x) + x - 1 for x in kl]  # logged: exp(ref - logp) - (ref - logp) - 1
        assert [ro["kl_k3"][i, t].item() for t in pos] == pytest.approx(k3, abs=1e-4)
        assert [ro["values"][i, t].item() for t in pos] == pytest.approx(values[i], abs=1e-4)
    assert ro["r_c"].tolist() == pytest.approx(scores, abs=1e-4)

    # rewards: -beta * KL everywhere, the whitened score added on the last answer token
    mean = sum(scores) / B
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / B)
    all_adv, all_ret = [], []
    for i, pos in enumerate(widths):
        r = [-beta * (a - b) for a, b in zip(logps[i], refs[i], strict=True)]
        r[-1] += (scores[i] - mean) / std
        assert [ro["rewards"][i, t].item() for t in pos] == pytest.approx(r, abs=1e-4)
        off = [t for t in range(mask.shape[1]) if t not in pos]
        assert ro["rewards"][i, off].eq(0).all()
        adv, next_a, next_v = [0.0] * len(r), 0.0, 0.0  # GAE, gamma 1, by a plain loop
        for k in reversed(range(len(r))):
            delta = r[k] + next_v - values[i][k]
            next_a = adv[k] = delta + lam * next_a
            next_v = values[i][k]
        all_adv.append(adv)
        all_ret.append([a + v for a, v in zip(adv, values[i], strict=True)])
        assert [ro["returns"][i, t].item() for t in pos] == pytest.approx(all_ret[i], abs=1e-4)
    flat = [a for row in all_adv for a in row]
    m = sum(flat) / len(flat)
    s = math.sqrt(sum((a - m) ** 2 for a in flat) / len(flat))
    for i, pos in enumerate(widths):  # advantages whitened over the batch's answer tokens
        want = [(a - m) / (s + 1e-8) for a in all_adv[i]]
        assert [ro["adv"][i, t].item() for t in pos] == pytest.approx(want, abs=1e-4)

    # the first minibatch of the first epoch runs on the rollout's own policy: ratio 1
    seen = []
    real = ppo_module.ppo_policy_loss

    def spy(logp, old_logp, adv, m, clip):
        seen.append(torch.exp(logp - old_logp)[m.bool()].detach())
        return real(logp, old_logp, adv, m, clip)

    monkeypatch.setattr(ppo_module, "ppo_policy_loss", spy)
    run.update(ro, 0)
    assert len(seen) == 2 and seen[0].numel() > 0
    assert torch.equal(seen[0], torch.ones_like(seen[0]))


def test_ppo_refuses_greedy_sampling():
    # temperature 0 samples by argmax (generation.sample): no distribution for ratios or KL
    with pytest.raises(ValueError, match="temperature must be > 0"):
        load_train_config(None, ["temperature=0"], stage="ppo")


def _rejection_args(policy, rm_dir, prompts, *more):
    return [
        f"init_from={policy}",
        f"data={prompts}",
        f"reward_model={rm_dir}",
        "samples_per_prompt=2",
        "max_new_tokens=4",
        "steps=1",
        "batch_size=1",
        "seq_len=128",
        "threads=1",
        *more,
    ]


def test_rejection_fine_tunes_on_the_chosen_answer_only(small_tokenizer, tmp_path, monkeypatch):
    from llama2.data.sft import encode_for_training
    from llama2.formats import chat_segments
    from llama2.train import rejection as rejection_module

    policy, rm_dir = _policy_and_reward_model(small_tokenizer, tmp_path)
    history = [
        {"role": "user", "content": "Explain sockets."},
        {"role": "assistant", "content": "An earlier answer nobody selected."},
        {"role": "user", "content": "And threads?"},
    ]
    prompts = _prompts_file(tmp_path / "prompts.jsonl", [{"prompt": history}])
    seen = {}

    def fake_sft(cfg, out, resume=False, **kw):  # what the fine-tuning would train on
        seen.update(kw, data=cfg.data)
        return []

    monkeypatch.setattr(rejection_module, "sft", fake_sft)
    cfg = load_train_config(None, _rejection_args(policy, rm_dir, prompts), stage="rejection")
    rejection_module.rejection(cfg, tmp_path / "r")
    (record,) = [json.loads(x) for x in open(seen["data"])]
    encode = seen.get("encode", encode_for_training)  # sft's default
    ids, mask = encode(small_tokenizer, record["messages"])
    segments = chat_segments(small_tokenizer, record["messages"])
    answer = len(segments[-1][1])  # the selected answer and its EOS, at the end
    assert len(segments) == 2 and len(segments[0][1]) > 0
    assert mask == [False] * (len(ids) - answer) + [True] * answer


def test_rejection_matches_earlier_rounds_by_prompt_and_rescores_them(small_tokenizer, tmp_path):
    from llama2.data.sft import encode_for_training
    from llama2.train.rejection import sample_and_select

    policy, rm_dir = _policy_and_reward_model(small_tokenizer, tmp_path)
    topics = TOPICS[:4]
    dialog = {t: [{"role": "user", "content": f"Explain {t}."}] for t in topics}
    # an earlier round, in file order, whose scores came from an older reward model
    previous = tmp_path / "best0.jsonl"
    previous.write_text(
        "\n".join(
            json.dumps(
                {
                    "prompt_index": i,
                    "prompt": dialog[t],
                    "answer": f"Old answer about {t}.",
                    "score": 1e9,
                    "round": 0,
                }
            )
            for i, t in enumerate(topics)
        )
    )
    order = topics[::-1]  # this round's prompt file lists them the other way round
    prompts = _prompts_file(tmp_path / "prompts.jsonl", [{"prompt": dialog[t]} for t in order])
    args = _rejection_args(policy, rm_dir, prompts, f"previous={previous}")
    out = tmp_path / "r1"
    out.mkdir()
    best = sample_and_select(load_train_config(None, args, stage="rejection"), out)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    rm = load(rm_dir, dtype=torch.float32)

    def current_score(d, answer):
        ids = encode_for_training(small_tokenizer, [*d, {"role": "assistant", "content": answer}])
        with torch.no_grad():
            return rm.model(torch.tensor([ids[0]]))[0, -1, 0].item()

    assert [b["prompt"] for b in best] == [dialog[t] for t in order]
    for i, (t, b) in enumerate(zip(order, best, strict=True)):
        old = current_score(dialog[t], f"Old answer about {t}.")  # rescored by today's RM
        new = max(s["score"] for s in samples if s["prompt_index"] == i)
        assert b["score"] == pytest.approx(max(old, new), abs=1e-4)
        if old > new:  # the earlier answer of this very prompt, never another's
            assert b["answer"] == f"Old answer about {t}." and b["round"] == 0
        else:
            assert not b["answer"].startswith("Old answer") and b["round"] == 1


def test_rejection_leaves_out_winners_the_safety_model_deems_unsafe():
    from llama2.train.rejection import fine_tuning_rows

    def row(text, score, is_safety):
        prompt = [{"role": "user", "content": text}]
        return {"prompt": prompt, "answer": f"to {text}", "score": score, "is_safety": is_safety}

    # a safety prompt's winner is scored by the safety model alone (R_c): a logit
    best = [
        row("a", math.log(0.6 / 0.4), True),  # p(safe) 0.6: kept at the floor 0.5
        row("b", math.log(0.4 / 0.6), True),  # 0.4: left out
        row("c", -1e4, True),  # far past exp's range
        row("d", -5.0, False),  # a helpfulness score: never gated
    ]
    args = ["reward_model=rm", "safety_model=safety"]
    cfg = load_train_config(None, args, stage="rejection")
    kept = [r["messages"][0]["content"] for r in fine_tuning_rows(cfg, best)]
    assert kept == ["a", "d"]
    strict = load_train_config(None, [*args, "safety_floor=0.7"], stage="rejection")
    assert [r["messages"][0]["content"] for r in fine_tuning_rows(strict, best)] == ["d"]
    for off in (
        load_train_config(None, [*args, "safety_floor=0"], stage="rejection"),
        load_train_config(None, ["reward_model=rm"], stage="rejection"),  # no safety model
    ):
        assert len(fine_tuning_rows(off, best)) == 4
    message = fine_tuning_rows(cfg, best)[0]["messages"]
    assert message == [*best[0]["prompt"], {"role": "assistant", "content": "to a"}]
    with pytest.raises(ValueError, match="safety_floor must be in"):
        load_train_config(None, [*args, "safety_floor=1.5"], stage="rejection")


def test_dpo_truncates_chosen_and_rejected_together(small_tokenizer, tmp_path):
    """Past seq_len, both rows keep the same prompt tokens (its end, after BOS), so that the
    shared context lines up, and the loss falls on each answer's start only."""
    from llama2.formats import chat_segments
    from llama2.train.dpo import build_dpo
    from llama2.train.loop import Dist

    base = micro_model(small_tokenizer, tmp_path / "base")
    prompt = [
        {"role": "user", "content": "Explain sockets, threads and files in Python. " * 3},
        {"role": "assistant", "content": "Sockets talk, threads run, files keep. " * 2},
        {"role": "user", "content": "And the json module?"},
    ]
    row = {
        "prompt": prompt,
        "chosen": "It reads and writes JSON text. " * 4,
        "rejected": "No.",
        "rating": "better",
    }
    data = _prompts_file(tmp_path / "pairs.jsonl", [row])
    seq_len = 48
    args = [f"init_from={base}", f"data={data}", f"seq_len={seq_len}", "batch_size=1"]
    stage = build_dpo(load_train_config(None, args, stage="dpo"), torch.device("cpu"), Dist())
    tokens, mask, _ = stage.batch(0, 0, 1)
    history = None
    ends = []
    for k, answer in enumerate((row["chosen"], row["rejected"])):
        segs = chat_segments(small_tokenizer, [*prompt, {"role": "assistant", "content": answer}])
        full_prompt = [t for p, a in segs[:-1] for t in p + a] + segs[-1][0]
        assert len(full_prompt) + len(segs[-1][1]) > seq_len + 1  # the pair must be cut
        n_loss = int(mask[k].sum())
        start = mask[k].tolist().index(1.0)
        assert mask[k, start : start + n_loss].eq(1).all()  # one run: this answer only
        kept = tokens[k, :start].tolist()
        assert kept[0] == small_tokenizer.bos_id and kept[1:] == full_prompt[-(len(kept) - 1) :]
        assert tokens[k, start : start + n_loss].tolist() == segs[-1][1][:n_loss]
        assert start + n_loss <= seq_len + 1
        ends.append(start + n_loss)  # the row's real tokens: prompt, then its answer
        if history is None:
            history = kept
        assert kept == history  # the same prompt tokens in chosen and rejected
    assert stage.batch_tokens((tokens, mask, None)) == sum(ends) < tokens.numel()
    assert int(mask[1].sum()) == len(
        chat_segments(small_tokenizer, [*prompt, {"role": "assistant", "content": "No."}])[-1][1]
    )


def test_reward_model_truncation_keeps_bos_and_the_end(small_tokenizer, tmp_path):
    from llama2.data.sft import encode_for_training
    from llama2.train.loop import Dist
    from llama2.train.reward import build_reward

    base = micro_model(small_tokenizer, tmp_path / "base")
    row = {
        "prompt": "Explain sockets and threads in Python. " * 4,
        "chosen": "Sockets talk, threads run.",
        "rejected": "No.",
    }
    data = _prompts_file(tmp_path / "pairs.jsonl", [row])
    seq_len = 24
    args = [f"init_from={base}", f"data={data}", f"seq_len={seq_len}", "batch_size=1"]
    stage = build_reward(load_train_config(None, args, stage="reward"), torch.device("cpu"), Dist())
    tokens, lengths, _ = stage.batch(0, 0, 1)
    for k, answer in enumerate((row["chosen"], row["rejected"])):
        msgs = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": answer},
        ]
        full = encode_for_training(small_tokenizer, msgs)[0]
        assert len(full) > seq_len
        got = tokens[k, : lengths[k]].tolist()
        assert len(got) == seq_len  # BOS, then the last seq_len - 1 tokens (the score's EOS)
        assert got == [small_tokenizer.bos_id] + full[-(seq_len - 1) :]


def test_rejection_checks_previous_before_sampling(small_tokenizer, tmp_path, monkeypatch):
    from llama2.train import rejection as rejection_module

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(rejection_module, "load", no_model)
    prompts = _prompts_file(tmp_path / "prompts.jsonl", [{"prompt": "Explain sets."}])
    base = _rejection_args(tmp_path / "policy", tmp_path / "rm", prompts)
    missing = tmp_path / "rs0" / "best.jsonl"
    cfg = load_train_config(None, [*base, f"previous={missing}"], stage="rejection")
    with pytest.raises(DialogError, match=r"previous=.*rs0/best.jsonl: no such file.*first round"):
        rejection_module.rejection(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "samples.jsonl").exists()
    bad = _prompts_file(tmp_path / "best.jsonl", [{"prompt": [], "answer": "x"}, {"prompt": "q"}])
    cfg = load_train_config(None, [*base, f"previous={bad}"], stage="rejection")
    with pytest.raises(DialogError, match=r"best.jsonl:2: field 'prompt' must be a list"):
        rejection_module.sample_and_select(cfg, tmp_path / "r")


def test_rejection_samples_several_prompts_per_batch_seeded_per_batch():
    from types import SimpleNamespace

    from llama2.data.split import derive_seed
    from llama2.train.rejection import sample_answers

    calls = []

    class FakePolicy:  # answers name the dialog and the row's seed (generation: seed + row)
        def chat(self, dialogs, seed=None, **sampling):
            calls.append((len(dialogs), seed))
            return [
                SimpleNamespace(text=f"{d[0]['content']}|{seed + j}") for j, d in enumerate(dialogs)
            ]

    prompts = [{"prompt": [{"role": "user", "content": f"p{i}"}]} for i in range(5)]
    args = ["samples_per_prompt=3", "sample_rows=6", "seed=7"]
    cfg = load_train_config(None, args, stage="rejection")
    answers = sample_answers(FakePolicy(), prompts, cfg)
    # 2 prompts x 3 samples a batch: 3 batches (the last one prompt), each its own seed
    assert calls == [(6, derive_seed(7, "samples", b)) for b in range(2)] + [
        (3, derive_seed(7, "samples", 2))
    ]
    for i, group in enumerate(answers):
        b, row = divmod(i, 2)
        seed = derive_seed(7, "samples", b)
        assert group == [f"p{i}|{seed + row * 3 + k}" for k in range(3)]
    assert sample_answers(FakePolicy(), prompts, cfg) == answers  # a function of the seed


def test_rejection_reports_graded_quality_of_samples_and_held_out_answers(
    small_tokenizer, tmp_path
):
    from llama2.train.rejection import sample_and_select
    from llama2.train.scoring import score

    policy, rm_dir = _policy_and_reward_model(small_tokenizer, tmp_path)
    rows = [{"prompt": f"Explain {t}.", "check": {"word": "e"}} for t in TOPICS[:10]]
    prompts = _prompts_file(tmp_path / "prompts.jsonl", rows)
    cfg = load_train_config(None, _rejection_args(policy, rm_dir, prompts), stage="rejection")
    out = tmp_path / "r"
    out.mkdir()
    best = sample_and_select(cfg, out, grade=_grade)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    # prompt 9 (the 10th) is held out: not sampled, answered greedily instead
    assert len(best) == 9 and {s["prompt_index"] for s in samples} == set(range(9))
    quality = json.loads((out / "eval.json").read_text())
    hits = [float("e" in s["answer"]) for s in samples]
    assert quality["samples_task_accuracy"] == pytest.approx(sum(hits) / len(hits))
    held = {"prompt": [{"role": "user", "content": rows[9]["prompt"]}], "is_safety": False}
    answer = load(policy).chat(held["prompt"], temperature=0, max_new_tokens=4).text
    assert quality["held_out_task_accuracy"] == float("e" in answer)
    rm = load(rm_dir, dtype=torch.float32)
    want = float(score(rm, None, [held], [answer])[0])
    assert quality["held_out_reward"] == pytest.approx(want, abs=1e-4)
