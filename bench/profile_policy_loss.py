"""Where linear_policy_loss's time goes on the CPU, next to eager PyTorch's: torch.profiler over
test_bench_policy_loss.py's CPU benchmark (N=4096, H=1024, V=32000 fp32, forward + backward w.r.t.
hidden and weight), operators grouped by input shape, so that each GEMM shows separately with its
rate: the logits GEMM of a token chunk, dhidden, the dweight accumulate, and eager's three.

    PYTHONPATH=$PWD python bench/profile_policy_loss.py [ROUNDS]
"""

import math
import os
import sys

import torch
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import POLICY_LOSS_IMPLS as IMPLS  # noqa: E402

N, H, V = 4096, 1024, 32000
GEMMS = {"aten::mm", "aten::addmm_", "aten::addmm"}


def _gemm_flops(op, shapes):
    """2*M*K*N of a GEMM from its recorded input shapes (the two matrix operands)."""
    if op not in GEMMS or len(shapes) < 2:
        return 0
    # mm(mat1, mat2[, out]); addmm(self, mat1, mat2)
    a, b = shapes[1:3] if op.startswith("aten::addmm") else shapes[:2]
    return 2 * a[0] * a[1] * b[1]


def _report(name, prof, rounds):
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if not e.key.startswith("aten::") or e.self_cpu_time_total == 0:
            continue
        flops = _gemm_flops(e.key, e.input_shapes) * e.count
        rows.append((e.self_cpu_time_total / 1e6 / rounds, e.count // rounds, e.key, e, flops))
    rows.sort(key=lambda r: -r[0])
    total = sum(r[0] for r in rows)
    gemm = sum(r[0] for r in rows if r[4])
    print(
        f"\n== {name}: {total:.2f} s self CPU per round, GEMMs {gemm:.2f} s, "
        f"the rest {total - gemm:.2f} s"
    )
    print("| op | input shapes | calls per round | s per round | GFLOP/s |")
    print("|---|---|---:|---:|---:|")
    for seconds, calls, key, e, flops in rows[:10]:
        shapes = " ".join(str(list(s)) for s in e.input_shapes if s)
        rate = f"{flops / rounds / seconds / 1e9:.0f}" if flops else ""
        print(f"| {key} | {shapes} | {calls} | {seconds:.3f} | {rate} |")


def main(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    coef = torch.randn(N, generator=g) / N
    print(f"N={N} H={H} V={V} fp32, {torch.get_num_threads()} threads, {rounds} rounds each")
    for name in ("nemokern", "eager"):
        fn = IMPLS[name]

        def step(fn=fn):
            return torch.autograd.grad(fn(hidden, weight, targets, coef), (hidden, weight))

        step()  # warm-up
        with profile(record_shapes=True) as prof:
            for _ in range(rounds):
                step()
        _report(name, prof, rounds)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
