"""Bad settings and run directories, stage by stage: refused before anything is read or
written, in one line naming the setting (tests/conftest.py: `refused`); a refused run never
touches an existing run directory. And, by property, the settings loader turns any YAML
value into a config or a named error."""

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2.train import STAGE_CONFIGS, load_train_config


def stage_argv(stage: str, inputs, out) -> list:
    """A run of `stage` that would train (tiny), before the case's settings are added."""
    data = {
        "pretrain": None,
        "sft": inputs.sft,
        "reward": inputs.pairs,
        "dpo": inputs.pairs,
        "rejection": inputs.prompts,
        "ppo": inputs.prompts,
        "gatt": inputs.gatt,
    }[stage]
    argv = [stage, "--out", out]
    if stage == "pretrain":
        return [*argv, "model=micro", *inputs.quick]
    argv += [f"init_from={inputs.model}", f"data={data}"]
    if stage in ("rejection", "ppo"):
        argv.append(f"reward_model={inputs.rm}")
    if stage == "ppo":
        return [*argv, "threads=1", "steps=2", "batch_size=2"]
    return [*argv, *inputs.quick]


# (stage, settings added, what the error line names)
CASES = [
    ("sft", ["threads=-1"], "threads must be >= 0"),
    ("sft", ["device=tpu"], "device must be"),
    ("sft", ["device=cuda:99"], "device=cuda:99 is not available"),
    ("pretrain", ["model_args.dim=abc"], "model_args: 'dim'"),
    ("pretrain", ["model_args.n_heads=7"], "not divisible by n_heads 7"),
    ("pretrain", ["model_args.norm_eps=.nan"], "model_args: 'norm_eps'"),
    ("pretrain", ["model_args.vocab_size=null"], "model_args: 'vocab_size'"),
    ("pretrain", ["model=llama3"], "unknown preset 'llama3'"),
    ("pretrain", ["model_args={dmi: 32}"], "model_args: unknown ['dmi']"),
    ("ppo", ["minibatch=0"], "minibatch must be >= 1"),
    ("sft", ["lr=inf"], "setting 'lr': 'inf' is not a finite number"),
    ("sft", ["lr=nan"], "setting 'lr'"),
    ("sft", ["lr=-1"], "lr must be > 0"),
    ("sft", ["lr=fast"], "setting 'lr': 'fast'"),
    ("sft", ["grad_clip=-1"], "grad_clip must be > 0"),
    ("sft", ["eps=0"], "eps must be > 0"),
    ("sft", ["beta1=1"], "beta1 must be in [0, 1)"),
    ("sft", ["weight_decay=-0.1"], "weight_decay must be >= 0"),
    ("sft", ["lora_rank=-3"], "lora_rank must be >= 0"),
    ("sft", ["lora_alpha=0"], "lora_alpha must be > 0"),
    ("sft", ["lora_rank=4", "lora_targets=wq,attn"], "lora_targets: unknown ['attn']"),
    ("sft", ["epochs=-1"], "epochs must be >= 0"),
    ("sft", ["steps=2.5"], "setting 'steps'"),
    ("sft", ["steps=0"], "steps must be >= 1"),
    ("sft", ["batch_size=3", "grad_accum=2"], "not a multiple of grad_accum"),
    ("sft", ["min_lr_ratio=2"], "min_lr_ratio must be in [0, 1]"),
    ("sft", ["autocast=fp8"], "autocast must be"),
    ("sft", ["compile=maybe"], "setting 'compile'"),
    ("sft", ["nonsense"], "override 'nonsense' is not key=value"),
    ("sft", ["kl_beta=0.1"], "sft has no setting 'kl_beta' (a setting of ppo)"),
    ("sft", ["init_from=null"], "sft needs init_from"),
    ("dpo", ["beta=-1"], "beta must be > 0"),
    ("dpo", ["beta=0"], "beta must be > 0"),
    ("reward", ["margin=huge"], "margin must be none, small or large"),
    ("rejection", ["samples_per_prompt=0"], "samples_per_prompt must be >= 1"),
    ("rejection", ["temperature=-1"], "temperature must be >= 0"),
    ("rejection", ["reward_model=null"], "rejection needs init_from"),
    ("gatt", ["temperature=-0.5"], "temperature must be >= 0"),
    ("gatt", ["max_new_tokens=0"], "max_new_tokens must be >= 1"),
    ("gatt", ["replay_rows=-1"], "replay_rows must be >= 0"),
    ("gatt", ["samples_per_turn=0"], "samples_per_turn must be >= 1"),
    ("gatt", ["samples_per_turn=2"], "samples_per_turn > 1 needs reward_model"),
    ("ppo", ["temperature=0"], "temperature must be > 0"),
    ("ppo", ["gae_lambda=2"], "gae_lambda must be in [0, 1]"),
    ("ppo", ["kl_beta=-1"], "kl_beta must be >= 0"),
    ("ppo", ["clip=0"], "clip must be > 0"),
    ("ppo", ["patience=-1"], "patience must be >= 0"),
]


