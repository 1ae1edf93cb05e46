"""torch.profiler over steady RLOO steps of test_bench_rloo_step.py's setup (bench/common.py):
nemokern's ReinforceTrainer and TRL's RLOOTrainer (no gradient checkpointing), the top operators
by self CPU time and the operator-call counts, per implementation.

    PYTHONPATH=$PWD python bench/profile_rloo_step.py [STEPS]
"""

import os
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import nemokern_rloo_trainer, rloo_setup, trl_rloo_trainer  # noqa: E402


def _report(name, prof, steps):
    events = prof.key_averages()
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(
        f"\n== {name}: {steps} steps, {total / steps:.3f} s self CPU/step, "
        f"{calls // steps} aten calls/step"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=14))


def main(steps: int) -> None:
    setup = rloo_setup(Path(tempfile.mkdtemp(prefix="rloo_step")))
    nk = nemokern_rloo_trainer(setup, 2, "prof-nemokern")
    nk.fit()  # warm-up
    nk.config.max_steps = steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        nk.fit()
    _report("nemokern", prof, steps)

    _, trl, _ = trl_rloo_trainer(setup, False, 2, "prof-trl")
    trl.train()  # warm-up, AdamW state
    trl.args.max_steps = steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trl.train()
    _report("trl[no-ckpt]", prof, steps)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
