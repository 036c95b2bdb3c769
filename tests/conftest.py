"""Shared fixtures: tiny randomly initialised models of four architectures and a tiny chat tokenizer.

Everything is built from configs at test time (no network, no committed weights). The tokenizer
has a ~600-token vocabulary because step time on a tiny model is dominated by the vocabulary size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# SmolLM2's ChatML template, including its habit of adding a default system prompt when none is given:
# the tests must prove that our formatting copes with that.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named Tiny.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Give three tips for staying healthy. Eat a balanced diet and exercise regularly.",
    "What are the three primary colors? The three primary colors are red, blue, and yellow.",
    "I cannot help with that request because it could hurt people, but I can suggest a safe alternative.",
    "Answer truthfully: nothing happens if you eat watermelon seeds; they pass through your body.",
    "Chain of Thought: Let's think step by step. Decline harmful requests briefly and say why.",
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}<>-_+=*/\\|@#$%^&~`",
]

ARCHITECTURES = ("llama", "mistral", "gemma", "qwen2")

# Tiny models gain nothing from intra-op threads, and two threads fighting another process for two cores
# run 5-17x slower (FINDINGS.md).
torch.set_num_threads(1)


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 64, scale: float | None = None):
    """``actual`` equals ``expected`` up to ``ulps`` rounding units of their dtype at the scale of the values.

    Two computations of the same function in floating point differ by rounding that grows with the
    magnitude of what is summed, and the CPUs this project runs on (AVX-512 and AVX2-only kinds) sum in
    different orders. So a fixed absolute tolerance is either too tight on one kind or too loose on small
    values: the tolerance here is ``ulps * eps(dtype) * scale``, with ``scale`` the largest magnitude in
    ``expected`` unless given. On the tiny models' logits (|max| ~ 7) the factored and merged forms differ by
    10-17 units on AVX2 and 0-15 on AVX-512 (``tests/test_mixing.py``); 64 leaves room for other CPUs while a
    wrong expert or wrong weights move the logits by thousands of units.
    """
    scale = float(expected.abs().max()) if scale is None else scale
    atol = ulps * torch.finfo(expected.dtype).eps * max(scale, torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def build_tiny_tokenizer():
    """A byte-level BPE chat tokenizer (no unknown tokens) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(arch: str, vocab_size: int, num_layers: int = 3, seed: int = 0):
    """A randomly initialised causal LM of the given architecture, small enough for a step in ~20 ms."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=3,
        # Larger than the usual 0.02: with tied embeddings behind a final RMSNorm, 0.02 caps every logit
        # near 1, so no adapter could ever make the tiny model confident (and the loss could not fall).
        initializer_range=0.2,
    )
    extra = {"gemma": {"head_dim": 16}, "mistral": {"sliding_window": None}}.get(arch, {})
    config = AutoConfig.for_model(arch, **common, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def shared_run(run_dir, copy: Path, **model) -> Path:
    """A copy of the run at ``run_dir`` whose config.yaml's model section says ``model``, as the run of someone
    else (an export, a download) can."""
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("run.lock"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"].update(model)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def model_with_code(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny Llama carrying code of its own (a modeling file for its auto_map, and a custom_generate/), each of
    which leaves a line in ``mark`` when it runs: (the model's directory, ``mark``)."""
    model, mark = tmp_path / "model-with-code", tmp_path / "code-ran"
    shutil.copytree(tiny_model_dir, model)
    leave_mark = f"open({str(mark)!r}, 'a').write(__name__ + '\\n')\n"
    (model / "evil.py").write_text(leave_mark + "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                   "class EvilConfig(LlamaConfig):\n    pass\n"
                                   "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    (model / "custom_generate").mkdir()
    (model / "custom_generate" / "generate.py").write_text(leave_mark + "def generate(model, *args, **kwargs):\n    pass\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    return model, mark


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """One saved tiny model directory (weights + tokenizer) per architecture, as a user would have."""
    dirs = {}
    for arch in ARCHITECTURES:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        build_tiny_model(arch, len(tiny_tokenizer)).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real staged data sets; tests that need them are skipped when they are absent."""
    value = os.environ.get("ALIGNX_DATA_DIR") or (str(SHARED_DATA) if SHARED_DATA.is_dir() else "")
    if not value or not Path(value).is_dir():
        pytest.skip("real data sets not available: set ALIGNX_DATA_DIR")
    return Path(value)


@pytest.fixture(autouse=True)
def _offline_and_quiet(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_stage1_run(tmp_path_factory, tiny_model_dir, data_dir):
    """A finished Stage 1 run of the tiny Llama on small slices of the real data (config returned)."""
    from alignx.config import load_config
    from alignx.stage1.pipeline import run_stage1

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    config = load_config(None, [
        f"run_dir={run_dir}", f"model.name={tiny_model_dir}", "model.precision=fp32", f"data.data_dir={data_dir}",
        "data.max_rows_per_axis=48", "train.max_steps=1", "train.batch_size=4", "train.max_length=384",
        "features.max_length=64", "stage2.latent_dim=16", "stage2.router_hidden=64", "stage2.max_epochs=5",
        "stage2.eval_prompts_per_axis=20",
    ])
    run_stage1(config, log=lambda *_: None)
    return config


@pytest.fixture(scope="session")
def tiny_stage2_run(tiny_stage1_run):
    """The same run with its MoCaE routers trained."""
    from alignx.stage2.pipeline import run_stage2

    run_stage2(tiny_stage1_run, log=lambda *_: None)
    return tiny_stage1_run
