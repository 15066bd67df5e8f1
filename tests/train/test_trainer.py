"""One GRPO-ATS step on the tiny model, with the README example's code-writing text forced and the real sandbox.

The three proofs of issue 4 are asserted on the batch TRL's loss receives (``_compute_loss`` inputs):
the sandbox crop's pixels are in it, the reported log-probs of greedy code tokens are the loss's temperature-1
values, and the sandbox tokens carry tool mask 0.
"""

from __future__ import annotations

import pytest
import torch

from thyme.protocol import CODE_CLOSE, CODE_OPEN, SANDBOX_OUTPUT_CLOSE, SANDBOX_OUTPUT_OPEN

pytestmark = pytest.mark.slow


def alternating_reward(completions, **kwargs):
    """Different rewards inside each group, so the advantages (and the gradient) are not zero."""
    return [float(index % 2) for index in range(len(completions))]


def _loss_logps(trainer, model, inputs: dict) -> torch.Tensor:
    """The per-token log-probs TRL's loss computes for this batch (temperature = args.temperature = 1)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model,
            ids,
            attention,
            inputs["completion_ids"].size(1),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            num_images=inputs["num_images"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
    return logps


def _capture_loss_inputs(trainer) -> list[dict]:
    """Records each batch the loss receives, plus the loss's own log-probs under the weights of that moment."""
    seen: list[dict] = []
    original = trainer._compute_loss

    def spy(model, inputs):
        seen.append({**inputs, "loss_logps": _loss_logps(trainer, model, inputs)})
        return original(model, inputs)

    trainer._compute_loss = spy
    return seen


