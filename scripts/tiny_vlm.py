#!/usr/bin/env python3
"""Build a tiny, random-weight Qwen2.5-VL checkpoint for end-to-end tests.

    python scripts/tiny_vlm.py OUT_DIR
    python scripts/tiny_vlm.py --vllm OUT_DIR   # the variant vLLM's CPU build serves

Writes to OUT_DIR, with no network access:

* config.json / generation_config.json / model.safetensors: a
  Qwen2_5_VLForConditionalGeneration with 2 text layers (hidden 64) and a
  1-block vision tower (hidden 32), random weights (about 0.23 M parameters, 0.9 MB);
* tokenizer.json / tokenizer_config.json: a byte-level BPE (Qwen2 pre-tokenizer)
  trained locally on built-in text, plus the Qwen2-VL special tokens;
* chat_template.jinja: a Qwen2-VL style chat template that renders OpenAI-style
  messages (string content, or lists of text / image / image_url / video parts);
* processor_config.json (+ image/video processor settings): small pixel bounds,
  so a 64x64 image becomes 4 image tokens and a 128x128 one 16.

With --vllm the text model is hidden 128 with 2 heads of 64 (vLLM's CPU
attention takes head sizes 32, 64, 80, ...; not the default's 16), MRoPE
sections [8, 12, 12], and greedy decoding yields only tokens with a letter or
digit in them; everything else is as above (about 0.57 M parameters, 2.3 MB).

Everything is seeded, so two runs give identical files.  The output is meant to
be served by `transformers serve OUT_DIR` (transformers[serving]) and loaded with
AutoProcessor / AutoModelForImageTextToText.  It generates garbage text, fast.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

# No hub access is wanted or possible: fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SEED = 1234

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4  # head_dim 16 -> rotary half-dim 8 = sum(MROPE_SECTION)
TEXT_KV_HEADS = 2
MROPE_SECTION = [2, 3, 3]
VISION_HIDDEN = 32
VISION_HEADS = 2
VISION_DEPTH = 1
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Pixel bounds of the resized image (multiples of (PATCH_SIZE*MERGE_SIZE)^2 = 28^2):
# 64x64 -> 56x56 -> 4 image tokens; 128x128 (or anything larger) -> 112x112 -> 16 tokens.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112
BPE_VOCAB = 600  # learned BPE vocabulary (256 byte symbols + merges)
# Greedy decoding picks only tokens with a letter or digit (see build_model).
ALNUM_ONLY = False

# --vllm: shapes vLLM's CPU backend accepts (its decoder attention supports
# head sizes 32, 64, 80, 96, 112, 128, ...; the vision tower uses torch SDPA).
VLLM_SHAPES = dict(
    TEXT_HIDDEN=128,
    TEXT_HEADS=2,  # head_dim 64 -> rotary half-dim 32 = sum(MROPE_SECTION)
    TEXT_KV_HEADS=2,
    MROPE_SECTION=[8, 12, 12],
    # this model's greedy text for med3d's prompts is sometimes all punctuation
    # ("-|||||||"), which med3d flags `empty` and asks again for
    ALNUM_ONLY=True,
)

# Special tokens of Qwen2-VL, in Qwen's order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Added, non-special tokens (as in Qwen2.5's tokenizer).
EXTRA_TOKENS = ["<tool_call>", "</tool_call>"]

# Qwen2-VL style chat template.  Every newline is emitted by an expression, so the
# result does not depend on Jinja's trim_blocks / lstrip_blocks settings.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content is string -%}"
    "{{- content -}}"
    "{%- elif content['type'] in ['image', 'image_url', 'input_image'] or 'image' in content"
    " or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] in ['video', 'video_url'] or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Built-in training text for the BPE (English captioning/medical-imaging flavoured).
CORPUS = """
Describe this image. What is shown in the picture? Write a short caption.
The image shows a grey scale slice of a brain MRI scan. An axial slice through the head.
A computed tomography (CT) image of the chest with the lungs, heart and ribs visible.
There is a bright region in the upper left and a dark region near the centre.
The picture is mostly black with a white circle in the middle. A square, a line, a dot.
This is a medical image: an X-ray, an ultrasound, a PET scan or a microscopy slide.
Tissue, bone, muscle, fat, fluid, vessel, lesion, tumour, edema, contrast, artefact.
Left, right, anterior, posterior, superior, inferior, sagittal, coronal, axial, oblique.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
You are a helpful assistant. The user asks a question and the assistant answers it.
Sure! Here is a caption: "A noisy grey image with a gradient from top to bottom."
Numbers 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024, 3.14, 42%, 1e-5, 2025-01-01.
Punctuation: ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ! ? , . ; : ' " ` ~
def main(): return {"type": "text", "text": "hello world"}  # JSON and code
Le scanner montre une coupe du cerveau. Das Bild zeigt einen Schnitt. La imagen muestra.
"""


def seed_everything(seed: int = SEED) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_bpe():
    """Train a byte-level BPE with Qwen2's normalizer / pre-tokenizer; return (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    # Repeat the corpus so frequent pairs dominate; order is fixed, so training is deterministic.
    tok.train_from_iterator(lines * 8, trainer=trainer)
    vocab = tok.get_vocab()
    # Merges from the serialized model (list of [a, b] pairs or "a b" strings, by version).
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    return vocab, merges


