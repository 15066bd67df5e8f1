"""Reward against step of a real GRPO run on a CPU: the tiny random Qwen2.5-VL samples its own text (no script)
through the Thyme loop and learns a reward it can reach, the share of its tokens that start with a space.

    pip install matplotlib
    thyme tiny-model /tmp/thyme-tiny-model
    python train/examples/tiny_learning_curve.py --model /tmp/thyme-tiny-model --out docs/tiny_rl_reward.png

It prints the mean reward of every step and draws them (docs/train.md shows the result). A shorter run is
``tests/train/test_learning.py::test_grpo_with_the_policy_sampling_raises_a_reachable_reward`` (with lr 1e-2).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def space_token_reward(completion_ids, **kwargs) -> list[float]:
    """Share of the completion's tokens that start with a space (the byte-level BPE's ``Ġ``)."""
    tokenizer = _TOKENIZER["tokenizer"]
    return [
        sum(tokenizer.convert_ids_to_tokens(token).startswith("Ġ") for token in ids) / max(1, len(ids))
        for ids in completion_ids
    ]


_TOKENIZER: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a tiny model folder (thyme tiny-model DIR)")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from thyme.backends.processor import load_processor
    from thyme.train.config import ThymeGRPOConfig
    from thyme.train.data import load_rl_dataset
    from thyme.train.trainer import ThymeGRPOTrainer

    _TOKENIZER["tokenizer"] = load_processor(args.model).tokenizer
    config = ThymeGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="thyme-curve-"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        per_device_train_batch_size=8,
        num_generations=8,
        max_steps=args.steps,
        learning_rate=3e-2,
        beta=0.0,
        min_pixels=28 * 28,
        max_pixels=256 * 256,
        max_generation_calls=2,
        max_new_tokens_per_call=4,
        max_completion_length=8,
        sandbox_workers=2,
    )
    trainer = ThymeGRPOTrainer(args.model, [space_token_reward], config, load_rl_dataset(DATA / "rl.jsonl"))
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()
    wall = time.perf_counter() - start
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"{len(rewards)} steps in {wall:.0f} s; reward per step: {[round(r, 3) for r in rewards]}")  # noqa: T201 (script output)
    figure, axes = plt.subplots(figsize=(5, 3), dpi=100)
    axes.plot(range(1, len(rewards) + 1), rewards, marker="o")
    axes.set(xlabel="step", ylabel="mean reward", ylim=(0, 1.05), title="GRPO, tiny model, CPU, 8 rollouts/step")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out)
    print(f"wrote {args.out}")  # noqa: T201 (script output)


if __name__ == "__main__":
    main()
