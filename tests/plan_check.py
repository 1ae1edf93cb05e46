"""`nemokern plan` against measurement on this machine's CPU: each trainer on 1, 2 and 4 gloo
processes, predicted peak memory per process vs the measured one.

Measured: the peak of anonymous resident memory (RssAnon in /proc/self/status, sampled every
millisecond by a thread) of each process while it builds the trainer and trains, minus its value
before (the process group already joined, the checkpoint read once: the first read sets up
about 24 MB of process state that later reads do not add; transformers imported, as the run
record does: 16 MB); glibc's MALLOC_MMAP_THRESHOLD_ is set to 64 KiB so that a freed tensor's
memory goes back to the OS at once, and MKL_DISABLE_FAST_MM=1 so that MKL does not keep its GEMM
buffers (4 to 7 MiB on the small model; cuBLAS's workspace is not tensor memory either). File
pages (libtorch's code, the memory-mapped checkpoint) are not anonymous memory and not counted.
Each process also reports the peak of each phase of the plan (PHASE_FRAMES: which function the
training thread is in), its stack at the peak, and glibc's mallinfo2 there (hblkhd: the blocks
of 64 KiB and more, the tensors; arena: the heap of smaller blocks).
Predicted: nemokern.plan for the same run (device cpu: float32), with the tokens per micro-batch
the trainer's batches actually have.

Three optimizer steps by default (--steps): the plan is the steady state, which DDP reaches only
in the third step. DDP allocates its gradient buckets at construction and again when it rebuilds
them at the start of the second step's forward; on the CPU a bucket's pages become resident
only when the backward first writes them, so the second step's forward runs without them
(AdamW's state, created by the first step, is there from the second step on).

    python tests/plan_check.py [--size small|100m] [--cases sft:1:-,reward:2:tp,...]
    python tests/plan_check.py --search sft:1:- --limit-mib 150 --grid 4,6,8,10,12

prints one line per case (or the search's result) and a JSON list with --json FILE.
tests/test_plan.py runs it on the small size (-m slow); the ~100M-parameter numbers are in
docs/plan.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # ~100M parameters: 12 layers of 768, GQA 12/4 heads, a 32000-token vocabulary
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
}  # fmt: skip
DEFAULT_CASES = [
    f"{t}:{n}:{layout}"
    for t in ("sft", "reward", "reinforce")
    for n, layout in ((1, "-"), (2, "ddp"), (2, "tp"), (4, "fsdp"), (4, "tp-fsdp"))
]


class _Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (mallinfo2(3))."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# the plan's phase that a sample of the training thread's stack is in: the innermost frame that
# one of these (file name, function) pairs names; "forward" when none does (the trainer's
# construction counts as "build")
PHASE_FRAMES = (
    ("generate.py", "generate", "generate"),
    ("reinforce.py", "_score", "score"),
    ("reinforce.py", "_logprobs", "score"),
    ("checkpoint.py", "save", "checkpoint"),
    ("policy.py", "export_policy", "export"),
    ("reward.py", "save_pretrained", "export"),
    ("__init__.py", "backward", "backward"),
    ("optimizer.py", "wrapper", "optimizer"),
    ("sft.py", "__init__", "build"),
    ("reward.py", "__init__", "build"),
    ("reinforce.py", "__init__", "build"),
)


def _phase(frame) -> str:
    while frame is not None:
        code = frame.f_code
        for file, name, phase in PHASE_FRAMES:
            if code.co_name == name and code.co_filename.endswith(file):
                return phase
        frame = frame.f_back
    return "forward"


def _frames(frame, keep: int = 8) -> list[str]:
    """The innermost `keep` frames of `frame`'s stack in nemokern, torch or safetensors, as
    "file:line function" (no source lines read: linecache would grow the measured process)."""
    out = []
    while frame is not None and len(out) < keep:
        code = frame.f_code
        if any(lib in code.co_filename for lib in ("nemokern", "torch", "safetensors")):
            out.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return out[::-1]


class PeakAnon:
    """Sample RssAnon every millisecond in a thread: .peak_bytes above the value at start;
    .where, the training thread's innermost frames at the peak; .phases, the peak of each phase
    (PHASE_FRAMES) above the start; .malloc, glibc's mallinfo2 at the peak."""

    def __init__(self):
        self._libc = ctypes.CDLL(None)
        self._libc.mallinfo2.restype = _Mallinfo2

    def __enter__(self):
        self.base = self.peak = _status_kib("RssAnon")
        self.where, self.phases = [], {}
        self.malloc_base = self.malloc = self._mallinfo()
        self._main = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _mallinfo(self) -> dict:
        m = self._libc.mallinfo2()
        return {k: getattr(m, k) for k in ("arena", "hblkhd", "uordblks", "fordblks")}

    def _run(self):
        while not self._stop.is_set():
            now = _status_kib("RssAnon")
            frame = sys._current_frames().get(self._main)
            phase = _phase(frame)
            self.phases[phase] = max(self.phases.get(phase, 0), (now - self.base) * 1024)
            if now > self.peak:
                self.peak = now
                self.where = _frames(frame)
                self.malloc = self._mallinfo()
            del frame
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))

    @property
    def peak_bytes(self) -> int:
        return (self.peak - self.base) * 1024


