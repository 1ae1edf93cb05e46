"""nemokern/env.py is the one reader of NEMOKERN_* variables, and the README shows its table."""

import re
from pathlib import Path

import pytest

from nemokern import env

ROOT = Path(__file__).parents[1]


def test_readme_table_is_the_defaults_table():
    assert env.markdown_table() in (ROOT / "README.md").read_text(), (
        "README's NEMOKERN_* table differs from nemokern/env.py; paste `python -m nemokern.env`"
    )


def test_no_other_file_reads_the_environment_for_nemokern_variables():
    readers = re.compile(r"(os\.environ|os\.getenv|environ\.get)[^\n]*NEMOKERN_")
    files = [*sorted((ROOT / "nemokern").rglob("*.py")), ROOT / "setup.py"]
    found = [str(f) for f in files if f.name != "env.py" and readers.search(f.read_text())]
    assert not found, f"read NEMOKERN_* through nemokern.env in {found}"
    named = set()
    for f in files:
        named |= set(re.findall(r"NEMOKERN_[A-Z_]+[A-Z]", f.read_text()))
    named -= {"NEMOKERN_WITH_CUDA"}  # a C++ macro setup.py defines, not a variable
    assert named <= set(env.VARIABLES), named - set(env.VARIABLES)


@pytest.mark.parametrize(
    "raw,want",
    [
        ("1", True),
        ("true", True),
        ("ON", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("off", False),
    ],
)
def test_one_boolean_spelling(monkeypatch, raw, want):
    monkeypatch.setenv("NEMOKERN_CUSTOM_ALLREDUCE", raw)
    assert env.flag("NEMOKERN_CUSTOM_ALLREDUCE") is want


def test_defaults_and_errors_name_the_variable(monkeypatch):
    for name in env.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env.check_all()
    assert env.flag("NEMOKERN_CHECK_TARGETS") is True
    assert env.number("NEMOKERN_ALLREDUCE_MAX_BYTES") == 16 << 20
    monkeypatch.setenv("NEMOKERN_CHECK_TARGETS", "yes please")
    with pytest.raises(env.EnvError, match="NEMOKERN_CHECK_TARGETS='yes please' is not a boolean"):
        env.check_all()
    monkeypatch.delenv("NEMOKERN_CHECK_TARGETS")
    monkeypatch.setenv("NEMOKERN_ALLREDUCE_TIMEOUT", "-3")
    with pytest.raises(env.EnvError, match="NEMOKERN_ALLREDUCE_TIMEOUT='-3' must be positive"):
        env.number("NEMOKERN_ALLREDUCE_TIMEOUT")
    with pytest.raises(KeyError, match="NEMOKERN_NOPE is not in"):
        env.flag("NEMOKERN_NOPE")
