"""RewardTrainer end to end on the synthetic task (tiny Llama, byte tokenizer, CPU)."""

import json

import pytest
import torch

from nemokern.data.synthetic import write_synthetic
from nemokern.engine.config import ConfigError
from nemokern.engine.metrics import read_metrics
from nemokern.model import RewardModel
from nemokern.trainers.reward import RewardConfig, RewardTrainer


def config(tmp_path, data, **kw):
    base = dict(
        data=str(data),
        out=str(tmp_path / "run"),
        lr=3e-3,
        rows_per_batch=8,
        progress=False,
        tensorboard=False,
    )
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "pairs": write_synthetic(d / "pref.jsonl", 48, "hs2-preference", seed=0),
        "rows": write_synthetic(d / "hs2.jsonl", 32, "helpsteer2", seed=0),
        "rb": write_synthetic(d / "rb.jsonl", 24, "pairs", seed=2),
    }


def test_scaled_bt_trains_and_writes_a_loadable_final_model(tmp_path, files):
    cfg = config(tmp_path, files["pairs"], loss="scaled-bt", max_steps=3)
    history = RewardTrainer(cfg).fit()
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert "accuracy" in history[0] and history[0]["tokens"] > 0
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    final = RewardModel.from_pretrained(tmp_path / "run" / "final")
    assert final.head.weight.shape == (9, 64)


def test_helpfulness_regression_and_init_carries_the_head(tmp_path, files):
    stage1 = config(tmp_path / "s1", files["rows"], loss="helpfulness", max_steps=2)
    RewardTrainer(stage1).fit()
    saved = RewardModel.from_pretrained(tmp_path / "s1" / "run" / "final")
    stage2 = config(
        tmp_path / "s2",
        files["pairs"],
        loss="scaled-bt",
        max_steps=1,
        init=str(tmp_path / "s1" / "run" / "final"),
        lr=0.0,
    )
    trainer = RewardTrainer(stage2)
    assert torch.equal(trainer.model.head.weight, saved.head.weight)  # the head came along
    trainer.fit()


def test_eval_on_rewardbench_pairs_reports_accuracy(tmp_path, files):
    cfg = config(tmp_path, files["pairs"], loss="bt", max_steps=1, eval_data=files["rb"])
    history = RewardTrainer(cfg).fit()
    assert 0.0 <= history[-1]["eval_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "loss, data, match",
    [
        ("bt", "rows", "--loss: bt needs preference pairs"),
        ("regression", "pairs", "--loss: regression needs attribute labels"),
        ("scaled-bt", "rb", "--loss: scaled-bt needs preference strengths"),
    ],
)
def test_loss_that_does_not_fit_the_data_is_refused(tmp_path, files, loss, data, match):
    with pytest.raises(ConfigError, match=match):
        RewardTrainer(config(tmp_path, files[data], loss=loss))


def test_eval_rows_a_pair_loss_cannot_score_are_refused_before_training(tmp_path, files):
    """Labelled rows as --eval-data of a BT run used to crash after the last step (or, for an even
    row count, log a BT loss over unrelated neighbours); pairs evaluate any loss."""
    with pytest.raises(ConfigError, match="--eval-data: .*hs2.jsonl holds helpsteer2 rows"):
        RewardTrainer(config(tmp_path, files["pairs"], loss="bt", eval_data=files["rows"]))
    assert not (tmp_path / "run").exists()
    cfg = config(tmp_path, files["rows"], loss="helpfulness", max_steps=1, eval_data=files["rb"])
    assert 0 <= RewardTrainer(cfg).fit()[-1]["eval_accuracy"] <= 1


def test_resume_continues_exactly(tmp_path, files):
    full = RewardTrainer(config(tmp_path / "a", files["pairs"], loss="bt", max_steps=4)).fit()
    RewardTrainer(
        config(tmp_path / "b", files["pairs"], loss="bt", max_steps=2, save_every=1)
    ).fit()
    # the same run, told to go to 4 steps, continues from step 2's checkpoint
    rest = RewardTrainer(
        config(tmp_path / "b", files["pairs"], loss="bt", max_steps=4, resume="auto")
    ).fit()
    assert [h["step"] for h in rest] == [3, 4]
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]


