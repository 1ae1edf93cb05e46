"""`nemokern bench`: a checkout without bench/ is one clear error; the quick sweep writes the
table (and the plots where matplotlib is installed). The benchmarks run in a pytest subprocess,
so nothing here imports bench/."""

import importlib.util
import json

import pytest

from nemokern.cli import main


def test_missing_bench_directory_is_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--bench-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"--bench-dir {tmp_path}: no test_bench_sweep.py there" in err
    assert "source checkout" in err


@pytest.mark.slow
def test_quick_sweep_writes_table_and_plots(tmp_path, capsys):
    # two benchmarks: 10-40 s, most of it pytest and torch starting in the subprocess
    assert main(["bench", "--quick", "--out", str(tmp_path), "-k", "N-N64-V1024"]) == 0
    md = (tmp_path / "bench.md").read_text()
    assert "| N | eager | nemokern |" in md and "| 64 |" in md
    runs = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    assert {r["extra_info"]["sweep"]["impl"] for r in runs} == {"nemokern", "eager"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "plots" / "sweep-N.png").stat().st_size > 0
