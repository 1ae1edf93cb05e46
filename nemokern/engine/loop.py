"""The training loop every trainer shares; a trainer supplies the model, its micro-batches and a
step function that turns one micro-batch into a loss.

Per optimizer step: `grad_accum` micro-batches on each of the data-parallel processes (DDP under
torchrun, gloo on CPUs, NCCL on GPUs; with `tp` > 1 the ranks form a (dp, tp) mesh, the model is
split over each tp group and DDP runs over the dp groups; with `fsdp` FSDP2 shards the model over
the data-parallel processes instead of DDP), bf16 autocast on CUDA, each
micro-batch's loss weighted by its `weight` (e.g. the number of labels or pairs it averages) so
that the step's loss is the mean over the whole global batch; then global-norm clipping, AdamW
and the learning-rate schedule.
A non-finite loss or gradient stops the run before the update, after saving the last good state.
Checkpoints every `save_every` steps and at the end; `resume` continues exactly where a checkpoint
left off (same data order, RNG, optimizer and schedule: bit-identical losses on the CPU), with the
options a resume may change (TrainConfig.RESUME_CHANGEABLE: the lr schedule, the length, ...)
taken from this run and any other changed option refused.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..model.deferred import materialize
from ..model.llama import DecoderLayer
from ..parallel import all_reduce, grad_norm_tp, init_parallel
from ..parallel.fsdp import full_tensor, full_weights, init_root, shard
from .checkpoint import Checkpointer, CheckpointError, get_rng_state, save_modules
from .config import ConfigError, TrainConfig, dump_toml, option_error
from .distributed import seed_everything, setup_distributed
from .metrics import MetricsLogger, peak_memory_mb
from .optimizer import build_optimizer, build_scheduler, warn_if_no_step_moves
from .resume import check_resume_options, content_digest
from .run_dir import RunLock, prepare_out, run_record, write_run_record
from .stop import StopSignals, TrainingStopped


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the message names the step, the rows and the
    checkpoint."""


@dataclass
class StepOutput:
    """What a step function returns for one micro-batch."""

    loss: torch.Tensor  # scalar, differentiable: the micro-batch's mean loss
    weight: float | torch.Tensor = 1.0  # how many terms that mean is over (a LossValue's count)
    # per-micro-batch means, e.g. accuracy; the same names on every micro-batch and process
    metrics: dict[str, Any] = field(default_factory=dict)
    tokens: int | torch.Tensor = 0  # tokens processed (for tokens/s)
    rows: Sequence | None = None  # the batch's row ids, named if its loss is not finite


