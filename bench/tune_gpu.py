"""Tile-configuration sweep for the Triton kernels, at the benchmarks' GPU shapes.

    python bench/tune_gpu.py --out bench/results/<run>-tune.json     # GPU
    python bench/tune_gpu.py --only policy --table policy_loss_paths.json --out <run>.json
    TRITON_INTERPRET=1 python bench/tune_gpu.py --dry                 # CPU: tiny shapes

For each candidate configuration it times the kernel entry points of nemokern.kernels (not the
ops: no validation, no autograd) and reports the rate against the two ceilings measured in the
same run. `--profile` adds a torch.profiler table of one fwd+bwd step of sequence_kl and
reward_head, to show where their time goes. The chosen defaults live in the kernel modules,
except linear_policy_loss's path: the `policy` sweep times its all-Triton path and its cuBLAS-
chunk path (kernels/policy_loss_cublas.py) at several chunk sizes, bf16 and fp16, and `--table`
writes the fastest per dtype as the table that module reads (commit it as
nemokern/kernels/policy_loss_paths.json).
"""

import argparse
import functools
import json
import time

import torch


def timer(fn, device):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200) / 1e3  # seconds (median)
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ceilings(device, dry):
    n = 1 << 20 if dry else 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src), device)
    m = 256 if dry else 8192
    a = torch.randn(m, m, device=device).to(torch.bfloat16)
    mm_s = timer(lambda: a @ a, device)
    return {"bytes_per_s": 2 * n / copy_s, "flops_per_s": 2 * m**3 / mm_s}


def sweep_logprobs(device, dry, roof):
    from nemokern.kernels import logprobs as K

    n, v = (8, 1000) if dry else (16384, 128256)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, device=device, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    ones = torch.ones(n, device=device)
    rows = []
    saved = K.FWD_CONFIG, K.BWD_CONFIG
    for block_v in (256, 1024) if dry else (2048, 4096, 8192):
        for warps in (4,) if dry else (4, 8, 16):
            K.FWD_CONFIG = K.BWD_CONFIG = (block_v, warps)
            try:
                fwd = timer(lambda: K.logprobs_stats_triton(logits, targets, 1.0, -100), device)
                bwd = timer(
                    lambda: K.logprobs_backward_triton(
                        logits, targets, ones, ones, ones, ones, 1.0, -100
                    ),
                    device,
                )
            except Exception as exc:  # noqa: BLE001 (a config that does not compile is a result)
                rows.append({"BLOCK_V": block_v, "num_warps": warps, "error": str(exc)[:200]})
                continue
            nbytes = n * v * logits.element_size()
            rows.append(
                {
                    "BLOCK_V": block_v,
                    "num_warps": warps,
                    "fwd_ms": fwd * 1e3,
                    "fwd_of_copy": nbytes / fwd / roof["bytes_per_s"],
                    "bwd_ms": bwd * 1e3,
                    "bwd_of_copy": 2 * nbytes / bwd / roof["bytes_per_s"],
                }
            )
            print("logprobs", rows[-1], flush=True)
    K.FWD_CONFIG, K.BWD_CONFIG = saved
    return rows


LINEAR_CONFIGS = [  # (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages)
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (64, 256, 64, 4, 4),
    (128, 256, 32, 8, 4),
]


def sweep_linear(device, dry, roof):
    from nemokern.kernels import linear_logprobs as L

    n, h, v = (16, 32, 300) if dry else (16384, 4096, 128256)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    ones = torch.ones(n, device=device)
    saved = L.TILE_CONFIGS[torch.bfloat16]
    rows = []
    configs = [(16, 32, 16, 4, 1)] if dry else LINEAR_CONFIGS
    nhv = n * h * v
    for cfg in configs:
        L.TILE_CONFIGS[torch.bfloat16] = cfg
        row = dict(zip(("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps", "num_stages"), cfg))
        try:
            fwd = timer(lambda: L.linear_stats_triton(hidden, weight, targets, 1.0), device)
            bwd = timer(
                lambda: L.linear_backward_triton(
                    hidden, weight, targets, ones, ones, ones, ones, 1.0
                ),
                device,
            )
        except Exception as exc:  # noqa: BLE001
            row["error"] = str(exc)[:200]
            rows.append(row)
            print("linear", row, flush=True)
            continue
        row.update(
            fwd_ms=fwd * 1e3,
            fwd_of_matmul=2 * nhv / fwd / roof["flops_per_s"],
            bwd_ms=bwd * 1e3,
            bwd_of_matmul=6 * nhv / bwd / roof["flops_per_s"],
            step_of_matmul=8 * nhv / (fwd + bwd) / roof["flops_per_s"],
        )
        rows.append(row)
        print("linear", row, flush=True)
    L.TILE_CONFIGS[torch.bfloat16] = saved
    return rows


