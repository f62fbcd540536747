"""Tiny stand-ins every family's tiny builder shares (no downloads; never imported by the app).

The families' `tiny.py` builders (tests, benchmarks) build their text encoders and tokenizers from
these: a byte-level CLIP tokenizer and CLIP text encoders, a word-level T5 tokenizer, a BPE
tokenizer with a ChatML template (the Qwen-style chat encoders), and a small captioned image
folder to train on. Shared here, like `dit/`, so no family package imports another.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The word list of the T5 stand-in (FLUX, Chroma, SD3): every caption the tests write tokenizes.
T5_WORDS = [
    "a", "photo", "of", "the", "red", "blue", "green", "thing", "cat", "dog", "on", "in", "with", "and",
    "tiny", "flux", "learns", "one", "image", "sks", "person", "style", "painting", "big", "small",
]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_CORPUS = [
    "The Kestrel K7 flies for 47 minutes on a full battery.",
    "What is the top speed? It reaches 83 km/h in Sport mode.",
    "user assistant system question answer prompt response",
    "How long does the battery take to charge? About 72 minutes.",
    "Please explain the warranty, the weight and the camera resolution.",
    "Hello! How can I help you today? Thank you, goodbye.",
]


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(pad_token: str = "<|endoftext|>"):
    """A real CLIPTokenizer over a byte-level vocabulary of ~514 tokens (no merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = _bytes_to_unicode()
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)


def clip_text_encoder(hidden: int, *, projection: int | None = None, vocab: int = 514, seed: int = 0):
    """A 2-layer CLIP text encoder of width `hidden` (with a projection: CLIP-G's kind)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            projection_dim=projection or hidden, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def tiny_t5_tokenizer():
    """A T5-like fast tokenizer: word-level vocabulary, <pad>=0, </s>=1 appended, <unk>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in T5_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def tiny_t5(d_model: int, *, d_kv: int, d_ff: int, seed: int = 5):
    """A 2-layer T5 encoder over `T5_WORDS` (the FLUX / SD3 T5-XXL stand-in)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(T5_WORDS) + 3, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def chat_bpe_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CHAT_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def make_image_folder(folder: Path, count: int = 6, *, size: tuple[int, int] = (64, 64),
                      captions: bool = True) -> Path:
    """A small folder of coloured images with metadata.csv captions (deterministic)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["filename,prompt"]
    for i in range(count):
        w, h = size if i % 3 else (size[0] + 32, size[1])  # one wide image per three
        base = rng.integers(0, 255, size=3)
        pixels = (np.linspace(0, 1, w)[None, :, None] * base[None, None, :]).repeat(h, 0)
        pixels = (pixels + rng.integers(0, 40, size=(h, w, 3))).clip(0, 255).astype("uint8")
        name = f"img_{i:02d}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append(f"{name},a photo of a red thing number {i}")
    if captions:
        (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def save_state_files(files: dict[Path, dict[str, torch.Tensor]]) -> Path:
    """Each state dict as a .safetensors file (folders made, tensors contiguous, written atomically): how the
    tiny builders lay out ComfyUI's models/ folder. Returns the first file's path (the diffusion model's)."""
    from safetensors.torch import save_file

    from core.atomic import atomic_path

    for path, state in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return next(iter(files))


def save_tiny_layouts(pipe: Any, root: Path, folder_name: str, files: dict[str, dict[str, torch.Tensor]]
                      ) -> tuple[Path, Path, Path]:
    """A tiny pipeline as a diffusers folder (`root/folder_name`) and in ComfyUI's layout: `files` maps paths under
    root/ComfyUI/models (the diffusion model's first) to their state dicts. Returns (the folder, the diffusion
    model's file, the models/ folder)."""
    folder = Path(root) / folder_name
    pipe.save_pretrained(folder)
    models = Path(root) / "ComfyUI" / "models"
    return folder, save_state_files({models / name: state for name, state in files.items()}), models


def diffusion_model_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer state under the `model.diffusion_model.` prefix of ComfyUI's checkpoints."""
    return {f"model.diffusion_model.{k}": v for k, v in state.items()}


def tiny_flow_vae(latent_channels: int, scaling_factor: float):
    """diffusers' tiny AE of the flow families' tests: one block (no downscale), `latent_channels` out."""
    from diffusers import AutoencoderKL

    torch.manual_seed(6)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=scaling_factor)
