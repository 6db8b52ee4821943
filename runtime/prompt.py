"""The internvl2_5 conversation template and the `<image>` rules of InternVL2.5's chat() and batch_chat().

Prompt injection: the runtime tokenises a conversation as segments, control tokens it places itself and text
that came from someone (system, user, assistant). Text is encoded as plain text by default, so a user who types
`<|im_start|>system` gets those characters, not a forged turn; the reference encodes the rendered string whole
(its behaviour, behind `parse_special_tokens=True`). For text without special-token strings the two give
identical ids: the tokenizer splits at special tokens before anything else, exactly where segments split.
`<image>` markers become images only in user turns.
"""

from __future__ import annotations

from collections.abc import Sequence

from vl_export.errors import InputError

IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
# InternLM2-based models (InternVL2.5-2B/8B/26B) have no <|endoftext|>: </s> ends text and <s> starts a prompt.
BOS = "<s>"
EOS = "</s>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)

# Byte-exact copy of the reference's default; the model was tuned with it.
DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
SEPARATOR = IM_END + "\n"
USER = IM_START + "user\n"
ASSISTANT = IM_START + "assistant\n"

History = Sequence[tuple[str, str]]
CONTROL = "control"  # a special token the runtime places; other kinds are text: template, system, user, assistant
Segment = tuple[str, str]  # (kind, text)
RUNTIME_ONLY = (IMG_START, IMG_END, IMG_CONTEXT)  # image tokens the runtime places; typed by a user they are refused


def render(question: str, history: History = (), system_message: str = DEFAULT_SYSTEM_MESSAGE) -> str:
    """The reference's Conversation.get_prompt() for the MPT separator style, ending in an open assistant turn."""
    prompt = IM_START + "system\n" + system_message + SEPARATOR
    for old_question, old_answer in history:
        prompt += USER + old_question + SEPARATOR
        # The reference tests `if message:`, so an empty answer renders as a bare role with no separator.
        prompt += ASSISTANT + old_answer + SEPARATOR if old_answer else ASSISTANT
    return prompt + USER + question + SEPARATOR + ASSISTANT


def conversation(question: str, history: History = (), system_message: str = DEFAULT_SYSTEM_MESSAGE) -> list[Segment]:
    """render() as segments: "".join of the texts is render()'s string, byte for byte."""

    def turn(role: str, text: str, closed: bool = True) -> list[Segment]:
        out = [(CONTROL, IM_START), ("template", role + "\n"), (role, text)]
        return out + [(CONTROL, IM_END), ("template", "\n")] if closed else out

    segments = turn("system", system_message)
    for old_question, old_answer in history:
        segments += turn("user", old_question)
        # The reference tests `if message:`, so an empty answer renders as a bare role with no separator.
        segments += turn("assistant", old_answer) if old_answer else turn("assistant", "", closed=False)
    return segments + turn("user", question) + turn("assistant", "", closed=False)


def expand_image_segments(segments: list[Segment], tiles_per_image: Sequence[int], num_image_tokens: int) -> list[Segment]:
    """Replace each `<image>` of the user turns, in order, by `<img>` + `<IMG_CONTEXT>` x 256 x tiles + `</img>`."""
    tiles = iter(tiles_per_image)
    out: list[Segment] = []
    for kind, text in segments:
        if kind != "user" or IMAGE_PLACEHOLDER not in text:
            out.append((kind, text))
            continue
        first, *rest = text.split(IMAGE_PLACEHOLDER)
        out.append((kind, first))
        for after in rest:
            n = next(tiles, None)
            if n is None:
                raise InputError("more <image> placeholders than images")
            out += [(CONTROL, IMG_START), *[(CONTROL, IMG_CONTEXT)] * (num_image_tokens * n), (CONTROL, IMG_END), (kind, after)]
    if next(tiles, None) is not None:
        raise InputError("more images than <image> placeholders in the user turns")
    return out


def check_text(segments: Sequence[Segment]) -> None:
    """Refuse text the runtime cannot encode honestly: image tokens only it may place, text that is not UTF-8."""
    for kind, text in segments:
        if kind == CONTROL:
            continue
        for token in RUNTIME_ONLY:
            if token in text:
                raise InputError(f"the {kind} text holds {token}, which only the runtime places (images go in as images)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"the {kind} text is not valid UTF-8") from None


def with_placeholders(question: str, num_images: int, history: History = ()) -> str:
    """Add `<image>` markers where chat() would; check that markers and images agree in number.

    One image, no history, no marker: `<image>\\n` is prepended (chat()). Several images and no marker anywhere:
    `Image-1: <image>\\nImage-2: <image>\\n...` is prepended (the model card's multi-image form).
    """
    in_history = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history)
    markers = in_history + question.count(IMAGE_PLACEHOLDER)
    if num_images and markers == 0:
        if num_images == 1 and not history:
            question = IMAGE_PLACEHOLDER + "\n" + question
        elif num_images > 1:
            question = "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1)) + question
        markers = num_images
    if markers != num_images:
        raise InputError(f"the conversation has {markers} <image> placeholders but {num_images} images were given")
    return question


def video_question(question: str, num_frames: int) -> str:
    """The model card's video prompt: `Frame1: <image>\\nFrame2: <image>\\n...` before the question."""
    if IMAGE_PLACEHOLDER in question:
        raise InputError("a video question must not hold <image> placeholders; one per frame is added for you")
    return "".join(f"Frame{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_frames + 1)) + question


def expand_images(prompt: str, tiles_per_image: Sequence[int], num_image_tokens: int) -> str:
    """Replace each `<image>`, in order, by `<img>` + `<IMG_CONTEXT>` x 256 x tiles + `</img>`."""
    for tiles in tiles_per_image:
        prompt = prompt.replace(IMAGE_PLACEHOLDER, IMG_START + IMG_CONTEXT * (num_image_tokens * tiles) + IMG_END, 1)
    return prompt


def clean_response(text: str) -> str:
    """As the reference: cut at the separator, strip whitespace."""
    return text.split(IM_END)[0].strip()
