"""Shared test setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so
TRITON_INTERPRET must be set before any nemokern kernel module is imported: here, first thing.
On a machine without CUDA the Triton kernels run through the interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


def pytest_runtest_logreport(report):
    from helpers import log_test_report

    log_test_report(report)


def pytest_addoption(parser):
    parser.addoption(
        "--fake-cuda",
        action="store_true",
        help="run -m gpu tests on the CPU under helpers.FakeCuda, with the small shapes of "
        "their gpu_small marker: finds test bugs (tensors built on the CPU) without a GPU",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu_small(**args): small argument values for a gpu test under --fake-cuda"
    )


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    if not pyfuncitem.config.getoption("--fake-cuda") or "gpu" not in pyfuncitem.keywords:
        return (yield)
    from helpers import FakeCuda, fake_cuda_patches

    for mark in pyfuncitem.iter_markers("gpu_small"):
        pyfuncitem.funcargs.update(mark.kwargs)
    with pytest.MonkeyPatch.context() as mp:
        fake_cuda_patches(mp)
        with FakeCuda():
            return (yield)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or config.getoption("--fake-cuda"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation (20x slower on a loaded 2-core
    box). A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreted on the CPU) for the duration of a test."""
    monkeypatch.setenv("NEMOKERN_BACKEND", "triton")
    yield


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("NEMOKERN_BACKEND", "torch")
    yield


# Independent spelling of the Llama-3.1 chat format as a Jinja template (what an HF tokenizer
# directory carries), without Meta's date preamble.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A local HF tokenizer directory: byte-level BPE, the Llama-3.1 special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    fast.chat_template = LLAMA3_TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return path
