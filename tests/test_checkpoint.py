import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llama2 import ModelConfig, Transformer, load, read_checkpoint, save_gguf, save_hf, save_meta
from llama2.checkpoint import describe, ours_to_meta
from llama2.cli import main as cli
from llama2.gguf_format import GGMLType, T, write_gguf

CFG = ModelConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=128
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(CFG).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.attention_norm.weight.uniform_(0.5, 1.5)
    return m


def _meta_shards(path):
    files = sorted(path.glob("consolidated.*.pth"))
    return [torch.load(f, weights_only=True) for f in files]


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_hf_meta_hf_is_bit_identical(model, small_tokenizer, tmp_path):
    save_hf(tmp_path / "hf", CFG, model.state_dict(), small_tokenizer)
    assert (
        cli(
            [
                "convert",
                str(tmp_path / "hf"),
                str(tmp_path / "meta"),
                "--to",
                "meta",
                "--shards",
                "2",
            ]
        )
        == 0
    )
    assert cli(["convert", str(tmp_path / "meta"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    _assert_identical(
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "hf2" / "model.safetensors"),
    )
    # params.json has no field for the context length (Meta's loader rejects one): all else
    # in config.json survives the trip
    before, after = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "hf2"))
    assert before.pop("max_position_embeddings") == 128
    assert after.pop("max_position_embeddings") == 4096
    assert after == before
    assert (tmp_path / "hf2" / "tokenizer.model").read_bytes() == small_tokenizer.model_proto
    # the two model-parallel shards split as Meta's do
    s0, s1 = _meta_shards(tmp_path / "meta")
    assert s0["layers.0.attention.wq.weight"].shape == (32, 64)  # dim 0
    assert s0["layers.0.attention.wk.weight"].shape == (16, 64)  # one kv head each
    assert s0["layers.0.attention.wo.weight"].shape == (64, 32)  # dim 1
    assert s0["layers.0.feed_forward.w2.weight"].shape == (64, 96)
    assert s0["tok_embeddings.weight"].shape == (512, 32)
    assert s0["output.weight"].shape == (256, 64)
    assert torch.equal(s0["norm.weight"], s1["norm.weight"])  # replicated


