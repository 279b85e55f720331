"""Training health: a step whose loss or gradient norm is not finite stops the run with a
message naming the step, before the update reaches the weights, so that no checkpoint of
NaNs is written and the run exits non-zero (it used to save a NaN model and exit 0)."""

import math

import pytest
import torch

from llama2 import load
from llama2.cli import main
from llama2.train.loop import NonFiniteError, check_finite


@pytest.mark.parametrize("loss,norm", [(math.nan, 1.0), (1.0, math.inf), (-math.inf, 0.0)])
def test_check_finite_names_the_step(loss, norm):
    with pytest.raises(NonFiniteError, match="step 7: loss .*, gradient norm .*not finite"):
        check_finite(7, loss, norm)
    check_finite(7, 1.0, 2.0)  # finite: nothing to say


def _error(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_a_diverging_run_stops_at_the_step_and_keeps_only_finite_checkpoints(
    stage_inputs, tmp_path, capsys
):
    """lr=1e30 is a finite setting, and its first update makes the weights overflow: the
    next step's gradient is NaN. The run stops there, and every checkpoint it left is finite."""
    out = tmp_path / "run"
    argv = ["sft", "--out", out, f"init_from={stage_inputs.model}", f"data={stage_inputs.sft}"]
    capsys.readouterr()
    code = main([str(a) for a in [*argv, *stage_inputs.quick, "steps=4", "lr=1e30"]])
    line = _error(capsys.readouterr().err)
    assert code == 1 and "llama2 sft: error: step 2: " in line and "not finite" in line
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_0000001"]  # step 2 was never taken, nor saved
    for name, t in load(out / "model").model.state_dict().items():
        assert torch.isfinite(t).all(), name


def test_ppo_stops_at_a_non_finite_iteration(stage_inputs, tmp_path, capsys):
    out = tmp_path / "ppo"
    argv = [
        "ppo",
        "--out",
        out,
        f"init_from={stage_inputs.model}",
        f"data={stage_inputs.prompts}",
        f"reward_model={stage_inputs.rm}",
        "threads=1",
        "steps=3",
        "batch_size=2",
        "minibatch=2",
        "max_new_tokens=4",
        "lr=1e30",
    ]
    capsys.readouterr()
    code = main([str(a) for a in argv])
    line = _error(capsys.readouterr().err)
    assert code == 1 and "iteration " in line and "not finite" in line
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
