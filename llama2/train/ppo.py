"""PPO (Llama 2, section 3.2.3): the policy samples answers, the reward model(s) score them,
and the policy is pushed toward higher reward while a per-token KL penalty keeps it near its
initial self.

Reward: R_c (the safety score for safety prompts or below 0.15, else helpfulness), kept as
the reward model's raw logit and whitened over the batch (unless fewer than two distinct
scores: see losses.whiten_scores), on the last token; minus beta * KL(policy || reference) on
every token. Advantages by GAE from a value model initialised from the reward model; the
clipped surrogate and clipped value losses over minibatches; a constant learning rate.
Per iteration, metrics.jsonl gets reward (the mean raw R_c), kl (the k3 estimate, never
negative; kl_logratio: the k1 sum the penalty uses), entropy, response length and clip
fraction; at iteration 0 (a row of step 0, the starting point) and every `eval_every`, the
greedy answers to held-out prompts give held_out_reward (their mean R_c, which stops the run
after `patience` evaluations without improvement) and, for prompts with a `check`, the mean
of each number the grader gives (held_out_task_accuracy, ...). Checkpoints
(policy, value model, optimizer, RNG, iteration) are atomic and a killed run resumes to the
same metrics.

Under `torchrun` every model is sharded with FSDP2 (a block per unit, as the training loop
does). The iteration's prompts are drawn as in one process and cut by index, each rank
sampling its rows with the row seeds one process would use; the rollouts are gathered, so
that rewards, whitening and advantages are computed over the global batch, and each
minibatch of the global permutation is cut among the ranks, each rank's loss weighted by
its share of the minibatch's answer tokens (the gradients FSDP averages are then those of
one process). Checkpoints are torch.distributed.checkpoint states: a run stopped with N
processes resumes with M.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import save_hf
from ..data.jsonl import read_prompts
from ..data.split import derive_seed, split_held_out
from ..eval.grading import Grade, grader, held_out_quality
from ..formats import encode_chat
from ..llm import Llama, load
from . import rundir
from .config import PPOConfig
from .loop import (
    Dist,
    autocast_dtype,
    check_finite,
    gathered,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    setup_distributed,
    shard_model,
)
from .losses import gae, per_token_kl, per_token_kl_k3, ppo_policy_loss, ppo_rewards, ppo_value_loss
from .scoring import load_reward_models, score


def token_logprobs(
    model: nn.Module, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of each next token and the entropy at each position: [B, L-1] each, under the
    distribution the answers were sampled from: the logits divided by the temperature, as
    generation.sample does (else every ratio and KL of the update is off-policy)."""
    if temperature <= 0:
        raise ValueError(f"PPO needs a sampling temperature > 0, got {temperature}")
    logits = model(tokens[:, :-1]).float() / temperature
    logp_all = F.log_softmax(logits, -1)
    logp = torch.gather(logp_all, 2, tokens[:, 1:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


class PPO:
    def __init__(
        self,
        cfg: PPOConfig,
        device: torch.device | str = "cpu",
        grade: Grade | None = None,
        d: Dist | None = None,
    ):
        if not (cfg.init_from and cfg.data and cfg.reward_model):
            raise ValueError("ppo needs init_from=POLICY, data=PROMPTS.jsonl, reward_model=RM")
        self.d = d = d or Dist()
        if d.world > 1 and (cfg.minibatch % d.world or cfg.batch_size % cfg.minibatch):
            raise ValueError(
                f"batch_size={cfg.batch_size}, minibatch={cfg.minibatch}: with {d.world} "
                "processes, minibatch must be a multiple of the number of processes and "
                "batch_size a multiple of minibatch (each rank takes an equal share)"
            )
        self.cfg, self.device = cfg, torch.device(device)
        prompts = read_prompts(cfg.data)  # checked before any model is loaded
        self.grade = grader(prompts, grade)

        def fp32(path):
            return load(path, dtype=torch.float32, device=device)

        self.policy: Llama = fp32(cfg.init_from)
        self.reference = fp32(cfg.init_from).model.requires_grad_(False)
        self.helpful, self.safety = load_reward_models(cfg.reward_model, cfg.safety_model, device)
        value = fp32(cfg.reward_model)  # the value model starts as the RM
        self.value = value.model
        self.value_config = value.config
        if d.world > 1:
            rms = [rm.model for rm in (self.helpful, self.safety) if rm is not None]
            for m in (self.policy.model, self.reference, self.value, *rms):
                shard_model(m, m.layers)
        self.prompts, self.held_out = split_held_out(prompts)
        self.both = nn.ModuleDict({"policy": self.policy.model, "value": self.value})
        self.optim = make_optimizer(self.both, cfg)
        amp = autocast_dtype("auto", self.device)  # bf16 on CUDA; fp32 on the CPU
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else nullcontext
        )

    def share(self, n: int) -> slice:
        """This rank's rows of n (n a multiple of the number of processes)."""
        per = n // self.d.world
        return slice(self.d.rank * per, (self.d.rank + 1) * per)

    @torch.no_grad()
    def rollout(self, it: int) -> dict:
        cfg, tok = self.cfg, self.policy.tokenizer
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "prompts", it))
        idx = torch.randint(0, len(self.prompts), (cfg.batch_size,), generator=g).tolist()
        batch = [self.prompts[i] for i in idx]
        mine = self.share(len(batch))
        dialogs = [p["prompt"] for p in batch[mine]]
        # row i of the global batch draws from seed + i (generation.py), on whichever rank
        seed = derive_seed(cfg.seed, "rollouts", it) + mine.start
        with gathered(self.policy.model), self.autocast():
            outs = self.policy.chat(
                dialogs, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed
            )
        seqs, masks = [], []
        for d, o in zip(dialogs, outs, strict=True):
            prompt = encode_chat(tok, d)
            answer = o.token_ids + ([tok.eos_id] if o.finish_reason == "stop" else [])
            answer = answer or [tok.eos_id]
            seqs.append(prompt + answer)
            masks.append([0.0] * len(prompt) + [1.0] * len(answer))
        seqs, masks = self.gather_lists(seqs), self.gather_lists(masks)
        width = max(map(len, seqs))
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width)
        for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
            tokens[i, : len(s)] = torch.tensor(s)
            mask[i, : len(m)] = torch.tensor(m)
        mask = mask[:, 1:]  # aligned with the next-token log-probs
        on = tokens[mine].to(self.device)  # this rank's rows, padded to the global width
        # the models run on the device; rewards and advantages are computed on the CPU, over
        # the global batch (every rank the same numbers)
        with self.autocast():
            logp = self.gather_rows(token_logprobs(self.policy.model, on, cfg.temperature)[0])
            ref = self.gather_rows(token_logprobs(self.reference, on, cfg.temperature)[0])
            values = self.gather_rows(self.value(on[:, :-1])[..., 0].float()) * mask
            r_c = self.gather_rows(self.reward(batch[mine], [o.text for o in outs]))
        # the penalty: k1 = log pi - log pi_ref per token, the paper's (losses.per_token_kl);
        # the KL logged: k3, never negative (losses.per_token_kl_k3)
        kl = per_token_kl(logp, ref) * mask
        kl_k3 = per_token_kl_k3(logp, ref) * mask
        rewards = ppo_rewards(r_c, kl, mask, self.cfg.kl_beta)
        adv, returns = gae(rewards, values, mask, gamma=1.0, lam=self.cfg.gae_lambda)
        flat = adv[mask.bool()]
        adv = (adv - flat.mean()) / (flat.std(unbiased=False) + 1e-8) * mask
        return {
            "tokens": tokens,
            "mask": mask,
            "logp": logp * mask,
            "values": values,
            "adv": adv,
            "returns": returns,
            "r_c": r_c,
            "rewards": rewards,
            "kl": kl,
            "kl_k3": kl_k3,
        }

    def gather_lists(self, rows: list) -> list:
        """Every rank's rows, in rank order (the global batch's order)."""
        if self.d.world == 1:
            return rows
        parts: list = [None] * self.d.world
        dist.all_gather_object(parts, rows)
        return [r for part in parts for r in part]

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of a tensor (the same shape on each), in rank order, on the CPU."""
        if self.d.world == 1:
            return t.cpu()
        t = t.to(self.device).contiguous()  # (NCCL gathers device tensors)
        parts = [torch.empty_like(t) for _ in range(self.d.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts).cpu()

    _UPDATE_KEYS = ("tokens", "mask", "logp", "adv", "values", "returns")

    def update(self, ro: dict, it: int) -> dict:
        cfg, d = self.cfg, self.d
        B = ro["tokens"].shape[0]
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatches", it))
        stats = {"policy_loss": [], "value_loss": [], "clip_frac": [], "entropy": []}
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(B, generator=g).split(cfg.minibatch):
                part = {
                    k: ro[k][mb[self.share(len(mb))]].to(self.device) for k in self._UPDATE_KEYS
                }
                m = part["mask"]
                with self.autocast():
                    logp, entropy = token_logprobs(
                        self.policy.model, part["tokens"], cfg.temperature
                    )
                    values = self.value(part["tokens"][:, :-1])[..., 0].float()
                pl, frac = ppo_policy_loss(logp, part["logp"], part["adv"], m, cfg.clip)
                vl = ppo_value_loss(values, part["values"], part["returns"], m, cfg.clip)
                loss = pl + cfg.value_coef * vl
                ent = (entropy * m).sum() / m.sum().clamp(min=1)
                numbers = [pl, vl, frac, ent, loss]
                if d.world > 1:
                    # the minibatch's token mean = the sum over ranks of each rank's mean
                    # times its share of the tokens; FSDP averages the gradients over ranks
                    weight = m.sum() / ro["mask"][mb].sum().clamp(min=1).to(self.device)
                    (loss * weight * d.world).backward()
                    numbers = torch.stack([x.detach().float() for x in numbers]) * weight
                    dist.all_reduce(numbers)
                else:
                    loss.backward()
                norm = nn.utils.clip_grad_norm_(self.both.parameters(), cfg.grad_clip)
                if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
                    norm = norm.full_tensor()
                pl, vl, frac, ent, total = (float(x.detach()) for x in numbers)
                check_finite(it + 1, total, float(norm), "iteration")
                self.optim.step()
                self.optim.zero_grad(set_to_none=True)
                for k, v in zip(stats, (pl, vl, frac, ent), strict=True):
                    stats[k].append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """held_out_reward and held_out_<graded key>s of greedy answers to the held-out
        prompts ({} without any). Under torchrun every rank answers them all (the same
        answers), so that the sharded reward models see the same forward passes."""
        with gathered(self.policy.model), self.autocast():
            return held_out_quality(
                self.policy, self.held_out, self.cfg.max_new_tokens, self.reward, grade=self.grade
            )

    def reward(self, prompts: list[dict], answers: list[str]) -> torch.Tensor:
        """Each answer's raw R_c (helpfulness alone without a safety model)."""
        return score(self.helpful, self.safety, prompts, answers)

    # --- checkpoints ---------------------------------------------------------------------

    def save(self, out: Path, it: int, extra: dict) -> None:
        """The policy and value model (HF directories `model` and `value`), and the sharded
        state of both and of the optimizer (torch.distributed.checkpoint), via the loop's
        save_checkpoint."""
        tok = self.policy.tokenizer

        def save_models(full: dict, path: Path) -> None:
            def part(prefix: str) -> dict:
                return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}

            save_hf(path, self.policy.config, part("policy."), tok)
            save_hf(path.with_name("value"), self.value_config, part("value."), tok, head="score")

        stage = SimpleNamespace(save_model=save_models)
        save_checkpoint(out, it, self.both, self.optim, None, stage, self.cfg, self.d, extra)

    def restore(self, ckpt: Path) -> dict:
        """The iteration, best and bad counters of a checkpoint, its models and optimizer
        state loaded (on any number of processes)."""
        it = load_checkpoint(ckpt, self.both, self.optim, None)
        state = torch.load(ckpt / "trainer.pt", weights_only=True)
        return {"step": it, "best": state["best"], "bad": state["bad"]}


