"""The embedded default job (`nemokern demo`): the whole recipe on a task a person can read, on a
laptop CPU, with nothing downloaded.

The task is small sums (data/synthetic.py: "3+1=" -> "4"). Four stages, each through the real
trainers (the code paths of the train-* commands) with its progress bar and a one-line result:

1. SFT warm start: a tiny random Llama-3.1 learns from noisy demonstrations (some answers wrong),
   so it starts imperfect but far from random (SFTTrainer).
2. Reward model: helpfulness regression, then scaled Bradley-Terry initialised from it (head
   included), held-out pair accuracy after each (RewardTrainer).
3. REINFORCE with the leave-one-out baseline and the KL penalty against the warm start, rewarded
   by the task's exact-answer function (ReinforceTrainer with --reward-fn); task accuracy and the
   reward model's mean score of the policy's answers before and after.
4. ExPO on the reward model at a few alphas, held-out pair accuracy at each (expo).

Everything goes to OUT (a temporary directory unless `out_dir` is given): each stage's data, its
metrics.jsonl, checkpoints and final model (HF layout), summary.json (headline numbers and seconds
per stage) and, when matplotlib is installed, plots/*.png of the training curves. Deterministic for
a seed on a given machine and thread count.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nemokern.data.readers import write_rows
from nemokern.data.synthetic import sum_reward, sum_rows
from nemokern.data.tokenizer import ByteTokenizer
from nemokern.engine import options
from nemokern.errors import ConfigError
from nemokern.model import Llama, RewardModel, generate
from nemokern.tools.expo import expo
from nemokern.trainers.policy import pack
from nemokern.trainers.reinforce import ReinforceConfig, ReinforceTrainer
from nemokern.trainers.reward import RewardConfig, RewardTrainer, score_file
from nemokern.trainers.sft import SFTConfig, SFTTrainer

DEFAULT_SEED, DEFAULT_DEVICE = 0, "cpu"
REWARD_FN = "nemokern.data.synthetic:sum_reward"  # what `--reward-fn` names


@dataclass(frozen=True)
class Sizes:
    """How much each stage trains; `nemokern demo --quick` takes QUICK."""

    sft_rows: int = 2000
    sft_epochs: int = 2
    rm_rows: int = 3200
    rm_epochs: int = 8
    rm_eval_every: int = 100
    rm_pairs: int = 3200
    heldout_pairs: int = 200
    rl_prompts: int = 512
    rl_steps: int = 300
    prompts_per_step: int = 16
    k: int = 8
    eval_prompts: int = 64
    eval_samples: int = 8
    alphas: tuple[float, ...] = (0.1, 0.3, 0.5)


DEFAULT, QUICK = (
    Sizes(),
    Sizes(
        sft_rows=400,
        rm_rows=400,
        rm_epochs=1,
        rm_eval_every=0,
        rm_pairs=200,
        heldout_pairs=64,
        rl_prompts=64,
        rl_steps=6,
        eval_prompts=16,
        eval_samples=4,
        alphas=(0.5,),
    ),
)
# The task: sums a + b with a in 0..MAX_A and b in 0..MAX_B; demonstrations are right this often.
MAX_A, MAX_B, SFT_CORRECT = 9, 1, 0.4


def check_options(*, seed, quick, device, out_dir) -> None:
    """Raise ConfigError for an argument run_demo cannot run with."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"{seed!r} is not allowed; use an integer in [0, 2**31)", option="seed")
    if not isinstance(quick, bool):
        raise ConfigError(f"{quick!r} is not allowed; use True or False", option="quick")
    options.device("device", device)
    if out_dir is not None:
        path = options.out_dir("out_dir", out_dir)
        if path.is_dir() and any(path.iterdir()):  # stage 4 would refuse it after all training
            raise ConfigError(
                f"{out_dir!r} is not empty; name a new or empty directory", option="out_dir"
            )


