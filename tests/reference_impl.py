"""An independent transcription of the InternVL2.5 model card and InternVLChatModel code paths, for parity tests.

Written from the reference (model card `load_image`/`dynamic_preprocess`/`get_index`, conversation.py's
internvl2_5 template with SeparatorStyle.MPT, `chat()`/`batch_chat()` prompt assembly), using PIL and torch as
torchvision's transforms do. It shares no code with vl_export.runtime.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


# --- model card: image loading -------------------------------------------------------------------------------


def build_transform(input_size):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def transform(img):
        img = img.convert("RGB") if img.mode != "RGB" else img
        if img.size != (input_size, input_size):  # T.Resize((s, s), BICUBIC) on a PIL image
            img = img.resize((input_size, input_size), Image.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # T.ToTensor
        x = x.float().div(255)
        return x.sub(mean).div(std)  # T.Normalize

    return transform


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def load_image(image, input_size=448, max_num=12, use_thumbnail=True):
    image = image.convert("RGB")
    transform = build_transform(input_size=input_size)
    images = dynamic_preprocess(image, image_size=input_size, use_thumbnail=use_thumbnail, max_num=max_num)
    return torch.stack([transform(im) for im in images])


def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array([int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)])


# --- conversation.py: internvl2_5 with SeparatorStyle.MPT ------------------------------------------------------


class Conversation:
    system_template = "<|im_start|>system\n{system_message}"
    roles = ("<|im_start|>user\n", "<|im_start|>assistant\n")
    sep = "<|im_end|>\n"

    def __init__(self, system_message=SYSTEM):
        self.system_message = system_message
        self.messages = []

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self):
        system_prompt = self.system_template.format(system_message=self.system_message)
        ret = system_prompt + self.sep
        for role, message in self.messages:
            if message:
                ret += role + message + self.sep
            else:
                ret += role
        return ret


def chat_query(question, num_patches_list, history=None, num_image_token=256, system_message=SYSTEM):
    """InternVLChatModel.chat() up to the tokenizer call; returns (query, question as stored in history)."""
    if history is None and num_patches_list and "<image>" not in question:
        question = "<image>\n" + question
    template = Conversation(system_message)
    for old_question, old_answer in history or []:
        template.append_message(template.roles[0], old_question)
        template.append_message(template.roles[1], old_answer)
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    query = template.get_prompt()
    for num_patches in num_patches_list:
        image_tokens = "<img>" + "<IMG_CONTEXT>" * num_image_token * num_patches + "</img>"
        query = query.replace("<image>", image_tokens, 1)
    return query, question


def batch_queries(questions, num_patches_list, num_image_token=256):
    """InternVLChatModel.batch_chat()'s queries (pixel_values given for every question)."""
    queries = []
    for idx, num_patches in enumerate(num_patches_list):
        question = questions[idx]
        if "<image>" not in question:
            question = "<image>\n" + question
        template = Conversation()
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = template.get_prompt()
        image_tokens = "<img>" + "<IMG_CONTEXT>" * num_image_token * num_patches + "</img>"
        queries.append(query.replace("<image>", image_tokens, 1))
    return queries


def hf_generate(model, tokenizer, queries, pixel_values, max_new_tokens, stop_ids, pad_id):
    """transformers' generate fed the reference's ids (left-padded) and pixel_values; new tokens per row."""
    rows = [tokenizer.encode(q, add_special_tokens=False) for q in queries]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=list(stop_ids), pad_token_id=pad_id, **images,
        )
    result = []
    for row in out[:, width:].tolist():
        tokens = []
        for t in row:
            tokens.append(t)
            if t in stop_ids:
                break
        result.append(tokens)
    return result
