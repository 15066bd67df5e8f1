"""Groups with zero reward spread: per-step counts, and DAPO's dynamic sampling (drop them, refill the batch).

When every rollout of a prompt gets the same reward, GRPO's group-normalised advantage is 0 for all of them: the
group costs a rollout and gives no gradient. Thyme runs watch two kinds: groups that all fail (the task is out of
reach, or the sandbox broke) and groups that all succeed (the prompt is too easy). A batch made mostly of such groups
is how tool use quietly collapses, so their shares are logged every step. With ``dynamic_sampling`` on, the trainer
drops those groups and rolls out fresh prompts until the batch is full again (DAPO, arXiv 2503.14476, section 3.2).

TRL has no such option, so the batch surgery is written here: the score step returns padded tensors (prompts padded
on the left, completions on the right) and per-image pixel rows, and rows of several rounds must be re-padded and
joined. Only the keys TRL's Qwen-VL path produces are handled; any other per-row key is refused loudly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

# Per-token tensors of the score step's output, with the side they are padded on and their padding value
# (TRL pads tool_mask with 1; masked positions never reach the loss, so the log-prob padding value is irrelevant).
_LEFT_PADDED = {"prompt_ids": None, "prompt_mask": 0}
_RIGHT_PADDED = {
    "completion_ids": None,
    "completion_mask": 0,
    "tool_mask": 1,
    "old_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
}
_PER_ROW = ("advantages", "pixel_values", "image_grid_thw", "num_images")
_RECOMPUTED = ("num_items_in_batch", "mm_token_type_ids")


@dataclass
class GroupSpread:
    """Reward spread of a batch's groups (rows are ``num_generations`` consecutive completions per prompt).

    Args:
        zero_std: per group, whether every completion got the same reward.
        level: per group, the mean reward.
    """

    zero_std: list[bool]
    level: list[float]

    @classmethod
    def of(cls, rewards: torch.Tensor, num_generations: int) -> GroupSpread:
        """From the weighted total reward of every completion (NaN = unscorable, ignored)."""
        grouped = rewards.view(-1, num_generations).float()
        zero, level = [], []
        for group in grouped:
            valid = group[~torch.isnan(group)]
            zero.append(bool(valid.numel() < 2 or torch.isclose(valid.max(), valid.min())))
            level.append(float(valid.mean()) if valid.numel() else 0.0)
        return cls(zero, level)

    def metrics(self) -> dict[str, float]:
        """Shares of groups: with zero spread, and among all groups those whose rollouts all got nothing (reward 0)
        or all got the same positive reward."""
        n = max(1, len(self.zero_std))
        unrewarded = sum(z and lv <= 0.0 for z, lv in zip(self.zero_std, self.level, strict=True))
        rewarded = sum(z and lv > 0.0 for z, lv in zip(self.zero_std, self.level, strict=True))
        return {
            "zero_std_groups": sum(self.zero_std) / n,
            "zero_std_groups_unrewarded": unrewarded / n,
            "zero_std_groups_rewarded": rewarded / n,
        }


def select_groups(batch: dict[str, Any], groups: Sequence[int], num_generations: int) -> dict[str, Any]:
    """The rows of ``groups`` (group indices of the local batch) of a score-step output, pixel values split per row.

    Raises:
        ValueError: the output holds a per-row key this module does not know how to join.
    """
    split = split_pixel_values_by_grid(batch)
    rows = [group * num_generations + k for group in groups for k in range(num_generations)]
    known = {*_LEFT_PADDED, *_RIGHT_PADDED, *_PER_ROW, *_RECOMPUTED}
    unknown = sorted(set(split) - known)
    if unknown:
        raise ValueError(f"dynamic sampling cannot join the batch keys {unknown} (TRL changed its score step?)")
    selected: dict[str, Any] = {}
    for key, value in split.items():
        if key in _RECOMPUTED or value is None:
            continue
        if isinstance(value, torch.Tensor):
            selected[key] = value[rows] if rows else value[:0]
        else:
            selected[key] = [value[row] for row in rows]
    return selected


def join_batches(parts: Sequence[dict[str, Any]], pad_token_id: int, image_token_id: int | None) -> dict[str, Any]:
    """Joins row selections (from :func:`select_groups`) into one score-step output; ``num_items_in_batch`` is left
    to the caller (it is a sum over processes)."""
    parts = [part for part in parts if len(part["advantages"])]
    joined: dict[str, Any] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key in _LEFT_PADDED or key in _RIGHT_PADDED:
            fill = pad_token_id if key in ("prompt_ids", "completion_ids") else {**_LEFT_PADDED, **_RIGHT_PADDED}[key]
            joined[key] = _pad_cat(values, fill, left=key in _LEFT_PADDED)
        elif isinstance(values[0], torch.Tensor):
            joined[key] = torch.cat(values)
        else:
            joined[key] = [item for value in values for item in value]
    if image_token_id is not None and "pixel_values" in joined:
        ids = torch.cat([joined["prompt_ids"], joined["completion_ids"]], dim=1)
        joined["mm_token_type_ids"] = (ids == image_token_id).long()
    return unsplit_pixel_values_by_grid(joined)


def _pad_cat(tensors: Sequence[torch.Tensor], fill: float | int, *, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    padded = []
    for tensor in tensors:
        pad = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), fill)
        padded.append(torch.cat([pad, tensor] if left else [tensor, pad], dim=1))
    return torch.cat(padded)


__all__ = ["GroupSpread", "join_batches", "select_groups"]
