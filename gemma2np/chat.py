"""Gemma 2's chat template, rendered in plain Python (no jinja).

``render_gemma2_chat`` produces exactly the string that transformers' ``apply_chat_template``
renders from ``GEMMA2_CHAT_TEMPLATE`` (the ``chat_template`` of google/gemma-2-2b-it's
tokenizer_config.json)::

    <bos><start_of_turn>user\\n{content.strip()}<end_of_turn>\\n<start_of_turn>model\\n...

The jinja rules it mirrors, including the odd corners:

* the first message may not have role ``system`` ("System role not supported");
* message i must have role ``user`` iff i is even, otherwise the roles-must-alternate
  error; so at odd positions *any* non-user role passes and is written as is
  (``assistant`` is written ``model``, ``system`` at index 1 is written ``system``);
* content is ``trim``-med (Python ``str.strip()``: all leading/trailing whitespace);
* keys whose value is None are dropped before rendering (transformers does this), so a
  ``content=None`` renders as an empty turn;
* special tokens written inside content are NOT escaped (transformers' default
  ``sanitize_control_tokens=False``): they are later tokenized as special tokens.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

# The chat template of google/gemma-2-2b-it (tokenizer_config.json), verbatim.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A conversation the Gemma 2 chat template refuses (same cases as its raise_exception)."""


def is_gemma2_template(template: str | None) -> bool:
    return template is not None and "".join(template.split()) == "".join(GEMMA2_CHAT_TEMPLATE.split())


def _check_message(i: int, m: Any) -> dict:
    if not isinstance(m, Mapping):
        raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
    m = {k: v for k, v in m.items() if v is not None}
    if "role" not in m:
        raise ChatTemplateError(f"message {i} has no 'role'")
    if not isinstance(m["role"], str):
        raise ChatTemplateError(f"message {i}: role must be a string, got {type(m['role']).__name__}")
    content = m.get("content", "")
    if not isinstance(content, str):
        raise ChatTemplateError(
            f"message {i}: content must be a string, got {type(content).__name__} "
            "(Gemma 2's template has no multimodal / structured content)"
        )
    return {"role": m["role"], "content": content}


def render_gemma2_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "<bos>",
    add_generation_prompt: bool = False,
) -> str:
    """Render one conversation with Gemma 2's template; raise ChatTemplateError like the template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    msgs = [_check_message(i, m) for i, m in enumerate(messages)]
    if msgs[0]["role"] == "system":
        raise ChatTemplateError("System role not supported")
    out = [bos_token]
    for i, m in enumerate(msgs):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ChatTemplateError(
                "Conversation roles must alternate user/assistant/user/assistant/... "
                f"(message {i} has role {m['role']!r})"
            )
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append("<start_of_turn>" + role + "\n" + m["content"].strip() + "<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)
