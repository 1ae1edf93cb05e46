"""Turn pytest-benchmark JSON files into a markdown table (and, for the sweep of
test_bench_sweep.py, a table per axis and PNG plots: time and peak memory against the vocabulary
size and the token count, one line per implementation; plots need matplotlib).

    python bench/report.py bench/results/<run>.json [...] > bench/results/<run>.md
    python bench/report.py --plots DIR <run>.json [...]      # also writes DIR/sweep-{V,N}.png,
                                                             # linked as if from DIR/..
    python bench/report.py <log>.jsonl                       # NEMOKERN_BENCH_LOG's records
    python bench/report.py --tests <tests>.jsonl             # NEMOKERN_TEST_LOG's: outcomes
    python bench/report.py --demo DIR                        # a demo's seconds, steps, memory

Convention: a benchmark may put in extra_info `bytes` (bytes it must move) or `flops` (FLOPs it
must do), `peak_extra_bytes` (bench/common.py) and `device`. The ceiling benchmarks
(test_bench_ceilings.py, extra_info["ceiling"]) give the roofline the others are divided by:
the "headline" column is that fraction, named (of the matmul ceiling, of the copy bandwidth), or
a benchmark's own `of_bound` (the decode step against its bandwidth bound).
"""

import json
import os
import sys


def load(paths):
    rows, machine = [], {}
    for p in paths:
        with open(p) as f:
            if p.endswith(".jsonl"):  # NEMOKERN_BENCH_LOG's records, one benchmark per line
                rows += [json.loads(line) for line in f if line.strip()]
                continue
            data = json.load(f)
        machine = data.get("machine_info", machine)
        rows += data["benchmarks"]
    return rows, machine


def ceilings(rows):
    out = {}
    for r in rows:
        kind = r.get("extra_info", {}).get("ceiling")
        if kind:
            out[kind] = r["extra_info"][kind] / r["stats"]["median"]
    return out


def fmt_rate(x, unit):
    return f"{x / 1e12:.2f} T{unit}/s" if x >= 1e12 else f"{x / 1e9:.2f} G{unit}/s"


ROOF_NAMES = {"flops": "of the matmul ceiling", "bytes": "of the copy bandwidth"}


def rate_and_fraction(r, roof):
    """(rate, fraction of the roofline) of one benchmark as text ("" where unknown)."""
    info, med = r.get("extra_info", {}), r["stats"]["median"]
    for kind, unit in (("flops", "FLOP"), ("bytes", "B")):
        if kind in info:
            frac = ""
            if kind in roof and not info.get("ceiling"):
                frac = f"{info[kind] / med / roof[kind]:.0%}"
            return fmt_rate(info[kind] / med, unit), frac
    if "tokens" in info:
        return f"{info['tokens'] / med / 1e3:.1f} k tokens/s", ""
    return "", ""


def headline(r, roof):
    """The fraction a benchmark is judged by, named: of its ceiling, or of its own bound."""
    info = r.get("extra_info", {})
    if "of_bound" in info:
        return f"{info['of_bound']:.0%} of the bandwidth bound"
    frac = rate_and_fraction(r, roof)[1]
    kind = "flops" if "flops" in info else "bytes"
    return f"{frac} {ROOF_NAMES[kind]}" if frac else ""


def _mib(info):
    mem = info.get("peak_extra_bytes")
    return f"{mem / 2**20:.1f}" if mem is not None else ""