def build_tokenizer():
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = train_bpe()
    # Give the special tokens fixed ids right after the BPE vocabulary, in Qwen's order
    # (<|endoftext|> first, then <|im_start|>, <|im_end|>, ...), before the constructor
    # registers eos/pad itself.
    for tok in SPECIAL_TOKENS + EXTRA_TOKENS:
        vocab.setdefault(tok, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    return tokenizer


def build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(
        size=size,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
    )
    video_processor = Qwen2VLVideoProcessor(
        size=size,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=4096,
        max_window_layers=TEXT_LAYERS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        dtype="float32",
    )
    vision_config = dict(
        depth=VISION_DEPTH,
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_heads=VISION_HEADS,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        window_size=PATCH_SIZE * MERGE_SIZE * 4,
        out_hidden_size=TEXT_HIDDEN,
        fullatt_block_indexes=[VISION_DEPTH - 1],
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    # Random weights would sometimes pick <|im_end|> (or stray bytes) first and answer "".
    # Zero the output rows of every token that is not plain printable ASCII text (special
    # and added tokens, partial UTF-8 bytes, control characters, padding rows): their
    # logit is then exactly 0, below the max over ~400 random text logits, so greedy
    # decoding always yields printable text and runs until max_tokens.
    with torch.no_grad():
        keep = torch.zeros(vocab_size, dtype=torch.bool)
        for i in range(len(tokenizer)):
            if i in ids.values() or tokenizer.convert_ids_to_tokens(i) in EXTRA_TOKENS:
                continue
            text = tokenizer.decode([i])
            keep[i] = bool(text) and text.isascii() and text.isprintable()
            if ALNUM_ONLY:
                keep[i] = keep[i] and any(c.isalnum() for c in text)
        model.lm_head.weight[~keep] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def demo_image(size: int = 64):
    """A deterministic greyscale test pattern (gradient + square)."""
    from PIL import Image, ImageDraw

    img = Image.linear_gradient("L").resize((size, size))
    draw = ImageDraw.Draw(img)
    draw.rectangle([size // 4, size // 4, size // 2, size // 2], fill=255)
    return img


def self_check(out_dir: str) -> None:
    """Reload with the Auto classes and run one short greedy generate on CPU."""
    import time

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(out_dir)
    model = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32).eval()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": demo_image(64)}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    dt = time.perf_counter() - t0
    new = out[0, inputs["input_ids"].shape[1] :]
    print(
        f"self-check: {type(model).__name__}, {sum(p.numel() for p in model.parameters())} params, "
        f"prompt {inputs['input_ids'].shape[1]} tokens ({n_img} image), generated {len(new)} tokens "
        f"in {dt:.2f}s: {processor.decode(new, skip_special_tokens=False)!r}"
    )
    text = processor.decode(new, skip_special_tokens=True)
    if len(new) == 0 or not text.strip():
        raise SystemExit("self-check failed: no text generated")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="directory to write the checkpoint to (created if missing)")
    ap.add_argument("--no-check", action="store_true", help="skip the reload + generate self-check")
    ap.add_argument("--vllm", action="store_true", help="build the variant with shapes vLLM's CPU build accepts")
    args = ap.parse_args(argv)
    if args.vllm:
        globals().update(VLLM_SHAPES)

    seed_everything()
    os.makedirs(args.out_dir, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer)
    model.save_pretrained(args.out_dir)
    processor.save_pretrained(args.out_dir)
    print(f"wrote tiny Qwen2.5-VL to {args.out_dir} (vocab {len(tokenizer)}, model vocab {model.config.text_config.vocab_size})")
    if not args.no_check:
        self_check(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
