import json

import pytest
import torch
from conftest import micro_model

from llama2 import Transformer, get_preset
from llama2.data.sft import IGNORE, encode_for_training, pack, read_sft_jsonl
from llama2.formats import DialogError
from llama2.model import Context

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "Apple."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": " Pear. "},
    {"role": "user", "content": "A vegetable?"},
    {"role": "assistant", "content": "Leek, in 日本語 too."},
]


def _runs(mask):
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_sft_mask_covers_exactly_the_assistant_tokens(llama2_tokenizer):
    tok = llama2_tokenizer
    ids, mask = encode_for_training(tok, DIALOG)
    sys_block = "<<SYS>>\nBe brief.\n<</SYS>>\n\n"
    pairs = [
        (sys_block + "Name a fruit.", "Apple."),
        ("Another?", "Pear."),
        ("A vegetable?", "Leek, in 日本語 too."),
    ]
    # the ids are the reference recipe's: one BOS ... EOS sequence per finished pair
    assert ids == [
        t for u, a in pairs for t in tok.encode(f"[INST] {u} [/INST] {a} ", bos=True, eos=True)
    ]
    runs = _runs(mask)
    assert len(runs) == 3
    for (start, end), (_, answer) in zip(runs, pairs, strict=True):
        assert ids[end - 1] == tok.eos_id  # each answer's EOS carries loss
        assert tok.decode(ids[start : end - 1]).strip() == answer
        assert tok.decode(ids[start - 4 : start]) == "[/INST]"  # ... and nothing before it
    assert sum(mask) == sum(e - s for s, e in runs)


def test_packed_examples_never_attend_across_their_boundary(llama2_tokenizer):
    tok = llama2_tokenizer
    torch.manual_seed(0)
    cfg = get_preset("micro", vocab_size=32000)
    model = Transformer(cfg).eval()
    examples = [
        encode_for_training(tok, DIALOG[1:3]),
        encode_for_training(tok, DIALOG[3:5]),
        encode_for_training(tok, DIALOG[5:7]),
    ]
    inputs, targets, segments = pack(examples, seq_len=100)
    assert inputs.shape[0] == 1 and set(segments[0].tolist()) == {0, 1, 2, 3}  # 3 + padding
    with torch.no_grad():
        packed = model(inputs, None, Context(segments=segments))[0]
        pos = 0
        for ids, _ in examples:
            alone = model(torch.tensor([ids]))[0]
            assert (packed[pos : pos + len(ids)] - alone).abs().max() < 1e-5
            pos += len(ids)
    # targets: the next answer token of the same example, nothing across a boundary
    n0 = len(examples[0][0])
    assert targets[0, n0 - 1] == IGNORE  # the last token of example 1 predicts nothing
    kept = targets[0][targets[0] != IGNORE].tolist()
    assert kept == [t for ids, m in examples for t, keep in zip(ids, m, strict=True) if keep]


