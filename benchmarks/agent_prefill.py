"""Prefill work of a 3-call Thyme trajectory: prompt tokens processed / final context length, per backend mode.

A scripted trajectory (the README example on 17127.jpg: two code rounds, each returning a zoomed crop, then the
answer) is replayed through a backend: before each scripted model segment the backend is asked for one token,
which makes it process the prompt as it would in a real run. The ratio

    sum of Generation.prompt_tokens over the 3 calls / tokens of the final trajectory

is 1.0 when every token is encoded once. A full re-prefill re-encodes the growing prefix on every call (about 2-3
here); the prefix cache encodes each token once, except the model's own text, which a real run would not re-encode
either but which a scripted replay has to prefill (so its ratio stays slightly under 1).

    python benchmarks/agent_prefill.py                      # tiny random Qwen2.5-VL, built in a temp dir
    python benchmarks/agent_prefill.py --max-pixels 1003520 # the tiny model at the RL budget's order of images
    python benchmarks/agent_prefill.py --model DIR_OR_ID    # a real checkpoint (e.g. Kwai-Keye/Thyme-RL)
    python benchmarks/agent_prefill.py --endpoint http://127.0.0.1:8000/v1   # also an OpenAI-compatible server

The OpenAI mode's ratio is what the server reports: vLLM counts cached prefix tokens only with
``--enable-prefix-caching --enable-prompt-tokens-details``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from thyme.backends.base import SamplingParams
from thyme.backends.local import TransformersBackend
from thyme.backends.openai_compat import OpenAIBackend
from thyme.backends.processor import load_processor
from thyme.prompts import SYSTEM_PROMPT, user_prompt, user_text_item
from thyme.protocol import CODE_CLOSE, CODE_OPEN, STOP_STRINGS
from thyme.trajectory import ModelText, SandboxOutput, Trajectory

ONE_TOKEN = SamplingParams(max_new_tokens=1)
# Plate box of the README example and a tighter second look, both zoomed 2x as the released model did.
CROP_BOXES = ((1250, 1030, 1360, 1070), (1270, 1035, 1340, 1065))
ZOOM = 2
SECOND_ROUND = (
    "The characters are still small. Let me crop tighter around the plate.\n\n"
    f"{CODE_OPEN}\n```python\nimport cv2\nimage = cv2.imread(image_path)\ncrop = image[1035:1065, 1270:1340]\n"
    "crop = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)\n"
    'path = "/mnt/data/temp_processed_images/17127_tight.jpg"\ncv2.imwrite(path, crop)\nprint(path)\n```\n'
    f"{CODE_CLOSE}"
)


def scripted_trajectory(work_dir: Path) -> tuple[Trajectory, list[str], list[str]]:
    """The prompt, the 3 scripted model segments and the 2 crops that follow the first two."""
    data = resources.files("thyme") / "data" / "examples"
    example = json.loads((data / "readme_17127.json").read_text(encoding="utf-8"))
    image_path = work_dir / "17127.jpg"
    image_path.write_bytes((data / "17127.jpg").read_bytes())
    image = Image.open(image_path)
    crops = []
    for index, box in enumerate(CROP_BOXES):
        crop = image.crop(box)
        crop = crop.resize((crop.width * ZOOM, crop.height * ZOOM), Image.Resampling.BICUBIC)
        crops.append(str(work_dir / f"crop{index}.jpg"))
        crop.save(crops[-1])
    prompt = user_prompt(example["question"], str(image_path), image.width, image.height)
    trajectory = Trajectory(SYSTEM_PROMPT, user_text_item(prompt), [str(image_path)], question=example["question"])
    first, last = example["segments"]
    return trajectory, [first, SECOND_ROUND, last], crops


def measure(backend, work_dir: Path, context_length) -> tuple[int, int, float]:
    """(prompt tokens processed over the 3 calls, final context length, seconds)."""
    trajectory, model_texts, crops = scripted_trajectory(work_dir)
    processed, started = 0, time.perf_counter()
    for index, text in enumerate(model_texts):
        processed += backend.generate(trajectory.to_messages(), stop=STOP_STRINGS, sampling=ONE_TOKEN).prompt_tokens
        trajectory.segments.append(ModelText(text))
        if index < len(crops):
            trajectory.segments.append(SandboxOutput(images=[crops[index]]))
    return processed, context_length(trajectory.to_messages()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint directory or hub id (default: build the tiny model)")
    parser.add_argument("--endpoint", help="also measure an OpenAI-compatible server at this URL")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-pixels", type=int, help="model-side image budget (default: the checkpoint's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        model_path = args.model
        if model_path is None:
            from thyme.tiny import build_tiny_model

            model_path = str(build_tiny_model(work_dir / "tiny"))
        plain = TransformersBackend.from_pretrained(model_path, device=args.device, max_pixels=args.max_pixels)
        cached = TransformersBackend(
            plain.model, load_processor(model_path, max_pixels=args.max_pixels), prefix_cache=True
        )

        def context_length(messages: list[dict]) -> int:
            return int(plain.prepare_inputs(messages)["input_ids"].shape[1])

        modes: dict[str, TransformersBackend | OpenAIBackend] = {
            "transformers (full re-prefill)": plain,
            "transformers (prefix_cache=True)": cached,
        }
        if args.endpoint:
            modes[f"openai ({args.endpoint})"] = OpenAIBackend(args.endpoint)
        limits = plain.pixel_limits
        print(f"model: {args.model or 'tiny random Qwen2.5-VL'}; image pixels {limits[0]}..{limits[1]}; 3 calls")
        print(f"{'mode':<40} {'prompt tokens':>13} {'final context':>13} {'ratio':>6} {'seconds':>8}")
        for name, backend in modes.items():
            processed, final, seconds = measure(backend, work_dir, context_length)
            print(f"{name:<40} {processed:>13} {final:>13} {processed / final:>6.2f} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
