"""The typed config tree: defaults, YAML differences, dotted overrides, errors naming the key, DeepSpeed dict."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from promoter_dist.config import TrainConfig, config_dict, dump_yaml, load_config, parse_override, to_deepspeed
from promoter_dist.data.loader import LoaderConfig, View
from promoter_dist.data.shards import VIEWS
from promoter_dist.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.yml"))


def error_of(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:  # one error type for every config problem, a UserError
        load_config(path, list(overrides))
    message = str(caught.value)
    assert "\n" not in message, message  # one line for the user
    return message


# --------------------------------------------------------------------------- defaults and files


def test_defaults_build_and_are_nads_recipe():
    config = load_config()
    assert config == TrainConfig()
    assert config.model.name == "nad" and config.task.name == "regression"
    assert config.optim.lr == 2e-4 and config.optim.weight_decay == 0.05
    assert config.task.smooth_l1_beta == 0.1 and config.task.label_noise == 0.05
    assert config.schedule.final_factor == 0.01 and config.schedule.per_epoch is True
    assert config.view == "nad" and config.tokens == "nad"


def test_the_repository_has_config_files():
    assert len(CONFIG_FILES) >= 2, CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_file_loads(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    to_deepspeed(config, world_size=8)  # and converts


def leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_file_values_land_in_the_tree_and_the_rest_are_defaults(path):
    import yaml

    written = dict(leaves(yaml.safe_load(path.read_text()) or {}))
    assert written, path
    resolved = dict(leaves(config_dict(load_config(path))))
    defaults = dict(leaves(config_dict(TrainConfig())))
    for key, value in resolved.items():
        if key in written:
            expected = written[key]
            if isinstance(expected, str) and isinstance(value, float):
                expected = float(expected)  # YAML 1.1 reads 1e-4 as a string
            assert value == expected, key
        elif key == "run.best_metric":  # resolved from the task when left at ''
            assert value == ("loss" if resolved["task.name"] == "mlm" else "pearson"), key
        else:
            assert value == defaults[key], key
    assert set(written) <= set(resolved)


def test_tuples_in_a_file_become_tuples(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  nad:\n    channels: [32, 48, 64, 80, 96]\n    depths: [1, 1, 1, 1]\n")
    config = load_config(path)
    assert config.model.nad.channels == (32, 48, 64, 80, 96)
    assert config.model.nad.depths == (1, 1, 1, 1)
    assert config.optim.weight_decay == 0.05  # not in the file: the default


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("override, key", [
    ("optim.gsam.rhoo=0.1", "optim.gsam.rhoo"),
    ("model.nad.chanels=[8,8]", "model.nad.chanels"),
    ("model.bert.hiden=64", "model.bert.hiden"),
    ("engine.zero=2", "engine.zero"),
    ("runn.epochs=2", "runn"),
])
def test_unknown_key_is_named_in_full(override, key):
    message = error_of(override)
    assert f"unknown config key {key} " in message, message


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  gsam:\n    enabled: true\n    rhoo: 0.2\n")
    message = error_of(path=path)
    assert str(path) in message and "optim.gsam.rhoo" in message, message


def test_non_string_yaml_keys_are_unknown_keys_not_a_crash(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  1: a\n  out_dir: x\n  epochs_: 3\n")
    message = error_of(path=path)
    assert "unknown config key run.1" in message, message


# --------------------------------------------------------------------------- wrong types and bad values


@pytest.mark.parametrize("override, key", [
    ("engine.zero_stage=two", "engine.zero_stage"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("optim.lr=abc", "optim.lr"),
    ("run.epochs=true", "run.epochs"),  # a bool is not an integer
    ("run.plots=1", "run.plots"),
    ("run.out_dir=[a, b]", "run.out_dir"),
    ("optim.betas=0.9", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9, x]", "optim.betas[1]"),
    ("model.nad.channels=[8, 8.5, 16, 16, 16]", "model.nad.channels[1]"),
    ("model.nad.head_dim=abc", "model.nad.head_dim"),
    ("optim.gsam=5", "optim.gsam"),
    ("optim.lr=null", "optim.lr"),
])
def test_wrong_type_names_the_key(override, key):
    message = error_of(override)
    assert message.startswith(key + ":") or f"{key} " in message, message


@pytest.mark.parametrize("override, key", [
    ("engine.zero_stage=4", "engine.zero_stage"),
    ("engine.precision=fp8", "engine.precision"),
    ("engine.gradient_clipping=-1", "engine.gradient_clipping"),
    ("engine.grad_accum=0", "engine.grad_accum"),
    ("engine.nonfinite=ignore", "engine.nonfinite"),
    ("engine.offload_optimizer=nvme", "engine.offload_optimizer"),
    ("engine.timeout_s=0", "engine.timeout_s"),  # a zero timeout fails every collective at once
    ("engine.timeout_s=-5", "engine.timeout_s"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.view=short", "data.view"),
    ("data.kmer_frame=3", "data.kmer_frame"),
    ("data.kmer_flank_bp=18", "data.kmer_flank_bp"),  # frames 1 and 2 skip two vector bases before the row
    ("data.kmer_flank_bp=151", "data.kmer_flank_bp"),
    ("run.log_every=0", "run.log_every"),
    ("run.epochs=-1", "run.epochs"),
    ("run.resume=sometimes", "run.resume"),
    ("run.best_metric=pearsn", "run.best_metric"),
    ("schedule.plateau_metric=los", "schedule.plateau_metric"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),  # YAML 'nan' is a string; float('nan') passes every range check
    ("optim.lr=.inf", "optim.lr"),
    ("task.smooth_l1_beta=.nan", "task.smooth_l1_beta"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("optim.name=sgd", "optim.name"),
    ("schedule.name=step", "schedule.name"),
    ("schedule.final_factor=1.5", "schedule.final_factor"),
    ("task.loss=l1", "task.loss"),
    ("task.mask_prob=1", "task.mask_prob"),
    ("model.name=cnn", "model.name"),
    ("model.nad.fpn_dim=0", "model.nad.fpn_dim"),
    ("optim.gsam.rho_max=-0.1", "optim.gsam.rho_max"),
    ("model.bert.heads=3", "model.bert.heads"),
])
def test_bad_value_names_the_key(override, key):
    message = error_of(override)
    assert key in message, message


# Settings typed Literal[...]: the coercer checks them against the type, the message names key and choices.
CHOICES = [
    ("run", "resume", "sometimes", ["auto", "never"]),
    ("data", "view", "short", ["", "all", "nad", "top"]),
    ("data", "kmer_frame", 3, [0, 1, 2]),
    ("model", "name", "cnn", ["nad", "bert", "legnet", "dream_rnn"]),
    ("task", "name", "ranking", ["regression", "mlm", "soft_classification"]),
    ("task", "loss", "l1", ["smooth_l1", "mse"]),
    ("task", "label_map", "log", ["nad", "none"]),
    ("optim", "name", "sgd", ["adamw", "adam", "lion"]),
    ("schedule", "name", "step", ["linear", "cosine", "constant", "plateau", "one_cycle"]),
    ("engine", "zero_stage", 4, [0, 1, 2, 3]),
    ("engine", "precision", "fp8", ["fp32", "bf16", "fp16"]),
    ("engine", "nonfinite", "ignore", ["stop", "skip"]),
    ("engine", "offload_optimizer", "nvme", ["none", "cpu"]),
]


def assert_names_key_and_choices(message: str, key: str, bad, choices: list) -> None:
    assert f"{key} must be one of {choices}, not {bad!r}" in message, message


@pytest.mark.parametrize("section, name, bad, choices", CHOICES, ids=lambda v: str(v))
def test_a_choice_override_outside_its_type_names_key_and_choices(section, name, bad, choices):
    assert_names_key_and_choices(error_of(f"{section}.{name}={bad}"), f"{section}.{name}", bad, choices)


@pytest.mark.parametrize("section, name, bad, choices", CHOICES, ids=lambda v: str(v))
def test_a_choice_in_a_file_outside_its_type_names_file_key_and_choices(tmp_path, section, name, bad, choices):
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {name}: {bad}\n")
    message = error_of(path=path)
    assert message.startswith(f"{path}: "), message
    assert_names_key_and_choices(message, f"{section}.{name}", bad, choices)


@pytest.mark.parametrize("override, bad", [
    ("engine.zero_stage=true", True),  # True == 1, but a bool is no ZeRO stage
    ("engine.zero_stage=2.0", 2.0),
    ("data.kmer_frame='1'", "1"),
    ("engine.precision=null", None),
])
def test_a_choice_must_match_in_type_too(override, bad):
    key = override.split("=")[0]
    message = error_of(override)
    assert f"{key} must be one of" in message and message.endswith(f"not {bad!r}"), message


def test_every_allowed_choice_loads():
    for section, name, _, choices in CHOICES:
        for choice in choices:
            overrides = [f"{section}.{name}={choice!r}" if isinstance(choice, str) else f"{section}.{name}={choice}"]
            if (section, name, choice) in {("data", "view", "all"), ("data", "view", "top"), ("model", "name", "bert"),
                                           ("task", "name", "mlm"), ("engine", "precision", "fp16")}:
                overrides.append("model.name=bert")  # NAD reads only its own view, fp32 or bf16
            if (section, name, choice) == ("engine", "offload_optimizer", "cpu"):
                overrides.append("engine.zero_stage=1")
            if (section, name, choice) in {("model", "name", "legnet"), ("model", "name", "dream_rnn")}:
                overrides.append("task.name=soft_classification")  # the bin models' objective, and theirs only
            if (section, name, choice) == ("task", "name", "soft_classification"):
                overrides.append("model.name=legnet")
            assert getattr(getattr(load_config(overrides=overrides), section), name) == choice


@pytest.mark.parametrize("overrides, words", [
    (["task.name=mlm"], "model.name=bert"),
    (["data.view=all"], "data.view=nad"),
    (["optim.gsam.enabled=true", "engine.precision=fp16"], "fp16"),
    (["engine.offload_optimizer=cpu", "engine.zero_stage=0"], "zero_stage"),
    (["optim.gsam.enabled=true", "engine.offload_optimizer=cpu", "engine.zero_stage=2"], "offload_optimizer=none"),
    (["optim.gsam.enabled=true", "optim.gsam.rho_min=0.02", "schedule.name=constant"], "rho_min"),
])
def test_combinations_that_cannot_work_are_refused(overrides, words):
    assert words in error_of(*overrides)


# --------------------------------------------------------------------------- values, files and overrides


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  eps: 1E-6\n  betas: [9e-1, 0.99]\ntask:\n  smooth_l1_beta: 5e-2\n")
    config = load_config(path)
    assert config.optim.lr == 1e-4 and type(config.optim.lr) is float
    assert config.optim.eps == 1e-6 and config.optim.betas == (0.9, 0.99)
    assert config.task.smooth_l1_beta == 0.05
    assert load_config(overrides=["optim.lr=3e-5"]).optim.lr == 3e-5


def test_integers_are_accepted_as_floats():
    config = load_config(overrides=["optim.lr=1", "schedule.decay_epochs=4"])
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    assert type(config.schedule.decay_epochs) is float


def test_overrides_apply_after_the_file_and_nest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.01\n  gsam:\n    enabled: true\n    rho_max: 0.2\nrun:\n  epochs: 3\n")
    config = load_config(path, ["optim.lr=0.001", "optim.gsam.rho_min=0.05", "run.epochs=7", "run.epochs=8"])
    assert config.optim.lr == 0.001  # the override wins over the file
    assert config.optim.gsam.enabled and config.optim.gsam.rho_max == 0.2  # the file's siblings survive
    assert config.optim.gsam.rho_min == 0.05  # three levels deep
    assert config.run.epochs == 8  # the last override wins


def test_parse_override_forms():
    assert parse_override("optim.gsam.rho_max=0.05") == {"optim": {"gsam": {"rho_max": 0.05}}}
    assert parse_override("data.glove=") == {"data": {"glove": ""}}
    assert parse_override("run.out_dir=a=b") == {"run": {"out_dir": "a=b"}}
    for bad in ("optim.lr", "optim..lr=1", "optim.lr=[1"):
        with pytest.raises(UserError) as caught:
            parse_override(bad)
        assert bad in str(caught.value) and "\n" not in str(caught.value)


def test_empty_section_means_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  gsam:\nrun:\n")
    assert load_config(path) == TrainConfig()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == TrainConfig()


def test_tuple_fields_from_lists():
    config = load_config(overrides=["model.nad.channels=[8,8,16,16,16]", "model.nad.depths=[1,2,1,1]",
                                    "optim.betas=[0.8, 0.9]", "model.nad.head_dim=null"])
    assert config.model.nad.channels == (8, 8, 16, 16, 16) and isinstance(config.model.nad.channels, tuple)
    assert config.model.nad.depths == (1, 2, 1, 1)
    assert config.optim.betas == (0.8, 0.9) and isinstance(config.optim.betas, tuple)
    assert config.model.nad.head_dim is None


def test_dump_yaml_reloads_to_an_equal_config(tmp_path):
    config = load_config(None,
                         ["optim.gsam.enabled=true", "optim.gsam.rho_min=0.02", "engine.precision=bf16", "optim.lr=1e-5", "data.glove=", "run.out_dir=runs/yes", "data.val_split=",
                          "model.nad.channels=[8,8,16,16,16]", "model.nad.head_dim=null", "engine.zero_stage=3",
                          "schedule.name=plateau", "schedule.plateau_metric=pearson", "run.best_metric=loss"])
    text = dump_yaml(config)
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == config
    assert config_dict(again) == config_dict(config)
    # every field is written, in field order
    assert list(config_dict(config)) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert text.index("run:") < text.index("engine:")


def test_config_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- optim\n- lr\n")
    message = error_of(path=path)
    assert str(path) in message and "mapping" in message


def test_config_file_that_is_not_valid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [0.1\n")
    message = error_of(path=path)
    assert str(path) in message and "YAML" in message and "line" in message


def test_config_file_that_is_binary(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01run:")
    message = error_of(path=path)
    assert str(path) in message


def test_missing_config_file_and_directory(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in error_of(path=missing)
    assert str(tmp_path) in error_of(path=tmp_path)


# --------------------------------------------------------------------------- DeepSpeed dict


def test_to_deepspeed_batch_sizes_and_stage(tmp_path):
    config = load_config(overrides=["data.batch_size=12", "engine.grad_accum=3", "engine.zero_stage=1",
                                    f"run.out_dir={tmp_path / 'run'}"])
    ds = to_deepspeed(config, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 12
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12 * 3 * 4
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["seed"] == config.run.seed
    assert "bf16" not in ds and "fp16" not in ds
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_to_deepspeed_always_writes_gradient_clipping():
    assert to_deepspeed(load_config(), 1)["gradient_clipping"] == 0.0  # DeepSpeed's own default would be 1.0
    ds = to_deepspeed(load_config(overrides=["engine.gradient_clipping=0.5"]), 1)
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_to_deepspeed_zero_stages(stage):
    ds = to_deepspeed(load_config(overrides=[f"engine.zero_stage={stage}", "engine.reduce_bucket_size=1234"]), 2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    if stage:
        assert zero["reduce_bucket_size"] == 1234
    else:
        assert "reduce_bucket_size" not in zero


def test_to_deepspeed_precision_blocks():
    assert "bf16" not in to_deepspeed(load_config(overrides=["engine.precision=bf16"]), 1)  # autocast, fp32 weights
    fp16 = to_deepspeed(load_config(overrides=["engine.precision=fp16", "model.name=bert"]), 1)
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert "bf16" not in fp16


def test_gsam_with_bf16_autocasts_instead_of_a_deepspeed_bf16_block():
    config = load_config(overrides=["engine.precision=bf16", "optim.gsam.enabled=true"])
    ds = to_deepspeed(config, 1)
    assert "bf16" not in ds and "fp16" not in ds


def test_to_deepspeed_monitors_write_under_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = to_deepspeed(load_config(overrides=["run.out_dir=runs/x", "engine.csv=false"]), 1)
    out = (tmp_path / "runs" / "x").resolve()
    assert Path(ds["tensorboard"]["output_path"]) == out / "monitor" and ds["tensorboard"]["enabled"] is True
    assert Path(ds["csv_monitor"]["output_path"]) == out / "monitor" and ds["csv_monitor"]["enabled"] is False


def test_to_deepspeed_offload():
    ds = to_deepspeed(load_config(overrides=["engine.offload_optimizer=cpu", "engine.zero_stage=2"]), 1)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    gpu = to_deepspeed(load_config(overrides=["engine.offload_optimizer=cpu", "engine.zero_stage=2"]), 1, "cuda")
    assert gpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gpu_ranks_overlap_reductions_and_keep_small_zero3_parameters_gathered(stage):
    config = load_config(overrides=[f"engine.zero_stage={stage}"])
    cpu, gpu = to_deepspeed(config, 2)["zero_optimization"], to_deepspeed(config, 2, "cuda")["zero_optimization"]
    assert cpu["overlap_comm"] is False and gpu["overlap_comm"] is True
    if stage == 3:
        assert cpu["stage3_param_persistence_threshold"] == 0
        assert gpu["stage3_param_persistence_threshold"] == 100_000


# --------------------------------------------------------------------------- the loader's settings


def test_loader_config_for_training_and_evaluation_follows_the_run():
    config = load_config(overrides=["model.name=bert", "data.batch_size=12", "data.eval_batch_size=5",
                                    "data.shuffle_buffer=300", "data.num_workers=2", "data.kmer_frame=1",
                                    "data.kmer_all_frames=true", "data.kmer_flank_bp=23", "run.seed=7"])
    train = config.loader_config("train", training=True)
    assert train == LoaderConfig(split="train", view="all", tokens="kmer", batch_size=12, shuffle=True,
                                 shuffle_buffer=300, drop_last=True, seed=7, num_workers=2, kmer_frame=1,
                                 kmer_all_frames=True, kmer_flank_bp=23)
    val = config.loader_config("val", training=False)  # every row once, in order, read by the same workers
    assert val == dataclasses.replace(train, split="val", batch_size=5, shuffle=False, drop_last=False)
    assert config.loader_config("val", training=False, pin_memory=True).pin_memory  # a GPU rank's


def test_loader_config_takes_the_models_view_and_tokens_and_the_training_batch_for_evaluation():
    nad = load_config().loader_config("val", training=False)
    assert (nad.view, nad.tokens, nad.batch_size, nad.kmer_frame) == ("nad", "nad", 64, 0)
    mlm = load_config(overrides=["model.name=bert", "task.name=mlm"]).loader_config("train", training=True)
    assert (mlm.view, mlm.tokens) == ("top", "kmer")
    chosen = load_config(overrides=["model.name=bert", "data.view=nad"]).loader_config("train", training=True)
    assert chosen.view == "nad"


def test_the_loaders_view_type_is_the_shards_views():
    assert set(typing.get_args(View)) == set(VIEWS)


@pytest.mark.parametrize("settings, key, bad, choices", [
    ({"view": "short"}, "loader.view", "short", ["all", "nad", "top"]),
    ({"tokens": "chars"}, "loader.tokens", "chars", ["nad", "kmer", "bases", "onehot"]),
    ({"tokens": "kmer", "kmer_frame": 3}, "loader.kmer_frame", 3, [0, 1, 2]),
    ({"tokens": "kmer", "kmer_frame": True}, "loader.kmer_frame", True, [0, 1, 2]),
])
def test_a_loader_config_built_in_code_checks_its_choices_from_the_same_types(settings, key, bad, choices):
    with pytest.raises(ConfigError) as caught:
        LoaderConfig(**settings)
    assert_names_key_and_choices(str(caught.value), key, bad, choices)


@pytest.mark.parametrize("settings, key", [
    ({"batch_size": 0}, "loader.batch_size"),
    ({"shuffle_buffer": 0}, "loader.shuffle_buffer"),
    ({"chunk_blocks": 0}, "loader.chunk_blocks"),
    ({"num_workers": -1}, "loader.num_workers"),
    ({"tokens": "nad", "view": "all"}, "loader.view='nad'"),
])
def test_a_loader_config_built_in_code_names_loader_keys(settings, key):
    with pytest.raises(ConfigError) as caught:
        LoaderConfig(**settings)
    assert key in str(caught.value), caught.value


def test_a_run_configs_loader_errors_name_the_data_keys():
    assert error_of("data.batch_size=0").startswith("data.batch_size must be >= 1")
    assert error_of("data.shuffle_buffer=0").startswith("data.shuffle_buffer must be >= 1")
    assert error_of("data.num_workers=-1").startswith("data.num_workers must be >= 0")


# The loader's counts are checked by one rule: LoaderConfig's, under the key the user wrote.
@pytest.mark.parametrize("section, key", [("data", "batch_size"), ("data", "shuffle_buffer"), ("data", "lanes"),
                                          ("data", "num_workers"), ("engine", "grad_accum")])
def test_the_loaders_counts_are_one_rule_under_the_users_key(section, key):
    least = LoaderConfig.LEAST[key]
    assert error_of(f"{section}.{key}={least - 1}") == f"{section}.{key} must be >= {least}, not {least - 1}"
    with pytest.raises(ConfigError, match=rf"^loader\.{key} must be >= {least}, not {least - 1}$"):
        LoaderConfig(**{key: least - 1})
    config = load_config(overrides=[f"{section}.{key}={least}"])
    assert getattr(getattr(config, section), key) == least
    loader = config.loader_config("train", training=True)
    assert getattr(loader, key) == least