def _layout(name: str) -> dict:
    tp = 2 if "tp" in name else 1
    return {"tp": tp, "fsdp": "fsdp" in name}


def worker(args) -> None:
    """One rank of one case (started by run_script_ranks, env:// rendezvous)."""
    import torch

    from helpers import leave_group
    from nemokern.engine.distributed import setup_distributed
    from nemokern.model import Llama

    torch.set_num_threads(1)
    layout = _layout(args.layout)
    setup_distributed("cpu", layout["tp"])
    # the first checkpoint read of a process sets up ~24 MB of process state (seen as RssAnon)
    # that a second read does not add: warmed up here, it is not counted as the run's
    Llama.from_pretrained(args.model, dtype=torch.float32)
    # OUT/run.json records the libraries' versions (engine/run_dir.py), importing transformers:
    # ~16 MB of Python state, imported here so that it is not counted as the run's either
    import transformers  # noqa: F401

    # and the trainers' modules (nemokern.train imports all three: ~3.5 MB of Python state)
    from nemokern.train import (
        ReinforceConfig,
        ReinforceTrainer,
        RewardConfig,
        RewardTrainer,
        SFTConfig,
        SFTTrainer,
    )

    common = dict(
        out=args.out, device="cpu", max_steps=args.steps, progress=False, tensorboard=False,
        save_every=0, shuffle=False, **layout,
    )  # fmt: skip
    with PeakAnon() as peak:
        if args.trainer == "sft":
            cfg = SFTConfig(model=args.model, data=args.data, rows_per_batch=args.rows, **common)
            trainer = SFTTrainer(cfg)
            big = max(trainer.micro_batches, key=lambda b: b["input_ids"].numel())
            tokens, targets = big["input_ids"].numel(), big["n_tokens"]
        elif args.trainer == "reward":
            cfg = RewardConfig(
                model=args.model, data=args.data, loss="bt", rows_per_batch=args.rows,
                shared_prompt=False, **common,
            )  # fmt: skip
            trainer = RewardTrainer(cfg)
            tokens = targets = max(int(b.num_tokens) for b in trainer.micro_batches)
        else:
            cfg = ReinforceConfig(
                policy=args.model, prompts=args.data, reward_model=args.reward_model,
                k=args.k, max_new_tokens=args.new, prompts_per_step=args.rows,
                shared_prompt=False, **common,
            )  # fmt: skip
            trainer = ReinforceTrainer(cfg)
            tokens = targets = 0
        trainer.fit()
    result = {
        "peak_bytes": peak.peak_bytes,
        "tokens": tokens,
        "targets": targets,
        "where": peak.where,
        "phases": peak.phases,
        "malloc": {k: peak.malloc[k] - peak.malloc_base[k] for k in peak.malloc},
    }
    Path(f"{args.result}.{os.environ.get('RANK', '0')}").write_text(json.dumps(result))
    leave_group()


def make_inputs(directory: Path, size: str, prompt_chars: int, response_chars: int, rows: int):
    """A random Llama and reward model in HF layout and the three data files, under directory."""
    import torch

    from nemokern.data.readers import write_rows
    from nemokern.model import Llama, LlamaConfig, RewardModel

    torch.manual_seed(0)
    config = LlamaConfig.tiny(**SIZES[size], max_position_embeddings=4096)
    Llama(config).save_pretrained(directory / "policy")
    RewardModel(Llama(config)).save_pretrained(directory / "reward")
    text = [("p" * prompt_chars, "r" * response_chars, "s" * response_chars)] * rows
    write_rows([{"prompt": p, "response": r} for p, r, _ in text], directory / "sft.jsonl")
    write_rows(
        [{"prompt": p, "chosen": r, "rejected": s} for p, r, s in text],
        directory / "pairs.jsonl",
    )
    write_rows([{"prompt": p} for p, _, _ in text], directory / "prompts.jsonl")
    return config