POLICY_CHUNK_ROWS = (1024, 2048, 4096, 8192)


def sweep_policy(device, dry, roof):
    """linear_policy_loss's fused pass (logp, entropy, dhidden, dweight) by each path: rows with
    ms, the fraction of the matmul ceiling counting 6 N*H*V, and peak memory beyond the inputs."""
    from nemokern.kernels import linear_policy_loss as P
    from nemokern.kernels import policy_loss_cublas as C

    n, h, v = (24, 32, 300) if dry else (16384, 4096, 128256)
    name = C.device_key(device)
    candidates = [("triton", None)] + [
        ("cublas", r) for r in ((8, 16) if dry else POLICY_CHUNK_ROWS)
    ]
    rows = []
    for dtype in (torch.float32,) if dry else (torch.bfloat16, torch.float16):
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(n, h, device=device, generator=g).to(dtype)
        weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype)
        targets = torch.randint(0, v, (n,), device=device, generator=g)
        coef = torch.randn(n, device=device, generator=g) / n
        for path, chunk in candidates:
            fn = (
                P.linear_policy_grads_triton
                if path == "triton"
                else functools.partial(C.linear_policy_grads_cublas, chunk_rows=chunk)
            )
            row = {"device": name, "dtype": str(dtype).split(".")[-1], "path": path}
            row["chunk_rows"] = chunk
            try:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                seconds = timer(functools.partial(fn, hidden, weight, targets, coef, 1.0), device)
            except Exception as exc:  # noqa: BLE001 (a path that fails is a result)
                row["error"] = str(exc)[:200]
                rows.append(row)
                print("policy", row, flush=True)
                continue
            row.update(
                seconds=seconds,
                ms=seconds * 1e3,
                of_matmul=6 * n * h * v / seconds / roof["flops_per_s"],
            )
            if device == "cuda":
                row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows.append(row)
            print("policy", row, flush=True)
    return rows


def profile_small_ops(device):
    from torch.profiler import ProfilerActivity, profile

    from nemokern.ops import reward_head, sequence_kl

    g = torch.Generator(device=device).manual_seed(0)
    lp = (-2 + torch.randn(64, 4096, device=device, generator=g)).requires_grad_()
    ref = lp.detach() + 0.1
    mask = torch.rand(64, 4096, device=device, generator=g) < 0.8
    hid = torch.randn(64, 4096, 8192, device=device, generator=g).to(torch.bfloat16)
    hid.requires_grad_()
    last = torch.randint(0, 4096, (64,), device=device, generator=g)
    nw = torch.ones(8192, device=device, dtype=torch.bfloat16, requires_grad=True)
    hw = torch.randn(9, 8192, device=device, generator=g).to(torch.bfloat16).requires_grad_()

    def step():
        sequence_kl(lp, ref, mask, estimator="k3").sum().backward()
        reward_head(hid, last, nw, hw).float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table, flush=True)
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="tiny shapes (CPU, TRITON_INTERPRET=1)")
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument("--profile", action="store_true", help="profile sequence_kl and reward_head")
    ap.add_argument("--only", choices=["logprobs", "linear", "policy"], help="one sweep only")
    ap.add_argument(
        "--table",
        metavar="FILE",
        help="with the policy sweep: write linear_policy_loss's path table (the fastest path "
        "and chunk per dtype) to FILE",
    )
    args = ap.parse_args()
    device = "cpu" if args.dry else "cuda"
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
    }
    import triton

    result["triton"] = triton.__version__
    result["ceilings"] = roof = ceilings(device, args.dry)
    print("ceilings", roof, flush=True)

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    save()
    if args.only in (None, "logprobs"):
        result["logprobs"] = sweep_logprobs(device, args.dry, roof)
        save()
    if args.only in (None, "linear"):
        result["linear_logprobs"] = sweep_linear(device, args.dry, roof)
        save()
    if args.only in (None, "policy"):
        result["policy"] = rows = sweep_policy(device, args.dry, roof)
        save()
        if args.table:
            from nemokern.kernels.policy_loss_cublas import write_table

            measured = {k: result[k] for k in ("device", "torch", "triton")}
            measured["shape"] = "N=16384 H=4096 V=128256" if not args.dry else "dry run"
            paths = write_table(args.table, [r for r in rows if "seconds" in r], measured)
            print("table", paths, flush=True)
    if args.profile and device == "cuda":
        result["profile"] = profile_small_ops(device)
        save()


if __name__ == "__main__":
    main()
