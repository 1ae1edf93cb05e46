"""`nemokern bench` in an installation without the benchmark directory: one clear error naming
--bench-dir. (Running the benchmarks themselves is `nemokern bench --quick`, outside the tests:
tests load nothing from the benchmark directory.)"""

import pytest

from nemokern.cli import main


def test_missing_benchmark_directory_is_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--bench-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"--bench-dir {tmp_path}: no test_bench_sweep.py there" in err
    assert "source checkout" in err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_bench_out_that_is_a_file_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--bench-dir", str(tmp_path), "--out", str(tmp_path / "f")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out: " in err and "not a directory" in err
    assert (tmp_path / "f").read_text() == "mine"
