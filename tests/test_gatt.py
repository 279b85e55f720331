import math

import torch

from llama2 import Llama, Transformer, get_preset
from llama2.data.gatt import INSTRUCTIONS, adherence_by_turn, sample_dialog, training_example
from llama2.data.sft import encode_for_training


def load_metrics(run):
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


TURNS = ["What is a list?", "And a tuple?", "Which is faster?"]
RULE = 'Always end your answer with "Over."'


def test_sampling_attaches_the_instruction_to_every_turn_training_keeps_it_first():
    seen = []

    def answer(dialog):  # records what the sampler is asked, answers by turn number
        seen.append([m["content"] for m in dialog if m["role"] == "user"])
        return f"answer {len(seen)}. Over."

    dialog = sample_dialog(answer, RULE, TURNS)
    # sampling: every turn, placed as training places it in the first turn (before the text)
    assert seen == [[f"{RULE}\n\n{t}" for t in TURNS[: k + 1]] for k in range(len(TURNS))]
    users = [m["content"] for m in dialog if m["role"] == "user"]
    assert users[0] == f"{RULE}\n\n{TURNS[0]}" and users[1:] == TURNS[1:]  # training: first only
    assert [m["content"] for m in dialog if m["role"] == "assistant"][2] == "answer 3. Over."


