"""Chat templates Thyme ships, for checkpoints whose own template cannot carry a Thyme trajectory.

Thyme puts sandbox images INSIDE the assistant message. The Qwen2.5-VL template renders image items in any message;
the Qwen3-VL template renders only the text of assistant messages, so the crops would silently vanish from the
prompt. For Thyme conversations (always with a system prompt, no tool calls) the two templates otherwise produce
the same text, so :func:`thyme.backends.processor.load_processor` uses this one for Qwen3-VL.

This module imports nothing, so the tiny-model builder and the processor loader share the text.
"""

from __future__ import annotations

# The Qwen2.5-VL-7B-Instruct chat template, byte for byte (the same text as trl/chat_templates/qwen2_5_vl.jinja;
# a test compares the two).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

__all__ = ["QWEN2_5_VL_CHAT_TEMPLATE"]
