"""Train the demo model on CPU: a small InternVL2.5 in the original layout that answers the questions of data.py.

    python -m vl_export.export.demo.train --out DIR [--steps N]

Every example is built exactly as the runtime builds a request: the reference's tiling (max_dynamic_patch 6,
thumbnail), the internvl2_5 template with the default system message, `<image>` expanded to
`<img><IMG_CONTEXT>...</img>`. An image carries a short conversation (1 to --turns questions, each fact asked
once); its first turn is byte for byte the single-turn prompt the runtime sends, and because the decoder is
causal the later turns only add supervision for the same, expensive, image features. The loss is on the answer
tokens and their `<|im_end|>` only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import random
import time
from pathlib import Path

import torch

from vl_export.runtime.preprocess import TilingConfig, preprocess
from vl_export.runtime.prompt import IM_END, expand_images, render, with_placeholders
from vl_export.spec import ModelSpec

from .. import synthetic_tokenizer
from ..random_model import random_model, write_original_checkpoint
from ..tokenizer import load_fast
from . import data, regions

DEMO_CONFIG = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "template": "internvl2_5",
    "downsample_ratio": 0.5,
    "ps_version": "v2",
    "select_layer": -1,
    "force_image_size": 448,
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": data.MAX_TILES,
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 448,
        "patch_size": 32,  # a 14x14 grid, 49 image tokens per tile after the pixel shuffle
        "num_channels": 3,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "drop_path_rate": 0.0,
        "use_flash_attn": False,
    },
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "vocab_size": None,  # set from the tokenizer
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
    },
}
TEMPLATE_WORDS = "system\nuser\nassistant\n"


def tiling(spec: ModelSpec) -> TilingConfig:
    return TilingConfig(
        image_size=spec.image_size,
        min_tiles=spec.min_dynamic_patch,
        max_tiles=spec.max_dynamic_patch,
        use_thumbnail=spec.use_thumbnail,
    )


def write_tokenizer(out_dir: Path) -> dict[str, int]:
    corpus = [*synthetic_tokenizer.DEFAULT_CORPUS, *data.corpus(), TEMPLATE_WORDS]
    return synthetic_tokenizer.write_slow_files(out_dir, corpus, vocab_size=1024)


def encode_conversation(tokenizer, turns: list[tuple[str, str, str]], tiles: int, num_image_tokens: int):
    """(input_ids, labels, kinds): the conversation as the template renders it; labels -100 except on answers.

    `kinds` names, per labelled token, the question kind it answers (for per-kind training accuracy).
    """
    history: list[tuple[str, str]] = []
    spans: list[tuple[int, int, str]] = []  # character spans of "answer<|im_end|>" in the final text
    text = ""
    for i, (question, answer, kind) in enumerate(turns):
        question = with_placeholders(question, 1) if i == 0 else question
        prefix = expand_images(render(question, history), [tiles], num_image_tokens)
        if not prefix.startswith(text):
            raise AssertionError("the rendered conversation is not an extension of its previous turn")
        text = prefix + answer + IM_END
        spans.append((len(prefix), len(text), kind))
        history.append((question, answer))
    encoding = tokenizer.encode(text, add_special_tokens=False)
    labels, kinds = [], []
    for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
        kind = next((k for s, e, k in spans if s <= start and end <= e), None)
        labels.append(token_id if kind else -100)
        kinds.append(kind)
    if sum(k is not None for k in kinds) < 2 * len(turns):
        raise AssertionError(f"answer tokens were merged across the template: {encoding.tokens[-8:]}")
    return encoding.ids, labels, kinds


def make_batch(seeds, tokenizer, spec: ModelSpec, max_turns: int, pad_id: int, difficulty=(data.MAX_SHAPES, 1.0),
               scene_weights: dict[str, float] | None = None):
    """Right-padded ids, mask and labels for one conversation per seed, all tiles concatenated in order, and
    the per-token region targets of those tiles."""
    pixel_values, rows, region_targets = [], [], []
    for seed in seeds:
        scene, turns = data.conversation(seed, max_turns, *difficulty, scene_weights=scene_weights)
        pv = torch.from_numpy(preprocess(data.render(scene), tiling(spec)))  # (tiles, 3, 448, 448)
        pixel_values.append(pv)
        region_targets.append(regions.targets(scene, spec))
        rows.append(encode_conversation(tokenizer, turns, pv.shape[0], spec.num_image_tokens))
    length = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    kinds = []
    for b, (ids, lab, kind) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(ids)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
        kinds.append(kind + [None] * (length - len(ids)))
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.cat(pixel_values)}
    return batch, kinds, concat_targets(region_targets)


def concat_targets(per_image: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Region targets of several images, their tiles concatenated in order as the pixel values are."""
    return {name: torch.cat([t[name] for t in per_image]) for name in per_image[0]}


