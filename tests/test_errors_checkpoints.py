"""Bad checkpoints in every layout (HF config.json and safetensors, Meta params.json and
.pth, GGUF headers): `info`, `convert` and a stage's init_from refuse them in one line naming
the file (and the field), without a traceback and without writing anything
(tests/conftest.py: `refused`). And, by property, the config loader and the GGUF header
reader turn any value or any bytes into a config or a named error."""

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import property_settings
from hypothesis import given
from hypothesis import strategies as st

from llama2 import Transformer, get_preset
from llama2.checkpoint import describe, read_checkpoint, save_gguf, save_meta
from llama2.config import load_config_file
from llama2.gguf_format import GGMLType, T, read_gguf, write_gguf

PROPERTY = property_settings(80)


def hf_copy(inputs, tmp_path: Path) -> Path:
    return Path(shutil.copytree(inputs.model, tmp_path / "m"))


def edit_config(change):
    """A case that rewrites config.json: `change(config dict)` returns the new value (a dict,
    any JSON value, or bytes written as they are)."""

    def make(d: Path) -> Path:
        value = change(json.loads((d / "config.json").read_text()))
        f = d / "config.json"
        f.write_bytes(value) if isinstance(value, bytes) else f.write_text(json.dumps(value))
        return f

    return make


def with_(**changes):
    return edit_config(lambda c: c | changes)


def without(key):
    return edit_config(lambda c: {k: v for k, v in c.items() if k != key})


