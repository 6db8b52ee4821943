"""`vl-export verify`: a bundle against the PyTorch reference, stage by stage, with thresholds per precision.

Stages, each fed what the previous stage of the *bundle* produced (so errors accumulate as they do at run time):
pixel_values, prompt ids, vision features, image embeds, spliced inputs_embeds, prefill logits (the last
positions of the prompt), teacher-forced top-1 agreement over the reference's own greedy continuation, and the
greedy tokens themselves, with the first divergent position and the reference's top-1/top-2 margin there, so a
near-tie is told apart from a bug.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vl_export.compare import first_divergence, max_abs_diff, tensor_stats, top1_agreement, top2_margin
from vl_export.errors import InputError
from vl_export.files import Progress, stderr_progress
from vl_export.runtime import GenerationConfig, Pipeline

from .reference import Reference

PRECISION_ORDER = ("fp32", "fp16", "int8", "int4")
PREFILL_POSITIONS = 16  # prompt positions whose logits are compared


@dataclass(frozen=True)
class Thresholds:
    pixel_max_abs: float = 1e-5  # preprocessing does not depend on the graphs' precision
    feature_cosine: float = 0.99999
    embed_cosine: float = 0.99999
    logit_cosine: float = 0.99999
    relative_error: float | None = 1e-3  # fp32 only: max abs diff over the reference's largest magnitude
    top1: float = 0.99  # teacher-forced agreement with the reference's greedy tokens
    greedy_min_match: int | None = None  # identical leading tokens required; None = all of them
    near_tie_margin: float = 0.01  # a divergence where the reference's top-2 margin is below this is not a failure

    def replace(self, overrides: dict[str, float]) -> Thresholds:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise InputError(f"unknown threshold {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        return dataclasses.replace(self, **overrides)


# Defaults per the bundle's lowest precision; the README explains each.
THRESHOLDS = {
    "fp32": Thresholds(),
    "fp16": Thresholds(feature_cosine=0.999, embed_cosine=0.999, logit_cosine=0.999, relative_error=None,
                       top1=0.95, greedy_min_match=4, near_tie_margin=0.1),
    "int8": Thresholds(feature_cosine=0.99, embed_cosine=0.99, logit_cosine=0.98, relative_error=None,
                       top1=0.85, greedy_min_match=1, near_tie_margin=0.5),
    # Vision stays INT8 (same feature/embed bars); the 4-bit decoder moves logits more than INT8 does.
    "int4": Thresholds(feature_cosine=0.99, embed_cosine=0.99, logit_cosine=0.95, relative_error=None,
                       top1=0.8, greedy_min_match=1, near_tie_margin=1.0),
}


def bundle_precision(pipe: Pipeline) -> str:
    used = {g.precision for g in pipe.manifest.graphs}
    return max(used, key=PRECISION_ORDER.index)


def default_images() -> list[tuple[str, Image.Image]]:
    """Two deterministic drawings: a 3x2-grid landscape (7 tiles with the thumbnail) and a single square tile."""
    images = []
    for name, size in (("landscape-1344x896", (1344, 896)), ("square-448", (448, 448))):
        image = Image.new("RGB", size, (235, 235, 225))
        draw = ImageDraw.Draw(image)
        w, h = size
        draw.ellipse((w * 0.1, h * 0.2, w * 0.35, h * 0.6), fill=(200, 30, 30))
        draw.rectangle((w * 0.55, h * 0.5, w * 0.9, h * 0.85), fill=(30, 60, 200))
        draw.polygon([(w * 0.5, h * 0.05), (w * 0.65, h * 0.4), (w * 0.35, h * 0.4)], fill=(40, 160, 60))
        images.append((name, image))
    return images


DEFAULT_PROMPTS = ("Describe the image in detail.", "What colour is the circle?")


def verify_case(pipe: Pipeline, ref: Reference, label: str, image, prompt: str, new_tokens: int) -> dict:
    """Every stage for one (image, prompt); each entry holds its metrics."""
    stages: dict[str, dict] = {}
    request = pipe.prepare(prompt, images=[image])
    ref_pixels, counts = ref.pixel_values([image])
    stages["pixel_values"] = {"max_abs_diff": max_abs_diff(request.pixel_values, ref_pixels.numpy()),
                              "tiles": len(request.pixel_values), "reference_tiles": len(ref_pixels)}
    ref_ids = ref.prompt_ids(prompt, counts)
    stages["prompt_ids"] = {"identical": request.ids == ref_ids, "tokens": len(request.ids)}

    per_run = pipe.tiles_per_run
    features = np.concatenate([pipe.vision.run({"pixel_values": request.pixel_values[i : i + per_run]})["vision_features"]
                               for i in range(0, len(request.pixel_values), per_run)])
    stages["vision_features"] = tensor_stats(features, ref.vision_features(ref_pixels).numpy())
    embeds = pipe.projector.run({"vision_features": features})["image_embeds"]
    ref_embeds = ref.image_embeds(ref_pixels)
    stages["image_embeds"] = tensor_stats(embeds, ref_embeds.numpy())
    spliced = pipe.splice(request.ids, embeds)  # (s, hidden)
    ref_spliced = ref.inputs_embeds(ref_ids, ref_embeds)
    stages["inputs_embeds"] = tensor_stats(spliced, ref_spliced.numpy())

    # The reference's greedy continuation, then both models teacher-forced along it.
    ref_tokens = ref.generate(ref_ids, ref_pixels, new_tokens)
    s, n = len(request.ids), len(ref_tokens)
    follow = pipe.embed(np.asarray(ref_tokens[:-1], np.int64)).reshape(-1, spliced.shape[-1])
    sequence = np.concatenate([spliced, follow])[None]  # (1, s + n - 1, hidden)
    positions = np.arange(max(0, s - PREFILL_POSITIONS), s + n - 1)[None]
    pipe.decoder.reset(1, sequence.shape[1])
    logits = pipe.decoder.forward(sequence, np.ones(sequence.shape[:2], np.int64),
                                  np.arange(sequence.shape[1])[None], positions)[0]  # (positions, vocab)
    ref_sequence = torch.cat([ref_spliced, ref.model.model.language_model.embed_tokens(torch.tensor(ref_tokens[:-1], dtype=torch.long))])
    ref_logits = ref.logits(ref_sequence, positions.shape[1]).numpy()
    prompt_part = slice(0, positions.shape[1] - n)
    stages["prefill_logits"] = tensor_stats(logits[prompt_part], ref_logits[prompt_part])
    stages["teacher_forced_top1"] = {"agreement": top1_agreement(logits[-n:], np.asarray(ref_tokens)), "positions": n}

    ours = pipe.chat(prompt, images=[image], generation=GenerationConfig(max_new_tokens=new_tokens)).token_ids
    at = first_divergence(ours, ref_tokens)
    greedy = {"identical": at is None, "match_length": n if at is None else at, "tokens": n,
              "first_divergence": at}
    if at is not None and at < n:
        greedy["reference_margin_at_divergence"] = top2_margin(ref_logits[-n:][at])
    stages["greedy"] = greedy
    return {"image": label, "prompt": prompt, "stages": stages}


def judge(cases: list[dict], t: Thresholds) -> list[dict]:
    """One row per stage: the worst value over all cases, its threshold, pass/fail."""
    def worst(stage, key, pick=min):
        return pick(c["stages"][stage][key] for c in cases)

    rows = [
        ("pixel_values", "max_abs_diff", worst("pixel_values", "max_abs_diff", max), t.pixel_max_abs, "<="),
        ("prompt_ids", "identical", all(c["stages"]["prompt_ids"]["identical"] for c in cases), True, "=="),
        ("vision_features", "cosine", worst("vision_features", "cosine"), t.feature_cosine, ">="),
        ("image_embeds", "cosine", worst("image_embeds", "cosine"), t.embed_cosine, ">="),
        ("inputs_embeds", "cosine", worst("inputs_embeds", "cosine"), t.embed_cosine, ">="),
        ("prefill_logits", "cosine", worst("prefill_logits", "cosine"), t.logit_cosine, ">="),
        ("teacher_forced_top1", "agreement", worst("teacher_forced_top1", "agreement"), t.top1, ">="),
    ]
    if t.relative_error is not None:
        for stage in ("vision_features", "image_embeds", "prefill_logits"):
            rows.append((stage, "relative_error", worst(stage, "relative_error", max), t.relative_error, "<="))
    out = []
    for stage, metric, value, threshold, op in rows:
        ok = {"<=": value <= threshold, ">=": value >= threshold, "==": value == threshold}[op]
        out.append({"stage": stage, "metric": metric, "value": value, "threshold": threshold, "op": op, "pass": bool(ok)})
    for c in cases:
        g = c["stages"]["greedy"]
        need = g["tokens"] if t.greedy_min_match is None else min(t.greedy_min_match, g["tokens"])
        near_tie = g.get("reference_margin_at_divergence", float("inf")) < t.near_tie_margin
        ok = g["match_length"] >= need or near_tie
        out.append({"stage": "greedy", "metric": f"match_length [{c['image']} | {c['prompt'][:24]}]",
                    "value": g["match_length"], "threshold": need, "op": ">=", "pass": bool(ok),
                    "note": "near-tie at divergence" if (near_tie and g["match_length"] < need) else ""})
    return out


def verify_bundle(bundle: Path, model: str, images: list | None = None, prompts: list[str] | None = None,
                  new_tokens: int = 16, backend: str = "onnxruntime", threshold_overrides: dict[str, float] | None = None,
                  reference: Reference | None = None, progress: Progress = stderr_progress, **backend_options) -> dict:
    """Compare the bundle with the reference on every (image, prompt); the report says pass or fail per stage."""
    pipe = Pipeline.from_bundle(bundle, backend=backend, **backend_options)
    precision = bundle_precision(pipe)
    thresholds = THRESHOLDS[precision].replace(threshold_overrides or {})
    ref = reference or Reference(model)
    # images: paths, or (label, image) pairs; default: the two built-in drawings
    inputs = [p if isinstance(p, tuple) else (str(p), str(p)) for p in images] if images else default_images()
    cases = []
    for label, image in inputs:
        for prompt in prompts or DEFAULT_PROMPTS:
            progress(f"verifying {label} | {prompt}")
            cases.append(verify_case(pipe, ref, label, image, prompt, new_tokens))
    rows = judge(cases, thresholds)
    return {"bundle": str(bundle), "reference": str(ref.ck.path), "backend": pipe.backend.describe(),
            "precision": precision, "thresholds": dataclasses.asdict(thresholds), "passed": all(r["pass"] for r in rows),
            "stages": rows, "cases": cases}


def table(report: dict) -> str:
    lines = [f"verify {report['bundle']} ({report['precision']}, {report['backend']['backend']}) "
             f"against {report['reference']}", "", "| stage | metric | worst | threshold | result |", "| --- | --- | --- | --- | --- |"]
    for r in report["stages"]:
        value = r["value"] if isinstance(r["value"], (bool, int)) else f"{r['value']:.8g}"
        verdict = "pass" if r["pass"] else "FAIL"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['stage']} | {r['metric']} | {value} | {r['op']} {r['threshold']} | {verdict}{note} |")
    lines += ["", "PASSED" if report["passed"] else "FAILED: " + ", ".join(sorted({r["stage"] for r in report["stages"] if not r["pass"]}))]
    return "\n".join(lines)


def summary(report: dict) -> dict:
    """What the manifest keeps of a verify run."""
    return {"passed": report["passed"], "precision": report["precision"], "backend": report["backend"]["backend"],
            "thresholds": report["thresholds"],
            "stages": [{k: r[k] for k in ("stage", "metric", "value", "threshold", "pass")} for r in report["stages"]]}