@pytest.fixture(scope="module")
def trained(make_trainer):
    """Runs one step once for the module's assertions: (trainer, loss inputs, params before, params after)."""
    trainer = make_trainer(reward_funcs=[alternating_reward])
    seen = _capture_loss_inputs(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    return trainer, seen, before, after


def _sandbox_crop_grid(trainer, readme_example) -> torch.Tensor:
    """The image-grid row the processor gives the README crop (what the sandbox saves for this code)."""
    from PIL import Image

    from thyme.backends.vision_inputs import open_image

    width, height = readme_example["expected_crop_size"]
    crop = open_image(Image.new("RGB", (width, height)))
    return trainer.processing_class.image_processor(images=[crop], return_tensors="pt")["image_grid_thw"][0]


def test_trainer_step_changes_parameters(trained):
    _, seen, before, after = trained
    assert len(seen) == 1
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    assert changed, "one GRPO step with non-zero advantages must move the policy"


def test_trainer_loss_forward_sees_sandbox_images(trained, readme_example):
    trainer, seen, _, _ = trained
    inputs = seen[0]
    # Per sample: the input image, then the crop the sandbox returned.
    assert inputs["num_images"] == [2, 2]
    grids = inputs["image_grid_thw"]
    assert grids.shape[0] == 4
    crop_grid = _sandbox_crop_grid(trainer, readme_example)
    assert torch.equal(grids[1], crop_grid) and torch.equal(grids[3], crop_grid)
    assert inputs["pixel_values"].shape[0] == int(grids.prod(dim=-1).sum())
    # Every image's tokens are in the sequence the loss scores (no image silently dropped by TRL's safety check).
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    pad_id = trainer.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = trainer.processing_class.image_processor.merge_size**2
    expected = grids.prod(dim=-1).view(2, 2).sum(dim=1) // merge
    assert torch.equal((ids == pad_id).sum(dim=1), expected)
    assert torch.equal(inputs["mm_token_type_ids"], (ids == pad_id).long())


def test_trainer_sandbox_tokens_are_masked_from_the_loss(trained):
    trainer, seen, _, _ = trained
    inputs = seen[0]
    tokenizer = trainer.processing_class.tokenizer
    for row in range(2):
        length = int(inputs["completion_mask"][row].sum())
        ids = inputs["completion_ids"][row, :length]
        mask = inputs["tool_mask"][row, :length]
        masked = tokenizer.decode(ids[mask == 0], skip_special_tokens=False)
        # The boundary tokens span model and sandbox text (`</code><sandbox_output>` -> `><`, `</sandbox_output>Upon`
        # -> `>Upon`, as a whole-text tokenisation gives): they reach into the model's text, so they are trained,
        # as the SFT mask trains a token that overlaps the trained text.
        assert masked.startswith(SANDBOX_OUTPUT_OPEN[1:] + "<|vision_start|><|image_pad|>")
        assert masked.endswith("<|vision_end|>" + SANDBOX_OUTPUT_CLOSE[:-1])
        pieces = [tokenizer.decode([token]) for token in ids.tolist()]
        assert "><" in pieces and pieces[pieces.index("><") - 1] == "code"
        trained_text = tokenizer.decode(ids[mask == 1], skip_special_tokens=False)
        assert SANDBOX_OUTPUT_OPEN not in trained_text and "<|image_pad|>" not in trained_text
        assert trained_text.endswith("</answer><|im_end|>")


def _code_positions(tokenizer, ids: list[int]) -> list[int]:
    """Indices of the tokens that lie after ``<code>`` and up to ``</code>`` (the greedy span under ATS)."""
    text, positions, inside = "", [], False
    for index, token in enumerate(ids):
        text += tokenizer.decode([token])
        if inside:
            positions.append(index)
            if CODE_CLOSE in text[text.rfind(CODE_OPEN) :]:  # the last token may run past it (`><`)
                break
        elif text.rstrip().endswith(CODE_OPEN):
            inside = True
    return positions


def test_trainer_code_token_logprobs_are_the_losss_temperature_1_values(trained):
    trainer, seen, _, _ = trained
    inputs = seen[0]
    loss_logps = inputs["loss_logps"]
    reported = inputs["sampling_per_token_logps"]
    tokenizer = trainer.processing_class.tokenizer
    for row in range(2):
        code = _code_positions(tokenizer, inputs["completion_ids"][row].tolist())
        assert len(code) > 100, "the README code block must be in the completion"
        got, want = reported[row, code], loss_logps[row, code]
        # Greedy tokens reported as log 1 = 0 would make TRL's importance ratio exp(loss - reported) tiny.
        assert got.mean() < -1.0
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_trainer_logs_rollout_metrics(trained):
    trainer, _, _, _ = trained
    logs = trainer.state.log_history[0]
    assert logs["thyme/code_blocks_per_trajectory"] == 1.0
    assert logs["thyme/images_per_trajectory"] == 1.0
    assert logs["thyme/sandbox_error_rate"] == 0.0
    assert logs["thyme/turns"] == 3.0  # prose to <code>, greedy code to </code>, then prose to </answer>
    assert logs["thyme/truncation_rate"] == 0.0 and logs["thyme/failed"] == 0.0
    assert 0.0 < logs["thyme/sandbox_wait_share"] < 1.0


def test_trainer_step_with_the_policy_generating(make_trainer):
    """No script: the tiny model samples its own (random) text through the loop; it writes no code, so every
    trajectory ends without an answer after its per-call cap, and is trained on as it is."""
    trainer = make_trainer(script=None, reward_funcs=[alternating_reward], max_new_tokens_per_call=4,
                           max_generation_calls=2)  # fmt: skip
    seen = _capture_loss_inputs(trainer)
    trainer.train()
    inputs = seen[0]
    assert inputs["num_images"] == [1, 1]  # only the input image: no code ran
    assert inputs["completion_mask"].sum(dim=1).tolist() == [8, 8]  # 2 calls x 4 sampled tokens, no end of turn
    assert torch.equal(inputs["tool_mask"], torch.ones_like(inputs["tool_mask"]))
    logs = trainer.state.log_history[0]
    assert logs["thyme/turns"] == 2.0 and logs["thyme/code_blocks_per_trajectory"] == 0.0
    assert logs["thyme/truncation_rate"] == 1.0 and logs["completions/clipped_ratio"] == 1.0
    reported = inputs["sampling_per_token_logps"]
    assert torch.allclose(reported, inputs["loss_logps"], atol=1e-4)


def test_trainer_lora_step_moves_only_the_adapter(make_trainer):
    from peft import LoraConfig

    trainer = make_trainer(reward_funcs=[alternating_reward], peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert changed and all("lora_" in name for name in changed)


def test_trainer_reported_logprobs_are_the_losss_at_every_trained_position(trained):
    """Rollout and loss forward agree on every trained token, those after the sandbox image included: the loss
    forward sees the crop's own pixels (a blank image of the same size would change every later log-prob)."""
    trainer, seen, _, _ = trained
    inputs = seen[0]
    reported, loss_logps = inputs["sampling_per_token_logps"], inputs["loss_logps"]
    pad_id = trainer.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row in range(2):
        trained_positions = (inputs["completion_mask"][row] * inputs["tool_mask"][row]).bool()
        scored = trained_positions & ~torch.isnan(reported[row])  # the appended end of turn was not sampled
        after_image = torch.arange(scored.numel()) > int((inputs["completion_ids"][row] == pad_id).nonzero().max())
        assert (scored & after_image).sum() > 20, "the answer after the sandbox image must be compared"
        assert scored.sum() >= trained_positions.sum() - 1
        got, want = reported[row, scored], loss_logps[row, scored]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
