"""lm-evaluation-harness on local tasks (tests/fixtures/lm_eval: JSON data, nothing downloaded)
through lm_eval's command line, with the package's model class (`--model llama2`) and with
lm_eval's `local-completions` model against the server on 127.0.0.1; each request's
log-likelihood, greedy flag and generated text against what transformers' LlamaForCausalLM
computes for the same random micro model and the same token ids."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"
CONTEXT = 128  # the micro model's


@pytest.fixture(scope="module")
def checkpoint(small_tokenizer, tmp_path_factory) -> Path:
    """A random micro model as an HF directory; its weights scaled up, so that its
    distributions are peaked (a greedy token is no near-tie)."""
    from llama2 import Transformer, get_preset, save_hf

    torch.manual_seed(0)
    cfg = get_preset("micro")
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    out = tmp_path_factory.mktemp("harness") / "micro"
    return save_hf(out, cfg, model.state_dict(), small_tokenizer)


class Reference:
    """transformers' log-probabilities and greedy tokens for lm_eval's requests, the token ids
    made as lm_eval makes them with `encode` (text, bos) -> ids."""

    def __init__(self, checkpoint: Path, encode):
        from transformers import LlamaForCausalLM

        self.hf = LlamaForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
        self.encode = encode

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(CONTEXT + 1) :]
        logprobs = self.hf(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
        rows = logprobs[len(ids) - 1 - len(continuation) :]
        want = torch.tensor(continuation)
        chosen = rows.gather(-1, want[:, None])[:, 0].double().sum().item()
        return chosen, bool((rows.argmax(-1) == want).all())

    def pair(self, context: str, continuation: str, bos: bool) -> tuple[float, bool]:
        """lm_eval's split: trailing spaces move to the continuation, whose ids are the
        whole's past the context's."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation, bos), self.encode(context, bos)
        return self.score(ctx, whole[len(ctx) :])

    def rolling(self, text: str, window: int, prefix: int) -> float:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        ids = self.encode(text, False)
        windows = get_rolling_token_windows(ids, prefix, window, 1)
        return sum(self.score(*make_disjoint_window(w))[0] for w in windows)

    @torch.no_grad()
    def generate(self, ids: list[int], max_new: int, decode, until: str) -> str:
        out = self.hf.generate(
            torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=2
        )
        return decode(out[0, len(ids) :].tolist()).split(until)[0]


