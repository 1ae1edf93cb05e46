"""Command line: argument parsing, progress and printing; nothing else."""

import argparse
import sys


def _info():
    import torch
    import triton

    import nemokern

    print(
        f"nemokern {nemokern.__version__}  torch {torch.__version__}  triton {triton.__version__}"
    )
    print(f"extension nemokern._C: {'built' if nemokern.extension_available() else 'MISSING'}")
    print(f"CUDA available: {torch.cuda.is_available()}")


def _demo(args):
    from nemokern.train.demo import run_demo

    res = run_demo(
        seed=args.seed,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        out_dir=args.out,
    )
    worst = max(res.checks.values())
    print(
        f"demo finished in {res.seconds:.1f} s; largest check error {worst:.1e} "
        f"({'OK' if worst < 1e-4 else 'MISMATCH'})"
    )
    return 0 if worst < 1e-4 else 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="nemokern", description="RLHF kernels and trainers for Llama-3.1."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print versions and which backends are available")
    demo = sub.add_parser(
        "demo", help="the embedded default job: rollout + scoring with a tiny built-in Llama"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--k", type=int, default=4, help="responses sampled per prompt (default 4)")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument(
        "--out", default=None, help="keep the tiny model's HF checkpoint in this directory"
    )
    args = parser.parse_args(argv)
    if args.cmd == "info":
        _info()
        return 0
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
