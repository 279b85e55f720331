"""Where the recipe writes: the run directories and files under OUT (`llama2 recipe --out
OUT`), and the world's data files the stages read (OUT/data, or any directory
`world.write_world` fills)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataFiles:
    """The world's data in one directory (world.write_world), and what the recipe makes of it.
    `kind`: helpful or safety."""

    root: Path

    @property
    def manifest(self) -> Path:  # file names and counts, the world's settings and templates
        return self.root / "world.json"

    @property
    def corpus(self) -> Path:  # the world's pretraining documents, one blank line apart
        return self.root / "corpus" / "world.txt"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.model"

    @property
    def shards(self) -> Path:  # the pretraining corpus, tokenized
        return self.root / "shards"

    @property
    def sft(self) -> Path:  # clean demonstrations
        return self.root / "sft.jsonl"

    @property
    def sft_noisy(self) -> Path:  # more demonstrations, some of them bad
        return self.root / "sft_noisy.jsonl"

    def pairs(self, kind: str) -> Path:
        """Graded comparisons of the world's answer variants."""
        return self.root / f"pairs_{kind}.jsonl"

    def sampled_pairs(self, kind: str) -> Path:
        """Graded comparisons of the SFT model's own samples (the recipe's annotate stage)."""
        return self.root / f"pairs_{kind}_sft.jsonl"

    def prompts(self, stage: str) -> Path:
        """The prompts of a sampling stage: annotate, rejection or ppo."""
        return self.root / f"prompts_{stage}.jsonl"

    @property
    def gatt(self) -> Path:  # dialogs for Ghost Attention
        return self.root / "gatt.jsonl"

    # the test columns (world.COLUMNS): "prompts" (a) and "entities" (b); read by the
    # evaluation only
    def test_items(self, column: str) -> Path:
        """Test prompts with checks."""
        return self.root / ("eval.jsonl" if column == "entities" else f"eval_{column}.jsonl")

    def test_dialogs(self, column: str) -> Path:
        """Test dialogs under an instruction (GAtt)."""
        tag = "" if column == "entities" else f"_{column}"
        return self.root / f"eval_gatt{tag}.jsonl"

    def test_pairs(self, kind: str, column: str) -> Path:
        """Test comparisons graded by the annotator, for the reward models' accuracy."""
        tag = "" if column == "entities" else f"_{column}"
        return self.root / f"eval_pairs{tag}_{kind}.jsonl"

    @property
    def valid_items(self) -> Path:  # the validation split: what stages may choose by
        return self.root / "valid.jsonl"

    @property
    def valid_dialogs(self) -> Path:
        return self.root / "valid_gatt.jsonl"

    def round_prompts(self, k: int) -> Path:
        """The prompts of RLHF round k's comparisons (round 1: prompts("annotate"))."""
        return self.prompts("annotate") if k == 1 else self.root / f"prompts_annotate{k}.jsonl"

    def red_team(self, k: int) -> Path:
        """The unsafe requests round k's policy answered unsafely, with its answers."""
        return self.root / f"redteam{k}.jsonl"

    def rejection_round_prompts(self, k: int) -> Path:
        """Rejection sampling round k's prompts: prompts("rejection") and every red-team find
        of rounds 1..k."""
        return self.root / f"prompts_rejection{k}.jsonl"

    def round_pairs(self, kind: str, k: int) -> Path:
        """Graded comparisons of round k's policy samples."""
        return self.sampled_pairs(kind) if k == 1 else self.root / f"pairs_{kind}_round{k}.jsonl"


@dataclass(frozen=True)
class RecipePaths:
    """OUT's layout. A stage's run directory is named after it (base for pretraining; sft,
    sft_noisy, rm_helpful, rm_safety, rejection1..N, ppo, gatt), each a run directory of
    llama2/train with its `model`; rm_helpful2, rm_safety2 ... hold later RLHF rounds' reward
    models."""

    out: Path

    @property
    def data(self) -> DataFiles:
        return DataFiles(self.out / "data")

    @property
    def state(self) -> Path:  # which stages are done, and the configuration
        return self.out / "recipe.json"

    def config(self, name: str) -> Path:
        """The stage config a stage ran with (`llama2 STAGE --config` reruns it)."""
        return self.out / "configs" / f"{name}.yaml"

    def run(self, name: str) -> Path:
        return self.out / name

    def rejection_rounds(self) -> list[Path]:
        """The run directories of rejection sampling's rounds (rejection1, rejection2 ...)."""
        return sorted(self.out.glob("rejection[0-9]*"))

    def model(self, name: str) -> Path:
        """A stage's model; `chat` is the final one (a link to Ghost Attention's), `rejection`
        the last round's, and PPO's and Ghost Attention's the one each kept for being best on
        the validation split (validation.select)."""
        if name == "chat":
            return self.out / "chat"
        return self.out / name / ("best" if name in ("ppo", "gatt") else "model")

    def reward_run(self, kind: str, k: int = 1) -> Path:
        """The run directory of round k's reward model (helpful or safety)."""
        return self.out / (f"rm_{kind}" if k == 1 else f"rm_{kind}{k}")

    def reward_model(self, kind: str) -> Path:
        """The latest round's reward model."""
        k = 1
        while (self.reward_run(kind, k + 1) / "model").exists():
            k += 1
        return self.reward_run(kind, k) / "model"

    @property
    def eval(self) -> Path:  # the evaluation's results, a JSON file each
        return self.out / "eval"

    def eval_result(self, name: str) -> Path:
        return self.eval / f"{name}.json"

    @property
    def report(self) -> Path:
        return self.out / "report.json"

    @property
    def report_md(self) -> Path:
        return self.out / "report.md"