def write_data(root: Path, sizes: Sizes, seed: int) -> dict[str, str]:
    """The task's files under root/data, each seeded from `seed` (distinct streams)."""
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    task = dict(max_a=MAX_A, max_b=MAX_B)
    files = {
        "sft": sum_rows(sizes.sft_rows, "sft", seed=seed * 8 + 1, correct=SFT_CORRECT, **task),
        "rm_regression": sum_rows(sizes.rm_rows, "helpsteer2", seed=seed * 8 + 2, **task),
        "rm_pairs": sum_rows(sizes.rm_pairs, "hs2-preference", seed=seed * 8 + 3, **task),
        "rm_heldout": sum_rows(sizes.heldout_pairs, "pairs", seed=seed * 8 + 4, **task),
        "prompts": [
            {"prompt": r["prompt"]}
            for r in sum_rows(sizes.rl_prompts, "sft", seed=seed * 8 + 5, **task)
        ],
        "eval_prompts": [
            {"prompt": r["prompt"]}
            for r in sum_rows(sizes.eval_prompts, "sft", seed=seed * 8 + 6, **task)
        ],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = str(d / f"{name}.jsonl")
        write_rows(rows, paths[name])
    return paths


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (control bytes such as ESC, CR, a
    newline) written as its escape (\\x1b, \\r, \\n): a sampled answer is shown, never run."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@torch.no_grad()
def task_accuracy(policy: Llama, prompts: list[str], tok, *, samples: int, seed: int, rm=None):
    """(share of sampled answers that are exact, mean reward-model score of them or None, a few
    (prompt, answer) examples): `samples` answers per prompt at temperature 1, seeded."""
    device = next(policy.parameters()).device
    ids = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    rows = [i for i in ids for _ in range(samples)]
    out = generate(
        policy.eval(),
        rows,
        max_new_tokens=4,
        temperature=1.0,
        eos_token_id=tok.eos_ids,
        generator=torch.Generator(device).manual_seed(seed),
        pad_id=tok.pad_id,
    )
    answers = [
        tok.decode(out.tokens[j, : out.lengths[j]].tolist(), skip_special=True)
        for j in range(len(rows))
    ]
    asked = [p for p in prompts for _ in range(samples)]
    correct = sum_reward(asked, answers)
    score = None
    if rm is not None:
        b = pack(rows, [out.tokens[j, : out.lengths[j]] for j in range(len(rows))])
        r = rm(b["input_ids"], b["last_index"], cu_seqlens=b["cu_seqlens"])
        score = float(r[:, rm.attribute_index("helpfulness")].mean())
    examples = [
        f"{asked[j]}{printable(answers[j])}" for j in range(0, min(len(rows), 6 * samples), samples)
    ]
    return sum(correct) / len(correct), score, examples


def run_demo(
    *,
    seed: int = DEFAULT_SEED,
    quick: bool = False,
    device: str = DEFAULT_DEVICE,
    out_dir: str | None = None,
    log=print,
) -> dict:
    """Run the four stages; returns the summary (also written to OUT/summary.json)."""
    check_options(seed=seed, quick=quick, device=device, out_dir=out_dir)
    # The tiny model's matrices are too small for a second CPU thread to pay for its
    # synchronisation (it is several times slower when the cores are shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sizes = QUICK if quick else DEFAULT
            return _run(seed, sizes, device, Path(out_dir or tmp), log, out_dir)
    finally:
        torch.set_num_threads(threads)


def _run(seed, sizes: Sizes, device, out: Path, log, keep) -> dict:
    t_all = time.perf_counter()
    tok = ByteTokenizer()
    data = write_data(out, sizes, seed)
    common = dict(
        seed=seed, device=device, tensorboard=False, progress=True, keep_last=1, overwrite=True
    )
    seconds, summary = (
        {},
        {"seed": seed, "sizes": asdict(sizes), "out": str(keep) if keep else None},
    )
    eval_prompts = [json.loads(line)["prompt"] for line in open(data["eval_prompts"])]
    log(
        f"task: small sums a+b= with a in 0..{MAX_A}, b in 0..{MAX_B} (e.g. 3+1=4); "
        f"the demonstrations are right {SFT_CORRECT:.0%} of the time"
    )

    # ---- 1. SFT warm start
    t = time.perf_counter()
    log("[1/4] SFT warm start of a tiny Llama-3.1 on noisy demonstrations")
    sft = SFTTrainer(
        SFTConfig(
            data=data["sft"],
            out=str(out / "sft"),
            lr=3e-3,
            warmup_steps=5,
            rows_per_batch=16,
            epochs=sizes.sft_epochs,
            **common,
        ),
        tokenizer=tok,
    )
    history = sft.fit()
    acc, _, examples = task_accuracy(
        sft.policy, eval_prompts, tok, samples=sizes.eval_samples, seed=seed
    )
    seconds["sft"] = time.perf_counter() - t
    summary["sft"] = {"loss": history[-1]["loss"], "task_accuracy": acc, "steps": len(history)}
    log(
        f"      SFT: {len(history)} steps, loss {history[-1]['loss']:.3f}; task accuracy "
        f"{acc:.1%} of sampled answers (e.g. {', '.join(examples[:4])})"
    )

    # ---- 2. reward model: regression, then scaled BT from it
    t = time.perf_counter()
    log("[2/4] reward model: helpfulness regression, then scaled Bradley-Terry from it")
    rm_common = dict(
        rows_per_batch=16,
        warmup_steps=5,
        lr=1e-3,
        schedule="cosine",
        min_lr=1e-4,
        eval_data=data["rm_heldout"],
        eval_every=sizes.rm_eval_every,
        **common,
    )
    RewardTrainer(
        RewardConfig(
            data=data["rm_regression"],
            loss="helpfulness",
            out=str(out / "rm_regression"),
            epochs=sizes.rm_epochs,
            **rm_common,
        ),
        tokenizer=tok,
    ).fit()
    acc1 = score_file(out / "rm_regression" / "final", data["rm_heldout"], device=device)
    RewardTrainer(
        RewardConfig(
            data=data["rm_pairs"],
            loss="scaled-bt",
            init=str(out / "rm_regression" / "final"),
            out=str(out / "rm_scaled_bt"),
            **rm_common | {"lr": 5e-4, "min_lr": 5e-5},
        ),
        tokenizer=tok,
    ).fit()
    acc2 = score_file(out / "rm_scaled_bt" / "final", data["rm_heldout"], device=device)
    seconds["reward_model"] = time.perf_counter() - t
    summary["reward_model"] = {
        "regression_pair_accuracy": acc1["accuracy"],
        "scaled_bt_pair_accuracy": acc2["accuracy"],
        "heldout_pairs": acc2["n"],
    }
    log(
        f"      held-out pair accuracy ({acc2['n']} pairs): regression {acc1['accuracy']:.1%}, "
        f"scaled BT from it {acc2['accuracy']:.1%}"
    )

    # ---- 3. REINFORCE (RLOO, KL to the warm start)
    t = time.perf_counter()
    log(f"[3/4] REINFORCE with RLOO (k={sizes.k}) and KL to the warm start, reward: {REWARD_FN}")
    rm = RewardModel.from_pretrained(out / "rm_scaled_bt" / "final", dtype=torch.float32)
    rm = rm.to(device).eval()
    before = task_accuracy(
        sft.policy, eval_prompts, tok, samples=sizes.eval_samples, seed=seed, rm=rm
    )
    rl = ReinforceTrainer(
        ReinforceConfig(
            policy=str(out / "sft" / "final"),
            prompts=data["prompts"],
            reward_fn=REWARD_FN,
            out=str(out / "reinforce"),
            k=sizes.k,
            max_new_tokens=4,
            beta=0.01,
            lr=2e-3,
            min_lr=2e-4,
            prompts_per_step=sizes.prompts_per_step,
            max_steps=sizes.rl_steps,
            **common,
        ),
        tokenizer=tok,
    )
    history = rl.fit()
    after = task_accuracy(
        rl.policy, eval_prompts, tok, samples=sizes.eval_samples, seed=seed, rm=rm
    )
    seconds["reinforce"] = time.perf_counter() - t
    summary["reinforce"] = {
        "task_accuracy_before": before[0],
        "task_accuracy_after": after[0],
        "rm_score_before": before[1],
        "rm_score_after": after[1],
        "kl_last": history[-1]["kl_mean"],
        "steps": len(history),
    }
    log(
        f"      task accuracy {before[0]:.1%} -> {after[0]:.1%}; reward-model score "
        f"{before[1]:.2f} -> {after[1]:.2f}; KL to the warm start {history[-1]['kl_mean']:.3f} "
        f"(e.g. {', '.join(after[2][:4])})"
    )

    # ---- 4. ExPO on the reward model
    t = time.perf_counter()
    log(f"[4/4] ExPO on the reward model: alphas {', '.join(map(str, sizes.alphas))}")
    expo_acc = {0.0: acc2["accuracy"]}
    for alpha in sizes.alphas:
        path = out / f"rm_expo_{alpha}"
        expo(out / "rm_regression" / "final", out / "rm_scaled_bt" / "final", alpha, path)
        expo_acc[alpha] = score_file(path, data["rm_heldout"], device=device)["accuracy"]
    seconds["expo"] = time.perf_counter() - t
    summary["expo"] = {"pair_accuracy": {str(a): v for a, v in expo_acc.items()}}
    log(
        "      held-out pair accuracy: "
        + ", ".join(f"alpha {a}: {v:.1%}" for a, v in expo_acc.items())
    )

    seconds["total"] = time.perf_counter() - t_all
    summary["seconds"] = seconds
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["plots"] = write_plots(out, log)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for line in summary_table(summary):
        log(line)
    return summary


def summary_table(summary: dict) -> list[str]:
    s, sec = summary, summary["seconds"]
    rows = [
        ("1 SFT warm start", f"task accuracy {s['sft']['task_accuracy']:.1%}", sec["sft"]),
        (
            "2 reward model",
            f"held-out pairs: regression {s['reward_model']['regression_pair_accuracy']:.1%}, "
            f"scaled BT {s['reward_model']['scaled_bt_pair_accuracy']:.1%}",
            sec["reward_model"],
        ),
        (
            "3 REINFORCE (RLOO)",
            f"task accuracy {s['reinforce']['task_accuracy_before']:.1%} -> "
            f"{s['reinforce']['task_accuracy_after']:.1%}",
            sec["reinforce"],
        ),
        (
            "4 ExPO (reward model)",
            ", ".join(f"a={a}: {v:.1%}" for a, v in s["expo"]["pair_accuracy"].items()),
            sec["expo"],
        ),
    ]
    width = max(len(r[1]) for r in rows)
    lines = [f"| stage                 | {'result'.ljust(width)} | seconds |"]
    lines.append(f"|{'-' * 23}|{'-' * (width + 2)}|---------|")
    lines += [f"| {a.ljust(21)} | {b.ljust(width)} | {c:7.1f} |" for a, b, c in rows]
    lines.append(f"total {sec['total']:.1f} s" + (f"; files in {s['out']}" if s["out"] else ""))
    return lines


def write_plots(out: Path, log) -> list[str]:
    """plots/<stage>.png of each stage's training curves; [] with a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install 'nemokern[plot]')")
        return []
    from nemokern.engine.metrics import METRICS_FILE, read_metrics

    curves = {
        "sft": ("loss",),
        "rm_regression": ("loss", "eval_accuracy"),
        "rm_scaled_bt": ("loss", "eval_accuracy"),
        "reinforce": ("reward_mean", "kl_mean"),
    }
    (out / "plots").mkdir(exist_ok=True)
    written = []
    for stage, keys in curves.items():
        records = read_metrics(out / stage / METRICS_FILE)
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), marker="o" if len(points) < 20 else None)
            ax.set_xlabel("step")
            ax.set_title(f"{stage}: {'held-out pair accuracy' if key == 'eval_accuracy' else key}")
        fig.tight_layout()
        path = out / "plots" / f"{stage}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path.relative_to(out)))
    return written
