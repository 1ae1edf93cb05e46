"""What the benchmarks share, in one module: bench files import from here and from no other bench
or test file (tests/test_test_plumbing.py checks it), so editing one benchmark cannot break
another.

- timing: run_benchmark (time a call, record its peak extra memory and the device), use_times
  (give a benchmark rounds timed elsewhere), device_name;
- shapes: the models several benchmarks or scripts build (REWARD_MODEL, GENERATE_SHAPES,
  TP_CONFIG) and the generate benchmarks' prompts;
- the eager PyTorch baselines of the log-prob and policy-loss ops, and bench_linear, the
  linear_logprobs step the logprobs benchmark and the sweep time;
- TRL: the offline HF byte tokenizer, the step-time callbacks, time_trl_steps;
- the RLOO step's setup and trainers (the benchmark and bench/profile_rloo_step.py).

It puts tests/ on the import path for tests/helpers.py (the peak-memory measurement the tests
use, tiny HF models). helpers, transformers and TRL are imported where used, not here: the
torchrun benchmarks (bench_fsdp.py, bench_tensor_parallel.py) measure their processes' RSS.
"""

import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from nemokern.ops import linear_logprobs, linear_policy_loss

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

IGNORE = -100

# ---------------------------------------------------------------- timing

CPU_NAME = "2-core CPU, no GPU"  # the CI/developer machine; GPU runs name their GPU


def device_name(device):
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else CPU_NAME


def peak_extra_bytes(fn, device="cpu"):
    """(fn(), the peak memory fn allocated beyond what was held before): tests/helpers.py's."""
    from helpers import peak_extra_bytes

    return peak_extra_bytes(fn, device)


def run_benchmark(benchmark, fn, device, rounds, **info):
    """Time fn (synchronised on CUDA), record its peak extra memory, the device and `info`."""

    def call():
        out = fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return out

    call()  # warm up (and compile, for torch.compile)
    _, peak = peak_extra_bytes(call, device)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info.update(peak_extra_bytes=peak, device=device_name(device), **info)


def use_times(benchmark, times):
    """Make `times` (seconds per step, measured by a callback or in turn with the others) the
    rounds of a benchmark already run once: pytest-benchmark computes median etc. lazily from
    them. Returns the seconds of that one run; None under --benchmark-disable (the project's
    default addopts), where the call ran once and no statistics exist."""
    if benchmark.stats is None:
        return None
    run = benchmark.stats.stats.data[0]
    benchmark.stats.stats.data[:] = times
    return run


def median(values):
    return statistics.median(values) if values else 0.0


# ---------------------------------------------------------------- shapes

# Llama-3.1-shaped, untied, fp32: the reward-training benchmark's model (the RLOO policy takes its
# shape with the byte vocabulary)
REWARD_MODEL = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}

# hidden, layers, query heads, KV heads, FFN, vocab
KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
KEYS += ("intermediate_size", "vocab_size")
GENERATE_SHAPES = {
    "tiny": dict(zip(KEYS, (256, 4, 8, 2, 704, 262))),
    "mid": dict(zip(KEYS, (1024, 8, 16, 4, 2816, 32000))),
}
GENERATE_PROMPTS, NEW_TOKENS = 16, 32


def generate_prompts(vocab_size):
    """GENERATE_PROMPTS prompts of 8-48 random tokens (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 49, (GENERATE_PROMPTS,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


# ~150M parameters (600 MB in fp32): big enough that a whole copy per rank shows in the RSS
TP_CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    rope_scaling=None,
)

# ---------------------------------------------------------------- eager baselines


def logprobs_eager(logits, targets):
    """What RLHF codebases write: fp32 log_softmax over the whole vocabulary, then gather."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != IGNORE
    picked = lsm.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return picked * valid


def linear_logprobs_eager(hidden, weight, targets):
    return logprobs_eager(hidden @ weight.t(), targets)


@functools.cache
def compiled(fn):
    """torch.compile of an eager baseline (on first use: importing torch._dynamo costs the
    torchrun benchmarks' processes RSS)."""
    return torch.compile(fn, dynamic=False)


