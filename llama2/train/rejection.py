"""Rejection sampling fine-tuning (Llama 2, section 3.2.3): K answers per prompt from the
current policy, each scored by the reward model(s); the best per prompt is kept, competing
with the best of all earlier rounds, and the policy is fine-tuned on the winners (SFT, with
the loss on the winning answer only).

One prompt in ten is held out (data/split.py): not sampled for training, but answered
greedily by the policy before and after the fine-tuning, to measure the reward and, where
prompts carry a `check`, the task quality (so that a reward model being gamed shows).

The run directory holds config.yaml, samples.jsonl (every answer and its score), best.jsonl
(the winner per prompt, with its score and round), sft.jsonl (the winners as SFT data),
eval.json (the mean reward and graded quality of the samples and of the held-out answers),
sft/ (the fine-tuning run, a run directory of its own) and model -> sft/model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.jsonl import parse_prompt, read_flag, read_jsonl
from ..data.sft import encode_for_training, encode_last_answer
from ..data.split import derive_seed, held_out
from ..formats import DialogError
from ..io import point_link, write_atomic
from ..llm import Llama, load
from .config import RejectionConfig, SFTConfig, stage_config
from .loop import pick_device
from .losses import combined_reward
from .reward import pad, scores
from .rundir import (
    check_run,
    latest_checkpoint,
    new_run,
    read_jsonl_rows,
    write_config,
    write_jsonl,
)
from .sft import sft

Grade = Callable[[dict, str], dict[str, float]]  # llama2.eval.judges.grade's signature


def read_prompts(path: str | Path) -> list[dict]:
    """JSONL of {"prompt": text or messages, "is_safety": optional true/false, "check":
    optional JSON object}. `check` is opaque here: what a grader (llama2.eval.judges) needs
    to judge an answer to the prompt (its task's expected answer, whether it is unsafe...)."""
    out = []
    for where, r in read_jsonl(path):
        row = {"prompt": parse_prompt(r, where), "is_safety": read_flag(r, "is_safety", where)}
        check = r.get("check")
        if check is not None:
            if not isinstance(check, dict):
                raise DialogError(f"{where}: field 'check' must be a JSON object")
            row["check"] = check
        out.append(row)
    if not out:
        raise DialogError(f"{path}: no prompts")
    return out


def grader(prompts: list[dict], grade: Grade | None = None) -> Grade | None:
    """`grade`, or llama2.eval.judges.grade (imported lazily: the graders belong to the
    evaluation package) when some prompt carries a check; resolved before any sampling, so
    that a missing grader fails at once."""
    if grade is None and any("check" in p for p in prompts):
        from ..eval.judges import grade
    return grade


def graded_means(prompts: list[dict], answers: list[str], grade: Grade | None = None) -> dict:
    """The mean of each number `grade(check, answer)` gives, over the answers to prompts that
    carry a check (a key counts only the answers it was given for); {} if none has one."""
    checked = [(p["check"], a) for p, a in zip(prompts, answers, strict=True) if "check" in p]
    if not checked:
        return {}
    grade = grader(prompts, grade)
    values: dict[str, list[float]] = {}
    for check, answer in checked:
        for key, v in grade(check, answer).items():
            values.setdefault(key, []).append(float(v))
    return {key: sum(v) / len(v) for key, v in values.items()}


def greedy_answers(policy: Llama, prompts: list[dict], max_new_tokens: int, rows: int) -> list[str]:
    """The policy's greedy answer to each prompt, `rows` prompts per generation batch."""
    out: list[str] = []
    for i in range(0, len(prompts), rows):
        dialogs = [p["prompt"] for p in prompts[i : i + rows]]
        outs = policy.chat(dialogs, temperature=0, max_new_tokens=max_new_tokens)
        out += [o.text for o in outs]
    return out


def held_out_quality(
    policy: Llama,
    helpful: Llama,
    safety: Llama | None,
    prompts: list[dict],
    max_new_tokens: int,
    rows: int = 64,
    grade: Grade | None = None,
) -> dict[str, float]:
    """held_out_reward (the mean raw R_c) and held_out_<key> (each graded number's mean) of the
    policy's greedy answers to the held-out prompts: the same answers for both, so that a
    reward rising while the task quality falls (reward hacking) shows."""
    if not prompts:
        return {}
    answers = greedy_answers(policy, prompts, max_new_tokens, rows)
    out = {"held_out_reward": float(score(helpful, safety, prompts, answers).mean())}
    return out | {f"held_out_{k}": v for k, v in graded_means(prompts, answers, grade).items()}


@torch.no_grad()
def score_answers(
    rm: Llama, dialogs: list[list[dict]], answers: list[str], batch: int = 16
) -> list[float]:
    """A reward model's raw score (the scalar, a logit) of each answer. Not its sigmoid: in
    float32 that saturates to 1.0 above ~17 and would tie the best answers (section 3.2.3's
    probability is only needed for R_c's 0.15 gate, which applies it itself)."""
    out: list[float] = []
    for i in range(0, len(answers), batch):
        pairs = zip(dialogs[i : i + batch], answers[i : i + batch], strict=True)
        seqs = [
            encode_for_training(rm.tokenizer, [*d, {"role": "assistant", "content": a}])[0]
            for d, a in pairs
        ]
        tokens, lengths = pad(seqs)
        out += scores(rm.model, tokens.to(rm.device), lengths.to(rm.device)).tolist()
    return out


def prompt_key(prompt: list[dict]) -> str:
    """A prompt's identity across rounds: a hash of its messages."""
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_previous(path: str | Path) -> dict[str, dict]:
    """An earlier round's best.jsonl, by prompt_key of each row's prompt; checked whole (read
    before any sampling, so that a bad path fails at once, not after the sampling)."""
    path = Path(path)
    if not path.is_file():
        raise DialogError(
            f"previous={path}: no such file (the best.jsonl of an earlier round; leave "
            "previous unset on a first round)"
        )
    out = {}
    for where, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), list):
            raise DialogError(f"{where}: field 'prompt' must be a list of messages")
        if not isinstance(row.get("answer"), str):
            raise DialogError(f"{where}: field 'answer' must be text")
        out[prompt_key(row["prompt"])] = row
    return out


