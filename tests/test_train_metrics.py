"""metrics.jsonl, the optional TensorBoard writer and the progress bar."""

import sys

import pytest
import torch

from nemokern.engine.metrics import MetricsLogger, read_metrics


def test_jsonl_per_step_and_resume_truncation(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=4, tensorboard=False, progress=True) as log:
        for step in (1, 2, 3):
            log.log(
                step, {"loss": torch.tensor(0.5 * step), "accuracy": 0.75, "tokens_per_s": 1000.0}
            )
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.5, 1.0, 1.5]
    err = capsys.readouterr().err
    assert "loss=1.5000" in err and "acc=0.750" in err and "tok/s=1000" in err
    with MetricsLogger(
        tmp_path, total_steps=4, start_step=2, tensorboard=False, progress=False
    ) as log:
        log.log(3, {"loss": 9.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 0.5),
        (2, 1.0),
        (3, 9.0),
    ]


def test_disabled_logger_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path / "x", total_steps=2, enabled=False) as log:
        assert log.log(1, {"loss": 1.0}) == {"step": 1, "loss": 1.0}
    assert not (tmp_path / "x").exists()


def test_without_tensorboard_installed_there_is_no_writer(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    with MetricsLogger(tmp_path, total_steps=1, tensorboard=True, progress=False) as log:
        assert log.writer is None
        log.log(1, {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, total_steps=1, tensorboard=True, progress=False) as log:
        log.log(1, {"loss": 1.0})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
