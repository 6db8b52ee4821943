"""The PyTorch reference: transformers' InternVL2.5 fed exactly what the original chat() would feed it.

`verify` compares a bundle against it stage by stage and `bench` times it. Its image preprocessing is the model
card's torchvision pipeline written in torch ops (ToTensor, Normalize) over PIL's resize and crop; the tiling
geometry is the card's dynamic_preprocess.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vl_export.runtime import prompt as prompts
from vl_export.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, closest_grid, load_image, target_grids

from . import checkpoint
from .tokenizer import checkpoint_tokenizer


def card_pixel_values(image, image_size: int = 448, max_num: int = 12, use_thumbnail: bool = True) -> torch.Tensor:
    """The model card's load_image: dynamic_preprocess, then T.Resize/ToTensor/Normalize per tile."""
    image = load_image(image)
    cols, rows = closest_grid(image.width, image.height, target_grids(1, max_num), image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [resized.crop(((i % cols) * image_size, (i // cols) * image_size,
                           (i % cols + 1) * image_size, (i // cols + 1) * image_size)) for i in range(cols * rows)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for tile in tiles:
        if tile.size != (image_size, image_size):
            tile = tile.resize((image_size, image_size), Image.BICUBIC)
        x = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        out.append(x.sub(mean).div(std))
    return torch.stack(out)  # (tiles, 3, 448, 448)


class Reference:
    def __init__(self, model: str | checkpoint.Checkpoint, attention: str = "eager"):
        self.ck = model if isinstance(model, checkpoint.Checkpoint) else checkpoint.load(checkpoint.resolve(model))
        self.model = self.ck.model
        self.model.set_attn_implementation(attention)
        self.tokenizer = checkpoint_tokenizer(self.ck.path)
        self.spec = self.ck.spec
        # InternLM2 tokenizers have no <|endoftext|>; their end of text (and pad) is </s>.
        end = prompts.END_OF_TEXT if prompts.END_OF_TEXT in _vocab_tokens(self.tokenizer) else prompts.EOS
        self.stop_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in (prompts.IM_END, end)]

    def pixel_values(self, images: list, max_tiles: int | None = None) -> tuple[torch.Tensor, list[int]]:
        per_image = [card_pixel_values(im, self.spec.image_size, max_tiles or self.spec.max_dynamic_patch,
                                       self.spec.use_thumbnail) for im in images]
        return torch.cat(per_image), [len(p) for p in per_image]

    def prompt_ids(self, question: str, tiles_per_image: list[int], history=()) -> list[int]:
        text = prompts.render(prompts.with_placeholders(question, len(tiles_per_image), history), history)
        text = prompts.expand_images(text, tiles_per_image, self.spec.num_image_tokens)
        # chat() calls tokenizer(query) with its special tokens: nothing for Qwen2, <s> first for InternLM2.
        return self.tokenizer.encode(text, add_special_tokens=True)

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.model.vision_tower(pixel_values=pixel_values).last_hidden_state

    @torch.no_grad()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_image_features(pixel_values=pixel_values).pooler_output

    @torch.no_grad()
    def inputs_embeds(self, ids: list[int], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """The original generate(): embed, then overwrite the <IMG_CONTEXT> rows."""
        ids_t = torch.tensor(ids)
        embeds = self.model.model.language_model.embed_tokens(ids_t)
        if image_embeds is not None:
            embeds[ids_t == self.ck.image_token_id] = image_embeds.reshape(-1, embeds.shape[-1])
        return embeds  # (s, hidden)

    @torch.no_grad()
    def generate(self, ids: list[int], pixel_values: torch.Tensor | None, new_tokens: int, ignore_eos: bool = False) -> list[int]:
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens if ignore_eos else None,
                                  do_sample=False, eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[1])
        return out[0, len(ids):].tolist()

    @torch.no_grad()
    def logits(self, inputs_embeds: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of one sequence: (keep, vocab)."""
        out = self.model(inputs_embeds=inputs_embeds[None], logits_to_keep=keep)
        return out.logits[0]


def _vocab_tokens(tokenizer) -> set[str]:
    decoder = tokenizer.added_tokens_decoder
    return {t if isinstance(t, str) else t.content for t in decoder.values()}
