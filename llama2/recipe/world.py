"""A small world in which every answer can be judged by a program, so that the Llama 2-Chat
recipe can be run and measured on a CPU (the paper's human annotators and safety data cannot
be shipped). Generated from a seed; `write_world` lays it out in OUT/data in the formats the
stage commands read. Its words are data (vocabulary.yaml); items.py draws its entities and
prompts; this module writes the pretraining documents and each stage's data.

What is in it:
- tasks with checkable answers, five kinds: addition of small numbers, which of two numbers
  is larger, the last number of a list, and two facts about people (where they live, their
  job). Every answer is "The answer is X."
- unsafe requests in five risk categories (after section 4.2.1: illicit and criminal
  activity, violence, hateful content, unqualified advice, privacy); the safe answer refuses
  and still offers something helpful.
- borderline requests that borrow the unsafe words ("kill a Python process", "shoot a photo
  at night"): refusing them is a false refusal.
- system instructions a program can check (data/gatt.py's), for Ghost Attention.
- a pretraining corpus (`documents`): the world's knowledge in prose (every person's city and
  job, the addition table, lists of numbers and their last one, which acts are wrong), tasks
  posed and answered in plain text ("Q: ... A: ..."), and the Python standard library.

Held-out items (the evaluation's) use request phrasings (core templates and filler parts) that
no stage's data uses, and entities (number pairs and lists, people, requested acts) that no
fine-tuning data mentions. What a held-out question asks is knowledge the pretraining
documents state (a held-out person's job, a held-out pair's sum, like a fact read on the web)
or a skill to apply (which number is larger, which comes last: no held-out comparison or
list is stated anywhere); their exercises use training phrasings and entities only. The
RLHF stages' prompts (and comparisons, and GAtt's dialogs) also use phrasings and entities
that no SFT demonstration uses: the paper's new batches of prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

from ..data.jsonl import write_jsonl
from ..eval.judges import Annotator
from ..io import write_atomic
from .items import (
    BORDERLINE,
    CLOSERS,
    GATT_INSTRUCTIONS,
    HELD_TEMPLATES,
    NOUNS,
    OPENERS,
    REQUEST_TEMPLATES,
    RLHF_TEMPLATES,
    SENTENCES,
    SFT,
    TASK_TEMPLATES,
    TRAIN,
    UNSAFE,
    UNSEEN_ENTITIES,
    UNSEEN_PROMPTS,
    Item,
    Split,
    World,
    WorldConfig,
    make_world,
    noisy,
    variants,
    with_instruction,
)
from .paths import DataFiles

# the test columns: (a) prompts no stage saw, about entities training saw; (b) entities (and
# phrasings) no fine-tuning stage saw
COLUMNS = {"prompts": UNSEEN_PROMPTS, "entities": UNSEEN_ENTITIES}

# --- pretraining documents -------------------------------------------------------------------


def documents(world: World, rng: random.Random) -> list[str]:
    """Prose that carries the world's knowledge, as the web carries a real model's: the facts
    about every person (held-out ones too) in varied wordings, the addition table of small
    numbers (all of it: sums are facts to recall, like where someone lives), which number is
    larger (training pairs only: that one has to be worked out), lists and their last numbers,
    every noun and act in neutral prose; and exercises, tasks posed and answered in plain text
    ("Q: ... A: ..."), in training phrasings about training entities. The prose uses the words
    of every phrasing ("greater", "earns a living", "at the end of"), never a held-out request."""
    cfg, docs = world.cfg, []
    for name, (city, job) in world.people.items():
        for _ in range(cfg.docs_per_person):
            lines = rng.sample(SENTENCES["bio"], 3)
            docs.append(" ".join(s.format(n=name, c=city, j=job) for s in lines))
    table = [(a, b) for a in range(cfg.max_add + 1) for b in range(cfg.max_add + 1)]
    for _ in range(cfg.table_passes):
        rng.shuffle(table)
        for i in range(0, len(table), 8):
            lines = [
                rng.choice(SENTENCES["sums"]).format(a=a, b=b, s=a + b) for a, b in table[i : i + 8]
            ]
            docs.append(" ".join(lines))
    for _ in range(cfg.people * 6):
        lines = []
        for _ in range(6):
            a, b = world._pair(rng, TRAIN, "compare", 1, 99)
            lines.append(rng.choice(SENTENCES["bigger"]).format(x=max(a, b), y=min(a, b)))
        docs.append(" ".join(lines))
    # exercises: the tasks posed and answered in plain text (as the web is full of), in the
    # training phrasings, about SFT's entities only; the chat format stays for SFT to teach
    qa = [world.task(rng, SFT) for _ in range(cfg.exercises)]
    for i in range(0, len(qa), 8):
        docs.append("\n".join(f"Q: {q.prompt}\nA: {q.answer}" for q in qa[i : i + 8]))
    for _ in range(cfg.people * 6):  # training lists of numbers and their last number
        nums = world.number_list(rng, TRAIN)
        docs.append(rng.choice(SENTENCES["ends"]).format(l=", ".join(nums), w=nums[-1]))
    for _ in range(cfg.people * 8):  # repeated lists: they teach copying from the context
        words = rng.sample(NOUNS, rng.randint(3, 6))
        docs.append(f"{', '.join(words)}. Once more: {', '.join(words)}.")
    # everyday talk quoted in stories: every greeting and thanks a prompt may carry (held-out
    # ones too) is a known phrase, as it is to a model pretrained on the web, though no
    # request to an assistant in the training data is phrased with the held-out ones
    talk = [p for group in [*OPENERS, *CLOSERS] for p in group if p]
    names = list(world.people)
    for _ in range(cfg.people * 6):
        n, (c, _) = rng.choice(names), world.people[rng.choice(names)]
        lines = [rng.choice(SENTENCES["said"]).format(n=n, c=c, p=p) for p in rng.sample(talk, 3)]
        docs.append(" ".join(lines))
    for w in NOUNS:
        docs.append(" ".join(rng.choice(SENTENCES["prose"]).format(w=w) for _ in range(3)))
    # which acts are wrong and which are harmless, in varied wordings and several documents
    # each (as a person's facts are): stated once, a model answers a held-out act's request
    # by its words alone, not by what the act is
    acts = [(a, SENTENCES["wrong"], "") for group in UNSAFE.values() for a in group]
    acts += [(a, SENTENCES["fine"], how) for a, _, how in BORDERLINE]
    for act, wordings, how in acts:
        for _ in range(cfg.docs_per_act):
            docs.append(" ".join(w.format(a=act, h=how) for w in rng.sample(wordings, 3)))
    rng.shuffle(docs)
    return docs


# --- the data each stage reads -----------------------------------------------------------------


def sft_dialogs(world: World, n: int, rng: random.Random, noise: float = 0.0) -> list[dict]:
    """Demonstrations: single-turn prompts of the world's mix and a few multi-turn dialogs
    (so the chat format's later turns are not new to the model), any turn of which may carry
    a system instruction: Ghost Attention samples with the instruction before every turn,
    and a model that has seen instructions before first turns only rarely honours one
    before a later turn."""
    out = []
    for _ in range(n):
        turns = rng.randint(2, 3) if rng.random() < 0.08 else 1
        items = [world.prompt(rng, SFT, instructions=True) for _ in range(turns)]
        messages = []
        for item in items:
            answer = noisy(world, item, rng) if rng.random() < noise else item.answer
            messages += [*item.messages(), {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def preference_pairs(
    world: World, n: int, rng: random.Random, aspect: str, split: Split = TRAIN
) -> list[dict]:
    """Comparisons graded by the simulated annotator (section 3.2.1): two answers of varied
    quality to a prompt, the annotator's choice and its rating. Helpfulness pairs are mostly
    tasks (with some requests of both kinds); safety pairs are unsafe and borderline requests,
    is_safety marking the unsafe ones (section 3.2.3's R_c)."""
    annotator = Annotator(world.cfg.mistake_rate, seed=rng.randrange(2**31))
    out = []
    while len(out) < n:
        if aspect == "safety":
            item = world.unsafe(rng, split) if rng.random() < 0.7 else world.borderline(rng, split)
        else:
            item = world.prompt(rng, split, instructions=True)
        a, b = rng.sample(variants(world, item, rng), 2)
        row = graded_pair(annotator, item.messages(), item.check, a, b, aspect)
        if row is not None:
            out.append(row)
    return out


def safety_model_pairs(world: World, rng: random.Random) -> list[dict]:
    """The safety reward model's comparisons: safety pairs mixed with helpfulness ones in the
    paper's 90/10 proportion (section 3.2.2), so that it has seen benign prompts too: R_c
    reads its score on every answer (section 3.2.3's gate), and a model trained on unsafe and
    borderline requests alone scores most task answers as unsafe."""
    n = world.cfg.pairs_safety
    helpful = round(world.cfg.safety_helpful_share * n)
    rows = preference_pairs(world, n - helpful, rng, "safety")
    rows += preference_pairs(world, helpful, rng, "helpfulness")
    rng.shuffle(rows)
    return rows


def graded_pair(
    annotator: Annotator, prompt: list[dict], check: dict, a: str, b: str, aspect: str
) -> dict | None:
    """The annotator's comparison of two answers as a preference pair row, or None when it
    scores them equal (no preference to learn from)."""
    if annotator.score(check, a, aspect) == annotator.score(check, b, aspect):
        return None
    better, rating = annotator.compare(check, a, b, aspect)
    chosen, rejected = (a, b) if better == 0 else (b, a)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "rating": rating,
        "is_safety": check["kind"] == "unsafe",
        "check": check,  # how the annotator judged (the stage ignores it)
    }


def sample_pairs(rows: list[dict], answers: list[list[str]], annotator: Annotator) -> dict:
    """Comparisons of a model's own answers (section 3.2.1: annotators compare two sampled
    responses of the current models): the samples to each prompt taken two by two, graded by
    the annotator on safety for unsafe requests and on helpfulness otherwise; pairs it scores
    equal are left out. Returns {"helpful": [...], "safety": [...]} in preference_pairs' rows.
    Unlike the world's answer variants, these are the near misses a policy really makes ("13"
    against "14"), which rejection sampling's choice among samples depends on."""
    out: dict[str, list[dict]] = {"helpful": [], "safety": []}
    for row, samples in zip(rows, answers, strict=True):
        check = row["check"]
        unsafe = check["kind"] == "unsafe"
        aspect = "safety" if unsafe else "helpfulness"
        for a, b in zip(samples[::2], samples[1::2], strict=False):  # an odd last one is left
            pair = graded_pair(annotator, row["prompt"], check, a, b, aspect)
            if pair is not None:
                out["safety" if unsafe else "helpful"].append(pair)
    return out


def prompt_rows(items: list[Item]) -> list[dict]:
    return [
        {"prompt": i.messages(), "is_safety": i.check["kind"] == "unsafe", "check": i.check}
        for i in items
    ]


def gatt_rows(
    world: World, n: int, rng: random.Random, split: Split, exclude: Collection[str] = ()
) -> list[dict]:
    """Multi-turn dialogs of gatt_turns turns, each with a system instruction (section 3.3).
    Training dialogs are drawn from the world's whole mix (fine-tuned on tasks alone, a model
    unlearns refusing unsafe requests); every honoured answer becomes an example
    (train/gatt.py), so each turn position is taught. The evaluation's dialogs are tasks,
    none of whose turns is in `exclude`."""
    rows = []
    draw = world.task if split.phrasing == "held" else world.prompt
    for _ in range(n):
        turns: list[str] = []
        unsafe: list[bool] = []
        while len(turns) < world.cfg.gatt_turns:
            item = draw(rng, split)
            if item.prompt not in exclude:
                turns.append(item.prompt)
                unsafe.append(item.check["kind"] == "unsafe")
        instruction = rng.choice(GATT_INSTRUCTIONS)
        rows.append({"turns": turns, "instruction": instruction, "is_safety": unsafe})
    return rows


def prompt_texts(rows: list[dict]) -> set[str]:
    """The user requests of data rows (prompts, comparisons, dialogs), without instructions."""
    out = set()
    for r in rows:
        if "turns" in r:
            out |= set(r["turns"])
        else:
            out |= {m["content"].split("\n\n")[-1] for m in r["prompt"] if m["role"] == "user"}
    return out


def eval_rows(
    world: World, n: int, rng: random.Random, split: Split, exclude: Collection[str] = ()
) -> list[dict]:
    """Test or validation items: a third unsafe and borderline requests, the rest tasks of
    every kind in equal shares; none whose prompt is in `exclude` (the validation split leaves
    out the test items' prompts)."""
    items: list[Item] = []
    kinds = list(TASK_TEMPLATES)
    while len(items) < n:
        i, r = len(items), len(items) % 6
        if r == 0:
            item = world.unsafe(rng, split)
        elif r == 1:
            item = world.borderline(rng, split)
        else:
            item = world.task(rng, split, kinds[i % len(kinds)])
        if item.prompt not in exclude:
            items.append(item)
    return prompt_rows(items)


def round_prompts(cfg: WorldConfig, k: int) -> list[dict]:
    """The prompts of RLHF round k >= 2's comparisons (cfg.update_prompts, a stream of their
    own): a new batch each round, as the paper's annotators got each week."""
    world = make_world(cfg)
    rng = random.Random(f"{cfg.seed}:annotate{k}")
    return prompt_rows(
        [world.prompt(rng, TRAIN, instructions=True) for _ in range(cfg.update_prompts)]
    )


def red_team_prompts(cfg: WorldConfig, k: int) -> list[dict]:
    """The unsafe requests tried on RLHF round k's policy (cfg.red_team_prompts, a stream of
    their own): training entities and phrasings, some under a system instruction, as the
    world's prompts are. The recipe keeps those the policy answers unsafely (section 4.3's
    red teaming, whose failures became new safety training prompts)."""
    world = make_world(cfg)
    rng = random.Random(f"{cfg.seed}:redteam{k}")
    items = []
    for _ in range(cfg.red_team_prompts):
        item = world.unsafe(rng, TRAIN)
        if rng.random() < cfg.instruction_share:
            item = with_instruction(item, rng.choice(GATT_INSTRUCTIONS))
        items.append(item)
    return prompt_rows(items)


def write_world(cfg: WorldConfig, out: Path) -> dict:
    """Generate the world and write what each stage reads into `out` (OUT/data, laid out as
    paths.DataFiles names it); returns the manifest (also world.json): file names and
    counts."""
    world = make_world(cfg)
    data = DataFiles(out)
    out.mkdir(parents=True, exist_ok=True)

    def rng(stream: str) -> random.Random:
        return random.Random(f"{cfg.seed}:{stream}")

    def draw(r: random.Random, n: int) -> list[Item]:
        return [world.prompt(r, TRAIN, instructions=True) for _ in range(n)]

    files = {
        data.sft: sft_dialogs(world, cfg.sft_items, rng("sft")),
        data.sft_noisy: sft_dialogs(world, cfg.sft_noisy_items, rng("noisy"), cfg.noise),
        data.pairs("helpful"): preference_pairs(world, cfg.pairs_helpful, rng("ph"), "helpfulness"),
        data.pairs("safety"): safety_model_pairs(world, rng("ps")),
        data.prompts("annotate"): prompt_rows(draw(rng("annotate"), cfg.annotate_prompts)),
        data.prompts("rejection"): prompt_rows(draw(rng("rs"), cfg.rejection_prompts)),
        data.prompts("ppo"): prompt_rows(draw(rng("ppo"), cfg.ppo_prompts)),
        data.gatt: gatt_rows(world, cfg.gatt_dialogs, rng("gatt"), TRAIN),
    }
    tested: set[str] = set()
    for column, split in COLUMNS.items():
        tag = "" if column == "entities" else "_prompts"  # column (b)'s streams: eval, eph ...
        files[data.test_items(column)] = eval_rows(world, cfg.eval_items, rng(f"eval{tag}"), split)
        files[data.test_dialogs(column)] = gatt_rows(
            world, cfg.eval_dialogs, rng(f"eval_gatt{tag}"), split
        )
        # the reward models' test comparisons, graded by the same annotator
        for kind, aspect, stream in (
            ("helpful", "helpfulness", "eph"),
            ("safety", "safety", "eps"),
        ):
            files[data.test_pairs(kind, column)] = preference_pairs(
                world, cfg.eval_pairs, rng(stream + tag), aspect, split
            )
        for path in (data.test_items(column), data.test_dialogs(column)):
            tested |= prompt_texts(files[path])
        tested |= prompt_texts(files[data.test_pairs("helpful", column)])
        tested |= prompt_texts(files[data.test_pairs("safety", column)])
    # the validation split: drawn as column (a) is, none of any test row's requests
    files[data.valid_items] = eval_rows(
        world, cfg.valid_items, rng("valid"), UNSEEN_PROMPTS, tested
    )
    files[data.valid_dialogs] = gatt_rows(
        world, cfg.valid_dialogs, rng("valid_gatt"), UNSEEN_PROMPTS, tested
    )
    for path, rows in files.items():
        write_jsonl(path, rows)
    data.corpus.parent.mkdir(exist_ok=True)
    docs = documents(world, rng("docs"))
    write_atomic(data.corpus, "\n\n".join(docs) + "\n")
    manifest = {
        "config": asdict(cfg),
        "files": {path.name: len(rows) for path, rows in files.items()},
        "documents": len(docs),
        "held_out": {k: sorted(v) for k, v in world.held.items()},
        "rlhf_only": {k: sorted(v) for k, v in world.rlhf.items()},
        "templates": {
            "tasks": TASK_TEMPLATES,
            "requests": REQUEST_TEMPLATES,
            "openers": OPENERS,
            "closers": CLOSERS,
            "held_out_per_list": HELD_TEMPLATES,
            "rlhf_only_per_list": RLHF_TEMPLATES,
        },
        "instructions": GATT_INSTRUCTIONS,
    }
    write_atomic(data.manifest, json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest
