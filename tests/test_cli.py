"""The `nemokern` command as a user runs it: every mistake gives one line on stderr naming the
option, exit status 2 and no traceback. Each case runs in its own process (all at once)."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nemokern
from nemokern.cli import _parser, main
from nemokern.tools.demo import run_demo
from nemokern.tools.selfcheck import run_selfcheck

ROOT = Path(__file__).parents[1]
A_FILE = str(ROOT / "README.md")
ERRORS = {  # name: (arguments, extra environment, what stderr must say)
    "no command": ([], {}, "choose a command: info, .*selfcheck, train-sft, train-reward, score"),
    "unknown command": (["bogus"], {}, "invalid choice: 'bogus'"),
    "unknown option": (["selfcheck", "--bogus"], {}, "unrecognized arguments: --bogus"),
    "k 0": (["selfcheck", "--k", "0"], {}, r"--k 0 is not allowed; .* integer >= 1"),
    "k -1": (["selfcheck", "--k", "-1"], {}, r"--k -1 is not allowed"),
    "k not a number": (["selfcheck", "--k", "x"], {}, "argument --k: invalid int value: 'x'"),
    "max-new-tokens 0": (["selfcheck", "--max-new-tokens", "0"], {}, r"--max-new-tokens 0 is not"),
    "max-new-tokens 1e9": (
        ["selfcheck", "--max-new-tokens", "1000000000"],
        {},
        r"--max-new-tokens 1000000000 is too many: .* room for \d+",
    ),
    "seed -1": (["selfcheck", "--seed", "-1"], {}, r"--seed -1 is not allowed"),
    "device tpu": (["selfcheck", "--device", "tpu"], {}, "--device 'tpu' is not a device"),
    "device cuda:99": (["selfcheck", "--device", "cuda:99"], {}, "--device 'cuda:99'"),
    "out is a file": (["selfcheck", "--out", A_FILE], {}, "--out .* exists and is not a directory"),
    "out under a file": (
        ["selfcheck", "--out", A_FILE + "/sub"],
        {},
        "--out .* is not a directory",
    ),
    "demo seed -1": (["demo", "--seed", "-1"], {}, r"--seed -1 is not allowed"),
    "demo device tpu": (["demo", "--device", "tpu"], {}, "--device 'tpu' is not a device"),
    "demo out is a file": (["demo", "--out", A_FILE], {}, "--out .* exists and is not a dir"),
    "demo out not empty": (
        ["demo", "--out", str(ROOT / "tests")],
        {},
        "--out .*tests' is not empty; name a new or empty directory",
    ),
    "demo quick takes no value": (["demo", "--quick=1"], {}, "ignored explicit argument"),
    "bad NEMOKERN_BACKEND": (
        ["info"],
        {"NEMOKERN_BACKEND": "cuda"},
        "NEMOKERN_BACKEND='cuda' is not allowed; use one of auto, triton",
    ),
    "bad boolean": (
        ["info"],
        {"NEMOKERN_CHECK_TARGETS": "maybe"},
        "NEMOKERN_CHECK_TARGETS='maybe' is not a boolean; use 0/1",
    ),
}
ERRORS.update(
    {
        "train-sft without data": (["train-sft"], {}, "--data: a training data file is required"),
        "train-sft bad max-length": (
            ["train-sft", "--data", A_FILE, "--max-length", "x"],
            {},
            "argument --max-length: invalid int value",
        ),
        "train-reward without data": (
            ["train-reward"],
            {},
            "--data: a training data file is required",
        ),
        "train-reward missing file": (
            ["train-reward", "--data", "nope.jsonl"],
            {},
            "data file 'nope.jsonl' does not exist",
        ),
        "train-reward bad loss": (
            ["train-reward", "--loss", "mse"],
            {},
            "argument --loss: invalid",
        ),
        "train-reward unknown toml": (
            ["train-reward", "--config", "nope.toml"],
            {},
            "nope.toml",
        ),
        "score bad data format": (
            ["score", "--model", str(ROOT), "--data", A_FILE],
            {},
            "unknown format; expected one of .jsonl",
        ),
        "expo alpha not a number": (
            ["expo", "--init", "a", "--aligned", "b", "--alpha", "abc", "--out", "c"],
            {},
            "argument --alpha: invalid float value: 'abc'",
        ),
        "train-reinforce without reward": (
            ["train-reinforce", "--prompts", A_FILE],
            {},
            "no reward source",
        ),
    }
)
if not torch.cuda.is_available():
    ERRORS["device cuda"] = (["selfcheck", "--device", "cuda"], {}, "--device 'cuda'")
    # a forced back end this machine cannot run: refused before any work (info reported it)
    ERRORS["forced triton without cuda"] = (
        ["info"],
        {"NEMOKERN_BACKEND": "triton", "TRITON_INTERPRET": "0"},
        "NEMOKERN_BACKEND=triton needs a CUDA GPU, or TRITON_INTERPRET=1",
    )
    ERRORS["forced torch_varlen without cuda"] = (
        ["selfcheck"],
        {"NEMOKERN_ATTENTION": "torch_varlen"},
        "NEMOKERN_ATTENTION=torch_varlen cannot run here",
    )
if Path("/proc").is_dir():
    ERRORS["out /proc"] = (["selfcheck", "--out", "/proc"], {}, "--out cannot write in '/proc'")
GOOD = {"version": ["--version"], "info": ["info"]}


@pytest.fixture(scope="module")
def runs():
    """{case: CompletedProcess-like (returncode, stdout, stderr)}, the processes run in parallel."""
    cases = {n: (a, e) for n, (a, e, _) in ERRORS.items()} | {n: (a, {}) for n, a in GOOD.items()}
    procs = {}
    for name, (args, extra) in cases.items():
        env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "nemokern.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return {name: (*p.communicate(timeout=300), p.returncode) for name, p in procs.items()}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_user_error_is_one_line_and_status_2(runs, case):
    out, err, code = runs[case]
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(ERRORS[case][2], err), err


def test_version_and_info(runs):
    out, err, code = runs["version"]
    assert code == 0 and out.strip() == f"nemokern {nemokern.__version__}", (out, err)
    out, err, code = runs["info"]
    assert code == 0, err
    for line in (
        "extension nemokern._C:",
        "CUDA all-reduce",
        "kernel back end for",
        "attention back end for",
    ):
        assert line in out, out


def test_k_1_warns_that_rloo_needs_2(capsys):
    assert main(["selfcheck", "--k", "1", "--max-new-tokens", "2"]) == 0
    assert "RLOO needs k >= 2" in capsys.readouterr().out


@pytest.mark.parametrize("command, fn", [("selfcheck", run_selfcheck), ("demo", run_demo)])
def test_every_option_has_help_and_the_python_defaults(command, fn):
    _, commands = _parser()
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    for action in commands[command]._actions:
        if action.dest == "help":
            continue
        assert "default" in (action.help or ""), action.dest
        assert action.default == defaults[action.dest], action.dest


def test_a_keyword_error_names_the_commands_flag(capsys):
    """A ConfigError about one keyword of the Python API (expo's alpha=, read_sft's max_length=)
    is named as the command's flag for it (--alpha, --max-length)."""
    with pytest.raises(SystemExit) as exit_:
        main(["expo", "--init", "a", "--aligned", "b", "--alpha", "-1", "--out", "c"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("nemokern expo: error: --alpha: -1.0: ExPO's extrapolation"), err


def test_a_warning_is_one_line_naming_the_command(tmp_path):
    """A UserWarning before a user error: two lines, neither Python's file:line nor its source
    line."""
    out = subprocess.run(
        [sys.executable, "-m", "nemokern.cli", "train-reinforce", "--prompts", "p.jsonl"]
        + ["--reward-fn", "no_such_module_xyz:f", "--k", "1", "--device", "cpu"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 2, out.stderr
    assert lines[0].startswith("nemokern train-reinforce: warning: k = 1: with one sample")
    assert lines[1].startswith("nemokern train-reinforce: error: --reward-fn: cannot import")


def test_only_nemokerns_own_warnings_lose_pythons_format():
    import warnings

    from nemokern.cli import _warnings_as_lines

    ours = str(Path(nemokern.__file__).parent / "trainers" / "reinforce.py")
    with _warnings_as_lines("train-sft"):
        mine = warnings.formatwarning("k = 1 ...", UserWarning, ours, 3)
        torch_s = warnings.formatwarning("TypedStorage ...", UserWarning, "/x/torch/a.py", 7)
    assert mine == "nemokern train-sft: warning: k = 1 ...\n"
    assert torch_s.startswith("/x/torch/a.py:7: UserWarning: TypedStorage")
    assert warnings.formatwarning("m", UserWarning, ours, 1).startswith(f"{ours}:1:")  # restored
