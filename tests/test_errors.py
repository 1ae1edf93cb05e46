"""One exception class per name, and one home for the errors a user can cause (nemokern/errors.py):
an AST scan of every module of the package, and the old import paths kept as the same class."""

import ast
import builtins
from pathlib import Path

import pytest

import nemokern.data
import nemokern.data.readers
import nemokern.engine
import nemokern.engine.checkpoint
import nemokern.engine.config
import nemokern.env
import nemokern.model
import nemokern.model.config
import nemokern.model.hf
import nemokern.train
from nemokern import errors

ROOT = Path(__file__).parents[1]
BUILTIN_ERRORS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


def exception_classes(sources: dict[str, str]) -> list[tuple[str, str, set[str]]]:
    """(module, class name, names of its builtin exception ancestors) of every class in
    `sources` ({module: source text}) that derives from an exception, through other classes of
    `sources` too."""
    classes = [
        (module, node.name, [_base_name(b) for b in node.bases])
        for module, text in sources.items()
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ClassDef)
    ]
    ancestors = {name: {b for b in bases if b in BUILTIN_ERRORS} for _, name, bases in classes}
    changed = True
    while changed:  # a class deriving from another nemokern exception is one too
        changed = False
        for _, name, bases in classes:
            inherited = set().union(*(ancestors.get(b, set()) for b in bases)) - ancestors[name]
            if inherited:
                ancestors[name] |= inherited
                changed = True
    return [(m, name, ancestors[name]) for m, name, _ in classes if ancestors[name]]


def _base_name(node) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def repeated_names(found) -> list[str]:
    """Messages for each exception class name defined in more than one place."""
    where: dict[str, list[str]] = {}
    for module, name, _ in found:
        where.setdefault(name, []).append(module)
    return [f"{n} is defined in {', '.join(ms)}" for n, ms in sorted(where.items()) if len(ms) > 1]


def package_sources() -> dict[str, str]:
    return {
        str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
        for p in sorted((ROOT / "nemokern").rglob("*.py"))
    }


def test_no_two_exception_classes_share_a_name():
    found = exception_classes(package_sources())
    assert {"ConfigError", "DataError", "CheckpointError", "NonFiniteError"} <= {
        name for _, name, _ in found
    }
    assert repeated_names(found) == []


def test_the_scan_finds_a_planted_second_class():
    planted = {
        "nemokern/a.py": "class ConfigError(ValueError):\n    pass\n",
        "nemokern/b.py": "from x import base\nclass Base(base.RuntimeError): ...\n"
        "class ConfigError(Base): ...\nclass Plain: ...\n",
    }
    found = exception_classes(planted)
    assert [name for _, name, _ in found] == ["ConfigError", "Base", "ConfigError"]
    assert repeated_names(found) == ["ConfigError is defined in nemokern/a.py, nemokern/b.py"]


def test_every_user_error_lives_in_errors_py():
    """A ValueError subclass is an error a user can cause (the CLI answers it with one line and
    exit status 2): its one home is nemokern/errors.py."""
    elsewhere = [
        f"{name} in {module}"
        for module, name, ancestors in exception_classes(package_sources())
        if "ValueError" in ancestors and module != "nemokern/errors.py"
    ]
    assert elsewhere == []


@pytest.mark.parametrize(
    "old, new",
    [
        (nemokern.model.ConfigError, errors.ConfigError),
        (nemokern.model.config.ConfigError, errors.ConfigError),
        (nemokern.engine.ConfigError, errors.ConfigError),
        (nemokern.engine.config.ConfigError, errors.ConfigError),
        (nemokern.train.ConfigError, errors.ConfigError),
        (nemokern.model.CheckpointError, errors.CheckpointError),
        (nemokern.model.hf.CheckpointError, errors.CheckpointError),
        (nemokern.engine.checkpoint.CheckpointError, errors.CheckpointError),
        (nemokern.data.DataError, errors.DataError),
        (nemokern.data.readers.DataError, errors.DataError),
        (nemokern.env.EnvError, errors.EnvError),
    ],
)
def test_old_import_paths_name_the_one_class(old, new):
    assert old is new


def test_config_error_about_one_option():
    e = errors.ConfigError("'tpu' is not a device", option="device")
    assert (str(e), e.option, e.message) == ("device: 'tpu' is not a device", "device", e.message)
    plain = errors.ConfigError("a.toml: not valid TOML")
    assert (str(plain), plain.option, plain.message) == (plain.message, None, plain.message)
    assert isinstance(e, ValueError)