def run_lm_eval(tmp: Path, *args: str) -> dict[str, list[dict]]:
    """lm_eval's command line through `python -m llama2.eval.harness` (offline, its caches
    under tmp) on the three local tasks -> each task's logged samples."""
    env = os.environ | {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf"),
        "PYTHONPATH": str(ROOT),
    }
    out = tmp / "out"
    cmd = [sys.executable, "-m", "llama2.eval.harness", *args, "--include_path", str(TASKS)]
    cmd += ["--tasks", "llama2_choice,llama2_rolling,llama2_gen", "--log_samples"]
    cmd += ["--output_path", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = re.match(r"samples_(llama2_[a-z]+)_", f.name).group(1)
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    assert set(samples) == {"llama2_choice", "llama2_rolling", "llama2_gen"}
    return samples


def check(samples, ref: Reference, bos: bool, window: int, prefix: int, generate) -> None:
    """Every logged request against the reference: loglikelihoods within 1e-4 with the same
    greedy flags, rolling loglikelihoods within 1e-4, the same generated text."""
    n = 0
    for doc in samples["llama2_choice"]:
        args = [a for _, a in sorted(doc["arguments"].items())]
        for a, resp in zip(args, doc["resps"], strict=True):
            got, greedy = float(resp[0][0]), resp[0][1] == "True"
            want, want_greedy = ref.pair(a["arg_0"], a["arg_1"], bos)
            assert abs(got - want) < 1e-4 and greedy == want_greedy, (a, got, want)
            n += 1
    assert n == 12
    lengths = []
    for doc in samples["llama2_rolling"]:
        text = doc["arguments"]["gen_args_0"]["arg_0"]
        lengths.append(len(ref.encode(text, False)))
        want = ref.rolling(text, window, prefix)
        assert abs(float(doc["resps"][0][0]) - want) < 1e-4, (text[:20], doc["resps"], want)
    assert max(lengths) > 2 * CONTEXT  # (windows)
    for doc in samples["llama2_gen"]:
        context = doc["arguments"]["gen_args_0"]["arg_0"]
        assert doc["resps"][0][0] == generate(context), context


def test_the_llama2_model_class_through_lm_evals_command_line(checkpoint, tmp_path):
    """`python -m llama2.eval.harness --model llama2 --model_args pretrained=PATH`: contexts
    begin with BOS (add_bos_token's default), rolling windows hold the whole context."""
    from llama2 import Tokenizer

    tok = Tokenizer.from_file(checkpoint)
    ref = Reference(checkpoint, lambda text, bos: tok.encode(text, bos=bos))
    model_args = f"pretrained={checkpoint},max_gen_toks=8"
    samples = run_lm_eval(tmp_path, "--model", "llama2", "--model_args", model_args)

    def generate(context: str) -> str:
        decode = lambda ids: tok.decode(ids, continuation=True)  # noqa: E731
        return ref.generate(tok.encode(context, bos=True), 8, decode, "\n")

    check(samples, ref, True, CONTEXT, tok.bos_id, generate)


def test_the_llama2_model_class_batches_as_it_scores_alone(checkpoint):
    """In process: batches of 1, 5 and "auto" give the same loglikelihoods (padding never
    reaches a row), contexts longer than max_length among them; a greedy continuation is
    flagged greedy."""
    import llama2.eval.harness as harness

    lm = harness.Llama2LM(str(checkpoint), batch_size=1, device="cpu")
    lines = (TASKS.parent / "corpus.txt").read_text().splitlines()[:200]
    pairs = [("\n".join(lines[:i]), " " + lines[i]) for i in range(3, 200, 25)]
    requests = [
        (None, lm.tok_encode(c), lm.tok_encode(x, add_special_tokens=False)) for c, x in pairs
    ]
    assert max(len(c) for _, c, _ in requests) > CONTEXT
    alone = lm._loglikelihood_tokens(requests)
    for size in (5, "auto"):
        lm.auto_batch, lm.batch_size = size == "auto", 0 if size == "auto" else size
        batched = lm._loglikelihood_tokens(requests)
        assert max(abs(a[0] - b[0]) for a, b in zip(alone, batched, strict=True)) < 1e-4
        assert [a[1] for a in alone] == [b[1] for b in batched]
    assert lm.eot_token_id == 2 and lm.prefix_token_id == 1
    # the model's own greedy continuation is flagged greedy, at the library's logprobs
    lib = lm.llm.generate("def load(path):", max_new_tokens=4, temperature=0, logprobs=0)
    ((logprob, greedy),) = lm._loglikelihood_tokens(
        [(None, lm.tok_encode("def load(path):"), lib.token_ids)]
    )
    assert greedy and abs(logprob - sum(x.logprob for x in lib.logprobs)) < 1e-4


def test_local_completions_against_the_server(checkpoint, tmp_path):
    """lm_eval's `local-completions` model (token-id prompts, echo with logprobs, max_tokens 1)
    against the server, prompts prefilled in chunks of 48 tokens: the prompt logprobs it
    sums are transformers'. Its tokenizer is transformers' from the checkpoint; contexts
    without BOS (its add_bos_token default); rolling windows of max_length - 2 tokens."""
    from test_serve import _start
    from transformers import AutoTokenizer

    from llama2 import Tokenizer, load
    from llama2.serve.api import create_app

    hf_tok = AutoTokenizer.from_pretrained(checkpoint)
    encode = lambda text, bos: hf_tok(text, add_special_tokens=bos).input_ids  # noqa: E731
    ref = Reference(checkpoint, encode)
    tok = Tokenizer.from_file(checkpoint)
    app = create_app(load(checkpoint), "micro", max_batch=4, prefill_chunk=48)
    srv, thread, base = _start(app)
    try:
        model_args = (
            f"model=micro,base_url={base}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={checkpoint},max_length={CONTEXT},max_gen_toks=8"
        )
        samples = run_lm_eval(tmp_path, "--model", "local-completions", "--model_args", model_args)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)

    def generate(context: str) -> str:
        decode = lambda ids: tok.decode(ids, continuation=True)  # noqa: E731
        return ref.generate(encode(context, False), 8, decode, "\n")

    check(samples, ref, False, CONTEXT - 2, hf_tok.bos_token_id, generate)
