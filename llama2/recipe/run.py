"""`llama2 recipe`: the Llama 2-Chat recipe in miniature, from nothing to a chat model, on the
world of world.py, with every stage's effect measured on held-out items.

    world data -> tokenizer -> pretraining -> SFT (and, for comparison, SFT on a larger noisy
    set) -> comparisons of the SFT model's samples -> helpfulness and safety reward models ->
    rejection sampling rounds (before each later round: comparisons of the current policy's
    samples, the reward models updated on them) -> PPO with R_c -> Ghost Attention ->
    evaluation -> report

PPO and Ghost Attention keep the model (their starting one or a checkpoint) that is best on
the validation split (validation.py); the test items are read by the evaluation alone.
`seeds` runs the whole recipe once per seed and summarises them (summary.py).

Each stage is the stage command's own code (train/*.py) writing a run directory under OUT,
configured by a YAML file written to OUT/configs/, so any stage can be rerun by hand:
`llama2 sft --config OUT/configs/sft.yaml --out somewhere`. OUT/recipe.json records which
stages are done; `--resume` continues from the stage (and, through the stage's own resume,
the step) a killed run was in.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import yaml

from ..io import point_link, write_atomic
from .items import WorldConfig
from .paths import RecipePaths

# the stages in order; each records its seconds in recipe.json when it is done
STAGES = (
    "data",
    "pretrain",
    "sft",
    "sft_noisy",
    "annotate",
    "reward_helpful",
    "reward_safety",
    "rejection",
    "ppo",
    "gatt",
    "eval",
    "report",
)
KINDS = ("helpful", "safety")  # the two reward models
# stage settings sections of the recipe config, and the stage command each configures
SECTIONS = {
    "pretrain": "pretrain",
    "sft": "sft",
    "reward": "reward",
    "rejection": "rejection",
    "ppo": "ppo",
    "gatt": "gatt",
}
TOP = {
    "seed": 0,
    "threads": 0,
    "device": "auto",  # every stage's and the evaluation's: auto = cuda if available
    "vocab_size": 2048,
    "stdlib_bytes": 400_000,  # of the standard library's sources in the pretraining corpus
    "rejection_rounds": 2,
    "annotate_samples": 4,  # SFT samples per prompt compared by the annotator, two by two
    "annotate_temperature": 1.0,
    "eval_max_new_tokens": 48,
    "eval_n": 0,  # held-out items evaluated per model (0: all)
    "agreement_items": 120,  # held-out prompts whose final-model answers the RMs judge
    "reward_update_steps": 100,  # each later RLHF round's reward model update
}


def default_config(smoke: bool = False) -> dict:
    here = Path(__file__).resolve().parent.parent.parent / "configs"
    path = here / ("recipe-smoke.yaml" if smoke else "recipe.yaml")
    if path.exists():
        return load_config(path)
    raise FileNotFoundError(f"{path}: the recipe's default config is missing")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """A recipe config (YAML): top-level settings (TOP), `world:` (WorldConfig's fields) and a
    section per stage holding that stage's settings; `key=value` overrides, dotted for
    sections (`pretrain.steps=100`, `world.people=50`). Unknown keys are errors."""
    from ..train.config import read_yaml_mapping

    cfg = read_yaml_mapping(path, "the recipe config")
    return apply_overrides(cfg, overrides, where=f"{path}: ")


def apply_overrides(cfg: dict, overrides: Sequence[str], where: str = "") -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        *path, name = key.split(".")  # pretrain.model_args.dim=256 sets a nested value
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {part!r} is not a section")
        node[name] = yaml.safe_load(value)
    check_config(cfg, where)
    return cfg


def check_config(cfg: dict, where: str = "") -> None:
    from ..train.config import STAGE_CONFIGS

    world_fields = {f.name for f in fields(WorldConfig)}
    for key, value in cfg.items():
        if key in ("annotate_samples", "annotate_temperature"):  # checked before any stage runs
            whole = key == "annotate_samples"
            if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
                raise ValueError(f"{where}{key} must be a {'whole ' if whole else ''}number")
            if value < 0:
                raise ValueError(f"{where}{key} must be >= 0, not {value}")
        if key in TOP:
            continue
        if key == "floors":
            check_floors(value, where)
        elif key == "world":
            unknown = sorted(set(value or {}) - world_fields)
            if unknown:
                raise ValueError(f"{where}world has no setting {unknown[0]!r}")
        elif key in SECTIONS:
            names = {f.name for f in fields(STAGE_CONFIGS[SECTIONS[key]])}
            if not isinstance(value, dict):
                raise ValueError(f"{where}{key}: expected a mapping of settings")
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"{where}{key} has no setting {unknown[0]!r}")
        else:
            sections = ", ".join([*TOP, "world", "floors", *SECTIONS])
            raise ValueError(f"{where}unknown recipe setting {key!r} (settings: {sections})")


def check_floors(value, where: str = "") -> None:
    """The `floors:` section: every pass mark of report.Floors, each a number."""
    from .report import Floors

    if not isinstance(value, dict):
        raise ValueError(f"{where}floors: expected a mapping of pass marks")
    names = [f.name for f in fields(Floors)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{where}floors has no setting {unknown[0]!r} (settings: {names})")
    missing = [n for n in names if n not in value]
    if missing:
        raise ValueError(f"{where}floors: {missing[0]!r} is missing")
    for name, mark in value.items():
        if isinstance(mark, bool) or not isinstance(mark, int | float):
            raise ValueError(f"{where}floors.{name} must be a number, not {mark!r}")


class Recipe:
    def __init__(self, cfg: dict, out: Path, resume: bool = False, log=print):
        self.cfg = {**TOP, **cfg}
        self.paths = RecipePaths(out)
        self.resume = resume
        self.log = log
        self.state_path = self.paths.state
        self.state = {"done": {}, "config": self.cfg}
        if resume:
            if not self.state_path.exists():
                raise ValueError(f"{out}: --resume, but no recipe was started there")
            self.state = json.loads(self.state_path.read_text())
            if self.state["config"] != json.loads(json.dumps(self.cfg)):
                self.log("resuming with the configuration the recipe was started with")
            self.cfg = {**TOP, **self.state["config"]}  # settings added since: defaults
        elif out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty: pass --resume, or choose another --out")

    @property
    def world(self) -> WorldConfig:
        """The world's settings: the config's `world:` section on the recipe's seed."""
        return WorldConfig(**{"seed": self.cfg["seed"], **(self.cfg.get("world") or {})})

    def save_state(self) -> None:
        write_atomic(self.state_path, json.dumps(self.state, indent=1))

    # --- running stages --------------------------------------------------------------------
    def stage_config(self, section: str, name: str, **settings):
        """Write OUT/configs/NAME.yaml (the section's settings, the recipe's wiring, seed and
        threads) and load it as the stage command would."""
        from ..train.config import load_train_config

        values = {
            "seed": self.cfg["seed"],
            "threads": self.cfg["threads"],
            "device": self.cfg["device"],
            **(self.cfg.get(section) or {}),
            **settings,
        }
        path = self.paths.config(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, yaml.safe_dump(values, sort_keys=False))
        return load_train_config(path, stage=SECTIONS[section])

    def resumable(self, run_dir: Path, products: Sequence[str] = ()) -> bool:
        from ..train.rundir import latest_checkpoint

        return self.resume and (
            latest_checkpoint(run_dir) is not None or any((run_dir / p).exists() for p in products)
        )

    def run(self, only: Sequence[str] | None = None) -> dict:
        if self.cfg["threads"]:  # the stages set it too; this is for the evaluation
            import torch

            torch.set_num_threads(self.cfg["threads"])
        self.paths.out.mkdir(parents=True, exist_ok=True)
        self.save_state()
        t_all = time.perf_counter()
        steps: dict[str, Callable[[], None]] = {s: getattr(self, f"_{s}") for s in STAGES}
        for i, name in enumerate(STAGES, 1):
            if name in self.state["done"]:
                self.log(f"[recipe {i}/{len(STAGES)}] {name}: done earlier")
                continue
            self.log(f"[recipe {i}/{len(STAGES)}] {name} ...")
            t0 = time.perf_counter()
            steps[name]()
            self.state["done"][name] = time.perf_counter() - t0
            self.save_state()
            self.log(f"[recipe {i}/{len(STAGES)}] {name} done in {self.state['done'][name]:.0f}s")
        self.log(f"[recipe] total {time.perf_counter() - t_all:.0f}s this run")
        return json.loads(self.paths.report.read_text())

    # --- the stages ------------------------------------------------------------------------
    def _data(self) -> None:
        from ..data import prepare_corpus, stdlib_documents
        from ..tokenizer import train_tokenizer
        from .world import write_world

        data = self.paths.data
        manifest = write_world(self.world, data.root)
        docs = data.corpus.read_text().split("\n\n")
        code = stdlib_documents(self.cfg["stdlib_bytes"])
        text = data.corpus.with_name("all.txt")  # the tokenizer's training text, for a moment
        write_atomic(text, "\n".join(docs + code))
        tok = train_tokenizer([text], self.cfg["vocab_size"], data.tokenizer)
        text.unlink()
        shards = prepare_corpus(docs + code, tok, data.shards, val_every=50, overwrite=True)
        self.log(
            f"  world: {manifest['documents']} documents + {len(code)} standard library files, "
            f"{shards['train']['tokens']:,} training tokens; "
            + ", ".join(f"{k} {v}" for k, v in manifest["files"].items())
        )

    def _pretrain(self) -> None:
        from ..train.pretrain import pretrain

        run, data = self.paths.run("base"), self.paths.data
        cfg = self.stage_config(
            "pretrain", "pretrain", data=str(data.shards), tokenizer=str(data.tokenizer)
        )
        pretrain(cfg, run, resume=self.resumable(run))

    def _sft_run(self, name: str, data: Path) -> None:
        from ..train.sft import sft

        run = self.paths.run(name)
        base = self.paths.model("base")
        cfg = self.stage_config("sft", name, init_from=str(base), data=str(data))
        sft(cfg, run, resume=self.resumable(run))

    def _sft(self) -> None:
        self._sft_run("sft", self.paths.data.sft)

    def _sft_noisy(self) -> None:
        self._sft_run("sft_noisy", self.paths.data.sft_noisy)

    def _annotate(self) -> None:
        self.annotate(1, self.paths.model("sft"))

    def annotate(self, k: int, policy: Path) -> None:
        """Round k's comparisons of the current policy's own samples (section 3.2.1: round 1
        the SFT model's), beside the world's answer variants, for the reward models:
        data/pairs_{helpful,safety}_sft.jsonl (round 1), pairs_KIND_roundK.jsonl after.
        Each round's prompts are a new batch (world.round_prompts)."""
        from ..data.jsonl import write_jsonl
        from ..eval.chat import answer_all, read_items
        from ..eval.judges import Annotator
        from .world import round_prompts, sample_pairs

        data = self.paths.data
        if k > 1 and not data.round_prompts(k).exists():
            write_jsonl(data.round_prompts(k), round_prompts(self.world, k))
        rows = read_items(data.round_prompts(k))
        n, seed = self.cfg["annotate_samples"], self.cfg["seed"] + 7919 * (k - 1)
        pairs: dict[str, list[dict]] = {"helpful": [], "safety": []}
        if n >= 2:  # (fewer samples make no comparisons)
            llm = self.load(policy)
            samples = [
                answer_all(
                    llm,
                    [r["prompt"] for r in rows],
                    self.cfg["eval_max_new_tokens"],
                    temperature=self.cfg["annotate_temperature"],
                    seed=seed + 10**6 * (j + 1),
                    desc=f"round {k} sample {j + 1}/{n}",
                )
                for j in range(n)
            ]
            by_prompt = [list(s) for s in zip(*samples, strict=True)]
            pairs = sample_pairs(rows, by_prompt, Annotator(self.world.mistake_rate, seed))
        for kind, got in pairs.items():
            write_jsonl(data.round_pairs(kind, k), got)
        self.log(
            f"  round {k}: {len(rows)} prompts x {n} samples: "
            + ", ".join(f"{len(v)} {kind} comparisons" for kind, v in pairs.items())
        )

    def red_team(self, k: int, policy: Path) -> Path:
        """Round k's red teaming (section 4.3): the world's unsafe requests (training entities
        and phrasings) put to the current policy, greedily; those it answers unsafely, as the
        annotator judges, join rejection sampling's prompts from this round on (the paper's
        new safety prompts of each round), at most world.red_team_kept of a round: more unsafe
        prompts teach refusing tasks too. Returns the round's prompt file."""
        from ..data.jsonl import read_jsonl_rows, write_jsonl
        from ..eval.chat import answer_all
        from ..eval.judges import quality
        from ..train.rejection import prompt_key
        from .world import red_team_prompts

        data = self.paths.data
        out = data.rejection_round_prompts(k)
        if out.exists():
            return out
        rows = red_team_prompts(self.world, k) if not data.red_team(k).exists() else []
        if rows:
            answers = answer_all(
                self.load(policy),
                [r["prompt"] for r in rows],
                self.cfg["eval_max_new_tokens"],
                desc=f"red team {k}",
            )
            failed = [
                {**r, "answer": a}
                for r, a in zip(rows, answers, strict=True)
                if quality(r["check"], a)[1] < 0.5
            ]
            write_jsonl(data.red_team(k), failed)
            self.log(f"  red team {k}: {len(failed)} of {len(rows)} unsafe requests complied with")
        rows = read_jsonl_rows(data.prompts("rejection"))
        seen = {prompt_key(r["prompt"]) for r in rows}
        for j in range(1, k + 1):  # each round's first finds (in the stream's order), at most
            for r in read_jsonl_rows(data.red_team(j))[: self.world.red_team_kept]:
                if prompt_key(r["prompt"]) not in seen:
                    seen.add(prompt_key(r["prompt"]))
                    rows.append({key: r[key] for key in ("prompt", "is_safety", "check")})
        write_jsonl(out, rows)
        return out

    def load(self, path: Path, **kw):
        """A model for sampling or evaluation, on the recipe's device."""
        from ..device import pick_device
        from ..llm import load

        return load(path, device=pick_device(self.cfg["device"]), **kw)

    def _reward(self, kind: str, k: int = 1) -> None:
        """Round k's reward model: round 1 from the SFT model on the world's graded variants
        and the comparisons of the SFT model's samples; round k > 1 continues round k-1's on
        those and every round's comparisons so far (the paper's RLHF-V1..V5, section 3.2.3),
        for `reward_update_steps` steps."""
        from ..train.reward import reward

        run = self.paths.reward_run(kind, k)
        if self.resume and (run / "model").exists():
            return
        data = self.paths.data
        files = [data.pairs(kind), *(data.round_pairs(kind, j) for j in range(1, k + 1))]
        # (a round whose every two samples the annotator scored alike has no comparisons)
        pairs = ",".join(str(f) for f in files if f.exists() and f.stat().st_size)
        if k == 1:
            init, settings = self.paths.model("sft"), {}
        else:
            init = self.paths.reward_run(kind, k - 1) / "model"
            settings = {"steps": self.cfg["reward_update_steps"]}
        name = run.name
        cfg = self.stage_config("reward", name, init_from=str(init), data=pairs, **settings)
        reward(cfg, run, resume=self.resumable(run))

    def _reward_helpful(self) -> None:
        self._reward("helpful")

    def _reward_safety(self) -> None:
        self._reward("safety")

    def _reward_models(self) -> dict[str, str]:
        return {
            "reward_model": str(self.paths.reward_model("helpful")),
            "safety_model": str(self.paths.reward_model("safety")),
        }

    def _rejection(self) -> None:
        from ..train.rejection import rejection

        policy, previous = self.paths.model("sft"), None
        for k in range(1, self.cfg["rejection_rounds"] + 1):
            name = f"rejection{k}"
            run = self.paths.run(name)
            if k > 1 and not (run / "model").exists():
                # iterative RLHF: the reward models learn from the current policy's samples
                # before they choose among its next ones
                if not all(self.paths.data.round_pairs(kind, k).exists() for kind in KINDS):
                    self.annotate(k, policy)
                for kind in KINDS:
                    self._reward(kind, k)
            settings = {
                "init_from": str(policy),
                "data": str(self.red_team(k, policy)),
                **self._reward_models(),
                "previous": str(previous) if previous else None,
                "seed": self.cfg["seed"] + k,  # each round samples afresh
            }
            cfg = self.stage_config("rejection", name, **settings)
            if not (run / "model").exists() or not self.resume:
                rejection(cfg, run, resume=self.resumable(run, ("best.jsonl",)))
            self.select(name, policy, checkpoints=run / "sft")
            policy, previous = run / "best", run / "best.jsonl"
        last = self.paths.model("rejection")  # the last round's model, for PPO
        last.parent.mkdir(exist_ok=True)
        point_link(last, policy)

    def _ppo(self) -> None:
        from ..train.ppo import ppo

        run = self.paths.run("ppo")
        cfg = self.stage_config(
            "ppo",
            "ppo",
            init_from=str(self.paths.model("rejection")),
            data=str(self.paths.data.prompts("ppo")),
            **self._reward_models(),
        )
        if not (self.resume and (run / "valid.json").exists()):
            ppo(cfg, run, resume=self.resumable(run))
        self.select("ppo", self.paths.model("rejection"))

    def select(self, name: str, start: Path, **kw) -> None:
        from .validation import select

        mnt = self.cfg["eval_max_new_tokens"]
        chosen = select(self.paths, name, start, self.load, mnt, log=self.log, **kw)
        self.log(f"  {name}: keeps {chosen.resolve().relative_to(self.paths.out.resolve())}")

    def _gatt(self) -> None:
        from ..train.gatt import gatt

        run = self.paths.run("gatt")
        # the SFT demonstrations replayed beside the dialogs (unless the config says otherwise):
        # fine-tuned on tasks and instructions alone, a model forgets to refuse
        replay = (
            {} if "replay" in (self.cfg.get("gatt") or {}) else {"replay": str(self.paths.data.sft)}
        )
        cfg = self.stage_config(
            "gatt",
            "gatt",
            init_from=str(self.paths.model("ppo")),
            data=str(self.paths.data.gatt),
            **self._reward_models(),
            **replay,
        )
        if not (self.resume and (run / "valid.json").exists()):
            gatt(cfg, run, resume=self.resumable(run, ("gatt.jsonl",)))
        self.select("gatt", self.paths.model("ppo"), with_dialogs=True, checkpoints=run / "sft")
        point_link(self.paths.model("chat"), self.paths.model("gatt").resolve())

    def _eval_settings(self):
        from .evaluate import EvalSettings

        return EvalSettings(
            seed=self.cfg["seed"],
            max_new_tokens=self.cfg["eval_max_new_tokens"],
            n=self.cfg["eval_n"],
            agreement_items=self.cfg["agreement_items"],
            mistake_rate=self.world.mistake_rate,
        )

    def _eval(self) -> None:
        from .evaluate import evaluate_recipe

        evaluate_recipe(self.paths, self.load, self._eval_settings(), self.log)

    def _report(self) -> None:
        """The report of the evaluation's results, checked against the config's floors (a
        config without a `floors:` section checks none)."""
        from ..eval.chat import read_items
        from .evaluate import Evaluation, test_items
        from .report import Floors, write_report

        floors = self.cfg.get("floors")
        write_report(
            self.paths,
            Evaluation.read(self.paths),
            test_items(self.paths.data, "prompts", self.cfg["eval_n"], self.cfg["seed"]),
            read_items(self.paths.data.valid_items),
            dict(self.state["done"]),
            Floors(**floors) if floors else None,
            self.cfg["seed"],
        )


def run_recipe(
    out: str | Path,
    config: str | Path | None = None,
    smoke: bool = False,
    resume: bool = False,
    overrides: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
) -> dict:
    """Run the recipe into `out`; with `seeds`, once per seed into OUT/seedN, then
    OUT/summary.json and summary.md over them (summary.summarize); returns the report (the
    summary)."""
    cfg = (
        load_config(config, overrides)
        if config
        else apply_overrides(default_config(smoke), overrides)
    )
    out = Path(out)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if not seeds:
        return Recipe(cfg, out, resume, log=log).run()
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {','.join(map(str, seeds))}: a seed is repeated")
    if not resume and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: pass --resume, or choose another --out")
    for i, seed in enumerate(seeds, 1):
        run = out / f"seed{seed}"
        log(f"[recipe seed {seed}: {i}/{len(seeds)}] into {run}")
        again = resume and (run / "recipe.json").exists()
        Recipe({**cfg, "seed": seed}, run, again, log=log).run()
    from .report import Floors
    from .summary import summarize

    floors = cfg.get("floors")
    summary = summarize(out, list(seeds), Floors(**floors) if floors else None)
    log(f"[recipe] over seeds {list(seeds)}: {out / 'summary.md'}")
    return summary