def score(
    helpful: Llama, safety: Llama | None, prompts: list[dict], answers: list[str]
) -> torch.Tensor:
    """Each answer's raw score: R_c with a safety model (section 3.2.3), else helpfulness."""
    if not answers:
        return torch.zeros(0)
    dialogs = [p["prompt"] for p in prompts]
    r_help = torch.tensor(score_answers(helpful, dialogs, answers))
    if safety is None:
        return r_help
    r_safe = torch.tensor(score_answers(safety, dialogs, answers))
    return combined_reward(r_help, r_safe, torch.tensor([p["is_safety"] for p in prompts]))


def sample_answers(policy: Llama, prompts: list[dict], cfg: RejectionConfig) -> list[list[str]]:
    """K sampled answers per prompt. Each generation batch holds several prompts' K rows
    (about `sample_rows` rows); batch b is seeded with derive_seed(seed, "samples", b) and its
    row j draws from that seed + j (generation.py), so the samples are a function of the
    seed, the prompt file and these settings."""
    K = cfg.samples_per_prompt
    per = max(1, cfg.sample_rows // K)  # prompts per batch
    out: list[list[str]] = []
    with tqdm(total=len(prompts), desc="sampling", unit="prompt") as bar:
        for b, start in enumerate(range(0, len(prompts), per)):
            chunk = prompts[start : start + per]
            outs = policy.chat(
                [p["prompt"] for p in chunk for _ in range(K)],
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                seed=derive_seed(cfg.seed, "samples", b),
            )
            out += [[o.text for o in outs[i * K : (i + 1) * K]] for i in range(len(chunk))]
            bar.update(len(chunk))
    return out


def _load_reward_models(cfg, device) -> tuple[Llama, Llama | None]:
    helpful = load(cfg.reward_model, dtype=torch.float32, device=device)
    safety = (
        load(cfg.safety_model, dtype=torch.float32, device=device) if cfg.safety_model else None
    )
    for rm, name in ((helpful, "reward_model"), (safety, "safety_model")):
        if rm is not None and rm.head != "score":
            raise ValueError(f"{name} {rm.path} is not a reward model")
    return helpful, safety


def sample_and_select(cfg: RejectionConfig, out: Path, grade: Grade | None = None) -> list[dict]:
    """Sample, score and select; returns the best per training prompt (also written to
    best.jsonl). Every input (prompts, the earlier round, the models) is read and checked
    before the first sample. `grade(check, answer)`: llama2.eval.judges.grade by default."""
    if not (cfg.init_from and cfg.data and cfg.reward_model):
        raise ValueError("rejection needs init_from=POLICY, data=PROMPTS.jsonl, reward_model=RM")
    every = read_prompts(cfg.data)
    previous = read_previous(cfg.previous) if cfg.previous else {}
    grade = grader(every, grade)
    # (index in the file, prompt): training prompts are sampled, held-out ones evaluated
    prompts = [(i, p) for i, p in enumerate(every) if not held_out(i)]
    held = [p for i, p in enumerate(every) if held_out(i)]
    device = pick_device(cfg)
    policy = load(cfg.init_from, device=device)
    helpful, safety = _load_reward_models(cfg, device)
    K = cfg.samples_per_prompt
    answers = sample_answers(policy, [p for _, p in prompts], cfg)
    flat = [p for _, p in prompts for _ in range(K)]
    r = score(helpful, safety, flat, [a for group in answers for a in group]).tolist()
    samples = []
    for n, ((i, _), group) in enumerate(zip(prompts, answers, strict=True)):
        for k, a in enumerate(group):
            samples.append({"prompt_index": i, "sample": k, "answer": a, "score": r[n * K + k]})
    write_jsonl(out / "samples.jsonl", samples)
    quality = {"samples_reward": sum(r) / max(1, len(r))}
    graded = graded_means(flat, [s["answer"] for s in samples], grade)
    quality |= {f"samples_{k}": v for k, v in graded.items()}
    quality |= held_out_quality(
        policy, helpful, safety, held, cfg.max_new_tokens, cfg.sample_rows, grade
    )
    write_atomic(out / "eval.json", json.dumps(quality, indent=2))
    this_round = 1 + max((r.get("round", 0) for r in previous.values()), default=-1)
    # an earlier round's winner competes again, matched by its prompt (a prompt file may be
    # reordered or edited between rounds) and rescored by today's reward model(s): the
    # paper's reward models change between rounds, so its stored score is stale
    olds = [(i, p, previous.get(prompt_key(p["prompt"]))) for i, p in prompts]
    matched = [(p, old) for _, p, old in olds if old is not None]
    rescored = iter(
        score(helpful, safety, [p for p, _ in matched], [o["answer"] for _, o in matched]).tolist()
    )
    by_prompt: dict[int, list[dict]] = {}
    for s_ in samples:
        by_prompt.setdefault(s_["prompt_index"], []).append(s_)
    best = []
    for i, p, old in olds:
        mine = max(by_prompt[i], key=lambda s_: s_["score"])
        row = {
            "prompt_index": i,
            "prompt": p["prompt"],
            "answer": mine["answer"],
            "score": mine["score"],
            "round": this_round,
        }
        if old is not None:
            old_score = next(rescored)
            if old_score > mine["score"]:  # an earlier winner still wins
                row |= {"answer": old["answer"], "score": old_score, "round": old.get("round", 0)}
        best.append(row)
    write_jsonl(out / "best.jsonl", best)
    return best


def evaluate_tuned(cfg: RejectionConfig, out: Path, grade: Grade | None = None) -> dict:
    """The held-out numbers of the fine-tuned model, added to eval.json as tuned_held_out_*."""
    every = read_prompts(cfg.data)
    held = [p for i, p in enumerate(every) if held_out(i)]
    path = out / "eval.json"
    quality = json.loads(path.read_text()) if path.exists() else {}
    if held:
        device = pick_device(cfg)
        tuned = load(out / "model", device=device)
        helpful, safety = _load_reward_models(cfg, device)
        after = held_out_quality(
            tuned, helpful, safety, held, cfg.max_new_tokens, cfg.sample_rows, grade
        )
        quality |= {f"tuned_{k}": v for k, v in after.items()}
        write_atomic(path, json.dumps(quality, indent=2))
    return quality


def rejection(
    cfg: RejectionConfig, out: str | Path, resume: bool = False, grade: Grade | None = None
) -> list[dict]:
    """Sample and select (once: sampling is seeded, a resumed run reuses best.jsonl), then
    fine-tune on the winners in out/sft; out/model is the tuned model."""
    out = Path(out)
    pick_device(cfg)  # there, before anything is read
    check_run(out, resume, products=("best.jsonl",))
    if not (resume and (out / "best.jsonl").exists()):
        # a failure before the samples are written (bad prompts, models...) leaves no run
        with new_run(out):
            out.mkdir(parents=True, exist_ok=True)
            write_config(out, cfg)
            best = sample_and_select(cfg, out, grade)
    else:
        write_config(out, cfg)
        best = read_jsonl_rows(out / "best.jsonl")
    data = [
        {"messages": [*b["prompt"], {"role": "assistant", "content": b["answer"]}]} for b in best
    ]
    write_jsonl(out / "sft.jsonl", data)
    tuned = stage_config(cfg, SFTConfig, data=str(out / "sft.jsonl"))
    # killed before the fine-tuning's first checkpoint: it starts afresh
    resume_sft = resume and latest_checkpoint(out / "sft") is not None
    # the loss on the selected answer only: a multi-turn prompt's history was not selected
    rows = sft(tuned, out / "sft", resume=resume_sft, encode=encode_last_answer)
    if rows:  # the fine-tuning's steps as run (set by epochs, when given), for the record
        write_config(out, dataclasses.replace(cfg, steps=max(r["step"] for r in rows)))
    link_model(out)
    if (out / "model").exists():
        evaluate_tuned(cfg, out, grade)
    return rows


def link_model(out: Path) -> None:
    """out/model -> sft/model (itself the fine-tuning's latest checkpoint), as every other
    stage's run directory has it: `llama2 generate RUN/model`, the next stage's init_from."""
    if (out / "sft" / "model").exists():
        point_link(out / "model", out / "sft" / "model")
