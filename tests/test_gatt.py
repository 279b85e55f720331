from llama2 import Llama, Transformer, get_preset
from llama2.data.gatt import INSTRUCTIONS, adherence_by_turn, sample_dialog, training_example
from llama2.data.sft import encode_for_training

TURNS = ["What is a list?", "And a tuple?", "Which is faster?"]
RULE = 'Always end your answer with "Over."'


def test_sampling_attaches_the_instruction_to_every_turn_training_keeps_it_first():
    seen = []

    def answer(dialog):  # records what the sampler is asked, answers by turn number
        seen.append([m["content"] for m in dialog if m["role"] == "user"])
        return f"answer {len(seen)}. Over."

    dialog = sample_dialog(answer, RULE, TURNS)
    assert all(all(u.endswith(RULE) for u in users) for users in seen)  # sampling: every turn
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
    # with a real (untrained) chat model: one verdict per turn, the instruction given once
    cfg = get_preset("micro")
    llm = Llama(Transformer(cfg).eval(), small_tokenizer, cfg)
    asked = []

    def chat(dialog):
        asked.append(dialog[-1]["content"])
        return llm.chat(dialog, max_new_tokens=4, temperature=0).text

    verdicts = adherence_by_turn(chat, rule, TURNS)
    assert len(verdicts) == 3 and asked[0].startswith(RULE) and asked[1:] == TURNS[1:]