def test_gatt_loss_is_zeroed_on_every_earlier_turn(llama2_tokenizer):
    tok = llama2_tokenizer
    dialog = []
    for i, turn in enumerate(TURNS):
        dialog += [
            {"role": "user", "content": turn},
            {"role": "assistant", "content": f"Reply {i}. Over."},
        ]
    ids, mask = training_example(tok, dialog)
    full_ids, sft_mask = encode_for_training(tok, dialog)
    assert ids == full_ids and sum(sft_mask) > sum(mask) > 0
    kept = [t for t, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(kept[:-1]).strip() == "Reply 2. Over." and kept[-1] == tok.eos_id
    first = mask.index(True)
    assert not any(mask[:first]) and all(mask[first:])  # one run: the last answer and its EOS


def test_adherence_is_measured_per_turn(small_tokenizer):
    rule = next(i for i in INSTRUCTIONS if i.text == RULE)
    replies = iter(["ok. Over.", "fine", "sure. Over."])
    assert adherence_by_turn(lambda d: next(replies), rule, TURNS) == [True, False, True]
    # with a real (untrained) chat model: each verdict is the check of that turn's reply, the
    # instruction given once, and the model sees its own earlier replies
    torch.manual_seed(0)
    cfg = get_preset("micro")
    llm = Llama(Transformer(cfg).eval(), small_tokenizer, cfg)
    seen, replies = [], []

    def chat(dialog):
        seen.append([m["content"] for m in dialog])
        replies.append(llm.chat(dialog, max_new_tokens=4, temperature=0).text)
        return replies[-1]

    verdicts = adherence_by_turn(chat, rule, TURNS)
    assert verdicts == [rule.check(r) for r in replies]
    assert seen[-1] == [f"{RULE}\n\n{TURNS[0]}", replies[0], TURNS[1], replies[1], TURNS[2]]


def test_gatt_stage_end_to_end(small_tokenizer, tmp_path):
    import json

    from llama2 import load, save_hf
    from llama2.train import load_train_config
    from llama2.train.gatt import gatt

    torch.manual_seed(0)
    cfg = get_preset("micro", max_seq_len=1024)
    base = save_hf(tmp_path / "chat", cfg, Transformer(cfg).state_dict(), small_tokenizer)
    data = tmp_path / "turns.jsonl"
    rows = [
        {"turns": ["What is a list?", "And a dict?", "Thanks!"]},
        {"turns": ["Hello", "Why?"], "instruction": RULE},
    ] * 3
    data.write_text("\n".join(json.dumps(r) for r in rows))
    # keep_adherent=false: a random model honours nothing (the next test checks the filter)
    settings = (
        "epochs=2 batch_size=2 seq_len=128 lr=1e-3 warmup_steps=1 ckpt_every=4 eval_every=4 "
        "threads=1 max_new_tokens=5 temperature=0.8 keep_adherent=false"
    )
    overrides = [f"init_from={base}", f"data={data}", *settings.split()]
    cfg = load_train_config(None, overrides, stage="gatt")
    report = gatt(cfg, tmp_path / "run")
    train_rows = (tmp_path / "run" / "train.jsonl").read_text().splitlines()
    assert train_rows == (tmp_path / "run" / "gatt.jsonl").read_text().splitlines()
    # epochs sets the fine-tuning's steps, as in sft: 2 passes over the training rows
    from llama2.data.sft import pack
    from llama2.data.split import split_held_out

    encoded = [
        training_example(small_tokenizer, json.loads(x)["messages"])
        for x in (tmp_path / "run" / "gatt.jsonl").read_text().splitlines()
    ]
    n_rows = pack(split_held_out(encoded)[0], cfg.seq_len)[0].shape[0]
    steps = [m["step"] for m in load_metrics(tmp_path / "run" / "sft") if "loss" in m]
    assert steps == list(range(1, math.ceil(2 * n_rows / 2) + 1)) and len(steps) < cfg.steps
    config = (tmp_path / "run" / "config.yaml").read_text().splitlines()
    assert f"steps: {steps[-1]}" in config  # the run's record: the steps it ran
    # RUN/model is the tuned model, as in every run directory
    assert (tmp_path / "run" / "model").resolve() == (tmp_path / "run" / "sft" / "model").resolve()
    dialogs = [
        json.loads(x)["messages"]
        for x in (tmp_path / "run" / "gatt.jsonl").read_text().splitlines()
    ]
    assert len(dialogs) == 6 and dialogs[1][0]["content"].startswith(RULE)
    assert not any(RULE in m["content"] for m in dialogs[1][1:])  # the instruction, once
    # the report is the tuned model's greedy adherence, turn by turn, over the 6 dialogs (the
    # 3rd turn only where a dialog has one), each with the instruction it was trained on
    tuned = load(tmp_path / "run" / "sft" / "model")
    assert tuned.head == "lm"
    by_text = {i.text: i for i in INSTRUCTIONS}

    def greedy(dialog):
        return tuned.chat(dialog, temperature=0, max_new_tokens=5).text

    verdicts = [[], [], []]
    for row, dialog in zip(rows, dialogs, strict=True):
        rule = by_text[dialog[0]["content"].split("\n\n")[0]]
        assert row.get("instruction", rule.text) == rule.text
        for k, ok in enumerate(adherence_by_turn(greedy, rule, row["turns"])):
            verdicts[k].append(ok)
    assert [len(v) for v in verdicts] == [6, 6, 3] and report["dialogs"] == 6
    assert report["adherence_by_turn"] == [sum(v) / len(v) for v in verdicts]


def test_training_keeps_each_honoured_answer_and_replays_demonstrations(tmp_path):
    import json

    from llama2.train import load_train_config
    from llama2.train.gatt import training_rows

    over = next(i for i in INSTRUCTIONS if i.text == RULE)
    short = next(i for i in INSTRUCTIONS if i.text == "Answer in at most 10 words")

    def dialog(*answers):
        out = []
        for k, a in enumerate(answers):
            out += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": a}]
        return out

    dialogs = [
        dialog("Yes. Over.", "No. Over."),  # honoured throughout
        dialog("Yes. Over.", "No."),  # not in its second answer
        dialog("a short answer", "another short one"),
        dialog("one two three four five six seven eight nine ten eleven"),
        dialog("No.", "Yes. Over."),  # honoured after a broken answer
    ]
    rules = [over, over, short, short, over]
    demos = tmp_path / "sft.jsonl"
    demos.write_text(
        "\n".join(json.dumps({"messages": dialog(f"demo {i}")}) for i in range(5)) + "\n"
    )
    cfg = load_train_config(None, [f"replay={demos}", "replay_rows=3"], stage="gatt")
    rows = [r["messages"] for r in training_rows(cfg, dialogs, rules)]
    # each honoured answer is an example, its dialog up to it; broken answers are none
    assert rows[:6] == [
        dialogs[0][:2], dialogs[0], dialogs[1][:2], dialogs[2][:2], dialogs[2], dialogs[4]
    ]  # fmt: skip
    replayed = [r[1]["content"] for r in rows[6:]]
    assert len(replayed) == 3 == len(set(replayed)) and all(r.startswith("demo") for r in replayed)
    assert training_rows(cfg, dialogs, rules) == training_rows(cfg, dialogs, rules)  # seeded
    everything = load_train_config(None, ["keep_adherent=false"], stage="gatt")
    assert [r["messages"] for r in training_rows(everything, dialogs, rules)] == dialogs


def test_gatt_samples_each_turn_of_all_dialogs_in_one_batch_with_its_own_seed(
    tmp_path, monkeypatch
):
    import json
    from types import SimpleNamespace

    from llama2.data.split import derive_seed
    from llama2.train import gatt as gatt_module
    from llama2.train import load_train_config

    calls = []

    class FakeChat:  # records each call's dialogs and seed; answers honour nothing in particular
        def chat(self, dialogs, seed=None, **sampling):
            calls.append(([len(d) for d in dialogs], seed))
            return [SimpleNamespace(text=f"reply {len(calls)}") for _ in dialogs]

    monkeypatch.setattr(gatt_module, "load", lambda *a, **k: FakeChat())
    monkeypatch.setattr(gatt_module, "sft", lambda *a, **k: [])
    data = tmp_path / "turns.jsonl"
    # three dialogs of three turns and one of two
    data.write_text("\n".join(json.dumps({"turns": t}) for t in [TURNS] * 3 + [TURNS[:2]]))
    args = [f"init_from={tmp_path}", f"data={data}", "temperature=0.8", "max_new_tokens=3"]
    gatt_module.gatt(load_train_config(None, args, stage="gatt"), tmp_path / "run")
    # sampling: one batched call per turn (the dialogs that have it), seeded per turn
    assert calls[:3] == [
        ([1] * 4, derive_seed(0, "answers", 0, 0)),
        ([3] * 4, derive_seed(0, "answers", 1, 0)),
        ([5] * 3, derive_seed(0, "answers", 2, 0)),
    ]
    # then the greedy adherence checks, batched the same way, unseeded
    assert calls[3:] == [([1] * 4, None), ([3] * 4, None), ([5] * 3, None)]
    dialogs = [json.loads(x)["messages"] for x in (tmp_path / "run" / "gatt.jsonl").open()]
    assert [m["content"] for m in dialogs[3] if m["role"] == "assistant"] == ["reply 1", "reply 2"]
    # sample_rows: at most that many dialogs a call, each batch its own seed
    calls.clear()
    small = [*args, "sample_rows=3"]
    gatt_module.gatt(load_train_config(None, small, stage="gatt"), tmp_path / "run2")
    assert calls[:2] == [
        ([1] * 3, derive_seed(0, "answers", 0, 0)),
        ([1], derive_seed(0, "answers", 0, 1)),
    ]


def test_sample_dialogs_batches_ragged_dialogs_as_one_at_a_time_would():
    from llama2.data.gatt import sample_dialogs

    def answer(dialog):  # depends on the whole dialog so far
        return f"{len(dialog)}:{dialog[-1]['content'][-3:]}"

    turns = [TURNS, TURNS[:1], TURNS[:2]]
    rules = [RULE, "Answer in French", RULE]
    batched = sample_dialogs(lambda ds, k: [answer(d) for d in ds], rules, turns)
    assert batched == [sample_dialog(answer, r, t) for r, t in zip(rules, turns, strict=True)]


def test_answers_to_safety_turns_the_safety_model_deems_unsafe_are_left_out(monkeypatch):
    from types import SimpleNamespace

    from llama2.train import gatt as gatt_module
    from llama2.train import load_train_config

    over = next(i for i in INSTRUCTIONS if i.text == RULE)

    def dialog(*answers):
        out = []
        for k, a in enumerate(answers):
            out += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": a}]
        return out

    # every answer honours the instruction; turn 2 of the first dialog and turn 1 of the
    # second are unsafe requests; the safety model gives an answer's probability of being safe
    dialogs = [dialog("a. Over.", "b. Over.", "c. Over."), dialog("d. Over.", "e. Over.")]
    flags = [[False, True, False], [True, False]]
    p_safe = {"a. Over.": 0.1, "b. Over.": 0.2, "c. Over.": 0.1, "d. Over.": 0.9, "e. Over.": 0.1}
    scored = []

    def score_answers(rm, prompts, answers):
        scored.extend(answers)
        return [math.log(p_safe[a] / (1 - p_safe[a])) for a in answers]

    monkeypatch.setattr(gatt_module, "load_reward_model", lambda *a: SimpleNamespace(head="score"))
    monkeypatch.setattr(gatt_module, "score_answers", score_answers)
    cfg = load_train_config(None, ["safety_model=safety"], stage="gatt")
    rows = [r["messages"] for r in gatt_module.training_rows(cfg, dialogs, [over, over], flags)]
    # b answers a safety turn and is deemed unsafe: out; d is deemed safe; the others answer
    # benign turns, whatever the safety model says of them (it is not asked)
    assert rows == [dialogs[0][:2], dialogs[0], dialogs[1][:2], dialogs[1]]
    assert scored == ["b. Over.", "d. Over."]
    for off in ([], ["safety_model=safety", "safety_floor=0"]):
        cfg = load_train_config(None, off, stage="gatt")
        assert len(gatt_module.training_rows(cfg, dialogs, [over, over], flags)) == 5


def test_gatt_dialogs_carry_a_safety_flag_per_turn(tmp_path):
    import json

    import pytest

    from llama2.data.gatt import read_turns
    from llama2.formats import DialogError

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"turns": ["a", "b"], "is_safety": [False, True]}) + "\n")
    assert read_turns(path)[0]["is_safety"] == [False, True]
    path.write_text(json.dumps({"turns": ["a", "b"]}) + "\n")
    assert read_turns(path)[0]["is_safety"] == [False, False]
    for bad in ([True], [0, 1], "yes"):
        path.write_text(json.dumps({"turns": ["a", "b"], "is_safety": bad}) + "\n")
        with pytest.raises(DialogError, match="is_safety"):
            read_turns(path)


