"""Turn pytest-benchmark JSON files into a markdown table.

    python bench/report.py bench/results/<run>.json [...] > bench/results/<run>.md

Convention: a benchmark may put in extra_info `bytes` (bytes it must move) or `flops` (FLOPs it
must do), `peak_extra_bytes` (bench/_memory.py) and `device`. The ceiling benchmarks
(test_bench_ceilings.py, extra_info["ceiling"]) give the roofline the others are divided by.
"""

import json
import sys


def load(paths):
    rows, machine = [], {}
    for p in paths:
        with open(p) as f:
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


def table(rows):
    roof = ceilings(rows)
    lines = [
        "| group | benchmark | median ms | rate | of roofline | peak extra MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.get("group") or "", r["name"])):
        info, med = r.get("extra_info", {}), r["stats"]["median"]
        rate = frac = ""
        for kind, unit in (("flops", "FLOP"), ("bytes", "B")):
            if kind in info:
                rate = fmt_rate(info[kind] / med, unit)
                if kind in roof and not info.get("ceiling"):
                    frac = f"{info[kind] / med / roof[kind]:.0%}"
                break
        if not rate and "tokens" in info:
            rate = f"{info['tokens'] / med / 1e3:.1f} k tokens/s"
        mem = info.get("peak_extra_bytes")
        mem = f"{mem / 2**20:.1f}" if mem is not None else ""
        lines.append(
            f"| {r.get('group') or ''} | {r['name']} | {med * 1e3:.3f} | {rate} | {frac} | {mem} |"
        )
    return "\n".join(lines)


def main(paths):
    rows, machine = load(paths)
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    devices = sorted({r.get("extra_info", {}).get("device", "") for r in rows} - {""})
    print(
        f"Machine: {', '.join(devices) or 'CPU'}; host CPU {cpu}; python "
        f"{machine.get('python_version', '')}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