def move_to(batch, device: torch.device):
    """`batch` with every tensor inside (dicts, lists, tuples, dataclasses) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(
            batch,
            **{
                f.name: move_to(getattr(batch, f.name), device)
                for f in dataclasses.fields(batch)
                if f.init
            },
        )
    return batch


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Switch on every submodule that has an `activation_checkpointing` flag (a Llama); returns
    how many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "activation_checkpointing"):
            m.activation_checkpointing = True
            n += 1
    return n


StepFn = Callable[[nn.Module, Any], StepOutput]


class TrainLoop:
    """Trains `model` on `data` with `step_fn`; `fit()` runs it and returns the per-step metrics.

    model: the module to train (moved to the run's device; wrapped in DDP under torchrun, or
        sharded in place with FSDP2 under config.fsdp: each DecoderLayer a unit, the model the
        root; parallel.fsdp.full_weights(model) makes it whole for code that calls its parts). A
        checkpoint stores it with checkpoint.save_modules: HF layout for a Llama, safetensors for
        the rest (e.g. a reward head); under tp > 1 each tp rank's shard (checkpoint.save_shard).
    data: a sequence of micro-batches (len + index); the loop owns their order (seeded shuffle
        per epoch) and position, which is what makes resuming exact. A trailing remainder that does
        not fill a global step (grad_accum x world_size micro-batches) is left out of that epoch.
    step_fn(model, batch) -> StepOutput: forward and loss of one micro-batch already moved to the
        device. It must call `model(...)` (the DDP wrapper's forward) rather than a submodule so
        that DDP sees the forward pass.
    evaluate(model) -> dict: optional, run every eval_every steps and at the end, in eval mode
        without gradients, on every process (its metrics are logged with an "eval_" prefix).
    find_unused_parameters: passed to DDP, for models with trainable parameters a loss never uses.

    Extension points, for a trainer whose batches or records need more than the above (REINFORCE's
    RolloutLoop): override `micro_batches` (batches made during training), `extra_state` and
    `load_extra_state` (what those need to resume), `step_record` (add to each step's record) and
    `nonfinite_note` (add to the message of a non-finite loss or gradient); call `autocast()` (the
    steps' mixed precision, for forwards made outside a step) and `sum_over_processes` (sums over
    the data-parallel processes). `train_step()` runs one optimizer step outside `fit` (what a
    benchmark times). The methods whose names start with _ are not among them.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        data: Sequence,
        step_fn: StepFn,
        *,
        evaluate: Callable[[nn.Module], dict] | None = None,
        find_unused_parameters: bool = False,
    ):
        if config.eval_every and evaluate is None:  # an option that would do nothing
            raise option_error(
                "eval_every",
                f"{config.eval_every} given, but this run has nothing to evaluate"
                + ("; give --eval-data" if hasattr(config, "eval_data") else ""),
            )
        self.config, self.data, self.step_fn, self.evaluate = config, data, step_fn, evaluate
        self._data_digest = None  # content_digest(data), on the first checkpoint or resume
        self.dist = setup_distributed(config.device, config.tp)
        self.device = self.dist.device
        self.out = Path(config.out)
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        # --fsdp on one data-parallel process has nothing to shard over: a plain run
        self.fsdp = config.fsdp and self.dist.dp_size > 1
        if self.fsdp:
            # sharded where it is (the CPU, as loaded): fully_shard moves one unit at a time to
            # the mesh's device and shards it there, so the device never holds the whole model
            self.dp_mesh = init_parallel(config.tp, self.device.type)["dp"]
            # float32: the parameters' own dtype, no MixedPrecisionPolicy
            gathered = torch.bfloat16 if config.fsdp_param_dtype == "bfloat16" else None
            shard(model, self.dp_mesh, (DecoderLayer,), param_dtype=gathered)
        # weights loaded deferred (Llama.from_pretrained(deferred=True)) are read now, where they
        # live: under fsdp each process reads and keeps its rows only
        materialize(model, self.device)
        if self.fsdp:
            init_root(model)
        self.model = model.to(self.device)
        self.ddp = (
            DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
                process_group=self.dist.dp_group,
            )
            if self.dist.dp_size > 1 and not self.fsdp
            else None
        )
        self.per_step = config.grad_accum * self.dist.dp_size  # micro-batches per optimizer step
        if len(data) < self.per_step:
            raise ConfigError(
                f"{len(data)} micro-batches cannot fill one optimizer step of grad_accum="
                f"{config.grad_accum} x {self.dist.dp_size} data-parallel process(es); use "
                "smaller batches "
                "or a smaller grad_accum"
            )
        self.steps_per_epoch = len(data) // self.per_step
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, config, self.dist.dp_group)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        warn_if_no_step_moves(config, self.total_steps)
        self.checkpointer = Checkpointer(
            self.out, keep_last=config.keep_last, tp_group=self.dist.tp_group
        )
        self.step = 0
        self.last_saved = -1
        self._epoch_order: tuple[int, list[int]] = (-1, [])
        self.history: list[dict] = []

    # ---- data order ------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order[0] != epoch:
            n = len(self.data)
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            order = (
                torch.randperm(n, generator=g).tolist() if self.config.shuffle else list(range(n))
            )
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def micro_batch_indices(self, step: int) -> list[int]:
        """Indices into `data` of this process's micro-batches for optimizer step `step`
        (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)[within * self.per_step : (within + 1) * self.per_step]
        return order[self.dist.dp_rank :: self.dist.dp_size]

    def micro_batches(self, step: int) -> list[tuple[Any, Any]]:
        """(id, micro-batch) pairs this process trains on in optimizer step `step` (0-based); the id
        names the micro-batch when its step function gives no rows. A trainer whose batches are
        made during training (REINFORCE's rollouts) overrides this, and extra_state/load_extra_state
        if what it makes must survive a resume."""
        return [(f"micro-batch {i}", self.data[i]) for i in self.micro_batch_indices(step)]

    def extra_state(self) -> dict:
        """A subclass's own resumable state (tensors, numbers, strings, lists, dicts), saved with
        every checkpoint by each process (each process gets its own back: under data
        parallelism, e.g. the rollout it made)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what extra_state returned."""

    def data_state(self, step: int) -> dict:
        if self._data_digest is None:
            self._data_digest = content_digest(self.data)
        return {
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "micro_batches": len(self.data),
            "micro_batches_per_step": self.per_step,
            "shuffle": self.config.shuffle,
            "seed": self.config.seed,
            # what the run trains on and from: the training data's content and the options that
            # name models, data and reward sources (TrainConfig.resume_identity)
            "identity": {**self.config.resume_identity(), "training data": self._data_digest},
        }

    def place_frozen(self, module: nn.Module, *, offload: bool = False) -> None:
        """Put a module the run calls without training it (REINFORCE's reference and reward
        model) where its forwards run: under fsdp sharded over the data-parallel processes like
        the model (each DecoderLayer a unit, resharded after every forward; with `offload` on
        CUDA the shards stay in pinned host memory), otherwise whole on the device, or with
        `offload` on CUDA on the CPU (its caller moves it to the device for each use)."""
        offload = offload and self.device.type == "cuda"
        if self.fsdp:
            shard(module, self.dp_mesh, (DecoderLayer,), frozen=True, offload=offload)
        placement = torch.device("cpu") if offload else self.device
        materialize(module, placement)  # deferred weights (see __init__)
        if self.fsdp:
            init_root(module)
        else:
            module.to(placement)

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def writes_weights(self) -> bool:
        """Whether this process joins writing the whole model (OUT/final): data-parallel rank 0
        (under tp a collective of its tp group, whose rank 0 writes), or every process under
        fsdp (each tensor gathered from all; the first writes)."""
        return self.dist.dp_rank == 0 or self.fsdp

    def save(self, step: int | None = None, rng: dict | None = None) -> Path:
        step = self.step if step is None else step
        path = self.checkpointer.save(
            step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={"data": self.data_state(step)},
            rng=rng,
            local={"extra": self.extra_state()},
        )
        self.last_saved = step
        return path

    def export(self, directory=None) -> Path:
        """Write the model's weights for use outside training (default OUT/final) with
        checkpoint.save_modules: HF layout for each Llama part, modules.safetensors for the rest."""
        directory = Path(directory) if directory is not None else self.out / "final"
        if self.writes_weights:
            save_modules(self.model, directory)
        if self.dist.active:
            dist.barrier()
        return directory

    def _resume(self) -> dict | None:
        """Continue from the checkpoint config.resume names, if any: {"step", "path"} of it."""
        path = self.checkpointer.resolve(self.config.resume)
        if path is None:
            return None
        state = self.checkpointer.load(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        saved, now = state["data"], self.data_state(state["step"])
        for key in ("micro_batches", "micro_batches_per_step", "shuffle", "seed"):
            if saved.get(key) != now[key]:
                raise CheckpointError(
                    f"{path}: saved with {key}={saved.get(key)!r}, this run has {now[key]!r}; an "
                    "exact resume needs the same data, batching, grad_accum x processes, shuffle "
                    "and seed"
                )
        then = saved["identity"]
        check_resume_options(self.config, path, then)
        if then["training data"] != self._data_digest:
            raise CheckpointError(
                f"{path}: saved by a run with other training data (file, split, max_length, "
                "tokenizer or rows differ); --resume continues that run. Start a new one in "
                "another --out (or resume with the same options)"
            )
        self.load_extra_state(state["local"]["extra"])
        self.step = self.last_saved = state["step"]
        # this run's lr, schedule, warmup and total steps from here on, not the saved ones
        self.scheduler = build_scheduler(
            self.optimizer, self.config, self.total_steps, step=self.step
        )
        if self.dist.rank == 0:  # one line, also without a progress bar
            print(
                f"resuming from {path} (step {self.step} of {self.total_steps})",
                file=sys.stderr,
                flush=True,
            )
        return {"step": self.step, "path": str(path)}

    def _claim_out(self, lock: RunLock) -> None:
        """Rank 0 takes OUT's lock and checks (or, with overwrite, clears) OUT for a fresh run;
        every process raises its ConfigError."""
        error = None
        if self.dist.rank == 0:
            try:
                lock.acquire()
                prepare_out(self.out, resume=self.config.resume, overwrite=self.config.overwrite)
            except ConfigError as e:
                error = str(e)
        if self.dist.active:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise ConfigError(error)

    # ---- the step ----------------------------------------------------------------------------
    def autocast(self):
        """The context the step functions and evaluations run in: bf16 autocast on CUDA under
        config.bf16, otherwise nothing."""
        if self.device.type == "cuda" and self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def sum_over_processes(self, values: list[torch.Tensor]) -> list[float]:
        """Each value (a scalar tensor) summed over the data-parallel processes, in float64; a
        collective: every process calls it with the same number of values."""
        vec = torch.stack([v.to(self.device, torch.float64) for v in values])
        if self.dist.dp_size > 1:  # the ranks of a tp group hold the same values
            all_reduce(vec, self.dist.dp_group)
        return vec.tolist()

    def train_step(self) -> dict:
        """One optimizer step and its record, outside fit: no run directory, resume, logging or
        checkpoint (what a benchmark times)."""
        return self._train_step()

    def _train_step(self) -> dict:
        cfg, step = self.config, self.step
        rng_before = get_rng_state()
        t0 = time.perf_counter()
        module = self.ddp or self.model
        self.model.train()
        micro = self.micro_batches(step)
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        weight_sum, loss_sum, tokens, finite = zero.clone(), zero.clone(), zero.clone(), []
        metric_sums: dict[str, torch.Tensor] = {}
        rows = []
        for j, (name, batch) in enumerate(micro):
            batch = move_to(batch, self.device)
            # FSDP reduce-scatters after every micro-batch: its gradients stay 1/dp (accumulating
            # unsynchronised would hold them whole until the step's last micro-batch)
            sync = self.ddp is None or j == len(micro) - 1
            with nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    out = self.step_fn(module, batch)
                w = torch.as_tensor(out.weight, device=self.device).detach().to(torch.float64)
                (out.loss * w.to(out.loss.dtype)).backward()
            loss = out.loss.detach().to(torch.float64)
            finite.append(torch.isfinite(loss))
            weight_sum += w
            loss_sum += loss * w
            tokens += torch.as_tensor(out.tokens, device=self.device, dtype=torch.float64)
            for k, v in out.metrics.items():
                metric_sums[k] = (
                    metric_sums.get(k, zero) + torch.as_tensor(v, device=self.device).detach() * w
                )
            rows.append(list(out.rows) if out.rows is not None else name)
        bad_local = (~torch.stack(finite)).sum()
        names = sorted(metric_sums)
        total_w, total_loss, total_tokens, n_bad, *msums = self.sum_over_processes(
            [weight_sum, loss_sum, tokens, bad_local, *(metric_sums[k] for k in names)]
        )
        if n_bad:
            bad_rows = [r for r, ok in zip(rows, finite) if not ok]
            self._stop(step, "loss", rng_before, bad_rows)
        if total_w > 0:
            # DDP averaged the weighted sums over processes; this makes them the global weighted
            # mean
            scale = self.dist.dp_size / total_w
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if self.dist.tp_group is None:  # under fsdp a DTensor: the norm over every shard
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        else:
            norm = grad_norm_tp(self.model, self.dist.tp_group)
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            self._stop(step, f"gradient (norm {grad_norm})", rng_before, rows)
        lr = self.optimizer.param_groups[0]["lr"]
        if total_w > 0:
            self.optimizer.step()
            self.scheduler.step()
        else:  # nothing counted (e.g. a global batch of ties): no update, not even weight decay
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        metrics = {
            "epoch": step // self.steps_per_epoch,
            "loss": total_loss / total_w if total_w else 0.0,
            **{k: v / total_w if total_w else 0.0 for k, v in zip(names, msums)},
            "lr": lr,
            "grad_norm": grad_norm,
            "weight": total_w,
            "tokens": int(total_tokens),
            "tokens_per_s": total_tokens / seconds,
            "step_s": seconds,
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        return self.step_record(step, metrics)

    def step_record(self, step: int, metrics: dict) -> dict:
        """The record of optimizer step `step` (0-based, its update done) that the run logs; an
        extension point for adding to it. Called on every process, so it may call collectives
        (sum_over_processes). This one returns `metrics` as they are."""
        return metrics

    def nonfinite_note(self, step: int) -> str:
        """An extension point: what to add to the message of a non-finite loss or gradient in
        optimizer step `step` (0-based), e.g. how large its inputs were; "" for nothing."""
        return ""

    def _weights_finite(self) -> bool:
        """Whether every parameter of every process is finite (one all-reduce of a flag)."""
        bad = torch.zeros(1, dtype=torch.float32, device=self.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP DTensor's shard
            bad += (~torch.isfinite(local.detach())).any()
        if self.dist.active:
            all_reduce(bad)
        return not bad.item()

    def _stop(self, step: int, what: str, rng_before: dict, rows) -> None:
        """Keep the state before this step as a checkpoint, then raise NonFiniteError; when that
        state's weights are themselves non-finite (the previous update diverged) write nothing
        and name the newest checkpoint instead."""
        self.optimizer.zero_grad(set_to_none=True)
        weights_ok = self._weights_finite()
        if not weights_ok:
            path = self.checkpointer.latest()
        elif self.last_saved != step:
            path = self.save(step, rng=rng_before)  # `step` steps done: the last good state
        else:
            path = self.checkpointer.path(step)
        if self.dist.active:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rows)
            # gloo's worker thread releases that gather's Python tensors once it has moved on;
            # a barrier makes sure it has before the error unwinds the process group
            dist.barrier()
            where = "; ".join(f"rank {r}: {g}" for r, g in enumerate(gathered) if g)
        else:
            where = f"{rows}"
        head = (
            f"non-finite {what} at step {step + 1} (epoch {step // self.steps_per_epoch}); batch "
            f"rows: {where}."
        )
        if weights_ok:
            message = (
                f"{head} The last good state (after step {step}) is in {path}: fix the data or "
                "lower the lr, then resume from it"
            )
        else:
            message = (
                f"{head} The weights themselves are non-finite (the update of step {step} "
                "diverged), so no checkpoint was written; lower the lr and "
                + (f"resume from {path}" if path else "start again (no earlier checkpoint exists)")
            )
        note = self.nonfinite_note(step)
        raise NonFiniteError(f"{message}; {note}" if note else message)

    def _run_eval(self) -> dict:
        if self.evaluate is None:
            return {}
        self.model.eval()
        # whole weights under fsdp: an evaluation may call the model's parts directly
        with torch.no_grad(), self.autocast(), full_weights(self.model):
            result = self.evaluate(self.model)
        self.model.train()
        return {f"eval_{k}": v for k, v in result.items()}

    # ---- the run -----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to total_steps (resuming first if config.resume says so); returns the step
        records. Rank 0 holds OUT's lock (run_dir.RunLock) while it runs, refuses a fresh run
        over another run in OUT (or clears it under config.overwrite) and writes OUT/config.toml
        and OUT/run.json."""
        lock = RunLock(self.out)
        try:
            self._claim_out(lock)
            return self._fit()
        finally:
            lock.release()

    def _fit(self) -> list[dict]:
        cfg, rank0 = self.config, self.dist.rank == 0
        seed_everything(cfg.seed + self.dist.dp_rank)
        resumed = self._resume()
        if rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_toml(cfg, self.out / "config.toml")
            record = run_record(cfg, processes=self.dist.world_size, device=str(self.device))
            write_run_record(self.out, {**record, "resumed_from": resumed})
        logger = MetricsLogger(
            self.out,
            total_steps=self.total_steps,
            start_step=self.step,
            enabled=rank0,
            tensorboard=cfg.tensorboard,
            progress=cfg.progress,
        )
        with logger, StopSignals() as signals:
            while self.step < self.total_steps:
                metrics = self._train_step()
                if (
                    cfg.eval_every
                    and self.step % cfg.eval_every == 0
                    and self.step < self.total_steps
                ):
                    metrics.update(self._run_eval())
                if self.step == self.total_steps:
                    metrics.update(self._run_eval())
                self.history.append(logger.log(self.step, metrics))
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                signum = signals.agreed(self.device, self.dist.active)
                if signum and self.step < self.total_steps:
                    self._stop_on(signum)
            if self.last_saved != self.step:
                self.save()
        return self.history

    def _stop_on(self, signum: int) -> None:
        """A signal reached a process (engine/stop.py): keep this step as a checkpoint, then raise
        TrainingStopped on every process."""
        path = self.save() if self.last_saved != self.step else self.checkpointer.path(self.step)
        raise TrainingStopped(
            f"stopped by {StopSignals.name(signum)} after step {self.step} of "
            f"{self.total_steps}; the state is in {path}: --resume auto continues from it",
            signum,
        )
