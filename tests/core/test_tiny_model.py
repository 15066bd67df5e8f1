"""The tiny random Qwen2.5-VL: loads through the real from_pretrained path and tokenizes Thyme text like Qwen."""

from __future__ import annotations

import argparse
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyme import protocol
from thyme.backends.chat_templates import QWEN2_5_VL_CHAT_TEMPLATE
from thyme.commands import tiny_model
from thyme.errors import ConfigError
from thyme.tiny import QWEN_ADDED_TOKENS, QWEN_SPECIAL_TOKENS


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    from transformers import AutoModelForImageTextToText

    from thyme.backends.processor import load_processor

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir), load_processor(tiny_model_dir)


def test_tiny_model_loads_as_qwen2_5_vl(loaded) -> None:
    model, processor = loaded
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.num_parameters() < 1_000_000
    tokenizer = processor.tokenizer
    # Qwen's added tokens in Qwen's order; <|im_end|> ends a turn, as in the released tokenizer.
    assert tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS)) == list(range(22))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert processor.chat_template == QWEN2_5_VL_CHAT_TEMPLATE


@pytest.mark.skipif(find_spec("trl") is None, reason="trl ships the reference copy of the template")
def test_tiny_chat_template_is_the_qwen2_5_vl_template() -> None:
    import trl

    reference = Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja"
    assert QWEN2_5_VL_CHAT_TEMPLATE == reference.read_text(encoding="utf-8").rstrip("\n")


def test_tiny_tokenizer_keeps_protocol_text_whole(loaded) -> None:
    tokenizer = loaded[1].tokenizer
    text = (
        f"{protocol.THINK_OPEN}Crop it.{protocol.CODE_OPEN}\n```python\nprint(1)\n```\n{protocol.CODE_CLOSE}"
        f"{protocol.SANDBOX_OUTPUT_OPEN}<|vision_start|><|image_pad|><|vision_end|>{protocol.SANDBOX_OUTPUT_CLOSE}"
        f"{protocol.THINK_CLOSE}\n{protocol.ANSWER_OPEN}C{protocol.ANSWER_CLOSE}<|im_end|>"
    )
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    # Special tokens are single ids; trained merges keep each tag to a few tokens, not one per character.
    for token in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_end|>"):
        assert tokenizer.convert_tokens_to_ids(token) in ids
    for tag in (protocol.CODE_CLOSE, protocol.ANSWER_CLOSE, protocol.SANDBOX_OUTPUT_OPEN):
        assert len(tokenizer(tag).input_ids) <= 4, tag
    # Special tokens are dropped from the decoded generation text, as the backends need.
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith(f"{protocol.ANSWER_CLOSE}")


def test_tiny_processor_expands_an_image_to_its_tokens(loaded) -> None:
    processor = loaded[1]
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "\nQ"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    # 64x64 px -> smart-resize to 56x56 -> 4x4 patches of 14 px -> 2x2 merged tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_pad).sum()) == 4


def _run_command(argv: list[str]) -> int:
    """Parses with the command's own parser (the full CLI also loads other parts' commands) and runs it."""
    parser = argparse.ArgumentParser(prog="thyme")
    tiny_model.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.handler(args)


def test_tiny_model_command_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoConfig

    target = tmp_path / "tiny"
    assert _run_command(["tiny-model", str(target)]) == 0
    assert f"tiny qwen2_5_vl model written to {target}" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(target).model_type == "qwen2_5_vl"


def test_tiny_model_command_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    keep = tmp_path / "weights.safetensors"
    keep.write_bytes(b"real weights")
    with pytest.raises(ConfigError, match=f"{tmp_path} is not empty: choose a new directory, or allow overwriting"):
        _run_command(["tiny-model", str(tmp_path)])
    assert keep.read_bytes() == b"real weights" and sorted(p.name for p in tmp_path.iterdir()) == [keep.name]


def test_tiny_model_command_run_twice_keeps_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A README block run again (or after an earlier block built the same model) must not fail on its folder."""
    target = tmp_path / "tiny"
    assert _run_command(["tiny-model", str(target)]) == 0
    weights = (target / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert _run_command(["tiny-model", str(target)]) == 0
    assert f"{target} already holds the tiny qwen2_5_vl model (seed 0, head_dim 16): kept" in capsys.readouterr().out
    assert (target / "model.safetensors").stat().st_mtime_ns == weights
    with pytest.raises(ConfigError, match="is not empty"):  # another seed is another model: not silently kept
        _run_command(["tiny-model", str(target), "--seed", "1"])


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_head_dim_64_variant_has_the_sizes_vllm_cpu_attention_accepts(tmp_path: Path, model_type: str) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from thyme.backends.processor import load_processor

    target = tmp_path / "tiny64"
    assert _run_command(["tiny-model", str(target), "--head-dim", "64", "--model-type", model_type]) == 0
    model = AutoModelForImageTextToText.from_pretrained(target)
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert (head_dim, text.num_attention_heads, text.num_key_value_heads) == (64, 2, 1)
    # M-RoPE's sections cover the head's rotary pairs exactly, else the position ids would not fit.
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert model.config.vision_config.out_hidden_size == text.hidden_size
    # It runs an image prompt end to end (the vision output feeds the wider language model).
    processor = load_processor(target)
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "\nQ"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with torch.inference_mode():
        logits = model(**processor(text=[prompt], images=[image], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_tiny_model_refuses_an_unsupported_head_dim(tmp_path: Path) -> None:
    from thyme.tiny import build_tiny_model

    with pytest.raises(ConfigError, match="unsupported tiny head_dim 32: choose one of 16, 64"):
        build_tiny_model(tmp_path / "t", head_dim=32)
    assert not (tmp_path / "t").exists()