def policy_loss_eager(hidden, weight, targets, coef):
    """What RLHF codebases write: the fp32 log-softmax over the whole vocabulary, gather, sum."""
    lsm = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    return (coef * lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()


def policy_loss_via_linear_logprobs(hidden, weight, targets, coef):
    return (coef * linear_logprobs(hidden, weight, targets)).sum()


POLICY_LOSS_IMPLS = {
    "nemokern": linear_policy_loss,
    "eager": policy_loss_eager,
    "linear_logprobs": policy_loss_via_linear_logprobs,
}


def _liger_linear():
    import pytest

    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        pytest.skip("Liger-Kernel is not installed")
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", ignore_index=IGNORE)
    # -sum of the log-probs of the targets: the same gradients as sum(logp) up to sign.
    return lambda h, w, t: -loss(w, h, t)


def bench_linear(benchmark, impl, n, hs, vocab, dtype, device, rounds, backward, ignore_every=8):
    """One linear_logprobs step of `impl` (nemokern, eager, compiled, liger) at N x H x V. Every
    ignore_every-th target is ignore_index (0: none): nemokern skips those rows' GEMMs, eager and
    compiled compute them."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, hs, device=device, generator=g).to(dtype)
    weight = (torch.randn(vocab, hs, device=device, generator=g) / hs**0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device, generator=g)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    hidden.requires_grad_(backward)
    weight.requires_grad_(backward)
    fn = {
        "nemokern": linear_logprobs,
        "eager": linear_logprobs_eager,
    }.get(impl) or (compiled(linear_logprobs_eager) if impl == "compiled" else _liger_linear())

    def step():
        if not backward:
            with torch.no_grad():
                return fn(hidden, weight, targets)
        return torch.autograd.grad(fn(hidden, weight, targets).sum(), (hidden, weight))

    nhv = n * hs * vocab
    info = {"flops": (6 if backward else 2) * nhv}
    if impl == "nemokern" and backward:
        info["flops_with_recompute"] = 8 * nhv
    run_benchmark(benchmark, step, device, rounds, shape=f"N={n} H={hs} V={vocab} {dtype}", **info)


# ---------------------------------------------------------------- TRL

TRL_WARMUP_STEPS, TRL_STEPS, TRL_SKIP = 2, 12, 2

# The Llama-3.1 chat format as Jinja, the way nemokern.data.tokenizer.render_llama3_chat writes it
# (contents stripped, no newline between turns, no date preamble).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def hf_byte_tokenizer(path):
    """A PreTrainedTokenizerFast with nemokern's byte-tokenizer ids: byte b -> id b (byte-level
    BPE without merges over the byte alphabet in byte order), then the Llama-3.1 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from nemokern.data.tokenizer import BEGIN_OF_TEXT, EOT, LLAMA3_SPECIAL_TOKENS, PAD

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BEGIN_OF_TEXT, eos_token=EOT, pad_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@functools.cache
def trl_callbacks():
    """(StepTimes, PhaseTimes): the TrainerCallback classes, defined on first use (transformers is
    imported then)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        """Seconds from on_step_begin to on_step_end of every optimizer step."""

        def __init__(self):
            self.times, self._start = [], None

        def clear(self):
            self.times.clear()

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    class PhaseTimes(StepTimes):
        """StepTimes plus, per optimizer step, the seconds spent in the RLOOTrainer methods that
        _time_phases wraps (summed into `current`)."""

        def __init__(self):
            super().__init__()
            self.current, self.phases = defaultdict(float), []

        def clear(self):
            super().clear()
            self.phases.clear()

        def on_step_begin(self, args, state, control, **kwargs):
            self.current.clear()
            super().on_step_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            c, step = self.current, self.times[-1]
            inner = c["generate_s"] + c["score_s"] + c["logprobs_s"]
            self.phases.append(
                {
                    "generate_s": c["generate_s"],
                    "score_s": c["score_s"],
                    "logprobs_s": c["logprobs_s"],
                    "other_s": c["rollout_s"] - inner,
                    "update_s": step - c["rollout_s"],
                    "response_tokens": c["response_tokens"],
                }
            )

    return StepTimes, PhaseTimes


def time_trl_steps(benchmark, trainer, timer):
    """A first train() of the warm-up steps creates the AdamW state; the measured train() of
    TRL_STEPS steps keeps that optimizer. Its steps after the first TRL_SKIP, as `timer` measured
    them, become the benchmark's rounds. Returns (peak extra bytes, seconds of the measured run)."""
    trainer.train()
    optimizer = trainer.optimizer
    trainer.args.max_steps = TRL_STEPS
    timer.clear()
    _, peak = peak_extra_bytes(lambda: benchmark.pedantic(trainer.train, rounds=1), "cpu")
    steady = timer.times[TRL_SKIP:]
    assert len(steady) == TRL_STEPS - TRL_SKIP
    assert trainer.optimizer is optimizer
    return peak, use_times(benchmark, steady)


# ---------------------------------------------------------------- the RLOO step

