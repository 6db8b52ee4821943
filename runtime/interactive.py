"""`vl-export chat`: a multi-round conversation in the terminal, images attachable between questions."""

from __future__ import annotations

import sys
from typing import TextIO

from vl_export.errors import VlExportError

from .pipeline import Pipeline
from .preprocess import load_image
from .prompt import IMAGE_PLACEHOLDER
from .sampling import GenerationConfig

HELP = "Type a question. /image PATH attaches an image to the next question, /reset starts over, /exit quits."


def chat_loop(pipe: Pipeline, generation: GenerationConfig, max_tiles: int | None = None,
              system_message: str | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Read questions until /exit or end of input; every round re-sends the conversation's images, as chat() does."""
    images: list = []
    new_images = 0
    history: list[tuple[str, str]] = []
    print(HELP, file=stdout, flush=True)
    while True:
        print("> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except UnicodeDecodeError:  # the terminal sent bytes that are not UTF-8: this line only is lost
            print("error: the input is not valid UTF-8", file=stdout, flush=True)
            continue
        if not line or line.strip() == "/exit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            images, new_images, history = [], 0, []
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                load_image(path)  # fail now, not at the next question
            except VlExportError as exc:
                print(f"error: {exc}", file=stdout, flush=True)
                continue
            images.append(path)
            new_images += 1
            print(f"(image {len(images)} attached)", file=stdout, flush=True)
            continue
        question = line
        if history and new_images:  # an image attached mid-conversation gets its marker in this question
            question = f"{IMAGE_PLACEHOLDER}\n" * new_images + question
        try:
            stream = pipe.stream(question, images=images or None, history=history, generation=generation,
                                 max_tiles=max_tiles, system_message=system_message)
            for piece in stream:
                print(piece, end="", file=stdout, flush=True)
        except VlExportError as exc:
            print(f"error: {exc}", file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)
        history, new_images = stream.result.history, 0
