"""`llama2 data prepare`: text files, JSONL and Parquet into packed token shards.

Documents are tokenized in parallel, each as BOS + ids + EOS, and concatenated into flat
numpy files (uint16 when the vocabulary fits, else uint32). One document in `val_every`
goes to the validation split. A manifest records the tokenizer's hash and the counts. The
shard set is written into a temporary directory renamed into place: it appears whole or not
at all.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io import atomic_dir
from ..tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
SHARD_TOKENS = 50_000_000  # tokens per shard file


class DataError(ValueError):
    pass


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {e.start})") from e


def iter_documents(inputs: Sequence[str | Path], field: str = "text") -> Iterator[str]:
    """Every document of the inputs, in a stable order: each text file is one document, each
    JSONL line or Parquet row one document (its `field`)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise DataError(f"{path}: no {'/'.join(TEXT_SUFFIXES)} files inside")
            for f in files:
                yield _read_text(f)
        elif not path.exists():
            raise DataError(f"{path}: no such file or directory")
        elif path.suffix == ".jsonl":
            yield from _jsonl(path, field)
        elif path.suffix == ".parquet":
            yield from _parquet(path, field)
        elif path.suffix in TEXT_SUFFIXES:
            yield _read_text(path)
        else:
            raise DataError(f"{path}: unsupported file type (text, .jsonl or .parquet)")


def _jsonl(path: Path, field: str) -> Iterator[str]:
    text = _read_text(path)
    # only "\n" ends a JSONL line (U+2028 and friends may stand raw inside strings)
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg}") from e
        if not isinstance(obj, dict) or field not in obj:
            raise DataError(f"{path}:{n}: no '{field}' field")
        if not isinstance(obj[field], str):
            raise DataError(f"{path}:{n}: '{field}' is {type(obj[field]).__name__}, not text")
        yield obj[field]


def _parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    if field not in table.schema_arrow.names:
        raise DataError(f"{path}: no '{field}' column (columns: {table.schema_arrow.names})")
    row = 0
    for batch in table.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: '{field}' is not text")
            yield value


def stdlib_documents(max_bytes: int = 8_000_000) -> list[str]:
    """The embedded default corpus: this interpreter's standard library sources (code and
    docstrings), present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, size = [], 0
    for f in sorted(root.rglob("*.py")):
        if "test" in f.parts or "idlelib" in f.parts or "site-packages" in f.parts:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return docs


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(proto: bytes) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(proto)


def _encode(doc: str) -> np.ndarray:
    tok = _WORKER_TOKENIZER
    return np.asarray(tok.encode(doc, bos=True, eos=True), dtype=np.uint32)


class _ShardWriter:
    def __init__(self, directory: Path, split: str, dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.files: list[dict] = []
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.documents += 1
        if self.buffered >= SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.split}_{len(self.files):04d}.bin"
        data = np.concatenate(self.buffer).astype(self.dtype)
        data.tofile(self.directory / name)
        self.files.append({"file": name, "tokens": int(len(data))})
        self.tokens += len(data)
        self.buffer, self.buffered = [], 0


def prepare_corpus(
    documents: Iterator[str] | Sequence[str],
    tokenizer: Tokenizer,
    out: str | Path,
    val_every: int = 100,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize documents into packed shards in `out`; return the manifest."""
    if val_every < 0 or val_every == 1:
        raise DataError(f"val_every must be 0 (no validation) or at least 2, not {val_every}")
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    workers = workers or os.cpu_count() or 1
    with atomic_dir(out, overwrite=overwrite) as tmp:
        train = _ShardWriter(tmp, "train", dtype)
        val = _ShardWriter(tmp, "val", dtype)
        bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)
        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(workers, _init_worker, (tokenizer.model_proto,)) as pool:
            for i, ids in enumerate(pool.imap(_encode, documents, chunksize=16)):
                (val if val_every and i % val_every == val_every - 1 else train).add(ids)
                bar.update()
                bar.set_postfix(tokens=f"{train.tokens + train.buffered:,}", refresh=False)
        bar.close()
        train.flush()
        val.flush()
        if train.tokens == 0:
            raise DataError("no training tokens: the inputs hold no documents")
        manifest = {
            "tokenizer_sha256": tokenizer.sha256(),
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "dtype": np.dtype(dtype).name,
            "val_every": val_every,
            "train": {"documents": train.documents, "tokens": train.tokens, "shards": train.files},
            "val": {"documents": val.documents, "tokens": val.tokens, "shards": val.files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        tokenizer.save(tmp / "tokenizer.model")
    return manifest