def test_choose_takes_an_honouring_draw_first_then_the_highest_reward():
    from llama2.train.gatt import choose

    draws = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["j", "k"]]
    honours = [[False, True, True], [False, False, False], [True, False, True], [True, True]]
    rewards = [[9.0, 1.0, 2.0], [0.5, 3.0, -1.0], [-2.0, 5.0, -2.0], [1.0, 1.0]]
    # the best reward among honouring draws; none honouring: the best reward; a tie: the first
    assert choose(draws, honours, rewards) == ["c", "e", "g", "j"]


def test_best_of_chat_answers_each_dialog_with_its_best_draw(monkeypatch):
    """Each turn draws samples_per_turn answers per dialog from streams of their own (the
    first the stream of a single draw) and keeps the best by R_c, reading each dialog's
    is_safety flag of that turn; dialogs without a turn k are not asked at turn k."""
    from types import SimpleNamespace

    from llama2.train import gatt as gatt_module
    from llama2.train import load_train_config

    over = next(i for i in INSTRUCTIONS if i.text == RULE)

    class Chat:  # answers with its seed and the dialog's last user turn
        def chat(self, dialogs, temperature, max_new_tokens, seed):
            return [
                SimpleNamespace(text=f"{d[-1]['content']}:{seed + j}")
                for j, d in enumerate(dialogs)
            ]

    rewards = {}
    scored = []

    def score(helpful, safety, prompts, answers):
        scored.append([(p["prompt"][-1]["content"], p["is_safety"]) for p in prompts])
        return torch.tensor([rewards.setdefault(a, float(len(rewards) % 5)) for a in answers])

    monkeypatch.setattr(gatt_module, "score", score)
    cfg = load_train_config(None, ["samples_per_turn=3", "reward_model=rm"], stage="gatt")
    flags = [[False, True], [True]]
    answer = gatt_module.best_of_chat(Chat(), cfg, gatt_module.Dist(), [over, over], flags, 0, 0)
    single = gatt_module.batched_chat(Chat(), cfg, cfg.temperature, seeded=True)
    dialogs = [[{"role": "user", "content": "u0"}], [{"role": "user", "content": "v0"}]]
    got = answer(dialogs, 0)
    draws = [single(dialogs, 0)] + [
        gatt_module.batched_chat(Chat(), cfg, cfg.temperature, True, draw=j)(dialogs, 0)
        for j in (1, 2)
    ]
    assert len({a for row in draws for a in row}) == 6  # three streams, no draw repeated
    for i in range(2):  # nothing honours "Over.": the highest reward, ties to the first draw
        best = max(range(3), key=lambda j: rewards[draws[j][i]])
        assert got[i] == draws[best][i]
    assert scored[-1] == [("u0", False)] * 3 + [("v0", True)] * 3
    # turn 1: only the first dialog has one, with its flag for that turn
    answer(
        [dialogs[0] + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "u1"}]], 1
    )
    assert scored[-1] == [("u1", True)] * 3


def test_gatt_stage_with_best_of_draws_runs_and_refuses_a_model_that_is_no_reward_model(
    stage_inputs, tmp_path
):
    import json

    import pytest

    from llama2.train import load_train_config
    from llama2.train.gatt import gatt

    settings = [
        f"init_from={stage_inputs.model}",
        f"data={stage_inputs.gatt}",
        *stage_inputs.quick,
        "max_new_tokens=4",
        "keep_adherent=false",
        "samples_per_turn=2",
        "seq_len=128",
    ]
    bad = load_train_config(None, [*settings, f"reward_model={stage_inputs.model}"], "gatt")
    with pytest.raises(ValueError, match="is not a reward model"):
        gatt(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    cfg = load_train_config(None, [*settings, f"reward_model={stage_inputs.rm}"], "gatt")
    gatt(cfg, tmp_path / "run")
    dialogs = [json.loads(x)["messages"] for x in (tmp_path / "run" / "gatt.jsonl").open()]
    assert [len(d) for d in dialogs] == [4] * 6
