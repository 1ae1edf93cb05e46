"""The `nemokern` command: argument parsing, checks of the arguments, and printing.

A mistake in the arguments prints one line naming the option and what it allows, and exits with
status 2 before any work starts.
"""

import argparse
import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import nemokern
from nemokern import env
from nemokern.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _device_and_out(p, default_device, kept):
    p.add_argument(
        "--device", default=default_device, help="cpu, cuda or cuda:N (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        dest="out_dir",
        default=None,
        metavar="DIR",
        help=f"{kept} in this directory (default: a temporary directory, deleted at the end)",
    )


def _parser():
    from nemokern.tools import demo, selfcheck

    parser = _Parser(prog="nemokern", description="Fused RLHF kernels and a minimal Llama-3.1.")
    parser.add_argument("--version", action="version", version=f"nemokern {nemokern.__version__}")
    sub = parser.add_subparsers(
        dest="cmd", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser
    )
    sub.add_parser(
        "info", help="print versions, the extension's parts and the back ends that would be used"
    )
    p = sub.add_parser(
        "demo",
        help="the whole recipe on a small-sums task with a tiny Llama, on the CPU in minutes: SFT, "
        "reward model (regression, scaled BT), REINFORCE (RLOO), ExPO",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=demo.DEFAULT_SEED,
        metavar="N",
        help="random seed of the data, models and sampling (default: %(default)s)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a sub-minute smoke run with small stages (default: off)",
    )
    _device_and_out(
        p,
        demo.DEFAULT_DEVICE,
        "keep the data, checkpoints (HF layout), metrics.jsonl per stage, summary.json and plots",
    )
    p = sub.add_parser(
        "selfcheck",
        help="one rollout-and-score pass of a tiny built-in Llama, each fused path checked "
        "against its plain counterpart",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=selfcheck.DEFAULT_SEED,
        metavar="N",
        help="random seed, >= 0 (default: %(default)s)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=selfcheck.DEFAULT_K,
        metavar="N",
        help="responses sampled per prompt; RLOO needs >= 2 (default: %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=selfcheck.DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help="longest response in tokens, >= 1 (default: %(default)s)",
    )
    _device_and_out(p, selfcheck.DEFAULT_DEVICE, "keep the tiny model's HF checkpoint")
    _training_parsers(sub)
    return parser, sub.choices  # {command: its parser}


COMMANDS = (
    "info",
    "demo",
    "selfcheck",
    "train-sft",
    "train-reward",
    "score",
    "export-reward",
    "train-reinforce",
    "expo",
    "bench",
    "plan",
)


def _print_config_flag(p):
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved options (defaults, --preset, --config, the command line) as "
        "TOML and exit",
    )


