"""The right kind of model in the right place: a policy directory given where a reward model is
read (score, --reward-model, --init, expo against a reward export), --init with --model, a head
output that was never trained, and output directories that cannot be written. Each is one line
on stderr with exit status 2, before any work."""

import json
import pathlib

import pytest
import torch

from nemokern.cli import main
from nemokern.data.synthetic import write_synthetic
from nemokern.model import Llama, LlamaConfig, RewardModel
from nemokern.trainers.reward import RewardConfig, RewardTrainer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    Llama(LlamaConfig.tiny()).save_pretrained(d / "policy")
    RewardModel(Llama(LlamaConfig.tiny())).save_pretrained(d / "rm")
    RewardModel.from_pretrained(d / "rm").export_hf(d / "rm-hf", "helpfulness")
    write_synthetic(d / "rb.jsonl", 6, "pairs", seed=1)
    write_synthetic(d / "hs2.jsonl", 8, "helpsteer2", seed=0)
    return d


def run(capsys, *args):
    """(exit status, stderr) of `nemokern ARGS`; the status of a parser exit or of main's."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def one_line(code, err, *parts):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def test_score_refuses_a_policy_and_reads_a_reward_model_and_its_export(dirs, capsys):
    one_line(
        *run(capsys, "score", "--model", dirs / "policy", "--data", dirs / "rb.jsonl"),
        f"--model {dirs / 'policy'}: a policy",
        "nemokern_reward_attribute",
    )
    for model in ("rm", "rm-hf"):
        code, err = run(capsys, "score", "--model", dirs / model, "--data", dirs / "rb.jsonl")
        assert code == 0, err


def test_reinforce_refuses_a_policy_as_reward_model(dirs, capsys, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1="}\n' * 4)
    args = ["train-reinforce", "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "o"]
    one_line(
        *run(capsys, *args, "--reward-model", dirs / "policy"),
        f"--reward-model {dirs / 'policy'}: a policy",
    )


def test_init_must_be_a_reward_model_and_excludes_model(dirs, capsys, tmp_path):
    args = ["train-reward", "--data", dirs / "hs2.jsonl", "--out", tmp_path / "o"]
    one_line(
        *run(capsys, *args, "--init", dirs / "policy"),
        f"--init: {dirs / 'policy'} has no reward_head.safetensors",
        f"use --model {dirs / 'policy'}",
    )
    one_line(
        *run(capsys, *args, "--init", dirs / "rm", "--model", dirs / "policy"),
        f"drop --model {dirs / 'policy'}",
    )
    assert not (tmp_path / "o").exists()


def test_expo_refuses_a_policy_against_a_reward_export(dirs, capsys, tmp_path):
    one_line(
        *run(
            capsys,
            *("expo", "--init", dirs / "policy", "--aligned", dirs / "rm-hf"),
            *("--alpha", "0.3", "--out", tmp_path / "e"),
        ),
        "is a reward export but init_dir",
        "is a policy",
    )
    assert not (tmp_path / "e").exists()


def test_the_head_records_what_it_was_trained_on(dirs, capsys, tmp_path):
    """A head trained on helpfulness only: score/export-reward --attribute correctness refused,
    helpfulness read; stage 2 (BT from it) keeps the record; regression records the labelled
    attributes."""
    cfg = dict(out=str(tmp_path / "s1"), max_steps=1, progress=False, tensorboard=False)
    RewardTrainer(RewardConfig(data=str(dirs / "hs2.jsonl"), loss="helpfulness", **cfg)).fit()
    head = json.loads((tmp_path / "s1" / "final" / "reward_head.json").read_text())
    assert head["trained_attributes"] == ["helpfulness"]
    final = tmp_path / "s1" / "final"
    score = ["score", "--model", final, "--data", dirs / "rb.jsonl"]
    one_line(
        *run(capsys, *score, "--attribute", "correctness"),
        "--attribute 'correctness': the reward model's head was trained on helpfulness only",
    )
    assert run(capsys, *score, "--attribute", "helpfulness")[0] == 0
    one_line(
        *run(
            capsys,
            "export-reward",
            "--model",
            final,
            "--out",
            tmp_path / "x",
            "--attribute",
            "correctness",
        ),
        "trained on helpfulness only",
    )
    cfg["out"] = str(tmp_path / "all")
    RewardTrainer(RewardConfig(data=str(dirs / "hs2.jsonl"), loss="regression", **cfg)).fit()
    head = json.loads((tmp_path / "all" / "final" / "reward_head.json").read_text())
    assert head["trained_attributes"] == [
        "helpfulness",
        "correctness",
        "coherence",
        "complexity",
        "verbosity",
    ]


def test_expo_and_export_into_an_unwritable_directory(dirs, capsys, tmp_path, monkeypatch):
    """The staging directory cannot be made (no permission; simulated, the tests may run as
    root): one line naming the file and --out."""
    mkdir = pathlib.Path.mkdir

    def denied(self, *args, **kwargs):
        if self.name.startswith(".out."):
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    import shutil

    shutil.copytree(dirs / "rm", tmp_path / "rm")
    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    out = tmp_path / "out"
    expo = ["expo", "--init", tmp_path / "rm", "--aligned", dirs / "rm", "--alpha", "0.3"]
    one_line(*run(capsys, *expo, "--out", out), "Permission denied", f"--out {out} must be")
    export = ["export-reward", "--model", dirs / "rm", "--out", out]
    one_line(*run(capsys, *export), "Permission denied", f"--out {out} must be writable")


def test_ctrl_c_during_start_up_is_one_line(capsys, monkeypatch):
    import nemokern.trainers.reward as reward

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reward, "check_reward_directory", interrupted)
    code, err = run(capsys, "score", "--model", "m", "--data", "d.jsonl")
    assert code == 130 and err == "nemokern: interrupted (Ctrl-C) before score finished\n"


def test_a_policy_whose_vocabulary_is_smaller_than_the_tokenizer_is_named(dirs, capsys, tmp_path):
    """It used to fail only on a prompt token it lacked (not naming --policy), or to never end a
    sample: the byte tokenizer's EOS ids (258, 259) have no row in a 200-token vocabulary."""
    torch.manual_seed(0)
    Llama(LlamaConfig.tiny(vocab_size=200)).save_pretrained(tmp_path / "small")
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1="}\n' * 4)
    one_line(
        *run(
            capsys,
            *("train-reinforce", "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "o"),
            *("--policy", tmp_path / "small", "--reward-model", dirs / "rm"),
        ),
        f"--policy: {tmp_path / 'small'} has a vocabulary of 200 tokens, fewer than the 262 of "
        "the tokenizer 'byte'",
    )


def test_a_reward_model_is_refused_as_a_policy(dirs, capsys, tmp_path):
    """train-sft --model and train-reinforce --policy read a policy: a reward model's lm_head is
    the policy it started from (or, exported, the head's row 0), never a trained policy."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n' * 4)
    (tmp_path / "q.jsonl").write_text('{"prompt": "1+1="}\n' * 4)
    for model in ("rm", "rm-hf"):
        one_line(
            *run(
                capsys,
                "train-sft",
                "--data",
                tmp_path / "p.jsonl",
                "--model",
                dirs / model,
                "--out",
                tmp_path / "sft",
                "--device",
                "cpu",
            ),
            f"--model: {dirs / model} is a reward ",
            "not a policy",
        )
        one_line(
            *run(
                capsys,
                "train-reinforce",
                "--prompts",
                tmp_path / "q.jsonl",
                "--policy",
                dirs / model,
                "--reward-fn",
                "nemokern.data.synthetic:sum_reward",
                "--out",
                tmp_path / "rl",
                "--device",
                "cpu",
            ),
            f"--policy: {dirs / model} is a reward ",
        )


def test_a_reward_model_without_its_head_weights_is_named(dirs, capsys, tmp_path):
    """A copy of a reward model that lost reward_head.safetensors is neither read as a policy
    (score) nor continued as one with a fresh head (--init)."""
    import shutil

    broken = tmp_path / "rm"
    shutil.copytree(dirs / "rm", broken)
    (broken / "reward_head.safetensors").unlink()
    want = f"{broken} has reward_head.json but no reward_head.safetensors"
    one_line(*run(capsys, "score", "--model", broken, "--data", dirs / "rb.jsonl"), want)
    one_line(
        *run(
            capsys,
            "train-reward",
            "--data",
            dirs / "rb.jsonl",
            "--loss",
            "bt",
            "--init",
            broken,
            "--out",
            tmp_path / "o",
            "--device",
            "cpu",
        ),
        want,
    )


def test_expo_of_a_model_with_itself_is_refused(dirs, capsys, tmp_path):
    one_line(
        *run(
            capsys,
            "expo",
            "--init",
            dirs / "policy",
            "--aligned",
            dirs / "policy",
            "--alpha",
            "0.5",
            "--out",
            tmp_path / "x",
        ),
        "are the same directory",
    )
    assert not (tmp_path / "x").exists()