def test_sft_records_in_three_schemas(tmp_path):
    f = tmp_path / "sft.jsonl"
    rows = [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        {
            "conversations": [
                {"from": "system", "value": "terse"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    dialogs = read_sft_jsonl(f)
    assert dialogs[0] == [
        {"role": "user", "content": "Add\n\n1 and 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert [m["role"] for m in dialogs[2]] == ["system", "user", "assistant"]
    f.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "x", "output": 5}))
    with pytest.raises(DialogError, match=r"sft.jsonl:2: field 'output' must be text"):
        read_sft_jsonl(f)
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(DialogError, match=r"sft.jsonl:1: .*end with an assistant answer"):
        read_sft_jsonl(f)
    f.write_text(json.dumps({"conversations": [{"from": "bot", "value": "x"}]}))
    with pytest.raises(DialogError, match=r"sft.jsonl:1: conversations\[0\].from"):
        read_sft_jsonl(f)


def test_sft_stage_end_to_end(small_tokenizer, tmp_path):
    import time

    from llama2 import load
    from llama2.train import load_train_config
    from llama2.train.sft import sft

    base = micro_model(small_tokenizer, tmp_path / "base")
    data = tmp_path / "sft.jsonl"
    words = ["import", "return", "class", "def", "self", "print", "while", "yield"] * 6
    rows = [{"instruction": f"Echo the word {w}", "output": w} for w in words]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    settings = (
        "epochs=3 batch_size=8 seq_len=64 lr=3e-3 warmup_steps=2 eval_every=5 ckpt_every=100 "
        "threads=1"
    )
    overrides = [f"init_from={base}", f"data={data}", *settings.split()]
    t0 = time.time()
    metrics = sft(load_train_config(None, overrides, stage="sft"), tmp_path / "run")
    assert time.time() - t0 < 60
    assert metrics[0]["step"] == 0 and "val_loss" in metrics[0]  # before the first step
    losses = [m["loss"] for m in metrics if m["step"] > 0]
    assert len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert "val_loss" in metrics[-1]  # 48 examples: every 10th held out
    tuned = load(tmp_path / "run" / "model")
    assert tuned.config == load(base).config
    answer = tuned.chat(
        [{"role": "user", "content": "Echo the word class"}], max_new_tokens=4, temperature=0
    )
    assert answer.token_ids


def test_lora_sft_adapter_loads_in_peft_and_merges(small_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llama2 import load
    from llama2.cli import main as cli
    from llama2.train import load_train_config
    from llama2.train.sft import sft

    base = micro_model(small_tokenizer, tmp_path / "base")
    data = tmp_path / "sft.jsonl"
    words = ["import", "return", "class", "def"] * 8
    data.write_text("\n".join(json.dumps({"instruction": f"Say {w}", "output": w}) for w in words))
    settings = (
        "steps=8 batch_size=4 seq_len=64 lr=1e-2 warmup_steps=1 ckpt_every=8 eval_every=8 "
        "threads=1 lora_rank=4 lora_alpha=8 lora_targets=wq,wv,w2"
    )
    overrides = [f"init_from={base}", f"data={data}", *settings.split()]
    metrics = sft(load_train_config(None, overrides, stage="sft"), tmp_path / "run")
    assert metrics[-1]["loss"] < metrics[1]["loss"]  # (metrics[0]: step 0's validation)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000008"
    adapter_cfg = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert (
        adapter_cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"] and adapter_cfg["r"] == 4
    )
    merged = load(ckpt / "model")  # the run's model: base + adapter, merged
    # PEFT puts our adapter on transformers' model of the base: same logits as our merge
    peft_model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base, attn_implementation="eager"), ckpt / "adapter"
    ).eval()
    x = torch.tensor([small_tokenizer.encode("[INST] Say def [/INST]", bos=True)])
    with torch.no_grad():
        ours, theirs = merged.model(x), peft_model(x).logits
        assert (ours - load(base).model(x)).abs().max() > 1e-3  # the adapter changed something
    assert (ours - theirs).abs().max() < 1e-4
    assert cli(["merge", str(base), str(ckpt / "adapter"), str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        assert (load(tmp_path / "merged").model(x) - ours).abs().max() < 1e-5


def test_sft_epochs_count_the_training_dialogs_only(small_tokenizer, tmp_path):
    import math

    from llama2 import save_hf
    from llama2.train import load_train_config
    from llama2.train.loop import Dist
    from llama2.train.sft import build_sft

    cfg = get_preset("micro")
    base = save_hf(tmp_path / "base", cfg, Transformer(cfg).state_dict(), small_tokenizer)
    rows = [{"instruction": f"Echo the number {i:02d}", "output": f"{i:02d}"} for i in range(40)]
    lengths = [len(encode_for_training(small_tokenizer, _alpaca_dialog(r))[0]) for r in rows]
    seq_len = max(lengths) - 1  # every example fits a row, no two share one
    assert 2 * min(lengths) > seq_len + 1
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = [f"init_from={base}", f"data={data}", "epochs=2", "batch_size=4", f"seq_len={seq_len}"]
    stage = build_sft(load_train_config(None, args, stage="sft"), torch.device("cpu"), Dist())
    # 40 dialogs, every 10th held out: 36 rows to train on; 2 epochs of 4 rows a step
    assert stage.steps == math.ceil(2 * 36 / 4)


def _alpaca_dialog(row):
    return [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["output"]},
    ]
