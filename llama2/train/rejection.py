"""Rejection sampling fine-tuning (Llama 2, section 3.2.3): K answers per prompt from the
current policy, each scored by the reward model(s); the best per prompt is kept, competing
with the best of all earlier rounds, and the policy is fine-tuned on the winners (SFT, with
the loss on the winning answer only).

One prompt in ten is held out (data/split.py): not sampled for training, but answered
greedily by the policy before and after the fine-tuning, to measure the reward and, where
prompts carry a `check`, the task quality (so that a reward model being gamed shows).

The run directory holds config.yaml, samples.jsonl (every answer and its score), best.jsonl
(the winner per prompt, with its score and round), sft.jsonl (the winners as SFT data, less
those a safety model deems unsafe: fine_tuning_rows), eval.json (the mean reward and graded
quality of the samples and of the held-out answers), sft/ (the fine-tuning run, a run
directory of its own) and model -> sft/model.

Under `torchrun` the generation batches and the scoring batches are dealt out to the ranks
(batch b to rank b % N; each rank holds whole models, sampling being inference) and
gathered in prompt order: the batches and their seeds are those of one process, so the
samples and best.jsonl do not depend on N. The main process writes the files and runs the
held-out evaluations; the fine-tuning runs on every rank (FSDP2, as sft does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from ..data.jsonl import read_jsonl, read_jsonl_rows, read_prompts, write_jsonl
from ..data.sft import encode_last_answer
from ..data.split import derive_seed, held_out
from ..device import pick_device
from ..eval.grading import Grade, Reward, graded_means, grader, held_out_quality
from ..formats import DialogError
from ..io import write_atomic
from ..llm import Llama, load
from .config import RejectionConfig, SFTConfig, stage_config
from .loop import Dist, map_shards, setup_distributed
from .rundir import check_run, latest_checkpoint, link_model, new_run, write_config
from .scoring import deemed_unsafe, load_reward_models, score
from .sft import sft


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


def _reward(helpful: Llama, safety: Llama | None) -> Reward:
    """score() with these reward models, as held_out_quality takes it."""
    return lambda prompts, answers: score(helpful, safety, prompts, answers)


# answers per scoring batch: score_answers' batch, so that a batch is scored as in one call
SCORE_ROWS = 16


def sample_answers(
    policy: Llama, prompts: list[dict], cfg: RejectionConfig, d: Dist | None = None
) -> list[list[str]]:
    """K sampled answers per prompt. Each generation batch holds several prompts' K rows
    (about `sample_rows` rows); batch b is seeded with derive_seed(seed, "samples", b) and its
    row j draws from that seed + j (generation.py), so the samples are a function of the
    seed, the prompt file and these settings (not of the number of processes `d` that share
    the batches)."""
    d = d or Dist()
    K = cfg.samples_per_prompt
    per = max(1, cfg.sample_rows // K)  # prompts per batch
    starts = range(d.rank * per, len(prompts), per * d.world)  # this rank's batches
    mine = sum(min(per, len(prompts) - s) for s in starts)

    def sample(b: int, chunk: list[dict]) -> list[list[str]]:
        outs = policy.chat(
            [p["prompt"] for p in chunk for _ in range(K)],
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=derive_seed(cfg.seed, "samples", b),
        )
        bar.update(len(chunk))
        return [[o.text for o in outs[i * K : (i + 1) * K]] for i in range(len(chunk))]

    with tqdm(total=mine, desc="sampling", unit="prompt", disable=not d.main) as bar:
        return map_shards(sample, prompts, per, d)


def score_sharded(
    helpful: Llama, safety: Llama | None, prompts: list[dict], answers: list[str], d: Dist
) -> list[float]:
    """score() of the answers, its batches dealt out to the ranks (the same batches as one
    call in one process), gathered in order on every rank."""

    def run(_: int, chunk: list) -> list[float]:
        return score(helpful, safety, [p for p, _ in chunk], [a for _, a in chunk]).tolist()

    return map_shards(run, list(zip(prompts, answers, strict=True)), SCORE_ROWS, d)


def sample_and_select(
    cfg: RejectionConfig, out: Path, grade: Grade | None = None, d: Dist | None = None
) -> list[dict]:
    """Sample, score and select; returns the best per training prompt (also written to
    best.jsonl). Every input (prompts, the earlier round, the models) is read and checked
    before the first sample. `grade(check, answer)`: llama2.eval.judges.grade by default.
    `d`: the processes sharing the sampling and scoring (every one returns the best; the
    main one writes the files and runs the held-out evaluation)."""
    d = d or Dist()
    if not (cfg.init_from and cfg.data and cfg.reward_model):
        raise ValueError("rejection needs init_from=POLICY, data=PROMPTS.jsonl, reward_model=RM")
    every = read_prompts(cfg.data)
    previous = read_previous(cfg.previous) if cfg.previous else {}
    grade = grader(every, grade)
    # (index in the file, prompt): training prompts are sampled, held-out ones evaluated
    prompts = [(i, p) for i, p in enumerate(every) if not held_out(i)]
    held = [p for i, p in enumerate(every) if held_out(i)]
    device = pick_device(cfg.device)
    policy = load(cfg.init_from, device=device)
    helpful, safety = load_reward_models(cfg.reward_model, cfg.safety_model, device)
    K = cfg.samples_per_prompt
    answers = sample_answers(policy, [p for _, p in prompts], cfg, d)
    flat = [p for _, p in prompts for _ in range(K)]
    r = score_sharded(helpful, safety, flat, [a for group in answers for a in group], d)
    samples = []
    for n, ((i, _), group) in enumerate(zip(prompts, answers, strict=True)):
        for k, a in enumerate(group):
            samples.append({"prompt_index": i, "sample": k, "answer": a, "score": r[n * K + k]})
    if d.main:
        write_jsonl(out / "samples.jsonl", samples)
        quality = {"samples_reward": sum(r) / max(1, len(r))}
        graded = graded_means(flat, [s["answer"] for s in samples], grade)
        quality |= {f"samples_{k}": v for k, v in graded.items()}
        quality |= held_out_quality(
            policy, held, cfg.max_new_tokens, _reward(helpful, safety), cfg.sample_rows, grade
        )
        write_atomic(out / "eval.json", json.dumps(quality, indent=2))
    this_round = 1 + max((r.get("round", 0) for r in previous.values()), default=-1)
    # an earlier round's winner competes again, matched by its prompt (a prompt file may be
    # reordered or edited between rounds) and rescored by today's reward model(s): the
    # paper's reward models change between rounds, so its stored score is stale
    olds = [(i, p, previous.get(prompt_key(p["prompt"]))) for i, p in prompts]
    matched = [(p, old) for _, p, old in olds if old is not None]
    rescored = iter(
        score_sharded(
            helpful, safety, [p for p, _ in matched], [o["answer"] for _, o in matched], d
        )
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
            "is_safety": p["is_safety"],
        }
        if old is not None:
            old_score = next(rescored)
            if old_score > mine["score"]:  # an earlier winner still wins
                row |= {"answer": old["answer"], "score": old_score, "round": old.get("round", 0)}
        best.append(row)
    if d.main:
        write_jsonl(out / "best.jsonl", best)
    d.barrier()
    return best


def fine_tuning_rows(cfg: RejectionConfig, best: list[dict]) -> list[dict]:
    """The winners as chat examples. With a safety model, a safety prompt's winner (scored by
    the safety model alone, R_c's rule) is left out when the model deems it unsafe (its
    probability of being safe below `safety_floor`): when none of the K samples refuses an
    unsafe request, the best of them still complies, and fine-tuning on it teaches compliance."""
    return [
        {"messages": [*b["prompt"], {"role": "assistant", "content": b["answer"]}]}
        for b in best
        if not (
            cfg.safety_model and b.get("is_safety") and deemed_unsafe(b["score"], cfg.safety_floor)
        )
    ]


def evaluate_tuned(cfg: RejectionConfig, out: Path, grade: Grade | None = None) -> dict:
    """The held-out numbers of the fine-tuned model, added to eval.json as tuned_held_out_*."""
    every = read_prompts(cfg.data)
    held = [p for i, p in enumerate(every) if held_out(i)]
    path = out / "eval.json"
    quality = json.loads(path.read_text()) if path.exists() else {}
    if held:
        device = pick_device(cfg.device)
        tuned = load(out / "model", device=device)
        helpful, safety = load_reward_models(cfg.reward_model, cfg.safety_model, device)
        after = held_out_quality(
            tuned, held, cfg.max_new_tokens, _reward(helpful, safety), cfg.sample_rows, grade
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
    device = pick_device(cfg.device)  # there, before anything is read
    check_run(out, resume, products=("best.jsonl",))
    d = setup_distributed(device)
    if not (resume and (out / "best.jsonl").exists()):
        # a failure before the samples are written (bad prompts, models...) leaves no run
        with new_run(out) if d.main else nullcontext():
            if d.main:
                out.mkdir(parents=True, exist_ok=True)
                write_config(out, cfg)
            d.barrier()
            best = sample_and_select(cfg, out, grade, d)
    else:
        if d.main:
            write_config(out, cfg)
        best = read_jsonl_rows(out / "best.jsonl")
    data = fine_tuning_rows(cfg, best)
    if d.main:
        if len(data) < len(best):
            print(
                f"{len(best) - len(data)} of {len(best)} best answers left out: answers to "
                f"safety prompts the safety model deems unsafe (p < {cfg.safety_floor})"
            )
        write_jsonl(out / "sft.jsonl", data)
    d.barrier()
    tuned = stage_config(cfg, SFTConfig, data=str(out / "sft.jsonl"))
    # killed before the fine-tuning's first checkpoint: it starts afresh
    resume_sft = resume and latest_checkpoint(out / "sft") is not None
    # the loss on the selected answer only: a multi-turn prompt's history was not selected
    rows = sft(tuned, out / "sft", resume=resume_sft, encode=encode_last_answer)
    if d.main:
        if rows:  # the fine-tuning's steps as run (set by epochs, when given), for the record
            write_config(out, dataclasses.replace(cfg, steps=max(r["step"] for r in rows)))
        link_model(out)
        if (out / "model").exists():
            evaluate_tuned(cfg, out, grade)
    d.barrier()
    return rows
