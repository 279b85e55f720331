"""A full disk: a checkpoint or a conversion that cannot be written says "no space left on
DEVICE writing PATH" (exit 1, no traceback), leaves no temporary behind and the previous
checkpoint whole, and `--resume` continues once there is space again. On a real tmpfs where
the machine lets a test mount one (a user and mount namespace, `unshare -rm`), and always by
making the writes fail as a full disk makes them fail."""

import errno
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llama2
from llama2.cli import main


def run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def sft_argv(inputs, out: Path, steps: int) -> list:
    return [
        "sft",
        "--out",
        out,
        f"init_from={inputs.model}",
        f"data={inputs.sft}",
        *inputs.quick,
        f"steps={steps}",
        "keep_last=5",
    ]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how", ["ENOSPC", "errno dropped"])
def test_checkpoint_on_a_full_disk_is_named_and_resumes(
    how, stage_inputs, tmp_path, capsys, monkeypatch
):
    """ENOSPC: the errno reaches us (safetensors, Python's writes). errno dropped: torch's
    writer fails with "unexpected pos" on a disk left with no space."""
    out = tmp_path / "run"
    assert run(sft_argv(stage_inputs, out, 1), capsys)[0] == 0
    first = out / "checkpoints" / "step_0000001"
    kept = tree_bytes(first)

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if not isinstance(f, str | Path) or Path(f).name != "trainer.pt":
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"\0" * 100)  # a partial write, then the failure
        if how == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing_save)
    if how == "errno dropped":
        monkeypatch.setattr("llama2.io.free_bytes", lambda path: 0)
    code, err = run([*sft_argv(stage_inputs, out, 2), "--resume"], capsys)
    line = error_line(err)
    assert code == 1
    assert "no space left on " in line and f"writing {out}/checkpoints/step_0000002" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001"]
    assert tree_bytes(first) == kept  # the previous checkpoint untouched

    monkeypatch.undo()  # space again
    assert run([*sft_argv(stage_inputs, out, 2), "--resume"], capsys)[0] == 0
    assert (out / "checkpoints" / "step_0000002" / "trainer.pt").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2]


def test_convert_onto_a_full_disk_leaves_nothing(stage_inputs, tmp_path, refused, monkeypatch):
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("llama2.checkpoint.hf.save_file", full)
    dst = tmp_path / "converted"
    refused(
        ["convert", stage_inputs.model, dst, "--to", "hf"],
        "no space left on",
        f"writing {dst}",
        watch=tmp_path,
    )


def test_a_metrics_row_cut_by_a_full_disk_is_not_a_row(tmp_path):
    from llama2.data.jsonl import read_jsonl_rows

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_jsonl_rows(f) == [{"step": 1, "loss": 2.0}]


# --- a real full filesystem ----------------------------------------------------------------

SCRIPT = """
import contextlib, io, json, os, shutil, sys
from pathlib import Path
from llama2.cli import main

small, model, sft, quick = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
out = small / "run"

def cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()

def sft_run(steps, *more):
    return cli("sft", "--out", out, f"init_from={model}", f"data={sft}", *quick,
               f"steps={steps}", "keep_last=5", *more)

def listing():
    return sorted(str(p.relative_to(small)) for p in small.rglob("*"))

result = {"first": sft_run(1)}
first = out / "checkpoints" / "step_0000001"
kept = {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()}
st = os.statvfs(small)  # fill the disk but for 256 KiB: room for the metrics, not the checkpoint
(small / "filler").write_bytes(b"\\0" * (st.f_bavail * st.f_frsize - 2**18))
before = listing()
result["full"] = sft_run(2, "--resume")
result["full_listing"] = sorted(set(listing()) - set(before))
result["kept"] = kept == {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()}
before = listing()
result["convert"] = cli("convert", model, small / "m.gguf", "--to", "gguf")
result["convert_hf"] = cli("convert", model, small / "hf", "--to", "hf")
result["convert_listing"] = sorted(set(listing()) ^ set(before))
(small / "filler").unlink()
result["resumed"] = sft_run(2, "--resume")
result["last"] = sorted(p.name for p in (out / "checkpoints").iterdir())
print(json.dumps(result))
"""


@pytest.mark.slow  # a Python process of its own, in a mount namespace
def test_a_real_full_tmpfs(stage_inputs, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {small}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"this machine does not let a test mount a tmpfs: {probe.stderr.strip()}")
    script = tmp_path / "full.py"
    script.write_text(textwrap.dedent(SCRIPT))
    root = Path(llama2.__file__).resolve().parents[1]
    quick = " ".join(stage_inputs.quick)
    shell = (
        f"mount -t tmpfs -o size=8m tmpfs {small} && cd {root} && "
        f"{sys.executable} {script} {small} {stage_inputs.model} {stage_inputs.sft} {quick}"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", shell],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["first"][0] == 0, r["first"][1][-2000:]
    code, err = r["full"]
    line = error_line(err)
    assert code == 1
    assert f"no space left on tmpfs at {small} writing {small}/run/checkpoints/step_0000002" in line
    # no temporary left: at most the metrics row and config rewritten, no new path
    assert not [p for p in r["full_listing"] if ".tmp" in p or "step_0000002" in p], r
    assert r["kept"]
    for key in ("convert", "convert_hf"):
        code, err = r[key]
        assert code == 1 and "no space left on tmpfs at" in error_line(err), err[-2000:]
    assert r["convert_listing"] == []
    assert r["resumed"][0] == 0, r["resumed"][1][-2000:]
    assert r["last"] == ["step_0000001", "step_0000002"]