def table(rows):
    roof = ceilings(rows)
    lines = [
        "| group | benchmark | median ms | rate | headline | peak extra MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.get("group") or "", r["name"])):
        info, med = r.get("extra_info", {}), r["stats"]["median"]
        rate, head = rate_and_fraction(r, roof)[0], headline(r, roof)
        mem = _mib(info)
        lines.append(
            f"| {r.get('group') or ''} | {r['name']} | {med * 1e3:.3f} | {rate} | {head} | {mem} |"
        )
    return "\n".join(lines)


def tests_table(path):
    """NEMOKERN_TEST_LOG's records (one per test as it ended): counts per stage, then every test
    that did not pass, so a stage killed by its limit still shows what ran."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    stages = {}
    for r in records:
        stages.setdefault(r.get("stage", ""), []).append(r)
    lines = [
        "| stage | tests | passed | failed | error | skipped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage, recs in stages.items():
        n = {
            k: sum(r["outcome"] == k for r in recs)
            for k in ("passed", "failed", "error", "skipped")
        }
        lines.append(f"| {stage} | {len(recs)} | " + " | ".join(str(v) for v in n.values()) + " |")
    bad = [r for r in records if r["outcome"] != "passed"]
    if bad:
        lines += ["", "Not passed:"]
        lines += [f"- {r['outcome'].upper()} {r['test']} ({r['seconds']:.1f} s)" for r in bad]
    return "\n".join(lines)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def demo_table(directory):
    """`nemokern demo --out DIR`: seconds per stage (summary.json), and per trainer (each
    metrics.jsonl) its steps, median step time and peak memory (CUDA: allocated; CPU: RSS)."""
    with open(os.path.join(directory, "summary.json")) as f:
        seconds = json.load(f)["seconds"]
    lines = [
        "Demo: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
        "",
        "| trainer | steps | median step s | peak memory MiB |",
        "|---|---:|---:|---:|",
    ]
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            steps = [r for r in map(json.loads, filter(str.strip, f)) if "step_s" in r]
        peak = max((r.get("peak_mem_mb", 0.0) for r in steps), default=float("nan"))
        step_s = _median([r["step_s"] for r in steps])
        lines.append(f"| {name} | {len(steps)} | {step_s:.4f} | {peak:.0f} |")
    return "\n".join(lines)


AXES = {"V": "vocabulary size V", "N": "tokens N"}


def sweep(rows):
    """{axis: {impl: [(x, median s, peak extra MiB or None, row)] sorted by x}} of the sweep."""
    out = {}
    for r in rows:
        s = r.get("extra_info", {}).get("sweep")
        if s:
            mem = r["extra_info"].get("peak_extra_bytes")
            point = (s[s["axis"]], r["stats"]["median"], None if mem is None else mem / 2**20, r)
            out.setdefault(s["axis"], {}).setdefault(s["impl"], []).append(point)
    for impls in out.values():
        for points in impls.values():
            points.sort(key=lambda p: p[0])
    return out


def sweep_tables(rows):
    """One markdown table per sweep axis: a row per size, median ms / peak MiB per impl."""
    roof, lines = ceilings(rows), []
    for axis, impls in sorted(sweep(rows).items(), reverse=True):
        first = next(iter(impls.values()))[0][3]["extra_info"]["sweep"]
        fixed = {k: v for k, v in first.items() if k in ("N", "H", "V") and k != axis}
        names = sorted(impls)
        lines += [
            f"\nlinear_logprobs fwd+bwd against {AXES[axis]} "
            f"({', '.join(f'{k}={v}' for k, v in fixed.items())}): median ms, peak extra MiB"
            + (", fraction of the bf16 matmul roofline" if "flops" in roof else ""),
            "",
            f"| {axis} | " + " | ".join(names) + " |",
            "|---:|" + "---:|" * len(names),
        ]
        xs = sorted({p[0] for points in impls.values() for p in points})
        for x in xs:
            cells = []
            for name in names:
                p = next((p for p in impls[name] if p[0] == x), None)
                if p is None:
                    cells.append("")
                    continue
                frac = rate_and_fraction(p[3], roof)[1]
                mem = "" if p[2] is None else f", {p[2]:.1f} MiB"
                cells.append(f"{p[1] * 1e3:.2f} ms{mem}" + (f", {frac}" if frac else ""))
            lines.append(f"| {x} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows, directory):
    """DIR/sweep-<axis>.png: time and peak memory against the axis, one line per implementation.
    Returns the files written; [] when matplotlib is missing or there is no sweep."""
    data = sweep(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed", file=sys.stderr)
        return []
    os.makedirs(directory, exist_ok=True)
    written = []
    for axis, impls in data.items():
        fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, points in sorted(impls.items()):
            xs = [p[0] for p in points]
            t_ax.plot(xs, [p[1] * 1e3 for p in points], marker="o", label=name)
            if all(p[2] is not None for p in points):
                m_ax.plot(xs, [p[2] for p in points], marker="o", label=name)
        for ax, what in ((t_ax, "median time (ms)"), (m_ax, "peak extra memory (MiB)")):
            ax.set_xlabel(AXES[axis])
            ax.set_ylabel(what)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend()
        device = next(iter(impls.values()))[0][3]["extra_info"].get("device", "")
        fig.suptitle(f"linear_logprobs forward + backward, {device}")
        fig.tight_layout()
        path = os.path.join(directory, f"sweep-{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(paths):
    if paths[:1] == ["--tests"]:
        return print(tests_table(paths[1]))
    if paths[:1] == ["--demo"]:
        return print(demo_table(paths[1]))
    plot_dir = None
    if paths[:1] == ["--plots"]:
        plot_dir, paths = paths[1], paths[2:]
    rows, machine = load(paths)
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    devices = sorted({r.get("extra_info", {}).get("device", "") for r in rows} - {""})
    host = [f"host CPU {cpu}"] if cpu else []
    host += [f"python {machine['python_version']}"] if machine.get("python_version") else []
    print(f"Machine: {'; '.join([', '.join(devices) or 'CPU', *host])}\n")
    print(table(rows))
    if sweep(rows):
        print(sweep_tables(rows))
    if plot_dir is not None:
        for path in plots(rows, plot_dir):
            # linked from a markdown file beside the plot directory (nemokern bench: OUT/bench.md
            # and OUT/plots/)
            link = os.path.relpath(path, os.path.dirname(os.path.abspath(plot_dir)))
            print(f"\n![{os.path.basename(path)}]({link})")


if __name__ == "__main__":
    main(sys.argv[1:])
