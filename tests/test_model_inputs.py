"""Mistakes a user can make with the model, generation and checkpoints raise one clear error
naming the input, before anything large is allocated."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemokern.model import CheckpointError, Llama, LlamaConfig, generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.tiny()).eval()


def test_out_of_vocabulary_ids_are_named(model):
    v = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids hold ids in \[1, {v}\], outside .*{v}"):
        model(torch.tensor([[1, 2, v]]))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        model.hidden_states(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"prompts\[1\] has token ids outside .* max 999"):
        generate(model, [[1, 2], [999]], max_new_tokens=2)


def test_empty_input_is_named(model):
    with pytest.raises(ValueError, match=r"input_ids has shape \(1, 0\): no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        generate(model, [[]], max_new_tokens=2)


def test_string_prompt_says_to_tokenize(model):
    with pytest.raises(TypeError, match="prompts must be a list of prompts.*got a string"):
        generate(model, "Hello", max_new_tokens=2)
    with pytest.raises(TypeError, match=r"prompts\[0\] is a string; .* encode the text"):
        generate(model, ["Hello"], max_new_tokens=2)
    with pytest.raises(TypeError, match="got str; tokenize the text first"):
        model("Hello")


def test_generation_beyond_the_context_fails_before_allocating(model):
    limit = model.config.max_position_embeddings
    with pytest.raises(
        ValueError,
        match=rf"3 tokens\) plus max_new_tokens=1000000000 exceeds "
        rf".*={limit}; .* at most {limit - 3}",
    ):
        generate(model, [[1, 2, 3]], max_new_tokens=10**9)  # the cache would be ~100 GB
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [list(range(10))], max_new_tokens=limit - 9)
    generate(model, [list(range(10))], max_new_tokens=1)


def test_non_finite_checkpoint_tensor_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor "
        r"'model.layers.1.mlp.up_proj.weight' holds 1 nan",
    ):
        Llama.from_pretrained(tmp_path)
    loaded = Llama.from_pretrained(tmp_path, check_finite=False)
    assert torch.isnan(loaded.layers[1].mlp.up_proj.weight).sum() == 1
