"""SFTTrainer (`nemokern train-sft`) on a tiny Llama with the byte tokenizer, CPU: the loss against
a float64 cross-entropy reference, rows split at the response, truncation, learning, exact
resume, errors naming the option or the row."""

import json

import pytest
import torch.nn.functional as F

from nemokern.cli import main
from nemokern.data import DataError
from nemokern.data.sft import encode_sft, read_sft
from nemokern.data.tokenizer import ByteTokenizer
from nemokern.engine.config import ConfigError
from nemokern.engine.metrics import read_metrics
from nemokern.model import Llama
from nemokern.trainers.policy import PolicyLoss, build_policy
from nemokern.trainers.sft import SFTConfig, SFTTrainer, sft_batches, sft_step

TOK = ByteTokenizer()
ROWS = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(6) for b in range(4)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def config(tmp_path, data, **kw):
    base = dict(
        data=str(data),
        out=str(tmp_path / "run"),
        lr=3e-3,
        rows_per_batch=6,
        progress=False,
        tensorboard=False,
        device="cpu",
    )
    base.update(kw)
    return SFTConfig(**base)


def test_rows_split_where_the_response_starts():
    two = [{"role": "user", "content": "2+2="}], [{"role": "assistant", "content": "4"}]
    ex = encode_sft(TOK, *two, 4096, "row 0")
    assert TOK.decode(ex.response_ids) == "4<|eot_id|>"
    assert TOK.decode(ex.prompt_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # too long: the prompt loses tokens on the left (BOS kept), then the response on the right
    prompt = [{"role": "user", "content": "x" * 50}]
    response = [{"role": "assistant", "content": "y" * 20}]
    whole = tuple(TOK.encode("y" * 20 + "<|eot_id|>"))
    cut = encode_sft(TOK, prompt, response, 30, "row 1")
    assert cut.truncated and cut.num_tokens == 30 and cut.response_ids == whole
    assert cut.prompt_ids[0] == TOK.bos_id and cut.prompt_ids[1:] == ex.prompt_ids[-8:]
    deep = encode_sft(TOK, prompt, response, 10, "row 1")
    assert deep.prompt_ids == (TOK.bos_id,) and deep.response_ids == whole[:9]
    user_first = [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(
        DataError, match="row 2: field 'response': bad value: its first turn has role 'user'"
    ):
        encode_sft(TOK, prompt, user_first, 4096, "row 2")


def test_loss_and_gradient_equal_float64_cross_entropy(tmp_path, data):
    cfg = config(tmp_path, data)
    policy = build_policy(cfg, TOK, "model")
    batch = sft_batches(read_sft(data, TOK), cfg, shuffle=False)[0]
    out = sft_step(PolicyLoss(policy), batch)
    out.loss.backward()
    ref_policy = Llama(policy.config).double()
    ref_policy.load_state_dict(policy.state_dict())
    logits = ref_policy(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])  # [N, V] float64
    ref = F.cross_entropy(logits, batch["targets"], ignore_index=-100)
    ref.backward()
    assert out.weight == int((batch["targets"] != -100).sum()) > 0
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * ref.item()
    for name in ("lm_head.weight", "layers.0.mlp.down_proj.weight"):
        g, g_ref = policy.get_parameter(name).grad, ref_policy.get_parameter(name).grad
        assert (g.double() - g_ref).abs().max() <= 1e-4 * g_ref.abs().max(), name


def test_loss_decreases_and_final_model_loads(tmp_path, data):
    history = SFTTrainer(config(tmp_path, data, epochs=4, eval_data=str(data))).fit()
    losses = [h["loss"] for h in history]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses
    assert history[-1]["eval_loss"] < losses[0]
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(
        range(1, 17)
    )
    Llama.from_pretrained(tmp_path / "run" / "final")


def test_resume_continues_exactly(tmp_path, data):
    full = SFTTrainer(config(tmp_path / "a", data, max_steps=4)).fit()
    SFTTrainer(config(tmp_path / "b", data, max_steps=2, save_every=1)).fit()
    rest = SFTTrainer(config(tmp_path / "b", data, max_steps=4, resume="auto")).fit()
    assert [h["step"] for h in rest] == [3, 4]
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]


def test_token_budget_batches_and_bad_rows(tmp_path):
    rows = ROWS[:6] + [{"prompt": "no answer"}]
    with pytest.raises(DataError, match=r"row 6: field 'response': missing column"):
        read_sft(rows, TOK)
    data = read_sft(rows, TOK, skip_bad_rows=True)
    assert len(data) == 6 and "1 bad rows skipped" in data.summary()
    batches = sft_batches(data, config(tmp_path, "x", max_tokens_per_batch=70), shuffle=False)
    assert all(b["input_ids"].numel() <= 70 for b in batches) and len(batches) == 3


def test_option_errors(tmp_path, data):
    with pytest.raises(ConfigError, match="--data: a training data file is required"):
        SFTTrainer(config(tmp_path, ""))
    with pytest.raises(ConfigError, match="--model: nope is not a directory"):
        SFTTrainer(config(tmp_path, data, model="nope"))


def test_command_line(tmp_path, data, capsys):
    out = str(tmp_path / "cli")
    assert main(["train-sft", "--data", str(data), "--out", out, "--max-steps", "2",
                 "--no-progress", "--no-tensorboard", "--device", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "24 prompt/response rows" in printed and "2 steps" in printed
    with pytest.raises(SystemExit) as e:
        main(["train-sft", "--data", str(tmp_path / "missing.jsonl"), "--out", out + "2"])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err
