"""Chat-template prologues between vlm's text content and transformers' list-of-parts content.

vlm renders messages whose content is text with one "<image>\\n" per image (`VLMConfig.images_after_text`: the text
then "\\n<image>" per image); transformers' pipelines and `apply_chat_template` pass a list of parts
(`{"type": "image"}`, `{"type": "text", "text": ...}`). A prologue put in front of a template rewrites the messages
into the form the rest of the template expects, and renders nothing itself.
"""

from __future__ import annotations

import json

# Export: list-of-parts content -> vlm's text, the images first. One line: it must render nothing itself.
_LIST_TO_TEXT = (
    "{%- set vlm_ns = namespace(messages=[]) -%}{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set vlm_ns.messages = vlm_ns.messages + [m] -%}"
    "{%- else -%}{%- set vlm_parts = namespace(images='', text='') -%}"
    "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}"
    "{%- set vlm_parts.images = vlm_parts.images + IMAGE_TOKEN + '\\n' -%}{%- elif c['type'] == 'text' -%}"
    "{%- set vlm_parts.text = vlm_parts.text + c['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set vlm_ns.messages = vlm_ns.messages + [{'role': m['role'], 'content': vlm_parts.images + vlm_parts.text}] "
    "-%}{%- endif -%}{%- endfor -%}{%- set messages = vlm_ns.messages %}"
)
# Import, for a LLaVA template that expects list content: vlm's "<image>\n" + text becomes parts.
_TEXT_TO_LIST = (
    "{%- set vlm_ns = namespace(messages=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
    "{%- set vlm_parts = namespace(items=[]) -%}{%- for part in m['content'].split(IMAGE_TOKEN) -%}"
    "{%- if not loop.first -%}{%- set vlm_parts.items = vlm_parts.items + [{'type': 'image'}] -%}"
    "{%- endif -%}{%- set vlm_text = part[1:] if (not loop.first and part.startswith('\\n')) else part -%}"
    "{%- if vlm_text -%}{%- set vlm_parts.items = vlm_parts.items + [{'type': 'text', 'text': vlm_text}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set vlm_ns.messages = vlm_ns.messages + [{'role': m['role'], 'content': vlm_parts.items}] -%}"
    "{%- else -%}{%- set vlm_ns.messages = vlm_ns.messages + [m] -%}{%- endif -%}{%- endfor -%}"
    "{%- set messages = vlm_ns.messages %}"
)


def _prologue(template: str, image_token: str) -> str:
    return template.replace("IMAGE_TOKEN", json.dumps(image_token))


def _list_to_text(image_token: str, images_after_text: bool) -> str:
    """The export prologue for vlm's layout: "<image>\\n" per image then the text, or (`images_after_text`) the text
    then "\\n<image>" per image."""
    template = _LIST_TO_TEXT
    if images_after_text:
        template = template.replace("IMAGE_TOKEN + '\\n'", "'\\n' + IMAGE_TOKEN")
        template = template.replace("vlm_parts.images + vlm_parts.text", "vlm_parts.text + vlm_parts.images")
    return _prologue(template, image_token)


def for_list_content(template: str, image_token: str, images_after_text: bool) -> str:
    """vlm's chat template made to read transformers' list-of-parts content (what export writes)."""
    return _list_to_text(image_token, images_after_text) + template


def vlm_template(template: str, image_token: str) -> tuple[str, bool] | None:
    """vlm's own template and its `images_after_text` back from a template `for_list_content` made; None if
    `template` was not made so."""
    for after in (False, True):
        prologue = _list_to_text(image_token, after)
        if template.startswith(prologue):
            return template[len(prologue) :], after
    return None


def for_text_content(template: str, image_token: str) -> str:
    """A LLaVA chat template (list-of-parts content) made to read vlm's text content (what import writes)."""
    return _prologue(_TEXT_TO_LIST, image_token) + template
