"""The REINFORCE trainer with a leave-one-out baseline (recipe.md section 2; presets: section 5).

One rollout (every `updates_per_rollout` optimizer steps), in four timed phases:
  generate  (_generate) k samples per prompt with the KV-cache generate() (temperature, top-p,
            top-k), laid out as SampleGroups: each prompt's k samples consecutive;
  score     (_score) r per sample: a reward model (reward_head on the last token) and/or a Python
            function with TRL's signature fn(prompts, completions, **columns) -> list[float],
            combined with weights;
  logprobs  (_logprobs) response-token log-probs of the frozen reference (and, when a rollout
            feeds several optimizer steps, of the policy: _advantages) with linear_logprobs on
            packed sequences under no_grad (no [N, V] logits); with one step per rollout the
            policy's come from the update's own forward (PolicyLoss), detached. Then per
            micro-batch (policy.micro_batch_terms, with the options' PolicyLossSpec) the
            per-sequence KL with sequence_kl, R = r - beta * KL, RLOO advantages over the
            EOS-ended samples;
then each optimizer step of the rollout (update) takes its slice of the prompts and minimises
-logp_t * (R - b) over the response tokens, normalised by loss_normalisation (ratio-clipped
if clip_eps_*), with linear_policy_loss (its gradients formed in the forward). The shared TrainLoop
does accumulation, clipping, AdamW, the lr schedule, checkpoints and metrics; RolloutLoop makes
the batches while training and keeps an unfinished rollout in its checkpoints, so a resume inside
a rollout continues exactly.
OUT/final is the policy in HF layout.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from nemokern.data.prompts import read_prompts
from nemokern.data.tokenizer import load_tokenizer
from nemokern.engine.config import option_error
from nemokern.engine.distributed import dp_size_of, reads_deferred
from nemokern.engine.loop import StepOutput
from nemokern.errors import DataError
from nemokern.model import Llama, generate
from nemokern.model.generate import position_fix
from nemokern.parallel.fsdp import full_weights
from nemokern.trainers.policy import (
    PolicyLoss,
    SampleGroups,
    Terms,
    TokenLogprobs,
    build_policy,
    export_policy,
    frozen_copy,
    pack,
    policy_terms,
)
from nemokern.trainers.reinforce_config import ReinforceConfig
from nemokern.trainers.rollout import (
    RolloutLoop,
    Samples,
    add_sums,
    call_reward_fn,
    check_reward_fn,
    completion,
    load_reward_fn,
    load_reward_model,
    step_sums,
    stop_length,
)


# ---- the trainer ---------------------------------------------------------------------------------
class ReinforceTrainer:
    """`ReinforceTrainer(config).fit()`: train the policy, write OUT/final, return the step records.

    Python-API extras: `policy` (a Llama to start from instead of config.policy), `tokenizer`, and
    `reward_fn` (a callable with TRL's signature instead of config.reward_fn's 'module:function').
    """

    # With one optimizer step per rollout the policy is unchanged between sampling and its
    # update, so the log-probs the KL needs come from the update's own forward (PolicyLoss) and
    # the rollout skips a no-grad forward of the policy; the results are the same bit for bit.
    # False keeps that forward in the rollout (the path taken when updates_per_rollout > 1).
    defer_policy_logprobs = True

    def __init__(
        self,
        config: ReinforceConfig,
        *,
        policy: Llama | None = None,
        tokenizer=None,
        reward_fn: Callable | None = None,
    ):
        if not config.prompts:
            raise option_error("prompts", "a prompts file is required")
        if reward_fn is not None and config.reward_fn:
            raise option_error(
                "reward_fn", "given both as an option and as a Python callable; pass one"
            )
        if reward_fn is None and not config.reward_fn and not config.reward_model:
            raise option_error(
                "reward_model",
                "no reward source: give --reward-model DIR and/or --reward-fn module:function",
            )
        if config.k < 2:
            warnings.warn(
                f"k = {config.k}: with one sample per prompt the leave-one-out baseline has "
                "nothing to compare with, every advantage is 0 and the policy does not learn; "
                "use k >= 2 (recipe: 4)",
                UserWarning,
                stacklevel=2,
            )
        self.config = config
        self.reward_fn = reward_fn or (
            load_reward_fn(config.reward_fn) if config.reward_fn else None
        )
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        self.prompts = read_prompts(config.prompts, self.tokenizer)
        self.columns = sorted({c for p in self.prompts for c in p.columns})
        if self.reward_fn is not None:
            check_reward_fn(self.reward_fn, self.columns, config.prompts)
        self.policy = policy if policy is not None else build_policy(config, self.tokenizer)
        vocab = self.policy.config.vocab_size
        if vocab < self.tokenizer.vocab_size:  # ids the policy has no row for, EOS among them
            raise option_error(
                "policy",
                f"{'a policy' if policy is not None else config.policy} has a vocabulary of "
                f"{vocab} tokens, fewer than the {self.tokenizer.vocab_size} of the tokenizer "
                f"{config.tokenizer!r}; give the policy's own tokenizer (--tokenizer DIR)",
            )
        self._check_lengths(self.policy, "the policy")
        frozen = getattr(torch, config.frozen_dtype)
        self.reference = frozen_copy(self.policy, frozen, config.policy)
        self.reward_model, self.reward_column = None, 0
        if config.reward_model:
            self.reward_model, self.reward_column = load_reward_model(
                config.reward_model,
                config.attribute,
                self.policy.tp_group,
                dtype=frozen,
                deferred=reads_deferred(config),
            )
            self.reward_model.eval().requires_grad_(False)
            if self.reward_model.trunk.config.vocab_size < vocab:
                raise option_error(
                    "reward_model",
                    f"its vocabulary ({self.reward_model.trunk.config.vocab_size}) is "
                    f"smaller than the policy's ({vocab}); they must share a tokenizer",
                )
            self._check_lengths(self.reward_model.trunk, "the reward model")

    def _check_lengths(self, model, what: str) -> None:
        """Every prompt plus max_new_tokens fits the model's positions: checked before any step
        (found at generation time, it stopped a run mid-way)."""
        limit, new = model.config.max_position_embeddings, self.config.max_new_tokens
        longest = max(self.prompts, key=lambda p: len(p.ids))
        if len(longest.ids) + new > limit:
            raise DataError(
                longest.where,
                "prompt",
                f"{len(longest.ids)} tokens plus --max-new-tokens {new} exceed {what}'s "
                f"max_position_embeddings ({limit}); "
                + position_fix(len(longest.ids), new, limit, "--max-new-tokens"),
                hint=None,
            )

    # ---- one rollout ----------------------------------------------------------------------------
    def _rollout(self, first_step: int, groups: list[list[list[int]]]) -> dict:
        """Sample, score and take log-probs for the prompt groups of steps first_step, ...;
        the batches of each step and the sums of its statistics (see RolloutLoop)."""
        device, seconds = self.loop.device, {}
        with self.loop.autocast():
            t = time.perf_counter()
            samples = self._generate(first_step, groups)
            seconds["generate_s"] = self._lap(t, device)
            share = samples.groups.k if self.config.shared_prompt else None
            packs = [
                [pack(samples.prompt_ids[a:b], samples.responses[a:b], share) for a, b, _ in step]
                for step in samples.spans
            ]
            t = time.perf_counter()
            rewards, parts = self._score(samples, packs)
            seconds["score_s"] = self._lap(t, device)
            t = time.perf_counter()
            steps, sums = self._logprobs(first_step, samples, packs, rewards, parts)
            seconds["logprobs_s"] = self._lap(t, device)
        return {"steps": steps, "sums": sums, "seconds": seconds}

    @property
    def _moves_frozen(self) -> bool:
        """Whether --offload moves the reference and reward model to the device for each use
        (under --fsdp their shards are placed once, TrainLoop.place_frozen)."""
        return self.config.offload and self.loop.device.type == "cuda" and not self.loop.fsdp

    def _generate(self, first_step: int, groups: list[list[list[int]]]) -> Samples:
        """k samples of each prompt of `groups` with generate() (cut at a stop string)."""
        cfg, loop, tok = self.config, self.loop, self.tokenizer
        order = [p for step in groups for mb in step for p in mb]
        layout = SampleGroups(cfg.k, len(order))
        prompt_ids = [self.prompts[p].ids for p in order]
        # seeded by the rollout's first step and the process: a resumed run draws the same samples
        gen = torch.Generator(loop.device).manual_seed(
            (cfg.seed * 1_000_003 + first_step) * loop.dist.world_size + loop.dist.rank
        )
        # whole prompts per call: each is prefilled once for its k samples (num_samples)
        chunk = max(1, (cfg.generation_batch_size or layout.n_samples) // layout.k)
        responses, ended = [], []
        # under --fsdp the policy is gathered whole while it generates, and only then: the
        # scoring and reference forwards that follow find it sharded again
        with full_weights(loop.model):
            for i in range(0, len(prompt_ids), chunk):
                g = generate(
                    self.policy,
                    prompt_ids[i : i + chunk],
                    num_samples=layout.k,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=tok.eos_ids,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k or None,
                    top_p=cfg.top_p,
                    generator=gen,
                    pad_id=tok.pad_id,
                    # FSDP's units keep their hooks while gathered: eager decoding (CUDA graphs
                    # over them are unverified)
                    compile=False if loop.fsdp else None,
                    stop=self._stop_strings_seen if cfg.stop_strings else None,
                )
                lengths = g.lengths.tolist()
                responses += [g.tokens[j, :n].cpu() for j, n in enumerate(lengths)]
                ended.append(g.ended_with_eos.cpu())
        ended = torch.cat(ended)
        if cfg.stop_strings:
            for j, r in enumerate(responses):
                n = stop_length(r.tolist(), tok.decode, cfg.stop_strings)
                if n is not None:
                    responses[j], ended[j] = r[:n], True
        return Samples(layout, order, layout.repeat(prompt_ids), responses, ended, groups)

    def _score(self, samples: Samples, packs: list[list[dict]]) -> tuple[torch.Tensor, dict]:
        """r per sample [n] float64: the weighted sum of the reward function's scores and the
        reward model's (on the packed samples); and each source's raw scores (--save-rollouts)."""
        cfg, device = self.config, self.loop.device
        rewards = torch.zeros(samples.groups.n_samples, dtype=torch.float64)
        parts = {}
        if self.reward_fn is not None:
            prompts = [self.prompts[p] for p in samples.groups.repeat(samples.order)]
            completions = [
                completion(p.prompt, self.tokenizer.decode(r.tolist(), skip_special=True))
                for p, r in zip(prompts, samples.responses)
            ]
            columns = {c: [p.columns.get(c) for p in prompts] for c in self.columns}
            parts["reward_fn"] = call_reward_fn(
                self.reward_fn, [p.prompt for p in prompts], completions, columns
            )
            rewards += cfg.reward_fn_weight * parts["reward_fn"]
        if self.reward_model is not None:
            if self._moves_frozen:
                self.reward_model.to(device)
            scores = []
            with torch.no_grad():
                for b in (b for step in packs for b in step):
                    out = self.reward_model(
                        b["input_ids"].to(device),
                        b["last_index"].to(device),
                        cu_seqlens=b["cu_seqlens"].to(device),
                        parents=b.get("parents"),
                    )
                    scores.append(out[:, self.reward_column].double().cpu())
            parts["reward_model"] = torch.cat(scores)
            rewards += cfg.reward_model_weight * parts["reward_model"]
            if self._moves_frozen:
                self.reward_model.to("cpu")
        return rewards, parts

    def _logprobs(self, first_step, samples: Samples, packs, rewards, parts):
        """([batches of each step], [sums of each step's statistics]): each micro-batch with the
        reference's log-probs, and unless the update takes the policy's (defer_policy_logprobs)
        its coefficients (_advantages)."""
        cfg, device = self.config, self.loop.device
        if self._moves_frozen:
            self.reference.to(device)
        defer = self.defer_policy_logprobs and cfg.updates_per_rollout == 1
        ended = samples.ended
        lengths = torch.tensor([r.numel() for r in samples.responses], dtype=torch.float64)
        steps, sums = [], []
        with torch.no_grad():
            for i, (step_spans, step_packs) in enumerate(zip(samples.spans, packs)):
                saved = cfg.save_rollouts and (first_step + i + 1) % cfg.save_rollouts == 0
                a, b = step_spans[0][0], step_spans[-1][1]
                sums.append(step_sums(rewards[a:b], lengths[a:b], ended[a:b]))
                batches = []
                for (a, b, mb), p in zip(step_spans, step_packs):
                    batch = {n: p[n] for n in ("input_ids", "cu_seqlens", "targets", "sample_cu")}
                    batch["rows"] = [int(x) for x in mb]
                    if "parents" in p:
                        batch["parents"] = p["parents"]
                    if saved:
                        batch["record"] = self._record_inputs(
                            samples.prompt_ids[a:b],
                            samples.responses[a:b],
                            rewards[a:b],
                            ended[a:b],
                            {name: v[a:b] for name, v in parts.items()},
                            a == step_spans[0][0],
                        )
                    ids, cu, targets, sample_cu = (
                        p[n].to(device) for n in ("input_ids", "cu_seqlens", "targets", "sample_cu")
                    )
                    parents = p.get("parents")
                    ref = self.reference_logprobs(ids, cu, targets, parents)
                    if defer or saved:  # copies: a checkpoint refuses views of one tensor
                        batch.update(
                            ref_logprobs=ref.cpu(),
                            rewards=rewards[a:b].clone(),
                            ended=ended[a:b].clone(),
                        )
                    if not defer:
                        packed = (ids, cu, targets, sample_cu, parents)
                        terms = self._advantages(packed, ref, rewards[a:b], ended[a:b])
                        batch.update(coef=terms.coef.cpu(), weight=terms.weight)
                        if saved:
                            batch["samples"] = {n: v.cpu() for n, v in terms.samples.items()}
                        if self.spec.clip:  # the sampling policy's, for the ratio
                            batch["old_logprobs"] = terms.samples["logprobs"].cpu()
                        add_sums(sums[-1], terms.stats)
                    batches.append(batch)
                steps.append(batches)
        if self._moves_frozen:
            self.reference.to("cpu")
        return steps, sums

    def _advantages(self, packed: tuple, ref_logprobs, rewards, ended) -> Terms:
        """A micro-batch's coefficients from a no-grad forward of the policy (policy_terms: its
        log-probs, the KL to the reference's, R and the RLOO advantages). packed: pack()'s
        input_ids, cu_seqlens, targets, sample_cu (on the device) and parents."""
        ids, cu, targets, sample_cu, parents = packed
        device = self.loop.device
        with full_weights(self.loop.model):  # --fsdp: gathered for this forward
            h = self.policy.hidden_states(ids, cu_seqlens=cu, parents=parents)
            return policy_terms(
                self.policy,
                h,
                targets,
                sample_cu,
                ref_logprobs,
                rewards.to(device),
                ended.to(device),
                self.spec,
            )

    def _stop_strings_seen(self, tokens, lengths) -> torch.Tensor:
        """generate()'s `stop`: the rows [B] whose text so far ends a prefix with a stop string
        (cut at that prefix after generation, stop_length)."""
        stops, decode = self.config.stop_strings, self.tokenizer.decode
        rows = zip(tokens.cpu().tolist(), lengths.cpu().tolist())
        return torch.tensor([stop_length(t[:n], decode, stops) is not None for t, n in rows])

    @staticmethod
    def _lap(start: float, device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    # ---- the update -----------------------------------------------------------------------------
    def _update(self, model, batch) -> StepOutput:
        # parents and sample_cu: absent from rollouts saved before prompts were shared
        shared = {"parents": batch.get("parents"), "sample_cu": batch.get("sample_cu")}
        if "coef" in batch:
            loss = model(
                batch["input_ids"],
                batch["cu_seqlens"],
                batch["targets"],
                batch["coef"],
                parents=shared["parents"],
                old_logprobs=batch.get("old_logprobs"),
            )
        else:  # the policy's log-probs come from this forward (PolicyLoss)
            loss = model(
                batch["input_ids"],
                batch["cu_seqlens"],
                batch["targets"],
                ref_logprobs=batch["ref_logprobs"],
                rewards=batch["rewards"],
                ended=batch["ended"],
                **shared,
            )
            terms = getattr(model, "module", model).terms
            self.loop.add_to_step(terms.stats)
            batch = {**batch, "weight": terms.weight, "samples": terms.samples}
        if "record" in batch:
            self._save_rollout(batch)
        return StepOutput(
            loss,
            weight=batch["weight"],
            tokens=batch["input_ids"].numel(),
            rows=batch["rows"],
            metrics=getattr(model, "module", model).metrics,  # with a ratio: clip_fraction...
        )

    def _record_inputs(self, prompt_ids, responses, rewards, ended, parts, first) -> dict:
        """What a saved rollout line needs beyond the micro-batch's tensors (--save-rollouts)."""
        return {
            "prompt_ids": [list(map(int, p)) for p in prompt_ids],
            "completion_ids": [r.tolist() for r in responses],
            "reward": rewards.tolist(),
            "ended": ended.tolist(),
            "parts": {n: v.tolist() for n, v in parts.items()},
            "first": first,
        }

    def _save_rollout(self, batch) -> None:
        """Append the micro-batch's samples to OUT/rollouts/step-XXXXXXXX.jsonl (the step's first
        micro-batch starts the file; under data parallelism each process writes its own file,
        -rankNN, and under --tp the group's first rank)."""
        loop, rec, smp = self.loop, batch["record"], batch["samples"]
        if loop.dist.rank % self.config.tp:
            return
        name = f"step-{loop.step + 1:08d}"
        if loop.dist.dp_size > 1:
            name += f"-rank{loop.dist.dp_rank:02d}"
        path = Path(self.config.out) / "rollouts" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        targets, cu = batch["targets"].cpu(), batch["sample_cu"].cpu()
        policy, ref = smp["logprobs"].double().cpu(), batch["ref_logprobs"].double().cpu()
        decode = self.tokenizer.decode
        with open(path, "w" if rec["first"] else "a", encoding="utf-8") as f:
            for s, ids in enumerate(rec["completion_ids"]):
                rows = torch.arange(int(cu[s]), int(cu[s + 1]))
                rows = rows[targets[rows] != -100]
                line = {
                    "prompt": decode(rec["prompt_ids"][s]),
                    "completion": decode(ids, skip_special=True),  # as the reward_fn sees it
                    "completion_ids": ids,
                    "logprobs": policy[rows].tolist(),
                    "ref_logprobs": ref[rows].tolist(),
                    "reward": rec["reward"][s],
                    **{n: v[s] for n, v in rec["parts"].items()},
                    "kl": float(smp["kl"][s]),
                    "reward_with_kl": float(smp["score"][s]),
                    "baseline": float(smp["baseline"][s]),
                    "advantage": float(smp["advantage"][s]),
                    "ended": bool(rec["ended"][s]),
                }
                f.write(json.dumps(line) + "\n")

    def _groups(self, per_micro: int) -> list[list[int]]:
        n = len(self.prompts) // per_micro
        if n == 0:
            raise option_error(
                "prompts_per_step",
                f"{self.config.prompts} has {len(self.prompts)} prompts, fewer than one "
                f"micro-batch ({per_micro}); lower prompts_per_step or add prompts",
            )
        return [list(range(i * per_micro, (i + 1) * per_micro)) for i in range(n)]

    def fit(self) -> list[dict]:
        """Train; write OUT/final (the policy in HF layout, and an HF tokenizer's files) on rank 0;
        return the per-step records."""
        cfg = self.config
        start = time.perf_counter()
        self.spec = cfg.loss_spec()
        model = PolicyLoss(self.policy, self.spec)
        world = dp_size_of(cfg)  # the loop's data parallelism
        per_step_micro = cfg.grad_accum * world
        if cfg.prompts_per_step % per_step_micro:
            raise option_error(
                "prompts_per_step",
                f"{cfg.prompts_per_step} prompts do not split into grad_accum x "
                f"processes = {per_step_micro} equal micro-batches",
            )
        groups = self._groups(cfg.prompts_per_step // per_step_micro)
        self.loop = RolloutLoop(
            cfg,
            model,
            groups,
            self._update,
            rollout=self._rollout,
            updates_per_rollout=cfg.updates_per_rollout,
        )
        self.reference_logprobs = TokenLogprobs(self.reference, self.spec.temperature)
        for module in filter(None, (self.reference_logprobs, self.reward_model)):
            self.loop.place_frozen(module, offload=cfg.offload)
        history = self.loop.fit()
        export_policy(self.loop, self.policy, self.tokenizer)
        self.seconds = time.perf_counter() - start
        return history