def curriculum(step: int, steps: int) -> tuple[int, float]:
    """(most shapes per scene, shape size factor). From scratch, the decoder first has to find that the answer
    is in the image at all; a few large shapes make that signal strong. Training starts with one shape twice
    the normal size, and reaches the evaluated distribution (up to MAX_SHAPES, size 1) at 40% of the steps."""
    ramp = min(1.0, max(0.0, (step / steps - 0.1) / 0.3))
    return 1 + math.floor(ramp * (data.MAX_SHAPES - 1) + 1e-9), 2.0 - ramp


def init_vision_embeddings_(model, generator: torch.Generator) -> None:
    """Patch tokens at unit scale and position embeddings at half that. random_model's sane-for-parity init
    gives patch tokens ~50x the position signal, and a white background's patches differ only by position:
    trained from there, shapes and left/right were learnt far more slowly than colours."""
    embeddings = model.model.vision_tower.embeddings
    patch = embeddings.patch_embeddings.projection
    with torch.no_grad():
        patch.weight.normal_(0.0, patch.weight[0].numel() ** -0.5, generator=generator)
        patch.bias.zero_()
        embeddings.position_embeddings.normal_(0.0, 0.5, generator=generator)
        embeddings.cls_token.normal_(0.0, 0.5, generator=generator)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, kinds: list[list[str | None]], kind_weights: dict[str, float]) -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens, each weighted by its question kind's weight (default 1),
    normalised by the total weight: with no weights, the mean that transformers' own loss computes."""
    log_p = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    labelled = target != -100
    nll = -log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    weight = torch.tensor([[kind_weights.get(k, 1.0) if k else 0.0 for k in row[1:]] for row in kinds]) * labelled
    return (nll * weight).sum() / weight.sum()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(named_params, lr: float) -> torch.optim.AdamW:
    decay = [p for n, p in named_params if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named_params if p.dim() < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def tile_view_batch(seeds, spec: ModelSpec):
    """Vision pretraining: one tile per scene, shapes packed densely, squeezed as thumbnails squeeze them."""
    one_tile = dataclasses.replace(spec, max_dynamic_patch=1)
    pixel_values, region_targets = [], []
    for seed in seeds:
        scene = data.make_scene(random.Random(seed), max_shapes=len(data.COLOURS), tile_view=True)
        pixel_values.append(torch.from_numpy(preprocess(data.render(scene), tiling(one_tile))))
        region_targets.append(regions.targets(scene, one_tile))
    return torch.cat(pixel_values), concat_targets(region_targets)


class Meter:
    """Running means and (right, total) counts between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, list[int]] = {}
        self.n = 0

    def add(self, values: dict[str, float], counts: dict[str, tuple[int, int]]) -> None:
        self.n += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        for k, (right, total) in counts.items():
            c = self.counts.setdefault(k, [0, 0])
            c[0], c[1] = c[0] + right, c[1] + total

    def line(self) -> str:
        means = " ".join(f"{k} {v / max(self.n, 1):.4f}" for k, v in self.sums.items())
        accuracy = " ".join(f"{k} {r / max(t, 1):.2f}" for k, (r, t) in self.counts.items())
        return f"{means} | acc {accuracy}"


def pretrain_vision(
    model, heads: regions.RegionHeads, spec: ModelSpec, steps: int, lr: float, batch_size: int, log_every: int, heads_only: bool = False
) -> None:
    """Stage 1: the vision tower and projector alone, on the region targets of densely packed single tiles.
    Four times cheaper per tile than stage 2 and several times denser in shapes, it gives stage 2 image
    features in which colours, shapes and text can already be told apart.

    `heads_only`: train the region heads alone on frozen features (a continuation's fresh heads, so that their
    random start does not push the trained features around through the auxiliary loss)."""
    named = [*heads.named_parameters()]
    if not heads_only:
        named += [*model.model.vision_tower.named_parameters(), *model.model.multi_modal_projector.named_parameters()]
    optimizer = make_optimizer(named, lr)
    start, meter = time.time(), Meter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=30)
        # Seeds from the top of the training range, far from stage 2's.
        pixel_values, targets = tile_view_batch(range(data.HELDOUT_SEED - (step + 1) * batch_size, data.HELDOUT_SEED - step * batch_size), spec)
        with torch.set_grad_enabled(not heads_only):  # frozen features: no gradient reaches (or builds up in) the model
            embeds = model.model.get_image_features(pixel_values).pooler_output  # (tiles, tokens, hidden)
        loss = heads.loss(embeds, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.add({"aux": loss.item()}, heads.accuracy(embeds.detach(), targets))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"{'heads' if heads_only else 'vision'} {step + 1}/{steps} {meter.line()} | {(time.time() - start) / 60:.1f} min", flush=True)
            meter = Meter()


def train(
    out_dir: Path,
    steps: int = 1500,
    vision_steps: int = 1500,
    batch_size: int = 8,
    vision_batch_size: int = 16,
    max_turns: int = 10,
    lr: float = 1.5e-3,
    warmup: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    aux_weight: float = 0.5,
    log_every: int = 20,
    save_every: int = 250,
    init: Path | None = None,
    first_seed: int = 0,
    head_warmup: int = 0,
    kind_weights: dict[str, float] | None = None,
    scene_weights: dict[str, float] | None = None,
) -> Path:
    """Train and write the checkpoint to out_dir. `init`: continue from a checkpoint this script wrote (its
    weights; fresh optimizer and region heads), usually with vision_steps=0 and `first_seed` past the seeds its
    run used, so that the continuation sees new examples; `head_warmup` steps then fit the fresh heads alone.
    `kind_weights`: loss weight of the answer tokens of a question kind (default 1), for the kinds that lag;
    `scene_weights`: how often each kind's scenes are drawn (see data.conversation)."""
    torch.manual_seed(seed)
    if first_seed + steps * batch_size + vision_steps * vision_batch_size > data.HELDOUT_SEED:
        raise ValueError("training would use held-out seeds: fewer steps or smaller batches")
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = write_tokenizer(out_dir)
    tokenizer = load_fast(out_dir)
    config = copy.deepcopy(DEMO_CONFIG)
    text = config["llm_config"]
    text.update(vocab_size=max(specials.values()) + 1, bos_token_id=specials["<|endoftext|>"], eos_token_id=specials["<|im_end|>"])
    spec = ModelSpec.from_config(config)
    if init is None:
        model = random_model(spec, specials["<IMG_CONTEXT>"], seed).train()
        init_vision_embeddings_(model, torch.Generator().manual_seed(seed))
    else:
        from ..checkpoint import load

        model = load(Path(init)).model.train().requires_grad_(True)  # load() gives an inference model
        if model.config.text_config.vocab_size != config["llm_config"]["vocab_size"]:
            raise ValueError(f"{init} was trained with another tokenizer")
    model.config._attn_implementation = "sdpa"
    params = sum(p.numel() for p in model.parameters())
    print(f"demo model: {params / 1e6:.2f}M parameters, {spec.num_image_tokens} image tokens per tile", flush=True)
    heads = regions.RegionHeads(spec.text.hidden_size, spec.vision.grid // spec.shuffle_factor)
    start = time.time()
    pretrain_vision(model, heads, spec, vision_steps, lr, vision_batch_size, log_every)
    if head_warmup:
        pretrain_vision(model, heads, spec, head_warmup, lr, vision_batch_size, log_every, heads_only=True)

    # Stage 2: the whole model on conversations, the region loss kept on as a regulariser of the features.
    image_embeds = []  # the projector's output of the current step, (tiles, tokens, hidden)
    model.model.multi_modal_projector.register_forward_hook(lambda module, args, out: image_embeds.append(out))
    named = [*model.named_parameters(), *heads.named_parameters()]
    optimizer = make_optimizer(named, lr)
    meter = Meter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        seeds = range(first_seed + step * batch_size, first_seed + (step + 1) * batch_size)
        difficulty = curriculum(step, steps) if init is None else (data.MAX_SHAPES, 1.0)  # a continuation: no ramp
        batch, kinds, targets = make_batch(seeds, tokenizer, spec, max_turns, specials["<|endoftext|>"], difficulty, scene_weights)
        image_embeds.clear()
        labels = batch.pop("labels")
        out = model(**batch)
        loss = answer_loss(out.logits, labels, kinds, kind_weights or {})
        aux = heads.loss(image_embeds[0], targets)
        (loss + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():  # answer-token accuracy per kind: the logits at t predict the token at t + 1
            predicted = out.logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            counts: dict[str, list[int]] = {k: [0, 0] for k in data.KINDS}
            answers = (target != -100) & (target != specials["<|im_end|>"])
            for b, t in zip(*torch.nonzero(answers, as_tuple=True)):
                kind = kinds[b][t + 1]
                counts[kind][0] += int(predicted[b, t] == target[b, t])
                counts[kind][1] += 1
        meter.add({"loss": loss.item(), "aux": aux.item()}, {k: tuple(v) for k, v in counts.items()})
        if (step + 1) % log_every == 0 or step + 1 == steps:
            shapes, grow = difficulty
            print(
                f"step {step + 1}/{steps} {meter.line()} | lr {optimizer.param_groups[0]['lr']:.2e} shapes<={shapes} "
                f"x{grow:.2f} | {(time.time() - start) / 60:.1f} min",
                flush=True,
            )
            meter = Meter()
        if (step + 1) % save_every == 0 and step + 1 < steps:
            write_original_checkpoint(model, config, out_dir, dtype=dtype)
    write_original_checkpoint(model, config, out_dir, dtype=dtype)
    print(f"saved {out_dir} after {(time.time() - start) / 60:.1f} min", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=1500, help="conversation steps (stage 2)")
    parser.add_argument("--vision-steps", type=int, default=1500, help="vision pretraining steps (stage 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--turns", type=int, default=10, help="most questions per image")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weights as saved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (leave a core for others)")
    parser.add_argument("--init", type=Path, default=None, help="continue from this checkpoint's weights")
    parser.add_argument("--first-seed", type=int, default=0, help="first training seed of stage 2")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--head-warmup", type=int, default=0, help="steps fitting fresh region heads alone before stage 2")
    parser.add_argument("--kind-weight", action="append", default=[], metavar="KIND=W", help="loss weight of a question kind's answers")
    parser.add_argument("--scene-weight", action="append", default=[], metavar="KIND=W", help="how often scenes for a question kind are drawn")
    args = parser.parse_args(argv)

    def weights(items: list[str], flag: str) -> dict[str, float]:
        out = {}
        for item in items:
            kind, _, weight = item.partition("=")
            if kind not in data.KINDS or not weight:
                parser.error(f"{flag} {item!r}: expected KIND=W with KIND one of {', '.join(data.KINDS)}")
            out[kind] = float(weight)
        return out

    torch.set_num_threads(args.threads)
    train(
        args.out,
        steps=args.steps,
        vision_steps=args.vision_steps,
        batch_size=args.batch_size,
        max_turns=args.turns,
        lr=args.lr,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        init=args.init,
        first_seed=args.first_seed,
        warmup=args.warmup,
        head_warmup=args.head_warmup,
        kind_weights=weights(args.kind_weight, "--kind-weight"),
        scene_weights=weights(args.scene_weight, "--scene-weight"),
    )


if __name__ == "__main__":
    main()
