"""The `nemokern` command: argument parsing, checks of the arguments, and printing.

A mistake in the arguments prints one line naming the option and what it allows, and exits with
status 2 before any work starts.
"""

import argparse
import os
import sys

import nemokern
from nemokern import env


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _parser():
    from nemokern.train import demo

    parser = _Parser(prog="nemokern", description="Fused RLHF kernels and a minimal Llama-3.1.")
    parser.add_argument("--version", action="version", version=f"nemokern {nemokern.__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="{info,demo}", parser_class=_Parser)
    sub.add_parser(
        "info", help="print versions, the extension's parts and the back ends that would be used"
    )
    p = sub.add_parser(
        "demo", help="the embedded default job: rollout + scoring with a tiny built-in Llama"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=demo.DEFAULT_SEED,
        metavar="N",
        help="random seed, >= 0 (default: %(default)s)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=demo.DEFAULT_K,
        metavar="N",
        help="responses sampled per prompt; RLOO needs >= 2 (default: %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=demo.DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help="longest response in tokens, >= 1 (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default=demo.DEFAULT_DEVICE,
        help="cpu, cuda or cuda:N (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        dest="out_dir",
        default=None,
        metavar="DIR",
        help="keep the tiny model's HF checkpoint in this directory (default: a temporary "
        "directory, deleted at the end)",
    )
    return parser, p


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


def _demo(args, parser):
    from nemokern.train.demo import check_options, run_demo
    from nemokern.train.options import OptionError

    kwargs = dict(
        seed=args.seed,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        out_dir=args.out_dir,
    )
    try:
        check_options(**kwargs)
    except OptionError as e:
        flag = next(a.option_strings[0] for a in parser._actions if a.dest == e.option)
        parser.error(f"{flag} {e.message}")
    res = run_demo(**kwargs)
    worst = max(res.checks.values())
    print(
        f"demo finished in {res.seconds:.1f} s; largest check error {worst:.1e} "
        f"({'OK' if worst < 1e-4 else 'MISMATCH'})"
    )
    return 0 if worst < 1e-4 else 1


def main(argv=None):
    parser, demo_parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.error("choose a command: info or demo")
    try:
        env.check_all()
    except env.EnvError as e:
        parser.exit(2, f"nemokern: error: {e}\n")
    try:
        if args.cmd == "info":
            _info()
            return 0
        return _demo(args, demo_parser)
    except BrokenPipeError:  # the reader went away (`nemokern demo | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