def test_resume_refuses_another_loss_or_other_data(tmp_path, files):
    RewardTrainer(config(tmp_path, files["pairs"], loss="bt", max_steps=1, save_every=1)).fit()
    with pytest.raises(
        ValueError, match="saved by a run with --loss 'bt', this run has 'margin-bt'"
    ):
        RewardTrainer(
            config(tmp_path, files["pairs"], loss="margin-bt", max_steps=2, resume="auto")
        ).fit()
    rows = [json.loads(line) for line in open(files["pairs"])]
    rows[0]["response_1"] += " (edited)"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="saved by a run with other training data"):
        RewardTrainer(config(tmp_path, other, loss="bt", max_steps=2, resume="auto")).fit()


def test_tiny_model_learns_the_synthetic_preference_task(tmp_path):
    # about 5 s on 2 idle cores (2 minutes when the cores are oversubscribed)
    train = write_synthetic(tmp_path / "train.jsonl", 400, "hs2-preference", seed=0)
    held_out = write_synthetic(tmp_path / "eval.jsonl", 100, "hs2-preference", seed=1)
    cfg = config(tmp_path, train, eval_data=held_out, loss="bt", warmup_steps=5)
    history = RewardTrainer(cfg).fit()
    assert history[-1]["eval_accuracy"] >= 0.9, json.dumps(history[-1])


def test_score_file_reads_the_final_model_and_its_export(tmp_path, files):
    from nemokern.trainers.reward import score_file

    RewardTrainer(config(tmp_path, files["pairs"], loss="bt", max_steps=1)).fit()
    final = tmp_path / "run" / "final"
    report = score_file(final, files["rb"])
    assert report["n"] == 24 and report["attribute"] == "helpfulness"
    assert set(report["subsets"]) == {"synthetic-easy", "synthetic-hard"}
    assert "sections" not in report  # no RewardBench subset names in the synthetic file
    RewardModel.from_pretrained(final).export_hf(tmp_path / "hf")
    exported = score_file(tmp_path / "hf", files["rb"])
    assert exported["accuracy"] == report["accuracy"]
    with pytest.raises(ValueError, match="compares chosen/rejected pairs"):
        score_file(final, files["rows"])


def test_score_leaves_preference_ties_out(tmp_path, files):
    """A HelpSteer2-Preference tie (strength 0) has no better response: score reports it apart
    instead of counting response_2 as chosen."""
    from nemokern.trainers.reward import score_file

    RewardTrainer(config(tmp_path, files["pairs"], loss="bt", max_steps=1)).fit()
    rows = [json.loads(line) for line in open(files["pairs"])][:6]
    for row in rows[:4]:
        row["preference_strength"] = 0
    ties = tmp_path / "ties.jsonl"
    ties.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = score_file(tmp_path / "run" / "final", ties)
    assert report["n"] == 2 and report["ties"] == 4
    assert report["accuracy"] in (0.0, 0.5, 1.0)
    assert score_file(tmp_path / "run" / "final", files["rb"])["ties"] == 0


def test_shared_prompt_pairs_train_like_whole_pairs(tmp_path, files):
    """Pairs packed with their common prefix once (the default) and whole: fewer tokens, the same
    losses, gradient norms and evaluation up to fp32 rounding (a small lr: AdamW's normalised
    step would turn rounding-level gradient differences into lr-sized weight differences)."""

    def run(shared):
        torch.manual_seed(0)
        cfg = config(
            tmp_path / str(shared),
            files["pairs"],
            loss="scaled-bt",
            lr=1e-5,
            max_steps=4,
            shared_prompt=shared,
            eval_data=files["rb"],
            eval_every=4,
        )
        return RewardTrainer(cfg).fit()

    shared, whole = run(True), run(False)
    assert all(s["tokens"] < w["tokens"] for s, w in zip(shared, whole))
    for name in ("loss", "accuracy", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([h[name] for h in shared]),
            torch.tensor([h[name] for h in whole]),
            rtol=1e-5,
            atol=1e-6,
            msg=name,
        )
    evals = [[k for k in h if k.startswith("eval")] for h in (shared[-1], whole[-1])]
    assert evals[0] and evals[0] == evals[1]
    for k in evals[0]:
        assert shared[-1][k] == pytest.approx(whole[-1][k], rel=1e-5, abs=1e-6), k


def test_a_loss_that_does_not_fit_the_data_names_the_layout_once():
    """It read "holds pairs pairs" for a RewardBench file."""
    from nemokern.trainers.reward import check_loss_fits_data

    for layout in ("pairs", "hs2-preference"):
        with pytest.raises(ConfigError) as err:
            check_loss_fits_data("regression", "pairs", layout, "x.jsonl")
        assert str(err.value) == (
            f"--loss: regression needs attribute labels (HelpSteer2 rows); x.jsonl holds {layout} "
            "rows (preference pairs): use bt, margin-bt or scaled-bt"
        )
