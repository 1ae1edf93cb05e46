"""Training configuration: flat dataclasses, a TOML file, and the command line (which wins).

Every field of a config dataclass is declared with `option(default, help, choices=...)`; from that
one declaration come the Python default, the `--kebab-case` command-line option with its help text
and "(default: ...)", and the TOML key (the field name). Precedence: dataclass default < TOML
file < command line. `TrainConfig` holds what the shared training loop reads; a trainer's config
subclasses it, adds its own fields and may override defaults (REINFORCE: lr 9e-7, cosine to 9e-8).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

from nemokern.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def option_error(name: str, message: str) -> ConfigError:
    """A ConfigError about one field, named as its command-line option (--kebab-case)."""
    return ConfigError(message, option=f"--{name.replace('_', '-')}")


def check_data_and_batching(config) -> None:
    """The checks a trainer reading packed rows makes first: a data file, and a batch size (rows or
    a token budget)."""
    if not config.data:
        raise option_error("data", "a training data file is required")
    if config.rows_per_batch <= 0 and config.max_tokens_per_batch <= 0:
        raise option_error("rows_per_batch", "give rows_per_batch > 0 or max_tokens_per_batch > 0")


SCHEDULES = ("constant", "cosine", "linear")
WARMUP_FORMULAS = ("(s+1)/w", "s/w", "(s+1)/(w+1)")


def option(default, help: str, *, choices=None, aliases=()):
    """A config field: its default, its help text, (optionally) its allowed values and other
    command-line spellings of it (e.g. "--steps"). A list default is copied for each instance."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainConfig:
    """What the shared training loop reads. Optimizer defaults: recipe.md (NeMo-Aligner's
    betas/weight decay/clip; the reward recipe's stage-1 lr, constant)."""

    # {preset name: {option: value}}: what `--preset NAME` sets, below --config and the command
    # line; a trainer's config fills it in (trainers/presets.py)
    PRESETS: typing.ClassVar[dict[str, dict]] = {}

    preset: str = option(
        "",
        "start from a reference's documented defaults where NeMo-Aligner and TRL differ "
        "(docs/recipe.md lists them); --config and the command line win",
    )
    out: str = option("runs/nemokern", "output directory: checkpoints/, metrics.jsonl, final/")
    seed: int = option(0, "seed of the model init, the data order and every sampler")
    epochs: int = option(1, "passes over the training data")
    max_steps: int = option(
        0,
        "stop after this many optimizer steps (0: as many as the epochs give)",
        aliases=("--steps",),
    )
    grad_accum: int = option(1, "micro-batches per optimizer step on each process")
    lr: float = option(
        2e-6, "peak learning rate (recipe: 2e-6 regression, 1e-6 Bradley-Terry, 9e-7 REINFORCE)"
    )
    schedule: str = option("constant", "learning-rate schedule after the warmup", choices=SCHEDULES)
    warmup_steps: int = option(0, "linear warmup from 0 to lr over this many steps")
    warmup_formula: str = option(
        "(s+1)/w",
        "the warmup's lr factor at step s (0-based) of w warmup steps: (s+1)/w for s < w (the "
        "first step already moves), s/w for s <= w (the first step at lr 0) or (s+1)/(w+1)",
        choices=WARMUP_FORMULAS,
    )
    min_lr: float = option(0.0, "final learning rate of the cosine and linear schedules")
    constant_steps: int = option(
        0, "cosine and linear schedules: hold min_lr for this many final steps (decay before them)"
    )
    betas: tuple[float, float] = option((0.9, 0.98), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    optimizer_impl: str = option(
        "auto",
        "AdamW implementation (auto: fused where the device has it, else foreach)",
        choices=("auto", "fused", "foreach", "for-loop"),
    )
    shard_optimizer: bool = option(
        False,
        "under torchrun: shard the AdamW state over the data-parallel processes (ZeRO stage 1, "
        "torch's ZeroRedundancyOptimizer), each keeping about 1/dp of it; checkpoints then "
        "hold one optimizer file per process and --resume needs the same process count",
    )
    fsdp: bool = option(
        False,
        "under torchrun: shard the trained model's parameters, gradients and AdamW state over "
        "the data-parallel processes (torch FSDP2, one unit per decoder layer), each keeping "
        "about 1/dp of them (models are read from disk straight into each process's share); "
        "checkpoints hold one optimizer file per process and --resume needs the same --tp (on "
        "another process count the state is regrouped). With --tp, the tensor-parallel shards "
        "are sharded further over the data-parallel groups",
    )
    fsdp_param_dtype: str = option(
        "float32",
        "with --fsdp: the dtype parameters are all-gathered and computed in (FSDP2's "
        "MixedPrecisionPolicy; gradients are still reduced and AdamW still steps in float32). "
        "bfloat16 halves the gathers' traffic and the gathered weights' memory, the policy "
        "gathered for generation included; norms and embeddings then run in bf16 too",
        choices=("float32", "bfloat16"),
    )
    bf16: bool = option(True, "bf16 autocast on CUDA (ignored on the CPU)")
    activation_checkpointing: bool = option(False, "recompute each layer in the backward pass")
    device: str = option(
        "auto",
        "cpu, cuda, cuda:N or auto (this process's GPU, cuda:LOCAL_RANK, when CUDA "
        "is available, else the CPU)",
    )
    shuffle: bool = option(True, "shuffle the micro-batch order each epoch (seeded)")
    save_every: int = option(0, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = option(2, "keep the newest K checkpoints")
    resume: str = option(
        "",
        "'' (start fresh), 'auto' (the newest complete checkpoint in OUT, if any) "
        "or a checkpoint directory",
    )
    overwrite: bool = option(
        False,
        "start fresh in an --out that holds another run, removing its checkpoints, metrics, "
        "tensorboard/, final/, config.toml and run.json first (without it such an --out is "
        "refused)",
    )
    eval_every: int = option(
        0, "evaluate every N steps (0: only at the end; refused without an evaluation set)"
    )
    tp: int = option(
        1,
        "tensor-parallel size under torchrun: each model is split over groups of tp consecutive "
        "ranks (one node), data parallelism runs across the groups; tp must divide "
        "--nproc-per-node. Checkpoints hold each tp rank's shard; --resume at another tp "
        "reshards them (keep grad_accum x data-parallel processes the same)",
    )
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool = option(True, "also log to OUT/tensorboard when tensorboard is installed")

    # The options a resume may change, which then take effect (docs/training.md, "Resume with
    # other options"): every other option must have the saved run's value, or the resume is
    # refused naming it (TrainLoop). A trainer's config adds its own.
    RESUME_CHANGEABLE: typing.ClassVar[tuple[str, ...]] = (
        "out",
        "resume",
        "overwrite",
        "epochs",
        "max_steps",
        "lr",
        "schedule",
        "warmup_steps",
        "warmup_formula",
        "constant_steps",
        "min_lr",
        "grad_clip",
        "grad_accum",
        "save_every",
        "keep_last",
        "eval_every",
        "progress",
        "tensorboard",
        "device",
        "tp",
        "fsdp",
        "shard_optimizer",
        "fsdp_param_dtype",
        "bf16",
        "activation_checkpointing",
        "optimizer_impl",
    )

    def resume_identity(self) -> dict:
        """{option: value} of every option a resume may not change (not in RESUME_CHANGEABLE), a
        path that exists as its resolved absolute path (so that ./data.jsonl and data.jsonl are
        the same)."""
        out = {}
        for f in config_fields(type(self)):
            if f.name in self.RESUME_CHANGEABLE:
                continue
            value = getattr(self, f.name)
            if isinstance(value, str) and value and Path(value).exists():
                value = str(Path(value).resolve())
            out[f.name] = value
        return out

    def __post_init__(self):
        # Every float option, a subclass's too: nan and inf pass the range checks below (nan
        # compares false) and surface steps later as a diverged run or NaN in metrics.jsonl.
        for f in config_fields(type(self)):
            value = getattr(self, f.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ConfigError(f"{f.name} = {value} must be a finite number")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas = {self.betas} must each be in [0, 1) (AdamW's decay rates)")
        if not 0 <= self.seed < 2**31:  # derived generator seeds (x 1e6 x processes) stay 64-bit
            raise ConfigError(f"seed = {self.seed} must be in [0, 2**31)")
        for name in ("epochs", "grad_accum", "keep_last", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} must be at least 1")
        for name in (
            "max_steps",
            "warmup_steps",
            "constant_steps",
            "save_every",
            "eval_every",
            "lr",
            "min_lr",
            "eps",
            "weight_decay",
            "grad_clip",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} = {getattr(self, name)} must not be negative")
        if self.fsdp_param_dtype != "float32" and not self.fsdp:  # it would do nothing
            raise option_error("fsdp_param_dtype", f"{self.fsdp_param_dtype} needs --fsdp")
        if self.fsdp and self.shard_optimizer:
            raise option_error(
                "fsdp",
                "cannot be combined with --shard-optimizer: both shard the AdamW state (--fsdp "
                "the parameters and gradients too); use one of them",
            )
        if self.overwrite and self.resume:
            raise option_error(
                "overwrite",
                f"removes the run in --out, which --resume {self.resume} continues; give one of "
                "them",
            )
        if self.schedule != "constant" and self.min_lr > self.lr:
            raise ConfigError(
                f"min_lr = {self.min_lr} is above lr = {self.lr}; the {self.schedule} schedule "
                "decays to it"
            )


def config_fields(cls) -> list[dataclasses.Field]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    return [f for f in dataclasses.fields(cls) if f.init]


def _types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(name: str, value, tp, choices=None, where: str = ""):
    """Check `value` (from TOML or Python) against the field's type; return it in that type."""
    prefix = f"{where}: " if where else ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(name, value, inner[0], choices, where)
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        ok = isinstance(value, (list, tuple)) and len(value) == len(args)
        if ok:
            value = tuple(
                coerce(f"{name}[{i}]", v, a, None, where)
                for i, (v, a) in enumerate(zip(value, args))
            )
    elif origin is list:
        ok = isinstance(value, (list, tuple))
        if ok:
            value = [coerce(f"{name}[{i}]", v, args[0], None, where) for i, v in enumerate(value)]
    if not ok:
        raise ConfigError(
            f"{prefix}{name} = {value!r} must be {_describe(tp)}"
            f"{f' of {len(args)} values' if origin is tuple else ''}"
        )
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{prefix}{name} = {value!r} is not one of {', '.join(map(str, choices))}"
        )
    return value


def _unknown(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}"
    )


def read_toml(cls, path) -> dict:
    """{field: value} from a flat TOML file, each value type-checked; errors name the key and
    file."""
    path = Path(path)
    if tomllib is None:
        raise ConfigError(f"{path}: reading TOML needs Python >= 3.11 (tomllib)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a TOML config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8 text: {e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    fields, hints = {f.name: f for f in config_fields(cls)}, _types(cls)
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            if isinstance(value, dict):
                raise ConfigError(
                    f"{path}: [{key}] is a table; config keys are flat, write them at "
                    "the top of the file"
                )
            raise _unknown(key, fields, str(path))
        if name in values:  # max-steps and max_steps are the same key
            raise ConfigError(f"{path}: {name} is given twice (as {key} and another spelling)")
        values[name] = coerce(
            key, value, hints[name], fields[name].metadata.get("choices"), str(path)
        )
    return values


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """Add `--config FILE.toml` and one `--kebab-case` option per field of `cls` to `parser`.

    Options carry no argparse default (argparse.SUPPRESS), so `build_config` can tell what the
    command line set; the help text shows the dataclass default, the one value used.
    """
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        default=argparse.SUPPRESS,
        help="read options from a flat TOML file (keys = option names with "
        "underscores); the command line wins",
    )
    hints = _types(cls)
    for f in config_fields(cls):
        tp, flags = hints[f.name], ("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()))
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else repr(default)
        kw = dict(
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f"{f.metadata.get('help', '')} (default: {shown})",
        )
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.name == "preset" and cls.PRESETS:
            kw["choices"] = ("", *cls.PRESETS)
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            parser.add_argument(*flags, nargs=len(args), type=args[0], metavar=f.name.upper(), **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(
                *flags, nargs="*", type=typing.get_args(tp)[0], metavar=f.name.upper(), **kw
            )
        else:
            parser.add_argument(*flags, type=tp, **kw)
    return parser


def config_parser(cls, **parser_kwargs) -> argparse.ArgumentParser:
    """A stand-alone parser for `cls` (what `python -m` scripts and tests use)."""
    return add_config_arguments(argparse.ArgumentParser(**parser_kwargs), cls)


def build_config(cls, args: argparse.Namespace | None = None, *, toml=None, **overrides):
    """An instance of `cls`: defaults < the preset's values (`cls.PRESETS`; the preset named
    last of TOML, args, overrides) < TOML (`toml`, or args.config) < parsed args < overrides."""
    values = {}
    names = {f.name for f in config_fields(cls)}
    path = toml if toml is not None else getattr(args, "config", None)
    if path is not None:
        values.update(read_toml(cls, path))
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names})
    for key in overrides:
        if key not in names:
            raise _unknown(key, names, f"{cls.__name__}(...)")
    values.update(overrides)
    if "preset" in names:
        values = {**preset_values(cls, values.get("preset", "")), **values}
    hints, fields = _types(cls), {f.name: f for f in config_fields(cls)}
    for key, value in values.items():
        values[key] = coerce(key, value, hints[key], fields[key].metadata.get("choices"))
    try:
        return cls(**values)
    except ConfigError as e:
        source = f" (options from {path} and the command line)" if path is not None else ""
        raise ConfigError(f"{e}{source}") from None


def preset_values(cls, name: str) -> dict:
    """{option: value} that preset `name` sets for the config class `cls` ('': none). A class
    without presets (SFTConfig) is refused, not silently left at its defaults."""
    if not name:
        return {}
    if not cls.PRESETS:
        raise option_error("preset", f"{name!r}: no preset for {cls.__name__}")
    if name not in cls.PRESETS:
        raise option_error("preset", f"{name!r} is not one of {', '.join(cls.PRESETS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in cls.PRESETS[name].items()}


def parse_config(cls, argv=None, **parser_kwargs):
    """Parse a command line (sys.argv[1:] when None) into `cls`, reading --config FILE.toml
    first."""
    return build_config(cls, config_parser(cls, **parser_kwargs).parse_args(argv))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def toml_text(config) -> str:
    """A config as the flat TOML text `--config` reads back (None values are left out)."""
    lines = [
        f"{f.name} = {_toml_value(getattr(config, f.name))}"
        for f in config_fields(type(config))
        if getattr(config, f.name) is not None
    ]
    return "\n".join(lines) + "\n"


def dump_toml(config, path) -> None:
    """Write toml_text(config) to `path`."""
    Path(path).write_text(toml_text(config))