RLOO_PROMPTS, K, MAX_NEW_TOKENS, TEMPERATURE, BETA, LR, GRAD_CLIP = 8, 4, 32, 1.0, 0.05, 1e-6, 1.0
WORDS = ("apple", "banana", "cat", "data", "alpha", "kernel", "llama", "grape")


def rloo_model():
    from nemokern.data.tokenizer import ByteTokenizer

    return {**REWARD_MODEL, "vocab_size": ByteTokenizer().vocab_size}


def share_of_a(prompts, completions, **kwargs):
    """TRL's reward-function signature; completions are strings (nemokern) or assistant turns
    (TRL, for conversational prompts)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.count("a") / max(len(t), 1) for t in texts]


def rloo_setup(tmp, system=None):
    """The policy in HF layout, the prompts file (one user turn per WORDS, after a system turn if
    given), nemokern's prompt ids."""
    from nemokern.data.prompts import read_prompts
    from nemokern.data.tokenizer import ByteTokenizer
    from nemokern.model import Llama, LlamaConfig

    if system is None:
        turns = [[{"role": "user", "content": f"Write a sentence about {w}."}] for w in WORDS]
    else:
        turns = [
            [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Write about {w}."},
            ]
            for w in WORDS
        ]
    tok = ByteTokenizer()
    torch.manual_seed(0)
    policy = Llama(
        LlamaConfig.tiny(**rloo_model(), bos_token_id=tok.bos_id, eos_token_id=list(tok.eos_ids))
    )
    policy.save_pretrained(tmp / "policy")
    assert len(turns) == RLOO_PROMPTS
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in turns))
    ids = [list(p.ids) for p in read_prompts(path, tok)]
    return {"dir": tmp / "policy", "prompts": path, "turns": turns, "ids": ids, "tmp": tmp}


def nemokern_rloo_trainer(setup, steps, out, shared_prompt=True):
    from nemokern.train import ReinforceConfig, ReinforceTrainer

    config = ReinforceConfig(
        shared_prompt=shared_prompt,
        policy=str(setup["dir"]),
        tokenizer="byte",
        prompts=str(setup["prompts"]),
        out=str(setup["tmp"] / out),
        k=K,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        beta=BETA,
        kl_estimator="k1",
        kl_reduction="sum",
        truncation_penalty=0.0,
        prompts_per_step=RLOO_PROMPTS,
        max_steps=steps,
        lr=LR,
        schedule="constant",
        weight_decay=0.0,
        betas=(0.9, 0.999),
        grad_clip=GRAD_CLIP,
        device="cpu",
        progress=False,
        tensorboard=False,
        seed=0,
    )
    return ReinforceTrainer(config, reward_fn=share_of_a)


def _time_phases(trainer, timer):
    """Wrap the trainer's own methods (instance attributes shadow the class's) to time them."""

    def wrap(name, fn, no_grad_only=False):
        def timed(*args, **kwargs):
            if no_grad_only and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            timer.current[name] += time.perf_counter() - t
            if name == "generate_s":  # completion token ids, EOS included
                timer.current["response_tokens"] += sum(len(c) for c in out)
            return out

        return timed

    trainer._prepare_inputs = wrap("rollout_s", trainer._prepare_inputs)
    trainer._generate_single_turn = wrap("generate_s", trainer._generate_single_turn)
    trainer._calculate_rewards = wrap("score_s", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = wrap(
        "logprobs_s", trainer._get_per_token_logps_and_entropies, no_grad_only=True
    )


def trl_rloo_trainer(setup, checkpointing, steps, name):
    """(trl module, an RLOOTrainer on the policy, its PhaseTimes); checks that TRL's prompt ids and
    EOS ids are nemokern's."""
    import pytest

    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    from nemokern.data.tokenizer import ByteTokenizer

    tokenizer = hf_byte_tokenizer(setup["tmp"] / "hf_tokenizer")
    timer = trl_callbacks()[1]()
    args = trl.RLOOConfig(
        output_dir=str(setup["tmp"] / name),
        per_device_train_batch_size=RLOO_PROMPTS * K,  # completions per step
        num_generations=K,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        beta=BETA,
        num_iterations=1,
        use_vllm=False,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=GRAD_CLIP,
        bf16=False,
        gradient_checkpointing=checkpointing,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        log_completions=False,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.RLOOTrainer(
        model=LlamaForCausalLM.from_pretrained(setup["dir"], dtype=torch.float32),
        reward_funcs=share_of_a,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": t} for t in setup["turns"]]),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    assert trainer._tokenize_prompts(setup["turns"])[0] == setup["ids"]
    assert set(trainer.eos_token_ids) == set(ByteTokenizer().eos_ids)
    _time_phases(trainer, timer)
    return trl, trainer, timer
