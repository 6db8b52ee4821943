"""Task accuracy of the demo model: greedy answers to held-out questions, exact match, in PyTorch fp32 (the
checkpoint) or through the runtime (a bundle on a backend).

    python -m vl_export.export.demo.evaluate [--checkpoint DIR] [--bundle B [--backend onnxruntime]] [-n 250]

The checkpoint is loaded through export.checkpoint.load (the original layout's rename map), and every request
is built as the runtime builds it: the reference's tiling, the internvl2_5 template with the default system
message, `<image>` expanded per tile, greedy decoding stopped at `<|im_end|>`, clean_response.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vl_export.runtime import GenerationConfig, Pipeline
from vl_export.runtime.preprocess import preprocess
from vl_export.runtime.prompt import IM_END, clean_response, expand_images, render, with_placeholders

from ..checkpoint import Checkpoint, load
from ..tokenizer import load_fast
from . import CHECKPOINT, data
from .train import tiling


class Answerer:
    """A loaded checkpoint and its tokenizer, answering one (image, question) at a time."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.tokenizer = load_fast(checkpoint.path)
        self.im_end_id = self.tokenizer.token_to_id(IM_END)
        self.pad_id = self.tokenizer.token_to_id("<|endoftext|>")

    @classmethod
    def from_path(cls, path: Path = CHECKPOINT) -> Answerer:
        return cls(load(path))

    def __call__(self, image: Image.Image | Path | str, question: str, max_new_tokens: int = 8) -> str:
        spec = self.checkpoint.spec
        pixel_values = torch.from_numpy(preprocess(image, tiling(spec)))  # (tiles, 3, 448, 448)
        prompt = expand_images(render(with_placeholders(question, 1)), [pixel_values.shape[0]], spec.num_image_tokens)
        input_ids = torch.tensor([self.tokenizer.encode(prompt, add_special_tokens=False).ids])
        with torch.inference_mode():
            output = self.checkpoint.model.generate(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.im_end_id,
                pad_token_id=self.pad_id,
            )
        new_tokens = output[0, input_ids.shape[1] :].tolist()
        return clean_response(self.tokenizer.decode(new_tokens, skip_special_tokens=True))


class BundleAnswerer:
    """The same questions through the runtime: a bundle on a backend, greedy."""

    def __init__(self, bundle: Path, backend: str = "onnxruntime", **backend_options):
        self.pipeline = Pipeline.from_bundle(bundle, backend=backend, **backend_options)

    def __call__(self, image: Image.Image | Path | str, question: str, max_new_tokens: int = 8) -> str:
        generation = GenerationConfig(max_new_tokens=max_new_tokens)
        return self.pipeline.chat(question, images=[image], generation=generation).text


@dataclass
class Report:
    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    mistakes: list[tuple[int, str, str, str]] = field(default_factory=list)  # (seed, question, answer, got)

    def add(self, kind: str, ok: bool) -> None:
        self.correct[kind] = self.correct.get(kind, 0) + int(ok)
        self.total[kind] = self.total.get(kind, 0) + 1

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(1, sum(self.total.values()))

    def per_kind(self) -> dict[str, float]:
        return {kind: self.correct[kind] / self.total[kind] for kind in self.total}

    def table(self) -> str:
        rows = [f"{kind:9s} {self.correct[kind]:4d}/{self.total[kind]:<4d} {acc:7.1%}" for kind, acc in self.per_kind().items()]
        rows.append(f"{'all':9s} {sum(self.correct.values()):4d}/{sum(self.total.values()):<4d} {self.accuracy:7.1%}")
        return "\n".join(rows)


def is_correct(got: str, answer: str) -> bool:
    return got.strip().lower() == answer.strip().lower()


def evaluate(answerer: Answerer, examples: Iterable[data.Example], max_new_tokens: int = 8) -> Report:
    report = Report()
    for example in examples:
        got = answerer(example.image, example.question, max_new_tokens)
        ok = is_correct(got, example.answer)
        report.add(example.kind, ok)
        if not ok:
            report.mistakes.append((example.seed, example.question, example.answer, got))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="checkpoint to run in PyTorch fp32")
    parser.add_argument("--bundle", type=Path, help="run this bundle through the runtime instead")
    parser.add_argument("--backend", default="onnxruntime", help="the bundle's backend")
    parser.add_argument("-n", type=int, default=250, help="held-out examples (balanced over the question kinds)")
    parser.add_argument("--start", type=int, default=0, help="first held-out index (keep validation and test ranges apart)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.bundle:
        answerer = BundleAnswerer(args.bundle, args.backend, threads=args.threads)
    else:
        answerer = Answerer.from_path(args.checkpoint)
    report = evaluate(answerer, data.heldout(args.n, args.start))
    print(report.table())
    for seed, question, answer, got in report.mistakes:
        print(f"  seed {seed}: {question!r} expected {answer!r}, got {got!r}")
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
