"""Questions, answer lead-ins and conversation templates of Text4Seg (SPEC section 3)."""

from __future__ import annotations

import random

from . import codec

IMAGE = "<image>"

QUESTIONS = (
    "Please segment only the [class_name] in the image.",
    "Can you segment the [class_name] in the image?",
    "Where is the [class_name] in this picture? Please respond with segmentation mask.",
    "Where is '[class_name]' in this image? Please output segmentation mask.",
    "Could you provide the segmentation mask for '[class_name]' in this image?",
    "Please segment the image and highlight '[class_name]'.",
)
LEAD_INS = (
    "Sure, here is the segmentation mask for '[class_name]':",
    "The segmentation map for '[class_name]' is:",
    "Here is the segmentation mask highlighting the [class_name]:",
)
SEMANTIC_QUESTION = "Please segment the image based on the category: [class_name]."

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# How a question and the image become the prompt. ``llava_v1`` is the released checkpoint's;
# ``question_first`` (the bundled tiny models') lets the image positions see the expression.
TEMPLATES = {
    "llava_v1": LLAVA_SYSTEM + " USER: " + IMAGE + "\n{question} ASSISTANT:",
    "question_first": "USER: {question}\n" + IMAGE + " ASSISTANT:",
}


# ``llava_v1`` as a chat template, for servers that build the prompt from chat messages (``vllm
# serve``). A server tokenises the rendered text in one piece, where LLaVA tokenises the text
# around the image piece by piece, each with SentencePiece's leading space; the two spaces
# below (after the BOS and after the image) give those same token ids under the LLaMA tokenizer.
LLAVA_V1_CHAT_TEMPLATE = (
    "{{ bos_token }} " + LLAVA_SYSTEM
    + "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: {% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] in ('image', 'image_url') %}" + IMAGE + " \n"
    "{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT:{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def question(expression: str, template: int | None = 0, rng: random.Random | None = None) -> str:
    """A referring question; ``template=None`` picks one at random like training does."""
    if template is None:
        template = (rng or random).randrange(len(QUESTIONS))
    return QUESTIONS[template].replace("[class_name]", expression)


def semantic_question(classes: list[str]) -> str:
    """A multi-class question: class names joined with ``|``."""
    return SEMANTIC_QUESTION.replace("[class_name]", "|".join(classes))


def lead_in(expression: str, template: int = 0) -> str:
    return LEAD_INS[template].replace("[class_name]", expression)


def answer(expression: str, body: str, template: int = 0) -> str:
    """The whole answer after ``ASSISTANT:`` (a space, the lead-in, then ``<seg>BODY</seg>``):
    what a model generates, token for token, apart from its end-of-sequence token."""
    return " " + codec.wrap(body, lead_in(expression, template))


def prompt(question_text: str, style: str = "llava_v1") -> str:
    """The text before the model's answer, with one ``<image>`` placeholder."""
    if style not in TEMPLATES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[style].format(question=question_text)
