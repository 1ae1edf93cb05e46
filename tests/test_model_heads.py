"""The model's hidden-state entry points feed the fused heads (nemokern.ops) as the demo does."""

import torch

from nemokern.model import Llama, LlamaConfig
from nemokern.ops import linear_logprobs, reward_head


def _model():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny()).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    return model


def test_linear_logprobs_on_packed_hidden_states_equals_log_softmax_of_logits():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (17,))
    cu = torch.tensor([0, 6, 17])
    targets = torch.roll(ids, -1)
    expected = model(ids, cu_seqlens=cu).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    got = linear_logprobs(model.hidden_states(ids, cu_seqlens=cu), model.lm_head.weight, targets)
    assert (got - expected).abs().max() < 1e-5


def test_reward_head_on_prenorm_hidden_states_equals_normed_last_token():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    last = torch.tensor([8, 4, 0])
    head_w, head_b = torch.randn(9, model.config.hidden_size), torch.randn(9)
    raw = model.hidden_states(ids, final_norm=False)
    got = reward_head(raw, last, model.norm.weight, head_w, head_b, eps=model.config.rms_norm_eps)
    expected = model.hidden_states(ids)[torch.arange(3), last] @ head_w.T + head_b
    assert (got - expected).abs().max() < 1e-5
