"""KV-cache generation: cache == full forward, ragged batch == alone, sampling options, EOS."""

import pytest
import torch

from helpers import CASES, nemokern_from_hf, random_hf_model
from nemokern.model import Llama, LlamaConfig, generate, sample_next
from nemokern.model.generate import STOP_CHECK_EVERY

PROMPTS = [[5, 9, 2, 77, 31], [8], [100, 3, 3, 250, 17, 6, 90, 12, 44]]


def _sharp(model, std=0.2):
    """Weights 10x larger than the usual init: with std 0.02 attention is nearly uniform and the
    argmax ignores positions, so a cache with wrong position ids would still pass these tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _sharp(Llama(LlamaConfig.tiny(vocab_size=257))).eval()


def _greedy_without_cache(model, prompt, n):
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        nxt = model(ids)[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


@torch.no_grad()
def test_greedy_with_cache_equals_full_forward_argmax(model):
    res = generate(model, PROMPTS, max_new_tokens=12, greedy=True, eos_token_id=[])
    assert res.tokens.shape == (3, 12) and res.lengths.tolist() == [12, 12, 12]
    assert not res.ended_with_eos.any()
    for i, p in enumerate(PROMPTS):
        assert res.tokens[i].tolist() == _greedy_without_cache(model, p, 12), i


@torch.no_grad()
def test_ragged_batch_equals_each_prompt_alone(model):
    batch = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_token_id=[])
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], max_new_tokens=10, temperature=0, eos_token_id=[])
        assert torch.equal(batch.tokens[i], alone.tokens[0]), i


def test_greedy_matches_transformers_generate():
    hf = _sharp(random_hf_model(**CASES["gqa_llama3_untied"]))
    ours = generate(
        nemokern_from_hf(hf), [PROMPTS[0]], max_new_tokens=8, greedy=True, eos_token_id=[]
    )
    theirs = hf.generate(
        torch.tensor([PROMPTS[0]]),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours.tokens[0].tolist() == theirs[0, len(PROMPTS[0]) :].tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(
            model,
            PROMPTS,
            max_new_tokens=15,
            temperature=1.3,
            top_p=0.95,
            top_k=50,
            generator=g,
            eos_token_id=[],
        ).tokens

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_1_equals_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=8, greedy=True, eos_token_id=[])
    topk1 = generate(
        model,
        PROMPTS,
        max_new_tokens=8,
        temperature=5.0,
        top_k=1,
        eos_token_id=[],
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy.tokens, topk1.tokens)


def test_eos_stops_each_row_and_pads_after(model):
    free = generate(model, PROMPTS, max_new_tokens=10, greedy=True, eos_token_id=[])
    eos = int(free.tokens[0, 3])  # row 0 emits this at step 3 (or earlier)
    res = generate(model, PROMPTS, max_new_tokens=10, greedy=True, eos_token_id=eos, pad_id=-1)
    for i in range(3):
        row = free.tokens[i].tolist()
        n = row.index(eos) + 1 if eos in row else 10
        assert res.lengths[i] == n and bool(res.ended_with_eos[i]) == (eos in row)
        assert res.tokens[i, :n].tolist() == row[:n]
        assert (res.tokens[i, n:] == -1).all()
    assert res.lengths[0] <= 4 and res.ended_with_eos[0]
    assert res.tokens.shape[1] == int(res.lengths.max())


def test_eos_defaults_to_config_and_accepts_a_set():
    torch.manual_seed(0)
    m = Llama(LlamaConfig.tiny(vocab_size=257)).eval()
    first = (
        generate(m, [PROMPTS[1]], max_new_tokens=5, greedy=True, eos_token_id=[])
        .tokens[0, 0]
        .item()
    )
    m.config.eos_token_id = [1000, first]
    res = generate(m, [PROMPTS[1]], max_new_tokens=5, greedy=True)
    assert res.lengths.tolist() == [1] and res.ended_with_eos.tolist() == [True]
    res = generate(m, [PROMPTS[1]], max_new_tokens=5, greedy=True, eos_token_id={first, 3})
    assert res.lengths.tolist() == [1]


def test_sample_next_checks_its_options():
    """top_k=0 failed inside torch, a negative temperature inverted the distribution."""
    logits = torch.randn(3, 10)
    for kw, match in [
        (dict(top_k=0), "top_k=0 must be a positive integer"),
        (dict(temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
        (dict(top_p=0.0), "top_p=0.0 must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            sample_next(logits, **kw)
    with pytest.raises(ValueError, match=r"logits has shape \(10,\)"):
        sample_next(logits[0])


def test_sample_next_top_k_and_top_p_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it -> tokens {0, 1}
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.81, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_p=0.01, generator=g).tolist()) == {0}
    # temperature 1, no truncation: frequencies follow the distribution
    freq = torch.bincount(sample_next(logits, generator=g), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_generate_restores_training_mode(model):
    model.train()
    generate(model, PROMPTS[:1], max_new_tokens=2, greedy=True)
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[]]), r"prompts\[0\] is empty"),
        (dict(prompts=[[1, 500]]), "outside"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(num_samples=0), "num_samples"),
        (dict(max_new_tokens=10**4), r"lower max_new_tokens to at most \d+$"),
        (dict(temperature=float("nan")), r"temperature=nan must be a finite number >= 0"),
        (dict(prompts=[1, 2, 3]), "prompts is one flat list of ids"),
        (dict(prompts=[torch.tensor([[1, 2], [3, 4]])]), r"prompts\[0\] has shape \(2, 2\)"),
        (dict(eos_token_id=10**6), "eos_token_id 1000000 is outside the vocabulary"),
        (dict(eos_token_id=2.0), "eos_token_id=2.0 must be a token id"),
        (dict(prompts=[[1] * 10**4]), r"shorten the prompt to at most \d+ tokens$"),
    ],
)
def test_bad_options_raise(model, kwargs, match):
    args = dict(prompts=PROMPTS, max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):  # TypeError for the wrong kind
        generate(model, args.pop("prompts"), **args)


def test_prefill_applies_the_lm_head_to_the_last_position_only(model):
    # [B, T_prompt, V] logits of the prompt would be B * T * 128256 floats for a real Llama-3.1
    # (GBs for a rollout batch); sampling needs only the last position's.
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        res = generate(model, PROMPTS, max_new_tokens=3, greedy=True, eos_token_id=[])
    finally:
        hook.remove()
    assert res.tokens.shape == (3, 3)
    v = model.config.vocab_size
    assert seen and all(s[:-1] in ((3,), (3, 1)) and s[-1] == v for s in seen), seen


def test_one_new_token_and_every_row_ending_at_the_same_step(model):
    one = generate(model, PROMPTS, max_new_tokens=1, greedy=True, eos_token_id=[])
    assert one.tokens.shape == (3, 1) and one.lengths.tolist() == [1, 1, 1]
    assert not one.ended_with_eos.any()
    firsts = one.tokens[:, 0].tolist()
    res = generate(model, PROMPTS, max_new_tokens=6, greedy=True, eos_token_id=firsts)
    assert res.tokens.tolist() == [[t] for t in firsts]
    assert res.lengths.tolist() == [1, 1, 1] and res.ended_with_eos.all()


def test_bf16_greedy_with_cache_equals_full_forward_argmax(model):
    bf16 = Llama(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    res = generate(bf16, PROMPTS, max_new_tokens=6, greedy=True, eos_token_id=[])
    for i, p in enumerate(PROMPTS):
        assert res.tokens[i].tolist() == _greedy_without_cache(bf16, p, 6), i


def _repeated(prompts, k):
    return [p for p in prompts for _ in range(k)]


def test_num_samples_greedy_equals_separate_prefills(model):
    shared = generate(model, PROMPTS, max_new_tokens=8, greedy=True, num_samples=3, eos_token_id=[])
    alone = generate(model, _repeated(PROMPTS, 3), max_new_tokens=8, greedy=True, eos_token_id=[])
    assert shared.tokens.shape == (9, 8) and torch.equal(shared.tokens, alone.tokens)


def test_num_samples_seeded_sampling_equals_separate_prefills(model):
    # The same generator draws for the same [B, V] logits whether the prompt's keys/values were
    # copied or computed per row, so the two runs agree sample by sample; rows of one prompt
    # differ from each other (they are independent samples).
    def run(prompts, k):
        return generate(
            model,
            prompts,
            max_new_tokens=12,
            temperature=1.3,
            top_k=50,
            top_p=0.95,
            num_samples=k,
            generator=torch.Generator().manual_seed(7),
            eos_token_id=[],
        ).tokens

    shared = run(PROMPTS, 4)
    assert torch.equal(shared, run(_repeated(PROMPTS, 4), 1))
    assert len({tuple(r) for r in shared[:4].tolist()}) > 1


def test_num_samples_prefills_each_prompt_once(model):
    rows = []
    hook = model.embed_tokens.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape))
    try:
        generate(model, PROMPTS, max_new_tokens=3, greedy=True, num_samples=5, eos_token_id=[])
    finally:
        hook.remove()
    # one packed prefill of the 15 prompt tokens (no padding, no copy per sample), then 15 rows
    assert rows[0] == (1, 15) and all(r == (15, 1) for r in rows[1:]), rows


def test_the_loop_stops_within_a_few_steps_once_every_row_has_ended(model):
    firsts = generate(model, PROMPTS, max_new_tokens=1, greedy=True).tokens[:, 0].tolist()
    calls = []
    hook = model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        res = generate(model, PROMPTS, max_new_tokens=100, greedy=True, eos_token_id=firsts)
    finally:
        hook.remove()
    assert res.lengths.tolist() == [1, 1, 1]
    assert 1 < len(calls) <= 1 + STOP_CHECK_EVERY  # prefill + decode steps until the check


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * 0.2)


def test_generate_reads_the_live_parameters():
    torch.manual_seed(3)
    m = _sharp(Llama(LlamaConfig.tiny(vocab_size=257))).eval()
    before = generate(m, PROMPTS, max_new_tokens=6, greedy=True, eos_token_id=[]).tokens
    _perturb(m)  # an optimizer step updates the parameters in place, as here
    after = generate(m, PROMPTS, max_new_tokens=6, greedy=True, eos_token_id=[]).tokens
    assert not torch.equal(before, after)
    for i, p in enumerate(PROMPTS):
        assert after[i].tolist() == _greedy_without_cache(m, p, 6), i


def test_compiled_generation_equals_eager_and_follows_weight_updates():
    from torch._dynamo.utils import counters

    torch.manual_seed(4)
    m = _sharp(Llama(LlamaConfig.tiny(vocab_size=257, num_hidden_layers=1))).eval()

    def run(compile):
        return generate(
            m, PROMPTS, max_new_tokens=6, greedy=True, eos_token_id=[], compile=compile
        ).tokens

    graphs = counters["stats"]["unique_graphs"]
    compiled = run(True)
    # one decode graph, the same at every position (the packed prefill runs eagerly)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert torch.equal(compiled, run(False))
    _perturb(m)
    updated = run(True)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # same graph, new weights read
    assert not torch.equal(updated, compiled)
    assert torch.equal(updated, run(False))


@pytest.mark.gpu
def test_gpu_cuda_graph_generation_equals_eager_and_follows_weight_updates():
    # compile=None on CUDA means torch.compile with CUDA graphs; sampling is on the device.
    torch.manual_seed(5)
    m = _sharp(Llama(LlamaConfig.tiny(vocab_size=257))).cuda().eval()

    def run(compile, **kw):
        return generate(m, PROMPTS, max_new_tokens=20, eos_token_id=[], compile=compile, **kw)

    graphs = run(None, greedy=True).tokens
    assert torch.equal(graphs, run(False, greedy=True).tokens)
    sampled = [
        run(c, num_samples=4, generator=torch.Generator("cuda").manual_seed(1)).tokens
        for c in (None, False)
    ]
    assert sampled[0].shape == (12, 20) and torch.equal(*sampled)
    _perturb(m)
    assert not torch.equal(run(None, greedy=True).tokens, graphs)
    assert torch.equal(run(None, greedy=True).tokens, run(False, greedy=True).tokens)
