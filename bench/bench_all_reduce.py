"""Latency of nemokern.parallel.all_reduce vs torch.distributed on one host: CPU tensors (the
shared-memory path) against gloo, or with `--device cuda` CUDA tensors (the CUDA IPC path, every
rank on GPU 0) against gloo and, where it can start, NCCL.

pytest-benchmark times one process, and an all-reduce needs several, so this script starts the
ranks itself (env:// like torchrun) and writes JSON + a markdown table:

    python bench/bench_all_reduce.py --worlds 2 4 --machine "2-core CPU, no GPU" \\
        --out bench/results/2026-11-24-cpu-2core-all-reduce

Per size and backend, every rank runs warm-up calls, meets the others at a barrier, then times
`iters` back-to-back all-reduces; the latency of a round is the slowest rank's mean, and the
table reports the median of `--rounds` rounds. bench/test_bench_all_reduce.py wraps a short run
for `pytest bench --benchmark-enable`.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]


def _iters(nbytes: int) -> int:
    return max(5, min(200, (32 << 20) // nbytes))


def rank_main(args):
    import torch
    import torch.distributed as dist

    from nemokern.parallel import all_reduce

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = args.device == "cuda"
    impls = [("nemokern_us", lambda t: all_reduce(t)), ("gloo_us", dist.all_reduce)]
    if cuda:
        torch.cuda.set_device(0)  # every rank shares GPU 0
        try:  # NCCL refuses two ranks on one GPU on most versions: then the column stays empty
            nccl = dist.new_group(backend="nccl")
            dist.all_reduce(torch.ones(1, device="cuda"), group=nccl)
            torch.cuda.synchronize()
            impls.append(("nccl_us", lambda t: dist.all_reduce(t, group=nccl)))
        except Exception as exc:  # noqa: BLE001 (recorded, not hidden)
            if rank == 0:
                print(f"NCCL unavailable: {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for nbytes in args.sizes:
        x = torch.randn(nbytes // torch.tensor([], dtype=dtype).element_size()).to(dtype)
        x = x.to(args.device)
        row = {"bytes": nbytes}
        for name, fn in impls:
            n = _iters(nbytes)
            for _ in range(3):
                fn(x)
            sync()
            rounds = []
            for _ in range(args.rounds):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn(x)
                sync()
                mine = (time.perf_counter() - t0) / n * 1e6
                every = [None] * world
                dist.all_gather_object(every, mine)
                rounds.append(max(every))
            row[name] = statistics.median(rounds)
        row["speedup"] = row["gloo_us"] / row["nemokern_us"]
        rows.append(row)
        if rank == 0:
            nccl_us = f"  nccl {row['nccl_us']:9.1f} us" if "nccl_us" in row else ""
            print(
                f"world={world} {nbytes:>9} B  nemokern {row['nemokern_us']:9.1f} us  "
                f"gloo {row['gloo_us']:9.1f} us  x{row['speedup']:.1f}{nccl_us}",
                flush=True,
            )
    if rank == 0:
        with open(args.rank_out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run_world(world, args):
    """Start `world` ranks of this script; return rank 0's rows."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rank_out = f"{args.out}.world{world}.tmp.json"
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        cmd = [
            sys.executable,
            __file__,
            "--rank-worker",
            "--rank-out",
            rank_out,
            "--dtype",
            args.dtype,
            "--rounds",
            str(args.rounds),
            "--device",
            args.device,
            "--sizes",
            *map(str, args.sizes),
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed (exit codes {codes})")
    with open(rank_out) as f:
        rows = json.load(f)
    os.unlink(rank_out)
    return rows


def markdown(report):
    lines = [
        f"All-reduce latency (sum, {report['dtype']}), {report['machine']}, {report['date']}, "
        f"torch {report['torch']}. Median of {report['rounds']} rounds; a round = slowest "
        "rank's mean over back-to-back calls. The machine is shared: its 1-minute load "
        f"average was {report['load_average_before']:.1f} when the run started, and 4 ranks "
        f"oversubscribe {report['cpus']} cores.",
        "",
        f"| ranks | message | nemokern {report.get('device', 'cpu')} (us) | gloo (us) | "
        "speed-up | NCCL (us) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for world, rows in report["results"].items():
        for r in rows:
            size = f"{r['bytes'] >> 20} MiB" if r["bytes"] >= 1 << 20 else f"{r['bytes'] >> 10} KiB"
            nccl = f"{r['nccl_us']:.1f}" if "nccl_us" in r else "n/a"
            lines.append(
                f"| {world} | {size} | {r['nemokern_us']:.1f} | {r['gloo_us']:.1f} | "
                f"{r['speedup']:.1f}x | {nccl} |"
            )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="message bytes")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: every rank on GPU 0 (CUDA IPC path)",
    )
    ap.add_argument("--machine", default=platform.processor() or platform.machine())
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        return rank_main(args)
    import torch

    args.out = args.out or "all_reduce_bench"
    report = {
        "machine": args.machine,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "dtype": args.dtype,
        "device": args.device,
        "rounds": args.rounds,
        "command": "python " + shlex.join(sys.argv),
        "load_average_before": os.getloadavg()[0],
        "results": {str(w): run_world(w, args) for w in args.worlds},
    }
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
