import json

import numpy as np
import pytest

from llama2.cli import main as cli
from llama2.data import PackedShards, iter_documents, prepare_corpus
from llama2.data.prepare import DataError

DOCS = [
    "def main():\n    print('hello')\n",
    "  Leading spaces, unicode: 日本語 🦙, tabs\tand\nnewlines\n\n",
    "x = 1",
    "class A:\n    pass\n",
]


def _split_docs(ids: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    docs, current = [], None
    for t in ids.tolist():
        if t == bos:
            current = []
        elif t == eos:
            docs.append(current)
            current = None
        else:
            current.append(t)
    return docs


def test_shards_decode_back_to_the_documents(small_tokenizer, tmp_path):
    (tmp_path / "src").mkdir()
    for i, d in enumerate(DOCS[:2]):
        (tmp_path / "src" / f"{i}.py").write_text(d)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[2:]))
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row one", "row two 🦙"]}), tmp_path / "t.parquet")
    inputs = [tmp_path / "src", jsonl, tmp_path / "t.parquet"]
    docs = list(iter_documents(inputs))
    assert docs == DOCS + ["parquet row one", "row two 🦙"]

    out = tmp_path / "shards"
    m = prepare_corpus(iter(docs), small_tokenizer, out, val_every=3, workers=2, progress=False)
    assert m["dtype"] == "uint16" and m["tokenizer_sha256"] == small_tokenizer.sha256()
    shards = PackedShards(out)
    tok = small_tokenizer
    train = _split_docs(np.concatenate(shards.splits["train"]), tok.bos_id, tok.eos_id)
    val = _split_docs(np.concatenate(shards.splits["val"]), tok.bos_id, tok.eos_id)
    # every third document is validation; each decodes back to its text exactly
    assert [tok.decode(d) for d in val] == [docs[2], docs[5]]
    assert [tok.decode(d) for d in train] == [d for i, d in enumerate(docs) if i % 3 != 2]
    assert m["train"]["tokens"] + m["val"]["tokens"] == sum(len(tok.encode(d)) + 2 for d in docs)


def test_batches_depend_on_step_alone_and_split_over_ranks(small_tokenizer, tmp_path):
    docs = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(50)]
    prepare_corpus(docs, small_tokenizer, tmp_path / "s", val_every=10, workers=1, progress=False)
    shards = PackedShards(tmp_path / "s")
    x, y = shards.batch(step=7, batch_size=4, seq_len=32, seed=1)
    x2, _ = shards.batch(step=7, batch_size=4, seq_len=32, seed=1)
    assert x.shape == (4, 32) and (x == x2).all() and (x[:, 1:] == y[:, :-1]).all()
    assert not (shards.batch(step=8, batch_size=4, seq_len=32, seed=1)[0] == x).all()
    halves = [shards.batch(7, 4, 32, seed=1, part=r, parts=2)[0] for r in range(2)]
    assert (np.concatenate(halves) == x.numpy()).all()  # two ranks draw the same global batch


def test_bad_inputs_are_named_and_leave_nothing(small_tokenizer, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two \xff\xfe\n")
    with pytest.raises(DataError, match=r"bad.txt:2: invalid UTF-8"):
        prepare_corpus(iter_documents([bad]), small_tokenizer, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: no 'text' field"):
        list(iter_documents([rows]))
    rows.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: invalid JSON"):
        list(iter_documents([rows]))
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents([tmp_path / "missing.txt"]))


def test_data_prepare_command(small_tokenizer, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.md").write_text("# Title\n\nSome text.\n")
    small_tokenizer.save(tmp_path / "tok.model")
    argv = ["data", "prepare", str(tmp_path / "in"), "--tokenizer", str(tmp_path / "tok.model")]
    assert cli([*argv, "--out", str(tmp_path / "out"), "--val-every", "0"]) == 0
    assert "1 documents" in capsys.readouterr().err
    assert (
        PackedShards(tmp_path / "out").tokens("train")
        == len(small_tokenizer.encode("# Title\n\nSome text.\n")) + 2
    )
    assert cli([*argv, "--out", str(tmp_path / "out")]) == 1  # exists: refused, not clobbered
    assert "already exists" in capsys.readouterr().err


def test_only_newline_ends_a_jsonl_line(tmp_path):
    # U+2028 and U+0085 may stand raw inside a JSON string; a CRLF line ending is accepted
    rows = tmp_path / "u.jsonl"
    rows.write_text(json.dumps({"text": "a\u2028b\u0085c"}, ensure_ascii=False) + "\r\n")
    assert list(iter_documents([rows])) == ["a\u2028b\u0085c"]


def test_a_validation_split_of_every_document_is_refused(small_tokenizer, tmp_path):
    with pytest.raises(DataError, match="val_every must be 0"):
        prepare_corpus(["x"], small_tokenizer, tmp_path / "o", val_every=1, progress=False)
    assert not (tmp_path / "o").exists()


def test_every_rank_gets_as_many_validation_batches(small_tokenizer, tmp_path):
    # even when the validation windows do not split evenly over the ranks
    docs = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(50)]
    prepare_corpus(docs, small_tokenizer, tmp_path / "s", val_every=3, workers=1, progress=False)
    shards = PackedShards(tmp_path / "s")
    counts = [len(list(shards.val_batches(3, 37, 1000, rank=r, world=2))) for r in range(2)]
    assert counts[0] == counts[1] > 0
