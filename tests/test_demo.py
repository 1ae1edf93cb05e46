"""`nemokern demo --quick` end to end (every stage through the real trainers, summary.json, the
files in --out, determinism for a seed) and the small-sums task it trains on."""

import importlib.util
import json

import pytest

from nemokern.cli import main
from nemokern.data import read_examples
from nemokern.data.sft import read_sft
from nemokern.data.synthetic import sum_helpfulness, sum_reward, sum_rows
from nemokern.data.tokenizer import ByteTokenizer
from nemokern.engine.metrics import read_metrics
from nemokern.model import Llama, RewardModel
from nemokern.tools.demo import run_demo

STAGES = ("sft", "rm_regression", "rm_scaled_bt", "reinforce")


def test_sum_task_rule_and_layouts():
    assert sum_helpfulness("3+4=", "7") == 4 and sum_helpfulness("3+4=", " 9 ") == 2
    assert sum_helpfulness("3+4=", "12") == 0 and sum_helpfulness("3+4=", "seven") == 0
    chat = [{"role": "user", "content": "2+2="}]
    assert sum_reward(["3+4=", chat], ["7", "5"]) == [1.0, 0.0]
    sft = sum_rows(200, "sft", seed=1, correct=0.5)
    right = sum(sum_reward([r["prompt"] for r in sft], [r["response"] for r in sft]))
    assert 70 <= right <= 130 and sum_rows(200, "sft", seed=1, correct=0.5) == sft
    assert len(read_sft(sft, ByteTokenizer())) == 200
    for layout in ("helpsteer2", "hs2-preference", "pairs"):
        rows = sum_rows(50, layout, seed=2)
        assert read_examples(rows, layout).layout == layout
    for r in sum_rows(50, "hs2-preference", seed=3):
        h1, h2 = (sum_helpfulness(r["prompt"], r[k]) for k in ("response_1", "response_2"))
        assert r["preference_strength"] == max(-3, min(3, h2 - h1)) != 0
    for r in sum_rows(50, "pairs", seed=3):
        assert (
            sum_helpfulness(r["prompt"], r["chosen"])
            == 4
            > sum_helpfulness(r["prompt"], r["rejected"])
        )
    with pytest.raises(ValueError, match="unknown layout 'qa'"):
        sum_rows(1, "qa")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(OUT, what it printed) of `nemokern demo --quick --seed 1 --out OUT`."""
    out = tmp_path_factory.mktemp("demo") / "out"
    lines = []
    run_demo(quick=True, seed=1, out_dir=str(out), log=lines.append)
    return out, "\n".join(lines)


def test_quick_demo_end_to_end(quick_run):
    out, printed = quick_run
    for line in ("[1/4] SFT", "[2/4] reward model", "[3/4] REINFORCE", "[4/4] ExPO", "| stage"):
        assert line in printed, printed
    summary = json.loads((out / "summary.json").read_text())
    sizes = summary["sizes"]
    assert 0 <= summary["sft"]["task_accuracy"] <= 1
    rm = summary["reward_model"]
    assert rm["heldout_pairs"] == sizes["heldout_pairs"]
    assert 0 <= rm["regression_pair_accuracy"] <= 1 and 0 <= rm["scaled_bt_pair_accuracy"] <= 1
    rl = summary["reinforce"]
    assert rl["steps"] == sizes["rl_steps"] and rl["kl_last"] >= 0
    assert 0 <= rl["task_accuracy_before"] <= 1 and 0 <= rl["task_accuracy_after"] <= 1
    assert rl["task_accuracy_before"] == summary["sft"]["task_accuracy"]  # same seeded samples
    assert set(summary["expo"]["pair_accuracy"]) == {"0.0", *map(str, sizes["alphas"])}
    assert summary["expo"]["pair_accuracy"]["0.0"] == rm["scaled_bt_pair_accuracy"]
    seconds = summary["seconds"]
    assert all(seconds[s] > 0 for s in ("sft", "reward_model", "reinforce", "expo"))
    assert seconds["total"] >= sum(v for k, v in seconds.items() if k != "total")
    for stage in STAGES:  # every stage's metrics.jsonl, a step per line
        assert len(read_metrics(out / stage / "metrics.jsonl")) > 0, stage
    assert len(read_metrics(out / "reinforce" / "metrics.jsonl")) == sizes["rl_steps"]
    Llama.from_pretrained(out / "sft" / "final")
    Llama.from_pretrained(out / "reinforce" / "final")
    RewardModel.from_pretrained(out / "rm_scaled_bt" / "final")
    if importlib.util.find_spec("matplotlib") is None:
        assert summary["plots"] == [] and "plots skipped" in printed
    else:
        assert sorted(summary["plots"]) == sorted(f"plots/{s}.png" for s in STAGES)
        assert all((out / p).stat().st_size > 0 for p in summary["plots"])


def test_the_command_runs_it_again_with_the_same_numbers(quick_run, tmp_path, capsys):
    def numbers(summary):
        return {k: v for k, v in summary.items() if k not in ("seconds", "out", "plots")}

    assert main(["demo", "--quick", "--seed", "1", "--out", str(tmp_path)]) == 0
    assert "| 3 REINFORCE (RLOO)" in capsys.readouterr().out
    first = json.loads((quick_run[0] / "summary.json").read_text())
    again = json.loads((tmp_path / "summary.json").read_text())
    assert numbers(first) == numbers(again)


@pytest.mark.gpu
def test_quick_demo_on_cuda(tmp_path):
    """The whole recipe on a GPU: every trainer with bf16 autocast and the Triton kernels, the
    REINFORCE rollout through generate()'s compiled (CUDA-graph) decode step."""
    lines = []
    summary = run_demo(quick=True, seed=1, device="cuda", out_dir=str(tmp_path), log=lines.append)
    assert "| 3 REINFORCE (RLOO)" in "\n".join(lines)
    rl = summary["reinforce"]
    assert rl["steps"] == summary["sizes"]["rl_steps"] and rl["kl_last"] >= 0
    assert 0 <= rl["task_accuracy_after"] <= 1
    assert 0 <= summary["reward_model"]["scaled_bt_pair_accuracy"] <= 1
    Llama.from_pretrained(tmp_path / "reinforce" / "final")
    RewardModel.from_pretrained(tmp_path / "rm_scaled_bt" / "final")


def test_example_answers_are_shown_with_control_bytes_escaped():
    """A sampled answer is bytes the tiny policy chose: ESC, CR or a newline printed raw would
    move the cursor or recolour the terminal (and the reward reads a conversational prompt's
    completion as a message list)."""
    import torch

    from nemokern.data.synthetic import sum_reward
    from nemokern.model import LlamaConfig
    from nemokern.tools.demo import task_accuracy

    class Raw(ByteTokenizer):
        def decode(self, ids, skip_special=False):
            return "4\x1b[2J\r\n\x07"

    torch.manual_seed(0)
    policy = Llama(LlamaConfig.tiny(vocab_size=262))
    _, _, examples = task_accuracy(policy, ["2+2="], Raw(), samples=1, seed=0)
    assert examples == ["2+2=4\\x1b[2J\\r\\n\\x07"]
    chat = [{"role": "user", "content": "2+2="}]
    assert sum_reward([chat], [[{"role": "assistant", "content": "4"}]]) == [1.0]