# the reward plot's curves
CURVES = {
    "reward": "reward (R_c)",
    "held_out_reward": "held-out reward",
    "kl": "KL to the reference (k3)",
    "held_out_task_accuracy": "held-out task accuracy",
    "held_out_safety_violation": "held-out safety violations",
    "held_out_false_refusal": "held-out false refusals",
}


def ppo(
    cfg: PPOConfig, out: str | Path, resume: bool = False, grade: Grade | None = None
) -> list[dict]:
    """Run (or resume) PPO into `out`; `grade(check, answer)` judges held-out answers
    (llama2.eval.judges.grade by default, used only for prompts with a check)."""
    out = Path(out)
    device, ckpt = rundir.start_run(out, cfg, resume)
    d = setup_distributed(device)
    # the prompts and models checked before the run directory
    with rundir.new_run(out) if d.main else nullcontext():
        torch.manual_seed(cfg.seed)
        run = PPO(cfg, device, grade, d)
        state = {"step": 0, "best": float("-inf"), "bad": 0}
        if ckpt is not None:
            state = run.restore(ckpt)
        start, best, bad = state["step"], state["best"], state["bad"]
        log = rundir.RunLog(out, cfg, start, ckpt, desc="ppo", unit="iteration", main=d.main)
    with log:
        log.first(run.evaluate)  # (not counted for patience)
        stopped = [any(m.get("early_stop") for m in log.rows)]  # (the main process's rows)
        if d.world > 1:
            dist.broadcast_object_list(stopped, src=0)
        stopped = stopped[0]
        for it in range(start, cfg.steps):
            if stopped:
                break
            ro = run.rollout(it)
            row = {
                "step": it + 1,
                "reward": float(ro["r_c"].mean()),
                "kl": float(ro["kl_k3"].sum(-1).mean()),
                "kl_logratio": float(ro["kl"].sum(-1).mean()),
                "response_length": float(ro["mask"].sum(-1).mean()),
            }
            row |= run.update(ro, it)
            if rundir.due(it + 1, cfg.eval_every, cfg.steps):
                row |= run.evaluate()
                held = row.get("held_out_reward", math.nan)
                if held > best:
                    best, bad = held, 0
                else:
                    bad += 1
                if cfg.patience and bad >= cfg.patience:
                    row["early_stop"] = stopped = True
            log.log(row, reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.3f}")
            if rundir.due(it + 1, cfg.ckpt_every, cfg.steps) or stopped:
                run.save(out, it + 1, {"best": best, "bad": bad})
                if d.main:
                    rundir.plot_metrics(log.rows, out / "reward.png", CURVES, ylabel="")
    return log.rows
