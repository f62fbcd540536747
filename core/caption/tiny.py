"""Tiny captioners and a small mixed photo folder, built without any download.

`build_tiny_blip` saves a real `BlipForConditionalGeneration` + `BlipProcessor` (a BERT
tokenizer over a ~100-token vocabulary) saved with `save_pretrained`, so tests load it
through the same `load_captioner(<folder>)` path users take. `build_tiny_git`,
`build_tiny_florence2`, `build_tiny_llava` and `build_tiny_idefics3` (SmolVLM's architecture) do the same
for the other families. Random
weights give random words: tests check structure, never content.

`caption_photo_folder` holds real photographs from scikit-image shrunk to <= 128 px in the
modes users drop in folders (grey, RGBA, CMYK, 16-bit, EXIF-rotated, non-square) plus a
corrupt JPEG and a non-image file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "cat", "dog", "man", "woman", "girl", "boy",
    "red", "blue", "green", "white", "black", "small", "large", "photo", "picture", "image", "drawing",
    "painting", "person", "people", "car", "tree", "sky", "field", "street", "table", "cup", "coffee",
    "rocket", "space", "city", "building", "water", "sea", "sitting", "standing", "holding", "looking",
    "grass", "wall", "door", "window", "face", "hair", "eyes", "hat", "shirt", "dress", "flower",
    "plant", "book", "laptop", "phone", "camera", "light", "dark", "bright", "old", "young", "two",
    "three", "many", "one", "front", "back", "top", "side", "near", "next", "to", "over", "under",
    "sun", "moon", "cloud", "road", "ship",
]


def skimage_data_dir() -> Path:
    """The folder of sample photographs that ships inside the installed scikit-image."""
    import skimage

    return Path(skimage.__file__).resolve().parent / "data"


def build_tiny_blip(folder: Path, *, image_size: int = 32, seed: int = 2) -> Path:
    """Save a randomly initialised tiny BLIP captioner (model + processor) to `folder`."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL_TOKENS + list(dict.fromkeys(WORDS))
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ids = {token: index for index, token in enumerate(vocab)}
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, bos_token="[DEC]",
                              model_max_length=64)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    text_config = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
                       bos_token_id=ids["[DEC]"], pad_token_id=ids["[PAD]"], sep_token_id=ids["[SEP]"],
                       eos_token_id=ids["[SEP]"], initializer_range=0.5)
    vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=image_size, patch_size=8, initializer_range=0.5)
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _shrink(image: Image.Image, longest: int = 128) -> Image.Image:
    image = image.copy()
    image.thumbnail((longest, longest))
    return image


def build_mixed_photo_folder(folder: Path) -> dict[str, list[str]]:
    """Fill `folder` with photos in many modes plus broken files; returns good and bad names."""
    data = skimage_data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    good: list[str] = []

    def save(name: str, image: Image.Image, **kwargs) -> None:
        image.save(folder / name, **kwargs)
        good.append(name)

    save("camera_grey.png", _shrink(Image.open(data / "camera.png")))                       # L
    save("astronaut.png", _shrink(Image.open(data / "astronaut.png")))                      # RGB square
    save("coffee, cup.jpg", _shrink(Image.open(data / "coffee.png").convert("RGB")), quality=90)
    save("logo_rgba.png", _shrink(Image.open(data / "logo.png").convert("RGBA")))           # RGBA
    save("rocket_tall.jpg", _shrink(Image.open(data / "rocket.jpg")))                       # non-square
    save("chelsea_cmyk.jpg", _shrink(Image.open(data / "chelsea.png").convert("RGB")).convert("CMYK"))
    grey16 = np.asarray(_shrink(Image.open(data / "camera.png")), dtype=np.uint16) * 257
    save("camera_16bit.png", Image.fromarray(grey16))                                       # I;16
    rotated = _shrink(Image.open(data / "astronaut.png")).resize((96, 64))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 CW when shown"
    save("astronaut_exif.jpg", rotated, exif=exif)

    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    return {"good": sorted(good), "bad": ["broken.jpg"]}


# -- the other families, smaller still: GIT, native Florence-2 and a LLaVA-style chat VLM ---------