def test_meta_hf_meta_is_bit_identical(model, small_tokenizer, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_meta(tmp_path / "meta", CFG, bf16, small_tokenizer, shards=2)
    assert cli(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (
        cli(
            [
                "convert",
                str(tmp_path / "hf"),
                str(tmp_path / "meta2"),
                "--to",
                "meta",
                "--shards",
                "2",
            ]
        )
        == 0
    )
    for a, b in zip(_meta_shards(tmp_path / "meta"), _meta_shards(tmp_path / "meta2"), strict=True):
        _assert_identical(a, b)
    params = json.loads((tmp_path / "meta2" / "params.json").read_text())
    assert params == json.loads((tmp_path / "meta" / "params.json").read_text())
    assert load(tmp_path / "hf").dtype == torch.bfloat16  # the stored dtype is kept


def test_meta_checkpoint_in_transformers(model, small_tokenizer, tmp_path):
    """A Meta checkpoint (interleaved q/k rows) converted to HF runs in transformers with the
    logits our model computes from the Meta files."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    save_meta(tmp_path / "meta", CFG, model.state_dict(), small_tokenizer, shards=2)
    save_hf(tmp_path / "hf", *_read(tmp_path / "meta"))
    ours = load(tmp_path / "meta")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    text = "def load(path):\n    return path"
    ids = small_tokenizer.encode(text, bos=True)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode(text) == ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours.model(tokens) - theirs(tokens).logits).abs().max()
    assert diff < 1e-4
    with torch.no_grad():
        assert (ours.model(tokens) - model(tokens)).abs().max() < 1e-5


def _read(path):
    ckpt = read_checkpoint(path)
    return ckpt.config, ckpt.state_dict, ckpt.tokenizer


def test_gguf_export_read_by_gguf_package(model, small_tokenizer, tmp_path):
    import gguf

    sd = model.state_dict()
    path = save_gguf(tmp_path / "m.gguf", CFG, sd, small_tokenizer, "f32")
    reader = gguf.GGUFReader(path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert field("llama.embedding_length") == 64 and field("llama.feed_forward_length") == 192
    assert field("llama.rope.dimension_count") == 16 and field("llama.context_length") == 128
    assert field("tokenizer.ggml.model") == "llama"
    pieces = small_tokenizer.pieces()
    assert field("tokenizer.ggml.tokens") == [p for p, _, _ in pieces]
    assert np.allclose(field("tokenizer.ggml.scores"), [s for _, s, _ in pieces])
    assert field("tokenizer.ggml.token_type") == [t for _, _, t in pieces]
    assert field("tokenizer.ggml.bos_token_id") == 1 and field("tokenizer.ggml.eos_token_id") == 2

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(sd)
    # llama.cpp's layout: Meta's interleaved q/k rows, gguf's reversed dims
    wq = tensors["blk.1.attn_q.weight"]
    assert wq.tensor_type == gguf.GGMLQuantizationType.F32
    expect = ours_to_meta(sd["layers.1.attention.wq.weight"], CFG.n_heads).numpy()
    assert np.array_equal(np.asarray(wq.data).reshape(expect.shape), expect)
    expect = ours_to_meta(sd["layers.0.attention.wk.weight"], CFG.n_kv_heads).numpy()
    assert np.array_equal(
        np.asarray(tensors["blk.0.attn_k.weight"].data).reshape(expect.shape), expect
    )
    for ours, theirs in [
        ("tok_embeddings", "token_embd"),
        ("output", "output"),
        ("layers.1.feed_forward.w2", "blk.1.ffn_down"),
        ("layers.0.attention_norm", "blk.0.attn_norm"),
    ]:
        expect = sd[f"{ours}.weight"].numpy()
        got = np.asarray(tensors[f"{theirs}.weight"].data).reshape(expect.shape)
        assert np.array_equal(got, expect), ours
    # the tokenizer comes back from the GGUF file, and so does the whole model
    back = load(path)
    assert back.tokenizer.encode("x = 1") == small_tokenizer.encode("x = 1")
    tokens = torch.tensor([small_tokenizer.encode("import os", bos=True)])
    with torch.no_grad():
        assert torch.equal(back.model(tokens), model(tokens))


def test_gguf_q8_0_within_quantization_error(model, small_tokenizer, tmp_path):
    import gguf
    from gguf.quants import dequantize

    sd = model.state_dict()
    path = save_gguf(tmp_path / "m.gguf", CFG, sd, small_tokenizer, "q8_0")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == 7
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            got = dequantize(t.data, t.tensor_type).reshape(192, 64)
            want = sd["layers.0.feed_forward.w3.weight"].numpy()
            # each value within half a quantization step of its 32-value block (+ fp16 scale)
            step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            err = np.abs(got - want).reshape(-1, 32)
            assert (err <= step * 0.5 + 1e-3 * np.abs(want.reshape(-1, 32)) + 1e-7).all()
            assert err.max() > 0
        if t.name == "output_norm.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
    tokens = torch.tensor([small_tokenizer.encode("for i in range(3):", bos=True)])
    with torch.no_grad():
        ref = model(tokens)
        rel = (load(path).model(tokens) - ref).norm() / ref.norm()
    assert rel < 0.02


def test_malicious_pickle_is_refused(model, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    save_meta(tmp_path / "meta", CFG, model.state_dict())
    shard = tmp_path / "meta" / "consolidated.00.pth"
    sd = torch.load(shard, weights_only=True)
    sd["extra"] = Payload()
    torch.save(sd, shard)
    with pytest.raises(ValueError, match="refused.*could run code"):
        load(tmp_path / "meta")
    assert not marker.exists()


def test_hf_sharded_checkpoint(model, small_tokenizer, tmp_path):
    save_hf(tmp_path / "hf", CFG, model.state_dict(), small_tokenizer, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    tokens = torch.tensor([[1, 5, 9, 300]])
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "hf").model(tokens), model(tokens))
    assert load(tmp_path / "hf", dtype="bfloat16").dtype == torch.bfloat16


def test_save_refuses_a_non_empty_directory(model, small_tokenizer, tmp_path):
    d = save_hf(tmp_path / "hf", CFG, model.state_dict(), small_tokenizer)
    with pytest.raises(ValueError, match="already exists"):
        save_hf(d, CFG, model.state_dict())


def test_config_disagreeing_with_the_tensors_is_named(model, small_tokenizer, tmp_path):
    d = save_hf(tmp_path / "hf", CFG, model.state_dict(), small_tokenizer)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing tensors.*layers.2"):
        load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match="w1.weight has shape"):
        load(d)


def test_unreadable_config_and_unknown_directory_are_named(model, small_tokenizer, tmp_path):
    d = save_hf(tmp_path / "hf", CFG, model.state_dict(), small_tokenizer)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        load(d)
    with pytest.raises(ValueError, match="neither config.json"):
        load(tmp_path)


def test_failed_save_leaves_no_directory_or_temporary(model, tmp_path):
    with pytest.raises(ValueError, match="cannot split into 3"):
        save_meta(tmp_path / "m3", CFG, model.state_dict(), shards=3)
    assert not (tmp_path / "m3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_failed_gguf_write_leaves_no_file(tmp_path):
    bad = [("x.weight", (4,), GGMLType.F32, np.zeros(3, np.float32))]
    with pytest.raises(ValueError, match="payload of 12 bytes, expected 16"):
        write_gguf(tmp_path / "m.gguf", {"general.name": (T.STRING, "x")}, bad)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_checkpoint_read_parses_config_json_once(model, small_tokenizer, tmp_path, monkeypatch):
    """quantization, head and config all come from one read of config.json."""
    d = save_hf(tmp_path / "hf", CFG, model.state_dict(), small_tokenizer)
    reads = []
    read_text = Path.read_text

    def counting_read_text(self, *args, **kwargs):
        reads.append(self.name)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    read_checkpoint(d)
    assert reads.count("config.json") == 1
    load(d)
    assert reads.count("config.json") == 2
    describe(d)
    assert reads.count("config.json") == 3


def test_info_and_tokenize_commands(model, small_tokenizer, tmp_path, capsys):
    d = save_hf(tmp_path / "hf", CFG, model.state_dict(), small_tokenizer, dtype="bfloat16")
    assert cli(["info", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == CFG.num_params() and info["dtypes"] == {
        "bfloat16": CFG.num_params()
    }
    assert info["layout"] == "hf" and info["size_on_disk"] > 2 * CFG.num_params()
    assert cli(["tokenize", str(d), "def f(x):", "--bos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == small_tokenizer.encode("def f(x):", bos=True)
    assert cli(["info", str(tmp_path / "nope")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err


_LLAMA_CPP_CHILD = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, text, out = sys.argv[1:]
cpp = Llama(path, n_ctx=128, logits_all=True, verbose=False, n_threads=2)
ids = cpp.tokenize(text.encode(), add_bos=True)
cpp.eval(ids)
np.save(out, np.array(cpp.scores[: len(ids)]))
print(json.dumps(ids))
"""


def llama_cpp_logits(path, text: str, tmp_path) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's token ids (with BOS) and logits for `text`, computed in a child process: a
    native crash of the oracle (an instruction the CPU refuses) fails this one test, by name."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "scores.npy"
    run = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP_CHILD, str(path), text, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode < 0:
        name = signal.Signals(-run.returncode).name
        pytest.fail(
            f"llama.cpp crashed ({name}) on {path.name}: a build for another CPU? Reinstall it "
            f"portably: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --no-cache-dir "
            f"--force-reinstall llama-cpp-python\n{run.stderr[-2000:]}"
        )
    assert run.returncode == 0, f"llama.cpp failed on {path.name}:\n{run.stderr[-2000:]}"
    return json.loads(run.stdout.splitlines()[-1]), torch.tensor(np.load(out))


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_gguf_export_runs_in_llama_cpp(small_tokenizer, tmp_path, gguf_type):
    """llama.cpp itself loads the exported file, tokenizes like us and computes the logits we
    compute from the same file."""
    torch.manual_seed(4)
    model = Transformer(CFG).eval()
    with torch.no_grad():  # larger weights than init: logits of a few units, not near zero
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5)
    path = save_gguf(tmp_path / "m.gguf", CFG, model.state_dict(), small_tokenizer, gguf_type)
    text = "def read(path):\n    with open(path) as f:\n        return f.read()"
    ids = small_tokenizer.encode(text, bos=True)
    their_ids, theirs = llama_cpp_logits(path, text, tmp_path)
    assert their_ids == ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        exact = model(tokens)[0]
        stored = load(path, dtype="float32").model(tokens)[0]  # the file's (rounded) weights
    scale = exact.abs().max()
    assert scale > 2
    weight_rounding = (stored - exact).abs().max()
    # llama.cpp keeps its KV cache in f16 (~1e-3), and for q8_0 also rounds the activations
    # to 8-bit blocks, an error no larger than the weights' own rounding
    bound = 2e-3 * scale + (weight_rounding if gguf_type == "q8_0" else 0)
    assert (theirs - stored).abs().max() < bound
    if gguf_type != "q8_0":  # (8-bit activations flip near-ties; the bound above is the check)
        assert torch.equal(theirs.argmax(-1), exact.argmax(-1))


def test_gguf_f16_loads_as_f16(model, small_tokenizer, tmp_path):
    path = save_gguf(tmp_path / "m.gguf", CFG, model.state_dict(), small_tokenizer, "f16")
    llm = load(path)
    assert {p.dtype for p in llm.model.parameters()} == {torch.float16}  # f32 norms joined in
    tokens = torch.tensor([[1, 40, 41, 300]])
    with torch.no_grad():
        ref = model(tokens)
        assert (llm.model(tokens) - ref).abs().max() < 1e-2 * ref.abs().max()


def test_rope_scaling_refused_by_meta_kept_by_gguf(model, small_tokenizer, tmp_path):
    scaled = CFG.replace(rope_scaling=2.0)
    with pytest.raises(ValueError, match="no field for RoPE scaling"):
        save_meta(tmp_path / "meta", scaled, model.state_dict())
    path = save_gguf(tmp_path / "m.gguf", scaled, model.state_dict(), small_tokenizer, "f32")
    assert load(path).config.rope_scaling == 2.0


def test_truncated_gguf_is_named(model, small_tokenizer, tmp_path):
    path = save_gguf(tmp_path / "m.gguf", CFG, model.state_dict(), small_tokenizer, "f32")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="cut.gguf: tensor .* runs past the end"):
        load(tmp_path / "cut.gguf")


def test_meta_shard_of_the_wrong_shape_is_named(model, tmp_path):
    save_meta(tmp_path / "m2", CFG, model.state_dict(), shards=2)
    shard = tmp_path / "m2" / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    sd["layers.0.attention.wo.weight"] = sd["layers.0.attention.wo.weight"][:-1]
    torch.save(sd, shard)
    with pytest.raises(ValueError, match="consolidated.01.pth: layers.0.attention.wo.weight"):
        load(tmp_path / "m2")


def test_negative_start_pos_is_refused(model):
    with pytest.raises(ValueError, match="start_pos must be >= 0"):
        model.setup_cache(1, 16)
        try:
            model(torch.tensor([[1]]), start_pos=-1)
        finally:
            model.clear_cache()
