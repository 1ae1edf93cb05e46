"""Command line: argument parsing, progress and printing; nothing else."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nemokern", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print versions and which backends are available")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import torch
        import triton

        import nemokern

        print(f"nemokern {nemokern.__version__}  torch {torch.__version__}  triton {triton.__version__}")
        print(f"extension nemokern._C: {'built' if nemokern.extension_available() else 'MISSING'}")
        print(f"CUDA available: {torch.cuda.is_available()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