@pytest.mark.parametrize("stage,extra,names", CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_settings_are_refused_naming_the_setting(
    stage, extra, names, stage_inputs, tmp_path, refused
):
    refused([*stage_argv(stage, stage_inputs, tmp_path / "run"), *extra], names, watch=tmp_path)


@pytest.mark.parametrize(
    "stage,setting,names",
    [
        ("sft", "init_from={dir}/nowhere", "no such checkpoint directory"),
        ("sft", "init_from={dir}", "neither config.json"),  # a directory, not a model
        ("rejection", "reward_model={model}", "is not a reward model"),
        ("ppo", "reward_model={model}", "is not a reward model"),
        ("rejection", "safety_model={dir}/nowhere", "no such checkpoint directory"),
        ("gatt", "replay={dir}/nowhere.jsonl", "nowhere.jsonl: cannot read"),
        ("gatt", "safety_model={dir}/nowhere", "no such checkpoint directory"),
        ("gatt", "safety_model={model}", "is not a reward model"),
    ],
)
def test_bad_model_and_data_paths_are_refused(
    stage, setting, names, stage_inputs, tmp_path, refused
):
    setting = setting.format(dir=tmp_path, model=stage_inputs.model)
    argv = [*stage_argv(stage, stage_inputs, tmp_path / "run"), setting]
    refused(argv, names, watch=tmp_path)


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_run_directory_errors(stage, stage_inputs, tmp_path, refused):
    """--out naming a file, --resume without a run, a run without --resume: refused, and
    neither the file nor the run directory changed."""
    f = tmp_path / "taken"
    f.write_text("mine")
    refused(stage_argv(stage, stage_inputs, f), f, "is a file", watch=tmp_path)
    assert f.read_text() == "mine"

    missing = tmp_path / "a" / "b"
    argv = [*stage_argv(stage, stage_inputs, missing), "--resume"]
    refused(argv, missing, "--resume, but there is no such run directory", watch=tmp_path)

    # a run directory holding a complete checkpoint and the stage's own products
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    (run / "checkpoints" / "step_0000001" / "trainer.pt").write_bytes(b"kept")
    for product in ("best.jsonl", "samples.jsonl", "gatt.jsonl"):
        (run / product).write_text('{"kept": true}\n')
    refused(stage_argv(stage, stage_inputs, run), run, "already holds a run", watch=tmp_path)
    assert (run / "best.jsonl").read_text() == '{"kept": true}\n'
    assert (run / "gatt.jsonl").read_text() == '{"kept": true}\n'


@pytest.mark.parametrize("stage", ["rejection", "gatt"])
def test_sampling_stages_never_overwrite_their_samples_without_resume(
    stage, stage_inputs, tmp_path, refused
):
    """Only the sampled files there (no checkpoint yet): still a run, not resampled over."""
    run = tmp_path / "run"
    run.mkdir()
    product = run / ("best.jsonl" if stage == "rejection" else "gatt.jsonl")
    product.write_text('{"kept": true}\n')
    refused(stage_argv(stage, stage_inputs, run), "already holds a run", watch=tmp_path)
    assert product.read_text() == '{"kept": true}\n'


@pytest.mark.parametrize(
    "text,names",
    [
        ("lr: [1, 2]\n", "setting 'lr'"),
        ("- a\n- b\n", "expected a mapping"),
        ("lr: .nan\n", "setting 'lr'"),
        ("keep_last: 1e999\n", "setting 'keep_last'"),
        ("keep_last: .inf\n", "setting 'keep_last'"),
        ("keep_last: 0\n", "keep_last must be >= 1"),
        ("a: [\n", "cannot read the config"),
        ("kl_beta: 1\n", "sft has no setting 'kl_beta'"),
    ],
)
def test_bad_config_files_are_named(text, names, stage_inputs, tmp_path, refused):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    argv = [*stage_argv("sft", stage_inputs, tmp_path / "run"), "--config", config]
    refused(argv, config, names, watch=tmp_path)


def test_missing_config_file(stage_inputs, tmp_path, refused):
    config = tmp_path / "none.yaml"
    argv = [*stage_argv("sft", stage_inputs, tmp_path / "run"), "--config", config]
    refused(argv, config, watch=tmp_path)


# --- property: any YAML value of any setting -> a config or a named error -----------------

yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["none", "auto", "cpu", "1e-3", "nan", "-inf", "small"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    stage=st.sampled_from(sorted(STAGE_CONFIGS)),
    values=st.dictionaries(
        st.sampled_from(
            sorted({f for c in STAGE_CONFIGS.values() for f in c.__dataclass_fields__})
        ),
        yaml_values,
        max_size=3,
    ),
    as_override=st.booleans(),
)
def test_config_loader_takes_any_value(stage, values, as_override, tmp_path):
    path = tmp_path / "c.yaml"
    if as_override:
        overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()]
        path = None
    else:
        path.write_text(yaml.safe_dump(values))
        overrides = []
    try:
        cfg = load_train_config(path, overrides, stage=stage)
    except ValueError as e:
        assert path is None or str(path) in str(e)
        assert any(k in str(e) for k in values) or "model_args" in str(e), str(e)
        return
    assert type(cfg) is STAGE_CONFIGS[stage]