def run_case(case: str, directory: Path, config, opts, rows_per_process=None) -> dict:
    from helpers import run_script_ranks
    from nemokern.plan import Run
    from nemokern.plan.memory import memory, model_counts

    trainer, world, layout = case.split(":")
    world = int(world)
    data = {"sft": "sft.jsonl", "reward": "pairs.jsonl", "reinforce": "prompts.jsonl"}[trainer]
    rows_per_process = rows_per_process or opts.rows
    # one --out per run: a trainer refuses an --out that holds another run (the search's cases)
    name = f"{trainer}-{world}-{layout}-{rows_per_process}"
    result = directory / f"result-{name}"
    rows = rows_per_process * world  # per process the same micro-batch at every process count
    args = [
        "--worker", "--trainer", trainer, "--world", world, "--layout", layout,
        "--model", directory / "policy", "--reward-model", directory / "reward",
        "--data", directory / data, "--out", directory / f"out-{name}",
        "--result", result, "--rows", rows if trainer == "reinforce" else rows_per_process,
        "--k", opts.k, "--new", opts.new, "--steps", opts.steps,
    ]  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MKL_DISABLE_FAST_MM="1")
    outs = run_script_ranks(Path(__file__), world, *args, env=env, timeout=opts.timeout)
    if any(rc for rc, _ in outs):
        raise RuntimeError(f"{case} failed:\n" + "\n".join(out[-3000:] for _, out in outs))
    measured = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
    lay = _layout(layout)
    run = Run(
        trainer, gpus=world, device="cpu", gpus_per_node=world,
        tokens_per_micro_batch=max(m["tokens"] for m in measured) or 1,
        response_share=max(m["targets"] / max(m["tokens"], 1) for m in measured),
        k=opts.k, prompts_per_step=rows, max_prompt_tokens=opts.prompt_tokens,
        max_new_tokens=opts.new, shared_prompt=False, reward_outputs=9, **lay,
    )  # fmt: skip
    counts, frozen = model_counts(config, run, config if trainer == "reinforce" else None)
    mem = memory(config, run, counts, frozen)
    peak = max(m["peak_bytes"] for m in measured)
    top = max(measured, key=lambda m: m["peak_bytes"])["phases"]
    return {
        "case": case,
        "steps": opts.steps,
        "tokens_per_micro_batch": run.micro_batch_tokens(),
        "predicted_bytes": mem.peak,
        "predicted_phase": mem.peak_phase,
        "measured_bytes": peak,
        "measured_by_rank": [m["peak_bytes"] for m in measured],
        "measured_phase": max(top, key=top.get),
        "peak_where_by_rank": [m["where"] for m in measured],
        "phases_by_rank": [m["phases"] for m in measured],
        "malloc_by_rank": [m["malloc"] for m in measured],
        "predicted_phases": mem.phase_totals,
        "error": mem.peak / peak - 1,
        "plan": (run, counts, frozen),
    }


def search(case: str, directory: Path, config, opts) -> dict:
    """The largest micro-batch (rows, or prompts, per process, on opts.grid) whose measured
    peak stays within opts.limit_mib, against the largest the plan predicts."""
    from nemokern.plan.memory import largest, memory

    limit = int(opts.limit_mib * 2**20)
    grid = [int(x) for x in opts.grid.split(",")]
    runs = {r: run_case(case, directory, config, opts, rows_per_process=r) for r in grid}
    found = max((r for r in grid if runs[r]["measured_bytes"] <= limit), default=0)
    first = runs[grid[0]]
    run, counts, frozen = first["plan"]
    per_row = first["tokens_per_micro_batch"] / grid[0]
    tokens = largest(
        lambda n: memory(config, run, counts, frozen, tokens=n).peak <= limit, 1, 1 << 24
    )
    return {
        "case": case,
        "limit_mib": opts.limit_mib,
        "measured_mib": {r: runs[r]["measured_bytes"] / 2**20 for r in grid},
        "largest_found": found,
        "largest_predicted": int(tokens // per_row),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("trainer", "layout", "model", "reward-model", "data", "out", "result"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help="trainer:processes:layout")
    p.add_argument("--rows", type=int, default=8, help="rows (prompts) per micro-batch")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--new", type=int, default=32, help="max_new_tokens")
    p.add_argument("--prompt-chars", type=int, default=120)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps each case trains")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--json", default=None)
    p.add_argument("--search", default=None, metavar="CASE", help="search a micro-batch limit")
    p.add_argument("--limit-mib", type=float, default=150.0)
    p.add_argument("--grid", default="4,6,8,10,12", help="rows (prompts) per process to try")
    opts = p.parse_args(argv)
    if opts.worker:
        worker(opts)
        return 0
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # nemokern, helpers
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config = make_inputs(directory, opts.size, opts.prompt_chars, 100, 64)
        from nemokern.data.tokenizer import load_tokenizer

        tok = load_tokenizer("byte")
        opts.prompt_tokens = len(tok.apply_chat_template(
            [{"role": "user", "content": "p" * opts.prompt_chars}], add_generation_prompt=True
        ))  # fmt: skip
        if opts.search:
            r = search(opts.search, directory, config, opts)
            print(json.dumps(r))
            results.append(r)
        for case in [] if opts.search else opts.cases.split(","):
            r = run_case(case, directory, config, opts)
            del r["plan"]
            results.append(r)
            print(
                f"{r['case']:<22} tokens/micro-batch {r['tokens_per_micro_batch']:>6}  "
                f"predicted {r['predicted_bytes'] / 2**20:8.1f} MiB ({r['predicted_phase']})  "
                f"measured {r['measured_bytes'] / 2**20:8.1f} MiB ({r['measured_phase']})  "
                f"error {r['error']:+.1%}",
                flush=True,
            )
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
