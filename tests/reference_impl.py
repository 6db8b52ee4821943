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


# --- modeling_internlm2.py (InternLM2ForCausalLM, eager attention) and modeling_intern_vit.py, transcribed -------
# Both read the checkpoint's own original-layout tensors (wqkv, attn.qkv, ...), so they share nothing with the
# package's rename table or with transformers' Llama / InternVLVision modules.


def _rms(x, weight, eps):
    """InternLM2RMSNorm / InternRMSNorm: variance in fp32, weight times the normalised input."""
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def internlm2_logits(sd, llm, inputs_embeds, attention_mask=None, position_ids=None):
    """InternLM2ForCausalLM.forward on inputs_embeds (b, s, H): every position's logits (b, s, vocab).

    InternLM2RotaryEmbedding (the dynamic NTK variant is the same up to max_position_embeddings): cos/sin tables of
    cat(freqs, freqs) indexed by position_ids; wqkv rearranged 'b q (h gs d) -> b q h gs d' with gs = 2 + groups;
    repeat_kv; scores / sqrt(d) plus the 4-D causal + padding mask; softmax in fp32; wo; SwiGLU w2(silu(w1) * w3).
    """
    b, s, hidden = inputs_embeds.shape
    nh, nkv = llm["num_attention_heads"], llm["num_key_value_heads"]
    d, groups, eps = hidden // nh, nh // nkv, llm["rms_norm_eps"]
    if attention_mask is None:
        attention_mask = torch.ones(b, s, dtype=torch.long)
    if position_ids is None:
        position_ids = torch.arange(s).expand(b, s)
    inv_freq = 1.0 / (llm["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    t = torch.arange(llm["max_position_embeddings"]).float()
    emb = torch.cat([torch.einsum("i,j->ij", t, inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos()[position_ids].unsqueeze(1), emb.sin()[position_ids].unsqueeze(1)  # (b, 1, s, d)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    allowed = causal[None] & attention_mask[:, None, :].bool()  # (b, s, s)
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]  # (b, 1, s, s)
    x = inputs_embeds.float()
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        h = _rms(x, sd[p + "attention_norm.weight"], eps)
        qkv = (h @ sd[p + "attention.wqkv.weight"].T).view(b, s, nkv, 2 + groups, d)
        q = qkv[..., :groups, :].reshape(b, s, nh, d).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k[:, :, None].expand(b, nkv, groups, s, d).reshape(b, nh, s, d)  # repeat_kv
        v = v[:, :, None].expand(b, nkv, groups, s, d).reshape(b, nh, s, d)
        scores = q @ k.transpose(2, 3) / (d ** 0.5) + mask
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, hidden)
        x = x + out @ sd[p + "attention.wo.weight"].T
        h = _rms(x, sd[p + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(h @ sd[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    x = _rms(x, sd["language_model.model.norm.weight"], eps)
    return x @ sd["language_model.output.weight"].T


def intern_vit_features(sd, vision, pixel_values):
    """InternVisionModel(...).last_hidden_state: patch conv + CLS + position embedding, then per layer
    x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)); norm1/norm2 LayerNorm or InternRMSNorm per norm_type;
    attention from the fused qkv (reshape(B, N, 3, H, D)), with q_norm/k_norm over all heads when qk_normalization."""
    eps, heads = vision["layer_norm_eps"], vision["num_attention_heads"]

    def norm(x, name):
        if vision["norm_type"] == "rms_norm":
            return _rms(x, sd[name + ".weight"], eps)
        return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    e = "vision_model.embeddings."
    x = torch.nn.functional.conv2d(pixel_values, sd[e + "patch_embedding.weight"], sd[e + "patch_embedding.bias"],
                                   stride=vision["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[e + "class_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + sd[e + "position_embedding"]
    B, N, C = x.shape
    D = C // heads
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        h = norm(x, p + "norm1")
        qkv = h @ sd[p + "attn.qkv.weight"].T
        if p + "attn.qkv.bias" in sd:
            qkv = qkv + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(B, N, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)
        if vision["qk_normalization"]:
            q = _rms(q.transpose(1, 2).flatten(-2, -1), sd[p + "attn.q_norm.weight"], eps).view(B, N, heads, D).transpose(1, 2)
            k = _rms(k.transpose(1, 2).flatten(-2, -1), sd[p + "attn.k_norm.weight"], eps).view(B, N, heads, D).transpose(1, 2)
        attn = torch.softmax((q * D ** -0.5) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + sd[p + "ls1"] * out
        h = norm(x, p + "norm2")
        h = torch.nn.functional.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + sd[p + "ls2"] * (h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"])
    return x


def pixel_shuffle(x, scale_factor=0.5):
    """InternVLChatModel.pixel_shuffle with ps_version v2."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def extract_feature(sd, vision, pixel_values):
    """InternVLChatModel.extract_feature (select_layer -1, downsample_ratio 0.5): the image embeds (tiles, 256, H)."""
    vit_embeds = intern_vit_features(sd, vision, pixel_values)[:, 1:, :]
    h = w = int(vit_embeds.shape[1] ** 0.5)
    vit_embeds = pixel_shuffle(vit_embeds.reshape(vit_embeds.shape[0], h, w, -1))
    vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
    x = torch.nn.functional.layer_norm(vit_embeds, vit_embeds.shape[-1:], sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    x = torch.nn.functional.gelu(x @ sd["mlp1.1.weight"].T + sd["mlp1.1.bias"])
    return x @ sd["mlp1.3.weight"].T + sd["mlp1.3.bias"]


def internlm2_greedy(sd, config, ids, pixel_values, image_token_id, new_tokens, stop_ids=()):
    """InternVLChatModel.generate with do_sample=False: splice the image embeds over <IMG_CONTEXT>, then greedy
    decoding by recomputing the whole sequence each step (no cache, so no cache code is shared with the graphs)."""
    ids_t = torch.tensor(ids)
    embeds = sd["language_model.model.tok_embeddings.weight"][ids_t].clone()
    if pixel_values is not None:
        vit = extract_feature(sd, config["vision_config"], pixel_values)
        embeds[ids_t == image_token_id] = vit.reshape(-1, embeds.shape[-1])
    out = []
    for _ in range(new_tokens):
        logits = internlm2_logits(sd, config["llm_config"], embeds[None])
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
        embeds = torch.cat([embeds, sd["language_model.model.tok_embeddings.weight"][token][None]])
    return out


def sentencepiece_ids(sp, added: dict[str, int], text: str, bos: int | None) -> list[int]:
    """InternLM2Tokenizer's tokenizer(text): <s>, then the added tokens split out (longest first) and every other
    stretch through sp_model.encode."""
    import re

    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
    ids = [] if bos is None else [bos]
    for chunk in pattern.split(text):
        if chunk in added:
            ids.append(added[chunk])
        elif chunk:
            ids += sp.encode(chunk)
    return ids