def _training_parsers(sub):
    from nemokern.engine.config import add_config_arguments
    from nemokern.trainers.reinforce import ReinforceConfig
    from nemokern.trainers.reward import RewardConfig
    from nemokern.trainers.sft import SFTConfig

    p = sub.add_parser(
        "train-sft",
        help="supervised fine-tuning on prompt/response rows (loss on the response tokens); "
        "OUT/final is the policy",
    )
    add_config_arguments(p, SFTConfig)
    _print_config_flag(p)
    p = sub.add_parser(
        "train-reward",
        help="train a reward model (SteerLM regression or Bradley-Terry); OUT/final is the model",
    )
    add_config_arguments(p, RewardConfig)
    _print_config_flag(p)
    p = sub.add_parser(
        "score", help="pair accuracy of a reward model on a pairs file (per subset, RewardBench)"
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="a reward model (OUT/final of train-reward) or a Nemotron-Reward-HF directory",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="pairs: .jsonl(.gz) or .parquet")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="a local HF tokenizer directory, or 'byte' (default: %(default)s)",
    )
    p.add_argument(
        "--data-format",
        default="auto",
        choices=("auto", "hs2-preference", "pairs"),
        help="row layout (default: %(default)s)",
    )
    p.add_argument(
        "--attribute",
        default=None,
        help="head column to compare (default: helpfulness where the head has it, else column 0)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=4096,
        metavar="N",
        help="tokens per conversation; longer ones lose prompt tokens on the left "
        "(default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N processes (torchrun --nproc-per-node N; each reads its "
        "slices) (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the weights' dtype (default: %(default)s)",
    )
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows (counted)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser(
        "export-reward",
        help="write a reward model in the Nemotron-Reward-HF layout (a plain Llama whose reward "
        "is logits[last, 0])",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="OUT/final of train-reward")
    p.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    p.add_argument(
        "--attribute",
        default="helpfulness",
        help="the head column that becomes lm_head row 0 (default: %(default)s)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest output shard, the most the export holds in memory (default: %(default)s)",
    )
    p = sub.add_parser(
        "train-reinforce",
        help="train a policy with REINFORCE (RLOO baseline, KL-regularised reward); OUT/final "
        "is the policy",
    )
    add_config_arguments(p, ReinforceConfig)
    _print_config_flag(p)
    p = sub.add_parser("expo", help="ExPO: aligned + alpha * (aligned - init), tensor by tensor")
    p.add_argument("--init", required=True, metavar="DIR", help="the model before alignment")
    p.add_argument("--aligned", required=True, metavar="DIR", help="the model after alignment")
    p.add_argument("--alpha", required=True, type=float, help="extrapolation strength, >= 0")
    p.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest output shard (default: %(default)s)"
    )
    p = sub.add_parser(
        "bench",
        help="run the kernel benchmarks of a source checkout on this device: markdown table, "
        "PNG plots (time, peak memory vs vocabulary and tokens)",
    )
    p.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="writes bench.json, bench.md and plots/ here (default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="the smallest sizes only (default: off)")
    p.add_argument(
        "--bench-dir",
        default=None,
        metavar="DIR",
        help="the checkout's bench/ directory (default: the one next to this nemokern package)",
    )
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression (default: all)")
    from nemokern.plan.cli import add_arguments as plan_arguments

    plan_arguments(
        sub.add_parser(
            "plan", help="will a training run fit on N GPUs, and a bound on its step time"
        )
    )


def _info():
    import torch
    import triton

    from nemokern.model.attention import packed_backend_for
    from nemokern.ops import default_backend

    ext = "missing (reinstall with a C++ compiler: pip install -e .)"
    if nemokern.extension_available():
        from nemokern import _C

        cuda_part = "built" if _C.with_cuda else "not built (no nvcc at install time)"
        ext = f"built; CPU all-reduce built, CUDA all-reduce {cuda_part}"
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    print(
        f"nemokern {nemokern.__version__}  torch {torch.__version__}  triton {triton.__version__}"
    )
    print(f"extension nemokern._C: {ext}")
    print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"kernel back end for {device} tensors: {default_backend(device)}")
    print(
        f"attention back end for packed {device} {str(dtype)[6:]}: "
        f"{packed_backend_for(device, dtype)}"
    )


def _flag(parser, option: str | None) -> str | None:
    """The command-line flag of `parser` whose keyword (dest) is `option`, or None."""
    return next((a.option_strings[0] for a in parser._actions if a.dest == option), None)


def _user_error(parser, e: Exception) -> str:
    """The one line of a user error: a ConfigError about one keyword (max_length=, alpha=) names
    the command's flag for it (--max-length, --alpha) where the command has one."""
    if isinstance(e, ConfigError) and e.option and (flag := _flag(parser, e.option)):
        return f"{flag}: {e.message}"
    return str(e)


