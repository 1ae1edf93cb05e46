"""Training config: one set of defaults for Python, TOML and the command line; clear errors."""

import argparse
import dataclasses

import pytest

from nemokern.engine.config import (
    ConfigError,
    TrainConfig,
    build_config,
    config_parser,
    dump_toml,
    option,
    parse_config,
    read_toml,
)


@dataclasses.dataclass
class RecipeConfig(TrainConfig):
    lr: float = option(9e-7, "peak learning rate")
    schedule: str = option("cosine", "schedule", choices=("constant", "cosine"))
    min_lr: float = option(9e-8, "final lr")
    k: int = option(4, "samples per prompt")
    reward_model: str | None = option(None, "reward model directory")
    weights: list[float] = option([1.0], "reward weights")


def test_command_line_defaults_are_the_dataclass_defaults():
    assert parse_config(TrainConfig, []) == TrainConfig()
    assert parse_config(RecipeConfig, []) == RecipeConfig()
    c = TrainConfig()
    assert (c.lr, c.betas, c.weight_decay, c.grad_clip, c.schedule) == (
        2e-6,
        (0.9, 0.98),
        0.1,
        1.0,
        "constant",
    )


def test_help_shows_every_option_with_its_default():
    text = config_parser(RecipeConfig, prog="x").format_help()
    for f in dataclasses.fields(RecipeConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert (
        "(default: 9e-07)" in text and "(default: 0.9 0.98)" in text and "(default: None)" in text
    )
    assert "--no-shuffle" in text


def test_steps_is_another_spelling_of_max_steps():
    """The REINFORCE interface's `--steps S` (issue 11) is --max-steps."""
    assert parse_config(RecipeConfig, ["--steps", "7"]).max_steps == 7
    assert parse_config(RecipeConfig, ["--max-steps", "7"]).max_steps == 7
    assert "--max-steps MAX_STEPS, --steps MAX_STEPS" in config_parser(TrainConfig).format_help()


def test_toml_then_command_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'lr = 1e-5\nbetas = [0.8, 0.9]\nshuffle = false\nk = 8\nout = "a"\nmax-steps = 3\n'
    )
    cfg = parse_config(
        RecipeConfig,
        ["--config", str(path), "--lr", "3e-4", "--k", "2", "--shuffle", "--weights", "0.5", "2"],
    )
    assert (cfg.lr, cfg.betas, cfg.shuffle, cfg.k, cfg.out, cfg.max_steps) == (
        3e-4,
        (0.8, 0.9),
        True,
        2,
        "a",
        3,
    )
    assert cfg.weights == [0.5, 2.0] and RecipeConfig().weights == [1.0]
    cfg = parse_config(RecipeConfig, ["--config", str(path)])
    assert (cfg.lr, cfg.shuffle, cfg.k, cfg.min_lr) == (1e-5, False, 8, 9e-8)
    assert build_config(RecipeConfig, toml=path, k=16).k == 16


def test_unknown_toml_key_names_key_file_and_suggestion(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("lr = 1e-5\nwarmup_step = 3\n")
    with pytest.raises(
        ConfigError, match=rf"{path}: unknown key 'warmup_step' \(did you mean 'warmup_steps'\?\)"
    ):
        read_toml(TrainConfig, path)


@pytest.mark.parametrize(
    "text,match",
    [
        ('lr = "fast"', r"lr = 'fast' must be float"),
        ("grad_accum = 1.5", r"grad_accum = 1.5 must be int"),
        ("shuffle = 1", r"shuffle = 1 must be bool"),
        ("betas = [0.9]", r"betas = \[0.9\] must be tuple.* of 2 values"),
        ('weights = [1.0, "x"]', r"weights\[1\] = 'x' must be float"),
        ('schedule = "linear"', r"schedule = 'linear' is not one of constant, cosine"),
        ("[optim]\nlr = 1.0", r"\[optim\] is a table"),
        ("lr = ", r"not valid TOML"),
    ],
)
def test_bad_toml_values_name_the_file(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match) as err:
        parse_config(RecipeConfig, ["--config", str(path)])
    assert str(path) in str(err.value)


def test_range_errors_name_the_option_and_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("grad_accum = 0\n")
    with pytest.raises(
        ConfigError, match=rf"grad_accum = 0 must be at least 1 \(options from {path}"
    ):
        parse_config(TrainConfig, ["--config", str(path)])
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(schedule="cosine", lr=1e-6, min_lr=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=float("inf")), "lr = inf must be a finite number"),
        (dict(min_lr=float("nan"), schedule="constant"), "min_lr = nan must be a finite number"),
        (dict(grad_clip=float("nan")), "grad_clip = nan must be a finite number"),
        (dict(betas=(0.9, float("nan"))), r"betas = \(0.9, nan\) must be a finite number"),
        (dict(betas=(1.5, 0.98)), r"betas = \(1.5, 0.98\) must each be in \[0, 1\)"),
        (dict(seed=-1), r"seed = -1 must be in \[0, 2\*\*31\)"),
        (dict(fsdp_param_dtype="bfloat16"), "--fsdp-param-dtype: bfloat16 needs --fsdp"),
        (dict(seed=10**23), r"seed = 1{1}0{23} must be in"),
    ],
)
def test_non_finite_and_out_of_range_optimizer_values_are_refused(kw, match):
    """nan passes `< 0` checks: an lr of inf trained a step into non-finite weights that the
    non-finite guard then kept as 'the last good state'."""
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_non_finite_options_of_a_trainer_config_are_refused():
    from nemokern.trainers.reinforce import ReinforceConfig

    for name in ("beta", "reward_fn_weight", "truncation_penalty"):
        with pytest.raises(ConfigError, match=f"{name} = nan must be a finite number"):
            ReinforceConfig(**{name: float("nan")})


def test_config_file_that_is_no_toml_text_is_named(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="dir.toml: is a directory"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "dir.toml")])
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe l")
    with pytest.raises(ConfigError, match="bin.toml: not valid TOML .not UTF-8"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "bin.toml")])
    (tmp_path / "twice.toml").write_text("max-steps = 2\nmax_steps = 3\n")
    with pytest.raises(ConfigError, match="twice.toml: max_steps is given twice"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "twice.toml")])


def test_unknown_option_and_bad_choice_exit(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--learning-rate", "1"])
    assert "--learning-rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--schedule", "exponential"])
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        build_config(TrainConfig, lrr=1.0)
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        parse_config(TrainConfig, ["--config", "missing.toml"])


def test_dump_toml_round_trips(tmp_path):
    cfg = RecipeConfig(
        out='we"ird\\path', betas=(0.5, 0.25), k=3, shuffle=False, weights=[2.0, 3.0]
    )
    dump_toml(cfg, tmp_path / "c.toml")
    assert build_config(RecipeConfig, toml=tmp_path / "c.toml") == cfg


def test_parser_can_be_embedded_in_a_cli():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    from nemokern.engine.config import add_config_arguments

    add_config_arguments(sub.add_parser("train"), RecipeConfig)
    ns = parser.parse_args(["train", "--k", "5", "--betas", "0.1", "0.2"])
    cfg = build_config(RecipeConfig, ns)
    assert (cfg.k, cfg.betas, cfg.lr) == (5, (0.1, 0.2), 9e-7)