def weights(data: bytes | None):
    def make(d: Path) -> Path:
        f = d / "model.safetensors"
        full = f.read_bytes()
        f.write_bytes(full[: len(full) // 2] if data is None else data)
        return f

    return make


# (case id, edit of a copy of a good HF directory -> the file to blame, the error's words,
# the commands that must refuse it: info reads headers only, convert every tensor)
HF_CASES = [
    ("empty weights", weights(b""), "cannot read safetensors", "ic"),
    ("truncated weights", weights(None), "model.safetensors", "ic"),
    ("garbage weights", weights(b"\x08" + b"\0" * 7 + b"{oops}!!"), "safetensors", "ic"),
    ("config list", edit_config(lambda c: [1]), "expected a JSON object", "ic"),
    ("config number", edit_config(lambda c: 5), "expected a JSON object", "ic"),
    ("config not json", edit_config(lambda c: b"{"), "invalid JSON", "ic"),
    ("config bad utf8", edit_config(lambda c: b'{"a": "\xff"}'), "invalid UTF-8", "ic"),
    ("config NaN", edit_config(lambda c: b'{"rms_norm_eps": NaN}'), "NaN", "ic"),
    ("vocab null", with_(vocab_size=None), "'vocab_size' must be an integer", "ic"),
    ("no layers", without("num_hidden_layers"), "'num_hidden_layers'", "ic"),
    ("layers 6.5", with_(num_hidden_layers=6.5), "'num_hidden_layers' must be", "ic"),
    ("layers 0", with_(num_hidden_layers=0), "n_layers must be positive", "ic"),
    ("hidden str", with_(hidden_size="288"), "'hidden_size' must be an integer", "ic"),
    ("hidden bool", with_(hidden_size=True), "'hidden_size' must be an integer", "ic"),
    ("eps str", with_(rms_norm_eps="1e-5"), "'rms_norm_eps' must be a finite number", "ic"),
    ("rope str", with_(rope_scaling="linear"), "'rope_scaling' must be an object", "ic"),
    ("rope yarn", with_(rope_scaling={"type": "yarn", "factor": 2}), "'yarn'", "ic"),
    ("rope no factor", with_(rope_scaling={"type": "linear"}), "without a 'factor'", "ic"),
    ("rope factor str", with_(rope_scaling={"type": "linear", "factor": "2"}), "'factor'", "ic"),
    ("kv heads", with_(num_key_value_heads=3), "not divisible by n_kv_heads 3", "ic"),
    ("head_dim", with_(head_dim=7), "head_dim 7", "ic"),
    ("architectures str", with_(architectures="Llama"), "'architectures'", "ic"),
    ("architecture", with_(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel", "ic"),
    ("quantization", with_(quantization_config=5), "'quantization_config'", "ic"),
    ("model_type", with_(model_type="gpt2"), "model_type", "ic"),
    ("tied", with_(tie_word_embeddings=True), "tied embeddings", "ic"),
    # the weights or the config: the directory is named
    ("vocab mismatch", lambda d: with_(vocab_size=600)(d).parent, "has shape", "c"),
]


@pytest.mark.parametrize("case,edit,names,commands", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_bad_hf_checkpoints(case, edit, names, commands, stage_inputs, tmp_path, refused):
    d = hf_copy(stage_inputs, tmp_path)
    blamed = edit(d)
    if "i" in commands:
        refused(["info", d], blamed, names, watch=tmp_path)
    if "c" in commands:
        refused(["convert", d, tmp_path / "out.gguf", "--to", "gguf"], blamed, watch=tmp_path)
        refused(["convert", d, tmp_path / "out", "--to", "hf"], blamed, names, watch=tmp_path)


def test_a_stage_refuses_a_bad_init_from(stage_inputs, tmp_path, refused):
    d = hf_copy(stage_inputs, tmp_path)
    blamed = with_(num_hidden_layers=6.5)(d)
    argv = ["sft", "--out", tmp_path / "run", f"init_from={d}", f"data={stage_inputs.sft}"]
    refused([*argv, *stage_inputs.quick], blamed, "'num_hidden_layers'", watch=tmp_path)


@pytest.mark.parametrize(
    "case,names",
    [
        ("index not json", "invalid JSON"),
        ("index no map", "weight_map"),
        ("index outside", "weight_map"),
        ("index missing shard", "model-2.safetensors"),
        ("no weights", "no model.safetensors"),
    ],
)
def test_bad_weight_files(case, names, stage_inputs, tmp_path, refused):
    d = hf_copy(stage_inputs, tmp_path)
    index = d / "model.safetensors.index.json"
    blamed = index
    if case == "index not json":
        index.write_text("{")
    elif case == "index no map":
        index.write_text('{"weight_map": [1]}')
    elif case == "index outside":
        index.write_text('{"weight_map": {"x": "../../etc/passwd"}}')
    elif case == "index missing shard":
        index.write_text('{"weight_map": {"x": "model-2.safetensors"}}')
        blamed = d / "model-2.safetensors"
    else:
        (d / "model.safetensors").unlink()
        blamed = d
    refused(["convert", d, tmp_path / "out", "--to", "hf"], blamed, names, watch=tmp_path)


# --- Meta --------------------------------------------------------------------------------


@pytest.fixture
def meta_dir(stage_inputs, tmp_path):
    ckpt = read_checkpoint(stage_inputs.model)
    return save_meta(tmp_path / "meta", ckpt.config, ckpt.state_dict, ckpt.tokenizer)


class Boom:  # a pickle that would run code if loaded
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "case,names",
    [
        ("params list", "expected a JSON object"),
        ("params dim str", "'dim' must be an integer"),
        ("params no layers", "'n_layers'"),
        ("params unknown", "unknown field"),
        ("pickle", "refused"),
        ("truncated pth", "cannot read a PyTorch checkpoint"),
        ("not tensors", "expected a dict of tensors"),
    ],
)
def test_bad_meta_checkpoints(case, names, meta_dir, tmp_path, refused):
    params = meta_dir / "params.json"
    shard = meta_dir / "consolidated.00.pth"
    p = json.loads(params.read_text())
    blamed = params
    if case == "params list":
        params.write_text("[]")
    elif case == "params dim str":
        params.write_text(json.dumps(p | {"dim": "64"}))
    elif case == "params no layers":
        params.write_text(json.dumps({k: v for k, v in p.items() if k != "n_layers"}))
    elif case == "params unknown":
        params.write_text(json.dumps(p | {"moe": 8}))
    else:
        blamed = shard
        if case == "pickle":
            shard.write_bytes(pickle.dumps({"tok_embeddings.weight": Boom()}))
        elif case == "truncated pth":
            shard.write_bytes(shard.read_bytes()[:300])
        else:
            torch.save({"tok_embeddings.weight": [1, 2]}, shard)
    refused(["info", meta_dir], blamed, names, watch=tmp_path)
    refused(["convert", meta_dir, tmp_path / "out", "--to", "hf"], blamed, names, watch=tmp_path)


# --- GGUF --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_parts(small_tokenizer, tmp_path_factory):
    """(metadata, tensors) as save_gguf writes them for a micro model, to write variants of."""
    d = tmp_path_factory.mktemp("gguf")
    cfg = get_preset("micro")
    captured = {}

    def capture(path, metadata, tensors):
        captured["parts"] = (dict(metadata), list(tensors))

    import llama2.checkpoint.gguf as gguf_module

    real = gguf_module.write_gguf
    gguf_module.write_gguf = capture
    try:
        save_gguf(d / "m.gguf", cfg, Transformer(cfg).state_dict(), small_tokenizer, "f32")
    finally:
        gguf_module.write_gguf = real
    return captured["parts"]


def gguf_variant(parts, path: Path, changes=None, drop=(), tensors=None) -> Path:
    meta, good_tensors = parts
    meta = {k: v for k, v in meta.items() if not any(k.startswith(p) for p in drop)}
    meta |= changes or {}
    write_gguf(path, meta, good_tensors if tensors is None else tensors)
    return path


def _nested_arrays(path: Path, depth: int) -> Path:
    """A GGUF header whose one value is an array of an array of ... (depth deep)."""
    key = b"x"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", T.ARRAY)
    body += struct.pack("<IQ", T.ARRAY, 1) * depth + struct.pack("<IQ", T.UINT8, 0)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    return path


GGUF_CASES = [
    ("alignment 0", {"general.alignment": (T.UINT32, 0)}, "general.alignment"),
    ("alignment str", {"general.alignment": (T.STRING, "32")}, "general.alignment"),
    ("alignment 3", {"general.alignment": (T.UINT32, 3)}, "general.alignment"),
    ("dim str", {"llama.embedding_length": (T.STRING, "64")}, "'llama.embedding_length'"),
    ("eps str", {"llama.attention.layer_norm_rms_epsilon": (T.STRING, "x")}, "epsilon"),
    ("context 0", {"llama.context_length": (T.UINT32, 0)}, "max_seq_len must be positive"),
    ("dim huge", {"llama.embedding_length": (T.UINT32, 2**31)}, "beyond any model"),
    # one flipped byte of the count (found by the header fuzz below: 24 GB and the OOM killer)
    ("layers huge", {"llama.block_count": (T.UINT32, 2**24 + 2)}, "llama.block_count"),
    ("arch", {"general.architecture": (T.STRING, "gpt2")}, "general.architecture"),
    ("rope yarn", {"llama.rope.scaling.type": (T.STRING, "yarn")}, "'yarn'"),
    ("rope factor str", {"llama.rope.scaling.factor": (T.STRING, "2")}, "scaling.factor"),
    ("scores str", {"tokenizer.ggml.scores": (T.ARRAY, (T.STRING, ["a"] * 512))}, "scores"),
    ("tokens short", {"tokenizer.ggml.tokens": (T.ARRAY, (T.STRING, ["a"]))}, "differ"),
    ("bos outside", {"tokenizer.ggml.bos_token_id": (T.UINT32, 10**6)}, "bos token id"),
    ("tokenizer kind", {"tokenizer.ggml.model": (T.STRING, "gpt2")}, "tokenizer.ggml.model"),
]


@pytest.mark.parametrize("case,changes,names", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_bad_gguf_headers(case, changes, names, gguf_parts, tmp_path, refused):
    f = gguf_variant(gguf_parts, tmp_path / "m.gguf", changes)
    refused(["info", f], f, names, watch=tmp_path)
    refused(["convert", f, tmp_path / "out", "--to", "hf"], f, names, watch=tmp_path)


@pytest.mark.parametrize(
    "case,names",
    [
        ("nested arrays", "nested deeper"),
        ("no vocabulary", "token_embd.weight"),
        ("dims overflow", "runs past the end"),
        ("five dims", "dimensions"),
        ("truncated", "truncated"),
        ("version", "version 7"),
        ("value type", "unsupported GGUF content"),
        ("tensor type", "unsupported GGUF content"),
        ("magic only", "truncated"),
    ],
)
def test_bad_gguf_files(case, names, gguf_parts, tmp_path, refused):
    f = tmp_path / "m.gguf"
    _, tensors = gguf_parts
    if case == "nested arrays":
        _nested_arrays(f, 100_000)
    elif case == "no vocabulary":
        gguf_variant(gguf_parts, f, drop=("tokenizer.",), tensors=tensors[1:])
    elif case == "dims overflow":  # 2**62 * 4 * 4 bytes wraps around in 64 bits
        meta = {k: v for k, v in gguf_parts[0].items() if not k.startswith("tokenizer.")}
        header_only(f, meta, [("token_embd.weight", (2**62, 4), GGMLType.F32)])
    elif case == "five dims":
        header_only(f, gguf_parts[0], [("token_embd.weight", (1, 1, 1, 1, 2), GGMLType.F32)])
    elif case == "truncated":
        gguf_variant(gguf_parts, f)
        f.write_bytes(f.read_bytes()[:2000])
    elif case == "version":
        f.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))
    elif case == "value type":
        key = struct.pack("<Q", 1) + b"k"
        f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + key + struct.pack("<I", 99))
    elif case == "tensor type":
        header_only(f, gguf_parts[0], [("token_embd.weight", (2,), 77)])
    else:
        f.write_bytes(b"GGUF")
    refused(["info", f], f, names, watch=tmp_path)
    refused(["convert", f, tmp_path / "out", "--to", "hf"], f, names, watch=tmp_path)


def header_only(path: Path, meta: dict, tensors: list) -> Path:
    """A GGUF file's header as write_gguf lays it out, for tensors it could not write."""
    from llama2.gguf_format import _pack_value

    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for key, (vtype, value) in meta.items():
        out += [_pack_value(T.STRING, key), struct.pack("<I", vtype), _pack_value(vtype, value)]
    for name, shape, gtype, *_ in tensors:
        out += [_pack_value(T.STRING, name), struct.pack("<I", len(shape))]
        out += [struct.pack("<Q", d) for d in reversed(shape)]
        out.append(struct.pack("<IQ", gtype, 0))
    path.write_bytes(b"".join(out))
    return path


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04 not a model"])
def test_a_file_that_is_no_checkpoint(content, tmp_path, refused):
    f = tmp_path / "model.bin"
    f.write_bytes(content)
    refused(["info", f], f, "not GGUF", watch=tmp_path)


# --- properties ----------------------------------------------------------------------------

HF_KEYS = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "intermediate_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "head_dim",
    "model_type",
    "tie_word_embeddings",
    "multiple_of",
    "ffn_dim_multiplier",
    "dim",
    "n_layers",
    "n_heads",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 300)
    | st.integers()
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["llama", "linear", "default", "silu"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["type", "rope_type", "factor"]), inner, max_size=3)
    ),
    max_leaves=6,
)
GOOD_HF = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
}


