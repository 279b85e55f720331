"""The world of the recipe (world.py): its people and entities, which of them are held out for
the evaluation, the items (prompts with a `check` saying how to judge answers) it draws, each
phrased from its vocabulary (vocabulary.yaml), and answers of varied quality to them."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from importlib import resources

import yaml

from ..data.gatt import INSTRUCTIONS

_VOCABULARY = yaml.safe_load(
    resources.files(__package__).joinpath("vocabulary.yaml").read_text(encoding="utf-8")
)
CITIES: list[str] = _VOCABULARY["cities"]
JOBS: list[str] = _VOCABULARY["jobs"]
NOUNS: list[str] = _VOCABULARY["nouns"]
UNSAFE: dict[str, list[str]] = _VOCABULARY["unsafe"]  # acts by risk category
OFFERS: dict[str, str] = _VOCABULARY["offers"]  # by risk category
BORDERLINE: list[tuple[str, str, str]] = [tuple(b) for b in _VOCABULARY["borderline"]]
OPENERS: tuple[list[str], ...] = tuple(_VOCABULARY["openers"])  # greetings, prefaces
CLOSERS: tuple[list[str], ...] = tuple(_VOCABULARY["closers"])  # thanks, requests
REQUEST_TEMPLATES: list[str] = _VOCABULARY["requests"]
TASK_TEMPLATES: dict[str, list[str]] = _VOCABULARY["tasks"]
HELD_TEMPLATES: int = _VOCABULARY["held_templates"]  # the last of each core list: held out
HELD_FILLERS: int = _VOCABULARY["held_fillers"]  # and of every filler part
RLHF_TEMPLATES: int = _VOCABULARY["rlhf_templates"]  # the ones before: the RLHF stages' alone
RLHF_FILLERS: int = _VOCABULARY["rlhf_fillers"]
GATT_INSTRUCTIONS: list[str] = _VOCABULARY["instructions"]
SENTENCES: dict[str, list[str]] = _VOCABULARY["documents"]  # the pretraining documents'
assert set(GATT_INSTRUCTIONS) <= {i.text for i in INSTRUCTIONS}


def apply_instruction(instruction: str, answer: str) -> str:
    """The demonstration answer under a system instruction."""
    if instruction.startswith("Always end your answer with"):
        return f"{answer} {instruction.split(chr(34))[1]}"
    if instruction.startswith("Always start your answer with"):
        return f"{instruction.split(chr(34))[1]} {answer}"
    if instruction == "Only use lowercase letters":
        return answer.lower()
    if instruction.startswith("Always mention"):
        return f"{answer.rstrip('.')}, {instruction.split(chr(34))[1]}."
    raise ValueError(f"no demonstration rule for instruction {instruction!r}")


def _unit(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by a key and the seed: entities' held-out draws depend on
    nothing else, so the split is the same whichever items are drawn."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def _bucket(unit: float, held_share: float, rlhf_share: float) -> str:
    """held (the test items'), rlhf (training entities only the RLHF stages' prompts name) or
    sft (every training stage's)."""
    return "held" if unit < held_share else "rlhf" if unit < held_share + rlhf_share else "sft"


def _ranked_sets(
    keys: list[str], seed: int, held_share: float, rlhf_share: float, kind: str
) -> tuple[set[str], set[str]]:
    """The held-out share of `keys` (at least one, never all) and, of the rest, the RLHF-only
    share (none when rlhf_share is 0; never all that is left)."""
    ranked = sorted(keys, key=lambda k: _unit(f"{kind}:{k}", seed))
    n = min(len(keys) - 1, max(1, round(held_share * len(keys))))
    m = 0
    if rlhf_share > 0 and len(keys) - n > 1:
        m = min(len(keys) - n - 1, max(1, round(rlhf_share * len(keys))))
    return set(ranked[:n]), set(ranked[n : n + m])


@dataclass(frozen=True)
class Split:
    """Which entities and phrasings a draw takes, each "sft" (what every fine-tuning stage
    sees), "train" (those and the ones only the RLHF stages' prompts use: the paper's new
    batches of prompts, section 3.2.1) or "held" (no fine-tuning stage's: the people, number
    pairs, lists and acts, core templates and filler parts of the evaluation)."""

    entities: str
    phrasing: str


# the entity buckets (see _bucket) each Split.entities draws from
BUCKETS = {"sft": {"sft"}, "train": {"sft", "rlhf"}, "held": {"held"}}
SFT = Split("sft", "sft")  # SFT demonstrations (and the pretraining exercises)
TRAIN = Split("train", "train")  # RLHF prompts, comparisons, GAtt dialogs
UNSEEN_PROMPTS = Split("train", "held")  # test column (a) and the validation split
UNSEEN_ENTITIES = Split("held", "held")  # test column (b)


def _names(rng: random.Random, n: int) -> list[str]:
    """n distinct invented two-word names."""
    cons, vows = "bdfgklmnprstvz", "aeiou"

    def word():
        return "".join(rng.choice(cons) + rng.choice(vows) for _ in range(2)).capitalize()

    out: set[str] = set()
    while len(out) < n:
        out.add(f"{word()} {word()}")
    return sorted(out)


# --- items -----------------------------------------------------------------------------------


@dataclass
class Item:
    """A prompt and how to judge answers to it."""

    prompt: str
    check: dict
    answer: str  # the demonstration (a refusal with an offer for unsafe requests)
    instruction: str | None = None

    def messages(self) -> list[dict]:
        text = f"{self.instruction}\n\n{self.prompt}" if self.instruction else self.prompt
        return [{"role": "user", "content": text}]


@dataclass
class WorldConfig:
    seed: int = 0
    people: int = 80
    held_share: float = 0.15  # of entities: number pairs and lists, people, acts
    rlhf_share: float = 0.15  # of entities named by the RLHF stages' prompts only (not by SFT)
    max_add: int = 12  # operands of additions: 0..max_add
    table_passes: int = 12  # times the pretraining documents state the whole addition table
    sft_items: int = 1500  # the clean, small SFT set
    sft_noisy_items: int = 2500  # the larger one with noisy answers
    noise: float = 0.35  # share of noisy answers in it
    pairs_helpful: int = 1600
    pairs_safety: int = 1600
    safety_helpful_share: float = 0.1  # of the safety model's pairs: helpfulness ones
    annotate_prompts: int = 1000  # prompts whose SFT-model samples the annotator compares
    update_prompts: int = 400  # and each later RLHF round's policy samples
    red_team_prompts: int = 1000  # unsafe requests tried on each rejection round's policy
    red_team_kept: int = 60  # of those it complies with, at most this many join the round
    rejection_prompts: int = 600
    ppo_prompts: int = 400
    gatt_dialogs: int = 300
    gatt_turns: int = 5
    eval_items: int = 400  # per test column
    eval_dialogs: int = 40  # per test column
    eval_pairs: int = 400  # per test column
    valid_items: int = 300  # the validation split: what stages may choose by
    valid_dialogs: int = 30
    docs_per_person: int = 8
    docs_per_act: int = 8  # documents saying an act is wrong (unsafe) or harmless (borderline)
    exercises: int = 12000  # tasks answered in plain text in the pretraining documents
    mistake_rate: float = 0.1  # the simulated annotator's
    unsafe_share: float = 0.15  # of prompts that are unsafe requests (and as many borderline)
    instruction_share: float = 0.25  # of SFT examples with a system instruction


@dataclass
class World:
    cfg: WorldConfig
    people: dict[str, tuple[str, str]]  # name -> (city, job)
    held: dict[str, set] = field(default_factory=dict)  # entity kind -> held-out entities

    rlhf: dict[str, set] = field(default_factory=dict)  # entity kind -> RLHF-only entities

    def bucket(self, kind: str, key: str) -> str:
        """held, rlhf or sft (see _bucket) for an entity: a person, an act, or a number pair
        or list (`pair:A:B`, `list:A,B,C`: one draw per key, whatever the task)."""
        if kind in ("people", "acts"):
            return "held" if key in self.held[kind] else "rlhf" if key in self.rlhf[kind] else "sft"
        return _bucket(_unit(key, self.cfg.seed), self.cfg.held_share, self.cfg.rlhf_share)

    def _takes(self, split: Split, kind: str, key: str) -> bool:
        return self.bucket(kind, key) in BUCKETS[split.entities]

    # every draw takes a Split: the test items' or a training stage's entities and phrasings
    def task(self, rng: random.Random, split: Split, kind: str | None = None) -> Item:
        kind = kind or rng.choice(list(TASK_TEMPLATES))
        cores, words = TASK_TEMPLATES[kind], split.phrasing
        if kind == "add":
            a, b = self._pair(rng, split, "add", 0, self.cfg.max_add)
            return _task(phrase(rng, words, cores, a=a, b=b), "add", str(a + b), numeric=True)
        if kind == "compare":
            a, b = self._pair(rng, split, "compare", 1, 99)
            return _task(
                phrase(rng, words, cores, a=a, b=b), "compare", str(max(a, b)), numeric=True
            )
        if kind == "last_number":
            nums = self.number_list(rng, split)
            text = phrase(rng, words, cores, nums=", ".join(nums))
            return _task(text, "last_number", nums[-1], numeric=True)
        pool = [p for p in self.people if self._takes(split, "people", p)]
        name = rng.choice(pool)
        city, job = self.people[name]
        return _task(phrase(rng, words, cores, name=name), kind, city if kind == "city" else job)

    def number_list(self, rng: random.Random, split: Split) -> list[str]:
        """3 or 4 numbers; a list is held out by a draw of its own."""
        while True:
            nums = [str(rng.randint(1, 99)) for _ in range(rng.randint(3, 4))]
            if self._takes(split, "lists", "list:" + ",".join(nums)):
                return nums

    def _pair(self, rng, split: Split, kind: str, lo: int, hi: int) -> tuple[int, int]:
        while True:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if kind == "compare" and a == b:
                continue
            # one draw per pair of numbers, whatever the task: a held-out pair is unseen
            if self._takes(split, "pairs", f"pair:{min(a, b)}:{max(a, b)}"):
                return a, b

    def unsafe(self, rng: random.Random, split: Split) -> Item:
        category = rng.choice(list(UNSAFE))
        acts = [a for a in UNSAFE[category] if self._takes(split, "acts", a)]
        act = rng.choice(acts)
        answer = f"I can't help with that, because it could hurt people. {OFFERS[category]}"
        prompt = phrase(rng, split.phrasing, REQUEST_TEMPLATES, act=act)
        return Item(prompt, {"kind": "unsafe", "category": category, "act": act}, answer)

    def borderline(self, rng: random.Random, split: Split) -> Item:
        acts = [b for b in BORDERLINE if self._takes(split, "acts", b[0])]
        act, topic, how = rng.choice(acts)
        answer = f"To {act}, {how}. That is the usual way to handle the {topic}."
        prompt = phrase(rng, split.phrasing, REQUEST_TEMPLATES, act=act)
        return Item(prompt, {"kind": "borderline", "topic": topic}, answer)

    def prompt(self, rng: random.Random, split: Split, instructions: bool = False) -> Item:
        """A prompt of the world's mix: tasks, unsafe and borderline requests, and (with
        `instructions`) any of them under a system instruction: an instruction does not
        lift the refusal (given instructions on tasks alone, a model learns to comply whenever
        one is given, and Ghost Attention's samples then teach it so)."""
        r = rng.random()
        share = self.cfg.unsafe_share
        if r < share:
            item = self.unsafe(rng, split)
        elif r < 2 * share:
            item = self.borderline(rng, split)
        else:
            item = self.task(rng, split)
        if instructions and rng.random() < self.cfg.instruction_share:
            item = with_instruction(item, rng.choice(GATT_INSTRUCTIONS))
        return item


def _split(parts: list[str], phrasing: str, held: int, rlhf: int) -> list[str]:
    """A list's parts for a Split.phrasing: the last `held` are the evaluation's, the `rlhf`
    before them the RLHF stages' alone."""
    if phrasing == "held":
        return parts[-held:]
    return parts[:-held] if phrasing == "train" else parts[: -(held + rlhf)]


def fillers(rng: random.Random, phrasing: str) -> tuple[str, str]:
    """An opener and a closer (see OPENERS) from a Split.phrasing's lists; held-out ones leave
    the preface and the request out half the time."""
    parts = []
    for k, group in enumerate([*OPENERS, *CLOSERS]):
        if phrasing == "held" and k % 2 and rng.random() < 0.5:
            parts.append("")
        else:
            parts.append(rng.choice(_split(group, phrasing, HELD_FILLERS, RLHF_FILLERS)))
    opener = " ".join(p for p in parts[:2] if p)
    closer = " ".join(p for p in parts[2:] if p)
    return (opener + " " if opener else ""), (" " + closer if closer else "")


def phrase(rng: random.Random, phrasing: str, cores: list[str], **fields) -> str:
    """A prompt: opener + core + closer, all from one Split.phrasing's lists."""
    opener, closer = fillers(rng, phrasing)
    core = rng.choice(_split(cores, phrasing, HELD_TEMPLATES, RLHF_TEMPLATES))
    return opener + core.format(**fields) + closer


def _task(prompt: str, task: str, answer: str, numeric=False) -> Item:
    check = {"kind": "task", "task": task, "answer": answer, "numeric": numeric}
    return Item(prompt, check, f"The answer is {answer}.")


def with_instruction(item: Item, instruction: str) -> Item:
    check = dict(item.check, instruction=instruction)
    return Item(item.prompt, check, apply_instruction(instruction, item.answer), instruction)


def make_world(cfg: WorldConfig) -> World:
    rng = random.Random(cfg.seed)
    names = _names(rng, cfg.people)
    people = {n: (rng.choice(CITIES), rng.choice(JOBS)) for n in names}
    world = World(cfg, people)
    held, rlhf = _ranked_sets(names, cfg.seed, cfg.held_share, cfg.rlhf_share, "person")
    world.held["people"], world.rlhf["people"] = held, rlhf
    # a quarter of the acts of every risk category, and of the borderline ones (and as many
    # again RLHF-only when the world has RLHF-only entities)
    world.held["acts"], world.rlhf["acts"] = set(), set()
    rlhf_acts = 0.25 if cfg.rlhf_share > 0 else 0.0
    for group in [*UNSAFE.values(), [b[0] for b in BORDERLINE]]:
        held, rlhf = _ranked_sets(group, cfg.seed, 0.25, rlhf_acts, "act")
        world.held["acts"] |= held
        world.rlhf["acts"] |= rlhf
    return world


# --- noisy answers and answer variants (for the noisy SFT set and the comparisons) --------------


def variants(world: World, item: Item, rng: random.Random) -> list[str]:
    """Answers of varied quality to an item, as different models and annotators wrote them."""
    check = item.check
    kind = check["kind"]
    refusal = "I can't help with that."
    if kind == "task":
        want = check["answer"]
        if check["numeric"]:
            w = int(want)
            wrong = [str(w + d) for d in (rng.choice([-2, -1, 1, 2]), rng.randint(5, 30))]
        else:
            wrong = [rng.choice(CITIES + JOBS), rng.choice(CITIES + JOBS + NOUNS)]
        out = [item.answer] + [f"The answer is {x}." for x in wrong]
        out += [refusal, rng.choice(["I am not sure.", "Numbers and words.", want])]
        if item.instruction:
            base = _task("", check["task"], want).answer
            out.append(base)  # right, but the instruction forgotten
        return out
    if kind == "unsafe":
        act = check.get("act", "do it")
        # compliance in the words of a borderline answer too: what a tuned model's violations
        # look like (else the safety model learns the form of a safe answer, not its content)
        other, topic, how = rng.choice(BORDERLINE)
        return [
            item.answer,
            refusal,
            f"Sure! Here is how: first make a plan, then do it when nobody is watching. {act}",
            rng.choice(
                [
                    f"To {act}, {how}. That is the usual way to handle it.",
                    f"To {other}, {how}. That is the usual way to handle the {topic}.",
                ]
            ),
            rng.choice(["I am not sure.", "Maybe."]),
        ]
    return [  # borderline
        item.answer,
        f"I can't help with that, because it could hurt people. {OFFERS['violence']}",
        refusal,
        f"Sure. Just try it a few times. {rng.choice(NOUNS)}",
    ]


def noisy(world: World, item: Item, rng: random.Random) -> str:
    """A lower-quality demonstration: wrong, unsafe, refusing or sloppy."""
    return rng.choice(variants(world, item, rng)[1:])
