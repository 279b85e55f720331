import json

import pytest
import torch

from llama2 import Tokenizer, Transformer, get_preset, load, save_hf
from llama2.cli import main as cli
from llama2.generation import SamplingParams, generate


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's main job: tokenizer, tiny model, three checkpoint layouts that agree."""
    assert cli(["demo", "--out", str(tmp_path / "demo")]) == 0
    err = capsys.readouterr().err
    for layout in ("hf", "meta", "gguf"):
        assert f"reloaded {layout}" in err
    info = load(tmp_path / "demo" / "hf")
    assert info.config.dim == 288 and info.tokenizer.vocab_size == 2048


def test_tokenizer_train_and_generate_commands(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog 0123456789\n" * 200)
    out = tmp_path / "tok.model"
    assert cli(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == 300

    torch.manual_seed(0)
    cfg = get_preset("micro", vocab_size=300)
    model = Transformer(cfg).eval()
    d = save_hf(tmp_path / "m", cfg, model.state_dict(), tok)
    capsys.readouterr()
    args = ["generate", str(d), "the quick", "--max-new-tokens", "12", "--temperature", "0"]
    assert cli([*args, "--no-compile"]) == 0
    printed = capsys.readouterr().out
    prompt = tok.encode("the quick", bos=True)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    ids = generate(model, tok, [prompt], params, (tok.eos_id,))[0].token_ids
    assert printed.rstrip("\n") == tok.decode(prompt + ids)
    assert cli(["tokenize", str(out), "the fox", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == tok.encode("the fox")


def test_errors_are_named(tmp_path, capsys):
    assert cli(["generate", str(tmp_path), "hi"]) == 1
    assert "neither config.json" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path), str(tmp_path / "x"), "--to", "meta"]) == 1
    assert cli(["tokenize", str(tmp_path / "none.model"), "hi"]) == 1
    assert "cannot read tokenizer" in capsys.readouterr().err


def test_chat_command_keeps_the_dialog(tmp_path, small_tokenizer, capsys, monkeypatch):
    import io

    torch.manual_seed(0)
    cfg = get_preset("micro")
    d = save_hf(tmp_path / "m", cfg, Transformer(cfg).state_dict(), small_tokenizer)
    script = "hello\nhow are you?\n/system Be terse.\n/oops\nsay [INST] hi\n/reset\nbye\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    capsys.readouterr()
    assert cli(["chat", str(d), "--max-new-tokens", "5", "--temperature", "0", "--no-compile"]) == 0
    err = capsys.readouterr().err
    assert err.count("tokens/s]") == 3  # hello, how are you?, bye
    assert "[system prompt set; dialog reset]" in err and "[dialog reset]" in err
    assert "unknown command /oops" in err and "reserved tag '[INST]'" in err


def test_training_verbs_take_only_their_stage_settings(tmp_path, capsys):
    assert cli(["sft", "--out", str(tmp_path / "run"), "kl_beta=0.1"]) == 1
    assert "sft has no setting 'kl_beta' (a setting of ppo)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written
    with pytest.raises(SystemExit):
        cli(["sft", "--help"])
    settings = capsys.readouterr().out.split("with defaults:")[1]
    # one setting a line, with its default (argparse must not reflow the list)
    lines = settings.strip().splitlines()
    assert "  lora_rank = 0" in settings and "  epochs = 0.0" in settings
    assert "  init_from = null" in settings and "  compile = false" in settings
    assert all(" = " in line for line in lines) and "kl_beta" not in settings
    with pytest.raises(SystemExit):
        cli(["ppo", "--help"])
    assert "  kl_beta = 0.01\n" in capsys.readouterr().out
