"""export_reward_hf (`nemokern export-reward`) on a broken reward-model directory: one error
naming the file and the tensor or field, raised before anything is written, and on a failure
while copying --out is left as it was (a re-run is not refused)."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import nemokern.model.reward as reward
from nemokern.cli import main
from nemokern.model import CheckpointError, ConfigError, Llama, LlamaConfig
from nemokern.model.reward import HEAD_WEIGHTS, RewardModel, export_reward_hf

H = 32  # the hidden size of the saved model


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    RewardModel(Llama(config)).save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def _config(**changes):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))

    return edit


def _head(**tensors):
    return lambda path: save_file(tensors, str(path / HEAD_WEIGHTS))


def _write(name, text):
    return lambda path: (path / name).write_text(text)


BROKEN = {  # name: (how the directory is broken, the error, what its message says)
    "head weight shape": (
        _head(weight=torch.zeros(9, 7), bias=torch.zeros(9)),
        CheckpointError,
        r"reward_head.safetensors: tensor 'weight' is \(9, 7\), expected \(9, 32\)",
    ),
    "head bias shape": (
        _head(weight=torch.zeros(9, H), bias=torch.zeros(10)),
        CheckpointError,
        r"reward_head.safetensors: tensor 'bias' is \(10,\), expected \(9,\)",
    ),
    "head bias missing": (
        _head(weight=torch.zeros(9, H)),
        CheckpointError,
        r"reward_head.safetensors: tensor 'bias' is missing",
    ),
    "head not safetensors": (
        _write(HEAD_WEIGHTS, "garbage"),
        CheckpointError,
        r"reward_head.safetensors: not a readable safetensors file",
    ),
    "config not llama": (
        _write("config.json", '{"x": 1}'),
        ConfigError,
        r"config.json: required field\(s\) \['vocab_size', 'hidden_size'",
    ),
    "config not json": (
        _write("config.json", "{x: 1}"),
        ConfigError,
        r"config.json is not valid JSON: Expecting property name",
    ),
    "config hidden_size": (
        _config(hidden_size=16),
        CheckpointError,
        r"model.safetensors: tensor '[^']+' has shape \(.*32.*\), config.json implies",
    ),
    "config fewer layers": (
        _config(num_hidden_layers=1),
        CheckpointError,
        r"model.safetensors: unexpected tensor 'model.layers.1.",
    ),
    "config more layers": (
        _config(num_hidden_layers=3),
        CheckpointError,
        r"rm: tensor\(s\) \['model.layers.2.*\] (\.\.\. )?missing",
    ),
}


def _nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary directory was left"


@pytest.mark.parametrize("case", BROKEN)
def test_bad_input_is_named_before_anything_is_written(saved, tmp_path, case):
    breaks, error, message = BROKEN[case]
    breaks(saved)
    with pytest.raises(error, match=message):
        export_reward_hf(saved, tmp_path / "out")
    _nothing_written(tmp_path / "out")
    (tmp_path / "empty").mkdir()  # what the CLI accepts as --out
    with pytest.raises(error, match=message):
        export_reward_hf(saved, tmp_path / "empty")
    assert not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("case", ["head weight shape", "config not llama", "config not json"])
def test_cli_prints_one_line_and_a_rerun_is_not_refused(saved, tmp_path, capsys, case):
    breaks, _, message = BROKEN[case]
    good = {p.name: p.read_bytes() for p in saved.iterdir()}
    breaks(saved)
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as exit_:
        main(["export-reward", "--model", str(saved), "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("nemokern export-reward: error: ") and str(saved) in err, err
    assert re.search(message, err), err
    _nothing_written(out)
    for name, data in good.items():  # repaired, the same command runs
        (saved / name).write_bytes(data)
    assert main(["export-reward", "--model", str(saved), "--out", str(out)]) == 0
    RewardModel.load_any(out)


def _fail_at_last_tensor(monkeypatch):
    """write_safetensors whose last tensor cannot be read: the earlier shards are written."""
    real = reward.write_safetensors

    def failing(path, names, nbytes, load, **options):
        def load_or_fail(name):
            if name == names[-1]:
                raise OSError(f"reading {name}: input/output error")
            return load(name)

        real(path, names, nbytes, load_or_fail, **options)

    monkeypatch.setattr(reward, "write_safetensors", failing)


def test_a_failure_while_copying_leaves_out_as_it_was(saved, tmp_path, monkeypatch):
    export_reward_hf(saved, tmp_path / "before")  # an earlier export, overwritten by the API
    before = {p.name: p.read_bytes() for p in (tmp_path / "before").iterdir()}
    (tmp_path / "empty").mkdir()
    _fail_at_last_tensor(monkeypatch)
    for out in (tmp_path / "new", tmp_path / "empty", tmp_path / "before"):
        with pytest.raises(OSError, match="input/output error"):
            export_reward_hf(saved, out, "correctness", max_shard_size="10KB")
        assert not list(tmp_path.glob(f".{out.name}.*")), "a temporary directory was left"
    assert not (tmp_path / "new").exists()
    assert not any((tmp_path / "empty").iterdir())
    assert {p.name: p.read_bytes() for p in (tmp_path / "before").iterdir()} == before


def test_export_into_an_empty_or_earlier_export_directory(saved, tmp_path):
    (tmp_path / "reference").mkdir()
    (tmp_path / "empty").mkdir()
    export_reward_hf(saved, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    mode = (tmp_path / "reference").stat().st_mode & 0o777
    assert (tmp_path / "empty").stat().st_mode & 0o777 == mode  # not a temporary dir's 0700
    export_reward_hf(saved, tmp_path / "sharded", max_shard_size="10KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    export_reward_hf(saved, tmp_path / "sharded", "correctness")  # one file now: shards go
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    again = RewardModel.load_any(tmp_path / "sharded")
    assert again.attributes == ("correctness",)
    assert not list(tmp_path.glob(".*.partial"))


def test_a_missing_model_directory_is_named_as_missing(tmp_path):
    """It was "has no reward_head.safetensors: not a reward model", as for a policy."""
    with pytest.raises(CheckpointError, match=r"nope is not a directory; give train-reward's"):
        export_reward_hf(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
