"""The demo model: a small InternVL2.5 trained here on synthetic visual questions.

CHECKPOINT is the trained checkpoint in the original OpenGVLab layout (config.json, model.safetensors and the
slow tokenizer files); EXAMPLES are images drawn by data.py with a question each and its correct answer.
`python -m vl_export.export.demo.train` retrains it, `python -m vl_export.export.demo.evaluate` measures it in
PyTorch or through the runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

CHECKPOINT = Path(__file__).parent / "checkpoint"
IMAGES = Path(__file__).parent / "images"


class DemoExample(NamedTuple):
    image: Path
    question: str
    answer: str


def _examples() -> list[DemoExample]:
    listing = IMAGES / "examples.json"
    if not listing.is_file():
        return []
    return [DemoExample(IMAGES / e["image"], e["question"], e["answer"]) for e in json.loads(listing.read_text())]


EXAMPLES: list[DemoExample] = _examples()
