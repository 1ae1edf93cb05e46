"""One exception class per name, and one home for the errors a user can cause (nemokern/errors.py):
an AST scan of every module of the package, and the old import paths kept as the same class."""

import ast
import builtins
from collections import Counter
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


# ----------------------------------------------------------------------------- plain raises
# Where a user's mistake can come from (options, config keys, data files, model directories):
# these raise the classes of nemokern/errors.py. ops/ and model/ are left out: their tensor shape
# and dtype checks are a programmer's API misuse, ValueError as torch's own.
USER_FACING = (
    "nemokern/data/",
    "nemokern/trainers/",
    "nemokern/tools/",
    "nemokern/engine/",
    "nemokern/plan/",
    "nemokern/cli.py",
)
PLAIN = {"ValueError", "RuntimeError"}
# The plain raises there that are not a user's mistake: {(module, function): how many}.
NOT_USER_MISTAKES = {
    # a conversation passed by a caller, checked as torch checks its arguments; rows read from a
    # file reach it through readers.parse_turns, whose DataError names the file, line and field
    ("nemokern/data/tokenizer.py", "_check_messages"): 4,
    # tensor shapes of the loss functions' arguments
    ("nemokern/trainers/losses.py", "regression_loss"): 2,
    ("nemokern/trainers/losses.py", "bradley_terry_loss"): 2,
    ("nemokern/trainers/losses.py", "pair_accuracy"): 1,
    ("nemokern/trainers/losses.py", "rloo_advantages"): 1,
    # the trainer's own sample layout (k samples per prompt, in order), not a user's input
    ("nemokern/trainers/policy.py", "SampleGroups.of"): 1,
    ("nemokern/trainers/policy.py", "pack"): 1,
    # plan's internals: a compute dtype the Run already checked; a caller inside a process group
    ("nemokern/plan/activations.py", "activation_model"): 1,
    ("nemokern/plan/sharding.py", "fake_world"): 1,
}


def plain_raises(sources: dict[str, str]) -> Counter:
    """{(module, qualified function): n} of `raise ValueError(...)` / `raise RuntimeError(...)`
    (or the bare class) in `sources` ({module: source text})."""
    found = Counter()

    def visit(module, node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(module, child, (*scope, child.name))
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(exc, ast.Name) and exc.id in PLAIN:
                    found[module, ".".join(scope) or "<module>"] += 1
            visit(module, child, scope)

    for module, text in sources.items():
        visit(module, ast.parse(text), ())
    return found


def test_user_mistakes_are_not_plain_value_or_runtime_errors():
    """A plain ValueError/RuntimeError where a user's mistake is raised: use ConfigError,
    DataError, CheckpointError or EnvError (nemokern/errors.py), or, for a check that is not a
    user's mistake, list it in NOT_USER_MISTAKES with the reason."""
    sources = {m: t for m, t in package_sources().items() if m.startswith(USER_FACING)}
    assert "nemokern/cli.py" in sources and len(sources) > 20
    found = plain_raises(sources)
    assert dict(found - Counter(NOT_USER_MISTAKES)) == {}, "unlisted"
    assert dict(Counter(NOT_USER_MISTAKES) - found) == {}, "listed, no longer raised"


def test_the_raise_scan_finds_a_planted_one():
    planted = {
        "nemokern/data/x.py": (
            "class A:\n    def f(self):\n        raise ValueError('bad')\n"
            "def g():\n    if 1:\n        raise RuntimeError\n    raise ConfigError('ok')\n"
            "raise ValueError('top')\n"
        )
    }
    assert plain_raises(planted) == Counter(
        {
            ("nemokern/data/x.py", "A.f"): 1,
            ("nemokern/data/x.py", "g"): 1,
            ("nemokern/data/x.py", "<module>"): 1,
        }
    )


def _keyword_mistakes():
    import torch

    from nemokern.trainers.losses import bradley_terry_loss, policy_gradient_coefficients
    from nemokern.trainers.policy import kl_regularised_advantages
    from nemokern.trainers.rewardbench import accuracy_report

    one = torch.zeros(2)
    return {
        "kind": lambda: bradley_terry_loss(one, one, one, kind="hinge"),
        "ties": lambda: bradley_terry_loss(one, one, one, ties="half"),
        "normalisation": lambda: policy_gradient_coefficients(
            one, torch.zeros(2, dtype=torch.long), one.bool(), "token-sum"
        ),
        "truncated": lambda: kl_regularised_advantages(
            one, one, one.bool(), 2, beta=0.0, truncated="dropped"
        ),
        "rejected": lambda: accuracy_report([1.0, 2.0], [1.0]),
        "subsets": lambda: accuracy_report([1.0], [0.0], ["a", "b"]),
        "strengths": lambda: accuracy_report([1.0], [0.0], strengths=[1.0, 2.0]),
    }


@pytest.mark.parametrize("option", sorted(_keyword_mistakes()))
def test_a_bad_keyword_value_is_a_config_error_naming_it(option):
    with pytest.raises(errors.ConfigError) as err:
        _keyword_mistakes()[option]()
    assert err.value.option == option and str(err.value).startswith(f"{option}: ")


def test_a_forced_back_end_this_machine_cannot_run_is_an_env_error(monkeypatch):
    import torch

    from nemokern.ops import _dispatch

    monkeypatch.setenv("NEMOKERN_BACKEND", "triton")
    monkeypatch.setattr(_dispatch, "triton_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(errors.EnvError, match="NEMOKERN_BACKEND=triton needs a CUDA GPU"):
        _dispatch.check_forced_backend()
    with pytest.raises(errors.EnvError, match="NEMOKERN_BACKEND=triton with CPU tensors"):
        _dispatch.backend_for(torch.zeros(1))