@contextmanager
def _warnings_as_lines(cmd: str):
    """nemokern's UserWarnings (a run that may learn nothing, an option that has no effect) as one
    line "nemokern CMD: warning: ...", without the file, line number and source line of Python's
    default format; other libraries' warnings keep that format (it names their source)."""
    import warnings

    default = warnings.formatwarning
    ours = os.path.dirname(nemokern.__file__) + os.sep

    def one_line(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and str(filename).startswith(ours):
            return f"nemokern {cmd}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = default


def _option_error(parser, e: ConfigError):
    """Exit with one line naming the command-line flag of a ConfigError about one keyword."""
    parser.error(f"{_flag(parser, e.option)} {e.message}")


def _demo(args, parser):
    from nemokern.tools.demo import check_options, run_demo

    kwargs = dict(seed=args.seed, quick=args.quick, device=args.device, out_dir=args.out_dir)
    try:
        check_options(**kwargs)
    except ConfigError as e:
        _option_error(parser, e)
    run_demo(**kwargs)
    return 0


def _selfcheck(args, parser):
    from nemokern.tools.selfcheck import check_options, run_selfcheck

    kwargs = dict(
        seed=args.seed,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        out_dir=args.out_dir,
    )
    try:
        check_options(**kwargs)
    except ConfigError as e:
        _option_error(parser, e)
    res = run_selfcheck(**kwargs)
    worst = max(res.checks.values())
    print(
        f"selfcheck finished in {res.seconds:.1f} s; largest check error {worst:.1e} "
        f"({'OK' if worst < 1e-4 else 'MISMATCH'})"
    )
    return 0 if worst < 1e-4 else 1


# The errors that mean the user's input (options, data rows, files) needs fixing. Every nemokern
# error a user can cause (nemokern/errors.py) is a ValueError.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _leave_process_group():
    """End a torchrun run's process group after training (every process calls it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no collective of another process still in flight
        dist.destroy_process_group()


def _train(kind, args):
    import nemokern.trainers as train
    from nemokern.engine.config import build_config
    from nemokern.engine.resume import check_resume
    from nemokern.engine.run_dir import RunLock, prepare_out

    trainer_cls, config_cls = {
        "reward": (train.RewardTrainer, train.RewardConfig),
        "reinforce": (train.ReinforceTrainer, train.ReinforceConfig),
        "sft": (train.SFTTrainer, train.SFTConfig),
    }[kind]
    config = build_config(config_cls, args)
    if args.print_config:
        from nemokern.engine.config import toml_text

        print(toml_text(config), end="")
        return 0
    _check_run_options(device=None if config.device == "auto" else config.device, out=config.out)
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, one process checks and reports
    if rank0:  # before any work: a fresh run over another, a resume with other fixed options
        prepare_out(config.out, resume=config.resume, overwrite=config.overwrite, clear=False)
        check_resume(config)
    trainer = trainer_cls(config)
    lock = RunLock(config.out)  # TrainLoop.fit takes it too; held here through OUT/final
    if rank0:
        lock.acquire()
    try:
        return _run_trainer(trainer, args, rank0)
    finally:
        lock.release()


def _run_trainer(trainer, args, rank0):
    from nemokern.engine.loop import NonFiniteError

    data = getattr(trainer, "train_data", None)
    if data is not None and rank0:
        print(data.summary())
    try:
        history = trainer.fit()
    except NonFiniteError as e:  # every process stops with it, together
        _leave_process_group()
        if rank0:
            print(f"nemokern {args.cmd}: stopped: {e}", file=sys.stderr)
        return 1
    _leave_process_group()
    if not rank0:
        return 0
    last = history[-1] if history else {}
    # 4 significant digits: round(v, 4) showed an lr of 2e-6 as 0.0
    shown = {k: float(f"{v:.4g}") for k, v in last.items() if isinstance(v, float)}
    print(f"{len(history)} steps; last: {shown}")
    print(f"final model: {trainer.config.out}/final")
    return 0


def _check_forced_back_ends():
    """A back end forced by NEMOKERN_BACKEND / NEMOKERN_ATTENTION that cannot run on this
    machine: refused before any work (info would report it, a run would crash on it)."""
    from nemokern.model.attention import check_forced_attention
    from nemokern.ops._dispatch import check_forced_backend

    check_forced_backend()
    check_forced_attention(machine=True)


def _check_run_options(**values):
    """The shared device and output-directory checks (engine/options.py) before any work, as
    one-line errors naming the flag (--device, --out); None values are not checked."""
    from nemokern.engine import options
    from nemokern.engine.config import option_error

    for name, value in values.items():
        if value is None:
            continue
        try:
            {"device": options.device, "out": options.out_dir}[name](name, value)
        except ConfigError as e:
            raise option_error(name, e.message) from None


def _score(args):
    import json

    from nemokern.trainers.reward import score_file

    _check_run_options(device=args.device)

    report = score_file(
        args.model,
        args.data,
        tokenizer=args.tokenizer,
        data_format=args.data_format,
        max_length=args.max_length,
        skip_bad_rows=args.skip_bad_rows,
        device=args.device,
        attribute=args.attribute,
        tp=args.tp,
        dtype=args.dtype,
    )
    _leave_process_group()
    if os.environ.get("RANK", "0") != "0":  # under torchrun every process has the report
        return 0
    summary = report.pop("summary")
    if args.json:
        print(json.dumps(report))
        return 0
    print(summary)
    print(
        f"accuracy {report['accuracy']:.4f} over {report['n']} pairs ({report['attribute']}); "
        f"mean margin {report['mean_margin']:.4f}"
        + (f"; {report['ties']} ties left out" if report.get("ties") else "")
    )
    for name, sub in report["subsets"].items():
        print(f"  {name}: {sub['accuracy']:.4f} ({sub['n']})")
    missing = report.get("missing", {})
    for name, value in report.get("sections", {}).items():
        absent = " (no subset in this file: 0, as the leaderboard counts it)"
        print(f"  section {name}: {value:.4f}" + (absent if name in missing["sections"] else ""))
    if "prior_sets" in report:
        print(f"  Prior Sets: {report['prior_sets']:.4f}")
    if "overall" in report:
        weights = "sections x2, Prior Sets x1" if "prior_sets" in report else "mean of the sections"
        print(f"RewardBench overall (leaderboard formula: {weights}): {report['overall']:.4f}")
    if "overall" in report and not report["complete"]:
        short = [f"{k} {n}/{full} rows" for k, (n, full) in missing["short"].items()]
        print(
            "not comparable with the leaderboard: this file is not the complete set"
            + (
                f"; sections missing: {', '.join(missing['sections'])}"
                if missing["sections"]
                else ""
            )
            + (f"; subsets missing: {', '.join(missing['subsets'])}" if missing["subsets"] else "")
            + (f"; subsets short: {', '.join(short)}" if short else "")
        )
    return 0


@contextmanager
def _writing(out):
    """An OSError of writing (no permission, a read-only or full disk) as one line naming the
    file, and --out where the file is the output's."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
            raise
        out, name = Path(out), Path(str(e.filename))
        # out, a directory above it, or the staging directory beside it (hf.staged_directory)
        ours = name in (out, *out.parents) or any(p.startswith(f".{out.name}.") for p in name.parts)
        raise ConfigError(
            f"{e.strerror}: {e.filename}" + (f" (--out {out} must be writable)" if ours else "")
        ) from None


def _export_reward(args):
    from pathlib import Path

    from nemokern.model.reward import export_reward_hf

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {args.out} exists and is not an empty directory")
    # streamed: one output shard in memory at a time
    with _writing(out):
        bias = export_reward_hf(args.model, out, args.attribute, max_shard_size=args.max_shard_size)
    print(
        f"wrote {args.out}: reward = logits[last, 0] + {bias:.6g} (the head's bias, recorded in "
        "config.json as nemokern_reward_bias; it changes no ranking)"
    )
    return 0


def _expo(args):
    from nemokern.tools.expo import expo

    with _writing(args.out):
        summary = expo(
            args.init, args.aligned, args.alpha, args.out, max_shard_size=args.max_shard_size
        )
    print(
        f"wrote {args.out}: {summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


def _bench(args):
    import subprocess
    from pathlib import Path

    import torch

    _check_run_options(out=args.out)
    root = Path(nemokern.__file__).resolve().parents[1]
    # resolved: pytest runs in the checkout's root, where a relative --bench-dir means another path
    bench = Path(args.bench_dir).resolve() if args.bench_dir else root / "bench"
    sweep = bench / "test_bench_sweep.py"
    if not sweep.is_file():
        raise FileNotFoundError(
            f"--bench-dir {bench}: no test_bench_sweep.py there; `nemokern bench` runs the "
            "benchmarks of a source checkout (clone the repository and `pip install -e .` in it, "
            "or pass --bench-dir CHECKOUT/bench)"
        )
    out = Path(args.out).resolve()
    gpu = torch.cuda.is_available()
    files = [str(sweep)] + ([str(bench / "test_bench_ceilings.py")] if gpu else [])
    cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-enable", "-q"]
    cmd += ["-p", "no:cacheprovider", f"--benchmark-json={out / 'bench.json'}"]
    cmd += ["-m", "gpu" if gpu else "not gpu", "--sweep", "quick" if args.quick else "full"]
    cmd += ["-k", args.select] if args.select else []
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    print(f"running {' '.join(cmd[1:])} in {bench.parent}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    code = subprocess.run(cmd, cwd=bench.parent, env=env).returncode
    if code == 5:  # pytest: no tests collected
        raise ConfigError(f"-k {args.select!r} selects no benchmark of {sweep}")
    if code != 0:
        print(f"nemokern bench: pytest exited with status {code}", file=sys.stderr)
        return code
    report = subprocess.run(
        [
            sys.executable,
            str(bench / "report.py"),
            "--plots",
            str(out / "plots"),
            str(out / "bench.json"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (out / "bench.md").write_text(report.stdout)
    print(report.stdout + report.stderr, end="")
    print(
        f"wrote {out / 'bench.md'}, {out / 'bench.json'}"
        + (", plots/" if "![" in report.stdout else "")
    )
    return 0


def _plan(args):
    from nemokern.plan.cli import run

    return run(args)


def main(argv=None):
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a trainer's own signal handling (or outside one)
        print(f"nemokern: interrupted (Ctrl-C) before {_command(argv)} finished", file=sys.stderr)
        return 130  # 128 + SIGINT, as a run stopped by it during training


def _command(argv) -> str:
    """The command named on the command line, for a message before parsing finished."""
    words = sys.argv[1:] if argv is None else list(argv)
    return next((w for w in words if w in COMMANDS), "the command")


def _main(argv):
    parser, commands = _parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.error(f"choose a command: {', '.join(COMMANDS)}")
    try:
        env.check_all()
        _check_forced_back_ends()
    except ValueError as e:  # EnvError, or a forced back end this machine cannot run
        parser.exit(2, f"nemokern: error: {e}\n")
    run = {
        "info": lambda: _info() or 0,
        "demo": lambda: _demo(args, commands["demo"]),
        "selfcheck": lambda: _selfcheck(args, commands["selfcheck"]),
        "train-sft": lambda: _train("sft", args),
        "train-reward": lambda: _train("reward", args),
        "train-reinforce": lambda: _train("reinforce", args),
        "score": lambda: _score(args),
        "export-reward": lambda: _export_reward(args),
        "expo": lambda: _expo(args),
        "bench": lambda: _bench(args),
        "plan": lambda: _plan(args),
    }[args.cmd]
    try:
        with _warnings_as_lines(args.cmd):
            return run()
    except USER_ERRORS as e:
        if args.cmd in (
            "info",
            "demo",
            "selfcheck",
        ):  # their options are checked before any work: a bug
            raise
        parser.exit(2, f"nemokern {args.cmd}: error: {_user_error(commands[args.cmd], e)}\n")
    except BrokenPipeError:  # the reader went away (`nemokern demo | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except RuntimeError as e:
        from nemokern.engine.stop import TrainingStopped

        if not isinstance(e, TrainingStopped):
            raise
        # a signal stopped training (train-*, the demo): every process stops with it, together
        _leave_process_group()
        if os.environ.get("RANK", "0") == "0":
            print(f"nemokern {args.cmd}: {e}", file=sys.stderr)  # "... stopped by SIGTERM ..."
        return 128 + e.signum  # the signal's conventional status: 143 SIGTERM, 130 SIGINT


if __name__ == "__main__":
    sys.exit(main())