def build_tiny_git(folder: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised tiny GIT captioner (`GitForCausalLM` + `GitProcessor`)."""
    import torch
    from transformers import (BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM,
                              GitProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL_TOKENS + list(dict.fromkeys(WORDS))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ids = {token: index for index, token in enumerate(vocab)}
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, model_max_length=64)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = GitConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=image_size, patch_size=8,
                                          initializer_range=0.5),
                       vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, initializer_range=0.5,
                       bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"])
    torch.manual_seed(seed)
    GitForCausalLM(config).eval().save_pretrained(folder)
    return folder


CHAT_TEMPLATE = ("{% for message in messages %}USER: {% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}"
                 "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_tiny_llava(folder: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny LLaVA-style chat VLM (CLIP vision + Llama text) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)

    folder.mkdir(parents=True, exist_ok=True)
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = ["USER:", "ASSISTANT:", "Describe", "this", "image", "in", "detail."] + list(dict.fromkeys(WORDS))
    # ("image" and "in" are in WORDS too: ids are counted without repeats, so every id is < vocab_size)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(special + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>",
                                        additional_special_tokens=["<image>"], model_max_length=256)
    patches = (image_size // 8) ** 2
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    processor.save_pretrained(folder)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=8,
                           projection_dim=32, initializer_range=0.5),
        text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                         pad_token_id=vocab["<pad>"], initializer_range=0.5),
        image_token_index=vocab["<image>"], image_seq_length=patches, vision_feature_layer=-1,
        vision_feature_select_strategy="default", pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


def build_tiny_florence2(folder: Path, *, image_size: int = 64, seed: int = 0) -> Path:
    """Save a tiny native Florence-2 (DaViT vision + BART text) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor, PreTrainedTokenizerFast)

    folder.mkdir(parents=True, exist_ok=True)
    special = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    words = ["Describe", "in", "detail", "what", "is", "shown", "the", "image."] + list(dict.fromkeys(WORDS))
    vocab = {token: index for index, token in enumerate(dict.fromkeys(special + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"}, model_max_length=256)
    # DaViT downsamples by 4*2*2*2 = 32: a 64 px image gives 2x2 tokens plus one pooled token.
    tokens = (image_size // 32) ** 2 + 1
    image_processor = CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                         image_seq_length=tokens)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = Florence2Config(
        vision_config=dict(depths=(1, 1, 1, 1), embed_dim=(16, 16, 32, 32), num_heads=(2, 2, 2, 2),
                           num_groups=(2, 2, 2, 2), window_size=2, projection_dim=32, drop_path_rate=0.0,
                           max_position_embeddings=8, max_temporal_embeddings=4, initializer_range=0.5),
        text_config=dict(model_type="bart", vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=64, bos_token_id=vocab["<s>"],
                         pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"],
                         decoder_start_token_id=vocab["</s>"], init_std=0.5),
        image_token_id=vocab["<image>"])
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


IDEFICS3_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}:{% for part in message['content'] %}"
                     "{% if part['type'] == 'image' %}<image>{% else %} {{ part['text'] }}{% endif %}{% endfor %}"
                     "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def build_tiny_idefics3(folder: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny SmolVLM-style chat VLM (Idefics3: SigLIP vision, pixel-shuffle connector, Llama text).

    Its processor splits larger images into tiles plus a global view, as SmolVLM's does, with the
    row/column and <fake_token_around_image> markers and <end_of_utterance> ending each turn.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                              PreTrainedTokenizerFast)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    markers = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + \
        [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    special = ["<unk>", "<s>", "</s>", "<pad>", *markers]
    words = ["User:", "Assistant:", "Describe", "this", "image", "in", "detail."] + list(WORDS)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(special + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="<end_of_utterance>", pad_token="<pad>",
                                        additional_special_tokens=markers, model_max_length=1024)
    patch, scale = 8, 2
    image_seq_len = (image_size // patch) ** 2 // scale ** 2
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * image_size},
                                                max_image_size={"longest_edge": image_size}, do_image_splitting=True)
    Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                      chat_template=IDEFICS3_TEMPLATE).save_pretrained(folder)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch, initializer_range=0.5),
        text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=vocab["<s>"],
                         eos_token_id=vocab["<end_of_utterance>"], pad_token_id=vocab["<pad>"], initializer_range=0.5),
        scale_factor=scale, image_token_id=vocab["<image>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder
