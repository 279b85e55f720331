"""Bad data, stage by stage: each case is refused before anything is trained or written, in
one line naming the file, the line and the field (tests/conftest.py: `refused`). And, by
property, every JSONL reader turns any bytes and any JSON value into rows or a named error."""

import json
from pathlib import Path

import pytest
from conftest import property_settings
from hypothesis import given
from hypothesis import strategies as st

from llama2.data.gatt import read_turns
from llama2.data.jsonl import read_prompts
from llama2.data.preferences import read_preferences
from llama2.data.sft import read_sft_jsonl
from llama2.formats import DialogError
from llama2.train.rejection import read_previous

PAIR = {"prompt": "p", "chosen": "yes", "rejected": "no"}
CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
GOOD = {
    "sft": json.dumps({"messages": CHAT}),
    "pairs": json.dumps(PAIR),
    "prompts": json.dumps({"prompt": "p"}),
    "gatt": json.dumps({"turns": ["a", "b"]}),
}


def pair(**changes):
    return json.dumps(PAIR | changes)


# (data kind, the bad line, what the error names besides the file and line)
CASES = [
    # SFT, in its three schemas
    ("sft", '{"conversations": 5}', "field 'conversations'"),
    ("sft", '{"conversations": null}', "field 'conversations'"),
    ("sft", '{"conversations": [{"from": "alien", "value": "x"}]}', "conversations[0].from"),
    ("sft", '{"messages": "hi"}', "field 'messages'"),
    ("sft", '{"messages": []}', "the dialog is empty"),
    ("sft", '{"messages": [{"role": "user", "content": "q"}]}', "end with an assistant"),
    ("sft", json.dumps({"messages": [CHAT[0], {**CHAT[1], "content": 5}]}), "content"),
    ("sft", json.dumps({"messages": [{**CHAT[0], "content": "[INST] x"}, CHAT[1]]}), "[INST]"),
    ("sft", '{"instruction": 5, "output": "x"}', "field 'instruction'"),
    ("sft", '{"instruction": "x", "output": "y", "input": 5}', "field 'input'"),
    ("sft", '{"text": "x"}', "no 'instruction', 'messages' or 'conversations'"),
    ("sft", "[1, 2]", "expected a JSON object"),
    ("sft", "not json", "invalid JSON"),
    ("sft", '{"messages": NaN}', "NaN"),
    # preference pairs (reward, dpo)
    ("pairs", pair(margin=float("nan")), "field 'margin'"),
    ("pairs", pair(margin=float("inf")), "field 'margin'"),
    ("pairs", pair(margin=-float("inf")), "field 'margin'"),
    ("pairs", pair().replace("}", ', "margin": 1e999}'), "field 'margin'"),
    ("pairs", pair(margin="1"), "field 'margin'"),
    ("pairs", pair(margin=True), "field 'margin'"),
    ("pairs", pair(is_safety="no"), "field 'is_safety'"),
    ("pairs", pair(is_safety="false"), "field 'is_safety'"),
    ("pairs", pair(is_safety=0), "field 'is_safety'"),
    ("pairs", pair(rating="great"), "field 'rating'"),
    ("pairs", pair(chosen=None), "field 'chosen'"),
    ("pairs", pair(rejected=5), "field 'rejected'"),
    ("pairs", pair(prompt=5), "field 'prompt'"),
    ("pairs", pair(prompt=[{"role": "assistant", "content": "x"}]), "prompt: message 0"),
    ("pairs", pair(chosen="[/INST]"), "reserved chat tag"),
    ("pairs", "5", "field 'prompt'"),
    # prompts (rejection, ppo)
    ("prompts", '{"prompt": "p", "is_safety": "no"}', "field 'is_safety'"),
    ("prompts", '{"prompt": "p", "check": 5}', "field 'check'"),
    ("prompts", '{"question": "p"}', "field 'prompt'"),
    ("prompts", '{"prompt": "p", "check": {"x": Infinity}}', "field 'check.x'"),
    # GAtt dialogs
    ("gatt", '{"turns": "hi"}', "field 'turns'"),
    ("gatt", '{"turns": []}', "field 'turns'"),
    ("gatt", '{"turns": [1]}', "field 'turns'"),
    ("gatt", '{"turns": null}', "field 'turns'"),
    ("gatt", '{"turns": ["a"], "instruction": "be nice"}', "unknown instruction"),
]

# the stages reading each kind of data, with the settings they need
STAGES = {
    "sft": ["sft"],
    "pairs": ["reward", "dpo"],
    "prompts": ["rejection", "ppo"],
    "gatt": ["gatt"],
}


def stage_argv(stage: str, inputs, out: Path, data: Path) -> list:
    argv = [stage, "--out", out, f"init_from={inputs.model}", f"data={data}"]
    if stage in ("rejection", "ppo"):
        argv.append(f"reward_model={inputs.rm}")
    if stage == "ppo":
        return [*argv, "threads=1", "steps=2", "batch_size=2"]
    return [*argv, *inputs.quick]


@pytest.mark.parametrize(
    "stage,kind,line,names",
    [(stage, *case) for case in CASES for stage in STAGES[case[0]]],
    ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None,
)
def test_bad_data_is_refused_naming_file_line_and_field(
    stage, kind, line, names, stage_inputs, tmp_path, refused
):
    data = tmp_path / f"{kind}.jsonl"
    # the bad record on line 2 (after a good one): the line named must be that one
    data.write_text(GOOD[kind] + "\n" + line + "\n")
    refused(
        stage_argv(stage, stage_inputs, tmp_path / "run", data),
        f"{data}:2: ",
        names,
        watch=tmp_path,
    )


@pytest.mark.parametrize(
    "content,names",
    [
        (b"", "no "),  # empty: no examples / pairs / prompts / dialogs
        (b"\n\n  \n", "no "),
        (b'{"a": "\xff"}\n', "invalid UTF-8"),
    ],
)
@pytest.mark.parametrize("stage", ["sft", "reward", "rejection", "gatt"])
def test_empty_and_undecodable_files(stage, content, names, stage_inputs, tmp_path, refused):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    refused(stage_argv(stage, stage_inputs, tmp_path / "run", data), data, names, watch=tmp_path)


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "rejection", "ppo", "gatt"])
def test_missing_data_file(stage, stage_inputs, tmp_path, refused):
    missing = tmp_path / "nowhere.jsonl"
    refused(stage_argv(stage, stage_inputs, tmp_path / "run", missing), missing, watch=tmp_path)


def test_rejection_previous_rounds_file_is_checked_before_sampling(stage_inputs, tmp_path, refused):
    argv = stage_argv("rejection", stage_inputs, tmp_path / "run", stage_inputs.prompts)
    refused([*argv, f"previous={stage_inputs.sft}"], f"{stage_inputs.sft}:1", watch=tmp_path)
    missing = tmp_path / "best.jsonl"
    refused([*argv, f"previous={missing}"], missing, "no such file", watch=tmp_path)


@pytest.mark.parametrize(
    "manifest",
    ["", "[]", '{"dtype": "uint16"}', '{"dtype": "nope", "tokenizer_sha256": "x"}'],
)
def test_pretrain_refuses_a_bad_shard_manifest(manifest, tmp_path, refused):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(manifest)
    argv = ["pretrain", "--out", tmp_path / "run", f"data={shards}", "model=micro", "threads=1"]
    refused(argv, shards / "manifest.json", watch=tmp_path)


# --- properties: any bytes, any JSON value -> rows or a named error, never another exception


READERS = {
    "sft": read_sft_jsonl,
    "pairs": read_preferences,
    "prompts": read_prompts,
    "gatt": read_turns,
    "previous": read_previous,
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: refused
    | st.text(max_size=8)
    | st.sampled_from(["user", "assistant", "system", "human", "gpt", "[INST]"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "prompt",
                    "chosen",
                    "rejected",
                    "margin",
                    "rating",
                    "is_safety",
                    "check",
                    "messages",
                    "conversations",
                    "instruction",
                    "input",
                    "output",
                    "role",
                    "content",
                    "from",
                    "value",
                    "turns",
                    "answer",
                ]
            )
            | st.text(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)
PROPERTY = property_settings(60)


def _read(reader, path: Path) -> None:
    try:
        reader(path)
    except DialogError as e:
        assert str(path) in str(e)


@PROPERTY
@given(kind=st.sampled_from(sorted(READERS)), records=st.lists(json_values, max_size=4))
def test_readers_take_any_json_values(kind, records, tmp_path):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN written as NaN
    _read(READERS[kind], path)


@PROPERTY
@given(kind=st.sampled_from(sorted(READERS)), data=st.binary(max_size=200))
def test_readers_take_any_bytes(kind, data, tmp_path):
    path = tmp_path / f"{kind}.jsonl"
    path.write_bytes(data)
    _read(READERS[kind], path)