@PROPERTY
@given(
    base=st.sampled_from([{}, GOOD_HF]),
    values=st.dictionaries(st.sampled_from(HF_KEYS), json_values, max_size=4),
)
def test_config_loader_takes_any_json(base, values, tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(base | values))
    try:
        cfg = load_config_file(f)
    except ValueError as e:
        assert str(f) in str(e)
    else:
        assert cfg.dim > 0 and cfg.n_layers > 0 and cfg.vocab_size > 0


@PROPERTY
@given(data=st.binary(max_size=300))
def test_config_loader_takes_any_bytes(data, tmp_path):
    f = tmp_path / "config.json"
    f.write_bytes(data)
    try:
        load_config_file(f)
    except ValueError as e:
        assert str(f) in str(e)


@pytest.fixture(scope="module")
def good_gguf(gguf_parts, tmp_path_factory) -> Path:
    return gguf_variant(gguf_parts, tmp_path_factory.mktemp("good") / "m.gguf")


def _read_any(f: Path) -> None:
    """read_gguf, describe and read_checkpoint: a result or a ValueError naming the file."""
    for read in (read_gguf, describe, read_checkpoint):
        try:
            read(f)
        except ValueError as e:
            assert str(f) in str(e), str(e)


@PROPERTY
@given(data=st.data())
def test_gguf_reader_takes_any_corruption_of_a_header(data, good_gguf, tmp_path):
    """A good file with bytes of its header changed, cut, or both."""
    raw = bytearray(good_gguf.read_bytes())
    header = min(len(raw), 6000)  # the metadata and tensor infos
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(4, header - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    f = tmp_path / "m.gguf"
    f.write_bytes(bytes(raw))
    _read_any(f)


@PROPERTY
@given(tail=st.binary(max_size=200), version=st.sampled_from([2, 3]))
def test_gguf_reader_takes_any_bytes(tail, version, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<I", version) + tail)
    _read_any(f)
