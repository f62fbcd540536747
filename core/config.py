"""TrainConfig: the one contract between the UI, the CLI and the engine.

The YAML a user saves from the Train tab runs unchanged with `train.py`, and the
reverse. Every key of the original tool keeps its name and meaning. Each field carries
its help text, group and allowed values in its metadata, so the GUI form and the
validation are derived from this file instead of being copied by hand.

Unknown keys, wrong types, missing paths and impossible values are refused before any
model loads, all at once, each naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from core.atomic import atomic_write_text

TASK_TYPES = ("image-generation", "text-generation")
PRECISIONS = ("no", "fp16", "bf16")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd")
LORA_VARIANTS = ("lora", "dora", "rslora", "pissa", "lokr", "loha")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
CAPTION_SOURCES = ("auto", "metadata", "txt")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
TIMESTEP_SAMPLINGS = ("auto", "shift", "sigmoid", "logit_normal", "uniform")
LORA_BLOCKS = ("all", "attention", "single_blocks")
BASE_QUANTIZATIONS = ("none", "nf4")
TEXT_METHODS = ("sft", "dpo", "orpo", "kto", "grpo", "vlm")
EVAL_MATCHES = ("contains", "exact")
EMA_DEVICES = ("auto", "cpu", "device")
DISTRIBUTED_MODES = ("ddp", "fsdp")
# The title of each field group, in the order the form's Advanced section and the README's
# key table show them (the form's accordions and tools/config_doc.py both read this one).
GROUP_TITLES = {
    "basic": "Common settings",
    "run": "Run: seed, steps, resume",
    "optim": "Optimizer and learning rate",
    "lora": "LoRA network",
    "data": "Image data and captions",
    "model": "Image model and noise",
    "flow": "Flow-matching transformers (FLUX.1, Chroma, ...)",
    "flux": "FLUX.1 and Chroma",
    "guidance": "Guidance-distilled models (FLUX.1-dev, Kontext, FLUX.2 dev)",
    "sample": "Sample previews",
    "text": "Text data and model",
    "eval": "Text evaluation: before and after",
    "output": "Output and logging",
    "advanced": "Other",
}
# Keys earlier versions wrote into every run's config.yaml but nothing ever read: accepted and
# dropped, so an old run's saved config still runs unchanged with train.py.
RETIRED_KEYS = frozenset({"num_workers"})


def _f(default: Any, help: str, group: str = "advanced", *, choices: tuple[str, ...] | None = None,
       minimum: float | None = None, maximum: float | None = None, task: str = "both") -> Any:
    """A dataclass field with the metadata the validator and the GUI form read."""
    meta = {"help": help, "group": group, "choices": choices, "min": minimum, "max": maximum, "task": task}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training setting. Groups: basic (up front in the GUI) and the rest under Advanced."""

    # --- the seed schema -------------------------------------------------------------
    train_data_dir: str = _f("", "Folder with the training images (or the text data file / folder).", "basic")
    metadata_path: str = _f("", "Captions file: metadata.csv (filename,prompt). Empty: <train_data_dir>/"
                            "metadata.csv if present, else .txt files beside the images.", "basic", task="image")
    base_model: str = _f("", "Base model: a .safetensors checkpoint, a diffusers/HF folder, a hub id, "
                         "or a GGUF file (text). Empty for text: the bundled SmolLM2-135M.", "basic")
    task_type: str = _f("image-generation", "What to train: an image LoRA (Stable Diffusion) or a text "
                        "LoRA (LLM).", "basic", choices=TASK_TYPES)
    lora_rank: int = _f(8, "LoRA rank (dim): capacity of the adapter. 4-16 for a style or a "
                        "character; higher learns more detail and more noise.", "basic", minimum=1, maximum=1024)
    lora_alpha: float = _f(16.0, "LoRA alpha: strength scale; the update is multiplied by alpha/rank.",
                           "basic", minimum=0.0)
    batch_size: int = _f(4, "Images (or examples) per step.", "basic", minimum=1, maximum=1024)
    epochs: int = _f(10, "Passes over the data set (ignored when max_train_steps is set).", "basic",
                     minimum=1, maximum=100000)
    learning_rate: float = _f(1e-4, "Learning rate of the LoRA weights. 1e-4 to 2e-4 for images, "
                              "1e-4 to 1e-3 for text.", "basic", minimum=0.0, maximum=1.0)
    output_dir: str = _f("./output/my_lora", "Where the results, checkpoints and samples go.", "basic")
    save_steps: int = _f(100, "Save a checkpoint every N optimizer steps (0: only at the end).", "basic",
                         minimum=0)
    resolution: int = _f(512, "Training resolution in pixels (multiple of 64). 512 for SD 1.x, "
                         "768 for SD 2.x, 1024 for SDXL.", "basic", minimum=64, maximum=4096, task="image")
    mixed_precision: str = _f("no", "Mixed precision: no (fp32), fp16, or bf16 (RTX 30xx and newer).",
                              "basic", choices=PRECISIONS)
    gradient_accumulation_steps: int = _f(1, "Steps whose gradients add up before one update; "
                                          "simulates a larger batch.", "basic", minimum=1, maximum=1024)

    # --- run -------------------------------------------------------------------------
    output_name: str = _f("", "File name of the LoRA (without .safetensors). Empty: the output folder's "
                          "name.", "basic")
    preset: str = _f("", "A preset from presets/ merged under your values, or 'auto' to pick one that "
                     "fits this machine's memory. Empty: none.", "basic")
    seed: int = _f(42, "Random seed: the same seed and data give the same run.", "run", minimum=0)
    max_train_steps: int = _f(0, "Stop after this many optimizer steps (0: use epochs).", "run", minimum=0)
    resume_from: str = _f("", "Continue a run: a checkpoint folder, 'latest' (newest checkpoint in "
                          "output_dir), or a LoRA .safetensors to keep training from its weights.", "run")
    init_lora: str = _f("", "Start from the weights of an existing LoRA file (incremental training).", "run")
    keep_checkpoints: int = _f(0, "Keep only the newest N checkpoints (0: keep all).", "run", minimum=0)
    auto_downshift: bool = _f(False, "On out-of-memory, retry from the last checkpoint with the next "
                              "smaller preset instead of stopping.", "run")
    allow_pickle: bool = _f(False, "Allow reading .ckpt/.bin/.pt files (pickles). Only their tensors are "
                            "read; a file that would run code is still refused.", "run")
    distributed: str = _f("ddp", "How several GPUs (processes) share the work: ddp (each holds the whole model) "
                          "or fsdp (the frozen base is split over the GPUs: a model too big for one GPU trains "
                          "on several). One process: no difference.", "run", choices=DISTRIBUTED_MODES)

    # --- optimizer -------------------------------------------------------------------
    optimizer: str = _f("adamw", "Optimizer. adamw8bit saves memory (needs bitsandbytes).", "optim",
                        choices=OPTIMIZERS)
    lr_scheduler: str = _f("constant", "How the learning rate changes over the run.", "optim",
                           choices=SCHEDULERS)
    lr_warmup_steps: int = _f(0, "Steps of linear warm-up at the start.", "optim", minimum=0)
    weight_decay: float = _f(1e-2, "AdamW weight decay.", "optim", minimum=0.0, maximum=1.0)
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0: no clipping).", "optim", minimum=0.0)
    text_encoder_lr: float = _f(0.0, "Learning rate of the text-encoder LoRA (0: the same as "
                                "learning_rate).", "optim", minimum=0.0, maximum=1.0, task="image")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: much less "
                                      "memory, about 20-30% slower.", "optim")
    ema: bool = _f(False, "Keep an exponential moving average (EMA) of the LoRA weights; previews and the saved "
                   "files use it. Smooths the noisy last steps of small data sets.", "optim")
    ema_decay: float = _f(0.999, "EMA decay per step: 0.999 averages about the last 1000 steps; use 0.99 for "
                          "runs of a few hundred steps.", "optim", minimum=0.0, maximum=0.99999)
    ema_warmup: bool = _f(True, "EMA warm-up: the n-th step uses decay min(ema_decay, n/(n+9)), so the start "
                          "does not linger.", "optim")
    ema_device: str = _f("auto", "Where the EMA copy lives: auto (the GPU when it has room, else the CPU), cpu, "
                         "or device.", "optim", choices=EMA_DEVICES)
    ema_save_raw: bool = _f(False, "With ema: also write the raw (not averaged) weights, in the raw/ folder of "
                            "the output.", "optim")

    # --- LoRA ------------------------------------------------------------------------
    target_modules: list[str] = _f([], "Module names to adapt. Empty: attention projections (image) or "
                                   "attention + MLP projections (text).", "lora")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path.", "lora", minimum=0.0, maximum=0.9)
    lora_variant: str = _f("lora", "lora, dora (weight-decomposed), rslora (rank-stabilised scale), "
                           "pissa (principal-singular-vector init), lokr (LyCORIS Kronecker product: a small "
                           "file, strong likeness), loha (LyCORIS Hadamard product: more capacity per "
                           "parameter).", "lora", choices=LORA_VARIANTS)
    lokr_factor: int = _f(-1, "LoKr: the factor each layer's size is split by (LyCORIS' factor; -1: near the "
                          "square root). Smaller files and fewer weights with a small factor such as 4-8.",
                          "lora", minimum=-1, maximum=4096)
    lokr_decompose_both: bool = _f(False, "LoKr: also split the first Kronecker factor at lora_rank (smaller).",
                                   "lora")
    lokr_full_matrix: bool = _f(False, "LoKr: keep both Kronecker factors whole (no rank; largest LoKr).",
                                "lora")
    loraplus_lr_ratio: float = _f(0.0, "LoRA+: the B matrices learn this many times faster (e.g. 16). "
                                  "0: off.", "lora", minimum=0.0, maximum=1000.0)
    conv_rank: int = _f(0, "Rank of LoCon-style LoRA on the UNet's 3x3 convolutions (0: off).", "lora",
                        minimum=0, maximum=1024, task="image")
    conv_alpha: float = _f(0.0, "Alpha of the conv LoRA (0: same as conv_rank).", "lora", minimum=0.0,
                           task="image")
    train_text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s).", "lora", task="image")

    # --- image data ------------------------------------------------------------------
    caption_source: str = _f("auto", "Where captions come from: metadata.csv, .txt files beside the "
                             "images, or auto (metadata.csv if present).", "data", choices=CAPTION_SOURCES,
                             task="image")
    caption_extension: str = _f(".txt", "Extension of kohya-style caption files.", "data", task="image")
    trigger_word: str = _f("", "Word put in front of every caption (e.g. 'sks_character').", "data")
    caption_dropout: float = _f(0.0, "Probability of training a step with an empty caption.", "data",
                                minimum=0.0, maximum=1.0, task="image")
    repeats: int = _f(1, "How many times each image counts per epoch.", "data", minimum=1, maximum=1000,
                      task="image")
    bucketing: bool = _f(True, "Aspect-ratio buckets: wide and tall images keep their shape instead of "
                         "being center-cropped to a square.", "data", task="image")
    min_bucket_reso: int = _f(256, "Smallest bucket side in pixels.", "data", minimum=64, task="image")
    max_bucket_reso: int = _f(2048, "Largest bucket side in pixels.", "data", minimum=64, task="image")
    center_crop: bool = _f(True, "Crop at the center (otherwise a random crop each epoch; disables "
                           "latent caching).", "data", task="image")
    random_flip: bool = _f(False, "Mirror images at random (disables latent caching).", "data", task="image")
    video_frames: int = _f(17, "Video families (Wan): frames per training clip, 4k+1 (17, 33, 49, 81). A clip "
                           "shorter than this trains at the largest 4k+1 count it holds; images train as one "
                           "frame.", "data", minimum=1, maximum=257, task="image")
    video_frame_stride: int = _f(1, "Video: take every n-th frame of a clip (1: every frame).", "data", minimum=1,
                                 maximum=64, task="image")
    video_fps: float = _f(0.0, "Video: sample clips at this frame rate instead of a stride (Wan: 16; 0: use "
                          "video_frame_stride).", "data", minimum=0.0, maximum=240.0, task="image")
    video_windows: str = _f("head", "Video: which windows of a long clip train: head (its start), uniform "
                            "(video_window_count spread evenly) or slide (back to back, up to video_window_count; "
                            "0: all).", "data", choices=("head", "uniform", "slide"), task="image")
    video_window_count: int = _f(1, "Video: windows per clip for uniform / slide.", "data", minimum=0, maximum=64,
                                 task="image")
    cache_latents: bool = _f(True, "Encode each image once with the VAE and keep the latents.", "data",
                             task="image")
    cache_latents_to_disk: bool = _f(True, "Keep cached latents on disk, reused by later runs.", "data",
                                     task="image")
    cache_text_encoder_outputs: bool = _f(True, "Encode each caption once when the text encoder is not "
                                          "trained.", "data", task="image")

    # --- image model / noise ---------------------------------------------------------
    prediction_type: str = _f("auto", "Training target: auto (from the model), epsilon, or v_prediction "
                              "(SD 2.x 768).", "model", choices=PREDICTION_TYPES, task="image")
    noise_offset: float = _f(0.0, "Noise offset (0.05-0.1 helps very dark/bright images).", "model",
                             minimum=0.0, maximum=1.0, task="image")
    snr_gamma: float = _f(0.0, "Min-SNR weighting gamma (5 is usual; 0: off).", "model", minimum=0.0,
                          task="image")
    wan_expert: str = _f("high", "Wan 2.2 A14B: which of its two experts trains: high (`transformer`, the noisy "
                         "steps above boundary_ratio), low (`transformer_2`), or both in one run (each step runs the "
                         "expert whose side of the boundary its drawn noise level is on; a LoRA file each). "
                         "ComfyUI's files name their expert (high_noise / low_noise) and win over high / low.",
                         "model", choices=("high", "low", "both"), task="image")
    wan_offload_inactive_expert: bool = _f(False, "Wan 2.2 A14B with wan_expert: both: keep only the expert that "
                                           "runs in GPU memory and the other's frozen weights in CPU memory "
                                           "(musubi-tuner's offload_inactive_dit; slower: a swap when the expert "
                                           "changes).", "model", task="image")
    base_model_config: str = _f("", "For a single-file checkpoint: a diffusers folder (or hub id) of the same "
                                "family whose configs and tokenizer build it, to load offline. Empty: the "
                                "family's standard hub repo (cached after the first online run).", "model",
                                task="image")
    vae: str = _f("", "Optional separate VAE (.safetensors or diffusers folder); FLUX: ae.safetensors.", "model",
                  task="image")
    # --- flow-matching transformers ("flow": FLUX.1, Chroma and the others; "flux": FLUX.1 / Chroma only) ---
    clip_l: str = _f("", "FLUX with a single-file transformer: the CLIP-L text encoder file (ComfyUI's "
                     "models/clip or models/text_encoders; found there when empty).", "flux", task="image")
    t5: str = _f("", "FLUX / Chroma with a single-file transformer: the T5-XXL text encoder file (fp16 or fp8; "
                 "found in models/clip or models/text_encoders when empty).", "flux", task="image")
    text_encoder_files: str = _f("", "A flow-matching transformer from a single file without its text encoders "
                                 "(SD3: clip_l, clip_g, t5xxl; Z-Image: qwen_3_4b; FLUX.2 klein: qwen_3_4b or "
                                 "qwen_3_8b; FLUX.2 dev: mistral_3_small_flux2_bf16; Krea 2: qwen3_vl_4b; "
                                 "Qwen-Image: qwen_2.5_vl_7b): their files, "
                                 "comma-separated, each "
                                 "told by its name; any not given is found in ComfyUI's models/text_encoders or "
                                 "models/clip.",
                                 "flow", task="image")
    timestep_sampling: str = _f("auto", "How training picks noise levels for flow-matching models: shift (FLUX "
                                "default), sigmoid (Chroma default), logit_normal, uniform; auto: the family's.",
                                "flow", choices=TIMESTEP_SAMPLINGS, task="image")
    discrete_flow_shift: float = _f(3.1582, "The shift of `timestep_sampling: shift` (kohya's and FluxGym's "
                                    "3.1582 for FLUX.1).", "flow", minimum=0.1, maximum=20.0, task="image")
    train_guidance: float = _f(1.0, "The guidance value fed to FLUX.1-dev's guidance embedding while training "
                               "(1.0 as kohya and FluxGym; ignored by schnell and Chroma). FLUX.2 dev takes 3.5 "
                               "(diffusers' trainer) while this is left at 1.0.", "guidance",
                               minimum=0.0, maximum=10.0, task="image")
    lora_blocks: str = _f("all", "Which FLUX blocks get LoRA: all, attention (attention projections only), or "
                          "single_blocks (FluxGym's 12 GB mode).", "flux", choices=LORA_BLOCKS, task="image")
    fp8_base: bool = _f(False, "Store the frozen transformer in fp8 (half the memory of bf16; the LoRA "
                        "stays in full precision). Needs a GPU with bf16.", "flow", task="image")
    base_quantization: str = _f("none", "Quantize the frozen base model (transformer or LLM): nf4 (4-bit, "
                                "QLoRA; FLUX about 9 GB) or none. Needs CUDA and bitsandbytes.", "flow",
                                choices=BASE_QUANTIZATIONS)
    blocks_to_swap: int = _f(0, "Above 0, the transformer blocks stay in CPU memory and each visits the GPU "
                             "when it runs (diffusers' group offload, like kohya's blocks_to_swap; slower, much less "
                             "VRAM). The estimate counts this many blocks off the GPU, so it errs high. Needs CUDA.",
                             "flow",
                             minimum=0, maximum=57, task="image")
    training_adapter: str = _f("", "A LoRA file merged into the base while training and left out of the saved "
                               "files and the previews: the de-distilling training adapter of a distilled model "
                               "(Z-Image Turbo, FLUX.1 schnell), as ai-toolkit trains them.", "flow", task="image")

    # --- samples ---------------------------------------------------------------------
    sample_steps: int = _f(0, "Make previews every N steps (0: only at the end if prompts are set).",
                           "sample", minimum=0)
    sample_prompts: list[str] = _f([], "Prompts for previews (images) or questions (text).", "sample")
    sample_negative_prompt: str = _f("", "Negative prompt for image previews.", "sample", task="image")
    sample_num_inference_steps: int = _f(20, "Denoising steps of image previews.", "sample", minimum=1,
                                         maximum=200, task="image")
    sample_guidance_scale: float = _f(7.0, "Guidance scale of image previews.", "sample", minimum=0.0,
                                      maximum=50.0, task="image")
    sample_base: str = _f("", "Draw previews (and the Test tab) with this model instead of base_model: the distilled "
                          "Turbo / schnell model of the family when you train on its base (Raw) model. Empty: "
                          "base_model.", "sample", task="image")
    sample_seed: int = _f(1234, "Seed of previews (the same every time so they compare).", "sample",
                          minimum=0)
    sample_max_new_tokens: int = _f(96, "Length of text previews in tokens.", "sample", minimum=1,
                                    maximum=4096, task="text")

    # --- text --------------------------------------------------------------------------
    max_seq_length: int = _f(512, "Longest training example in tokens; longer ones are cut (listed).",
                             "text", minimum=16, maximum=131072, task="text")
    chat_template: str = _f("", "Chat template: empty for the tokenizer's own, or chatml / llama2 / "
                            "alpaca / plain.", "text", task="text")
    text_method: str = _f("sft", "How a text LoRA learns: sft from prompt/response answers; dpo or orpo "
                          "(preference tuning) from prompt,chosen,rejected data, preferring the chosen answer; kto "
                          "from prompt,completion,label data (answers marked good or bad); grpo from prompts alone, "
                          "sampling answers and scoring them with grpo_rewards; vlm tunes a vision-language model "
                          "(SmolVLM, Qwen2-VL) on images with captions or image chat rows, a captioner for the "
                          "Caption tab.",
                          "text", choices=TEXT_METHODS, task="text")
    preference_beta: float = _f(0.1, "Preference strength. DPO and KTO: beta, how far the LoRA may move from the base "
                                "model (0.1 usual; higher stays closer). ORPO: lambda, the weight of the "
                                "odds-ratio term beside the chosen answers' loss (0.1 usual).", "text",
                                minimum=0.001, maximum=10.0, task="text")
    grpo_rewards: list[str] = _f([], "GRPO's reward functions, summed: regex:<pattern> (1 when the answer matches), "
                                 "json (1 when it parses as JSON), numeric (1 when its last number equals the row's "
                                 "answer column), length:<n> (minus the share beyond n characters), or a .py file "
                                 "defining reward(prompt, completion, row) -> float.", "text", task="text")
    grpo_generations: int = _f(4, "GRPO: answers sampled per prompt; each is judged against its group's mean.",
                               "text", minimum=2, maximum=64, task="text")
    grpo_max_new_tokens: int = _f(64, "GRPO: longest sampled answer in tokens.", "text", minimum=1, maximum=4096,
                                  task="text")
    grpo_temperature: float = _f(1.0, "GRPO: sampling temperature (lower: answers vary less).", "text",
                                 minimum=0.05, maximum=2.0, task="text")
    grpo_kl: float = _f(0.04, "GRPO: weight of the KL penalty to the base model (the adapter switched off); 0: none.",
                        "text", minimum=0.0, maximum=10.0, task="text")
    vlm_prompt: str = _f("", "vlm: what the model is asked about each captioned image (empty: \"Describe this "
                         "image in detail.\", the Caption tab's own question); the trained captioner asks it too.",
                         "text", task="text")
    validation_split: float = _f(0.0, "Share of the data held out for validation loss (0: none).", "text",
                                 minimum=0.0, maximum=0.5)
    validation_file: str = _f("", "A separate validation data file (overrides validation_split).", "text")
    save_merged_model: bool = _f(False, "Also save the base model with the LoRA merged in (for serving).",
                                 "text", task="text")
    gguf_file: str = _f("", "Name of the .gguf file inside base_model when it is a folder or hub id.",
                        "text", task="text")

    # --- text evaluation (core.text_eval): the base before training, the LoRA after -------
    eval_file: str = _f("", "Your held-out questions with their answers (CSV prompt,response or JSONL, like the "
                        "training data): the base model answers them before training and the LoRA after; the "
                        "share right is in eval/ of the run folder and the Train tab.", "eval", task="text")
    eval_match: str = _f("contains", "When an answer to eval_file counts as right: contains (the expected answer "
                         "appears in it, whole words) or exact (nothing else); case and punctuation are ignored.",
                         "eval", choices=EVAL_MATCHES, task="text")
    eval_tasks: list[str] = _f([], "lm-eval-harness tasks (arc_easy, hellaswag, gsm8k ...) or task YAML files, "
                               "scored before and after to show what the LoRA forgot. Their data must be on this "
                               "machine (nothing is downloaded).", "eval", task="text")
    eval_limit: int = _f(50, "Examples per eval task (a slice keeps it to minutes on a CPU).", "eval", minimum=1,
                         maximum=100000, task="text")
    eval_steps: int = _f(0, "Also evaluate the LoRA every N steps (0: only before and after training).", "eval",
                         minimum=0, task="text")

    # --- output --------------------------------------------------------------------------
    save_precision: str = _f("fp16", "Precision of the saved LoRA files.", "output", choices=SAVE_PRECISIONS)
    logging_steps: int = _f(1, "Write loss to loss.csv / TensorBoard every N steps.", "output", minimum=1)
    validation_steps: int = _f(0, "Every N steps, a validation loss that compares over the run (loss.csv's val_loss, "
                               "the live plot, TensorBoard). Images: up to 4 training images with the same noise and "
                               "noise levels every time; text: the validation split. 0: text after each epoch, "
                               "images not at all.", "output", minimum=0)

    # ---------------------------------------------------------------------------------------
    @property
    def is_image(self) -> bool:
        return self.task_type == "image-generation"

    @property
    def name(self) -> str:
        """The LoRA's name: output_name, else the output folder's name."""
        return self.output_name or Path(self.output_dir).name or "lora"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """One or more config values are wrong. `errors` maps each key to what is allowed."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        lines = [f"  {key}: {message}" for key, message in self.errors.items()]
        super().__init__("The config has problems:\n" + "\n".join(lines))

    @property
    def key(self) -> str:
        return next(iter(self.errors))


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = get_type_hints(TrainConfig)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(kind: Any) -> str:
    if get_origin(kind) is list:
        return "a list of text"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(kind, str(kind))


def coerce(name: str, value: Any) -> Any:
    """Turn a YAML / form value into the field's type, or raise ValueError with what is allowed."""
    kind = TYPES[name]
    if value is None:
        default = FIELDS[name].default
        if default is dataclasses.MISSING:
            return FIELDS[name].default_factory()  # type: ignore[misc]
        return default
    if get_origin(kind) is list:
        item = get_args(kind)[0]
        if isinstance(value, str):
            # A single string is one item for prompts; comma lists are common for module names.
            return [v.strip() for v in value.split(",") if v.strip()] if name == "target_modules" else (
                [value] if value.strip() else [])
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, (str, int, float)) for v in value):
                raise ValueError(f"expected {_type_name(kind)}")
            return [item(v) for v in value]
        raise ValueError(f"expected {_type_name(kind)}, got {type(value).__name__}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError(f"expected a whole number, got {value!r}") from None
            if number.is_integer():
                return int(number)
        raise ValueError(f"expected a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `2e-4` as a string; we read it as the number the user meant.
            try:
                return float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number such as 2e-4, got {value!r}") from None
        raise ValueError(f"expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else " See configs/*.yaml or the README for the keys."
    return f"unknown key.{hint}"


def _looks_like_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", value)) and not value.startswith((".", "/"))


def _check_values(cfg: TrainConfig, check_paths: bool) -> dict[str, str]:
    errors: dict[str, str] = {}
    for name, spec in FIELDS.items():
        meta = spec.metadata
        value = getattr(cfg, name)
        if meta.get("choices") and value not in meta["choices"]:
            errors[name] = f"{value!r} is not allowed; choose one of: {', '.join(meta['choices'])}."
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if meta.get("min") is not None and value < meta["min"]:
                errors[name] = f"{value} is too small; the smallest allowed is {meta['min']}."
            elif meta.get("max") is not None and value > meta["max"]:
                errors[name] = f"{value} is too large; the largest allowed is {meta['max']}."
    if cfg.is_image and cfg.resolution % 64 != 0 and "resolution" not in errors:
        lower = max(64, cfg.resolution // 64 * 64)
        errors["resolution"] = (f"{cfg.resolution} is not a multiple of 64 (the UNet halves the latent "
                                f"three times). Use {lower} or {lower + 64}.")
    if cfg.is_image and (cfg.video_frames - 1) % 4 != 0 and "video_frames" not in errors:
        lower = max(1, (cfg.video_frames - 1) // 4 * 4 + 1)
        errors["video_frames"] = (f"{cfg.video_frames} is not 4k+1 (a video VAE keeps the first frame and folds "
                                  f"every 4 after it into one latent frame). Use {lower} or {lower + 4}.")
    if cfg.learning_rate == 0 and "learning_rate" not in errors:
        errors["learning_rate"] = "0 would train nothing; use e.g. 1e-4."
    if cfg.lora_variant == "pissa" and cfg.conv_rank > 0:
        # PEFT has no PiSSA initialisation for convolutions.
        errors["conv_rank"] = "PiSSA works on linear layers only: set conv_rank: 0, or use lora_variant: lora."
    if not cfg.is_image and cfg.text_method in ("dpo", "kto", "grpo") and cfg.lora_variant == "pissa":
        # DPO's reference is the model with the adapter switched off; PiSSA moves part of the base
        # weights into the adapter, so that would no longer be the base model.
        errors["lora_variant"] = (f"PiSSA changes the base weights, so {cfg.text_method.upper()}'s reference (the "
                                  "adapter switched off) would not be the base model: use lora, dora or rslora, or "
                                  "text_method: orpo.")
    if not cfg.is_image and cfg.text_method == "grpo" and not cfg.grpo_rewards:
        errors["grpo_rewards"] = ("text_method grpo needs at least one reward: regex:<pattern>, json, numeric, "
                                  "length:<n> or a .py file.")
    if not cfg.is_image and cfg.text_method == "vlm":
        errors.update(_vlm_refusals(cfg))
    if cfg.lora_variant in ("lokr", "loha") and cfg.loraplus_lr_ratio > 0:
        errors["loraplus_lr_ratio"] = (f"LoRA+ speeds up a LoRA's B matrices; {cfg.lora_variant} has none: "
                                       "set loraplus_lr_ratio: 0.")
    if cfg.lokr_factor == 0 and "lokr_factor" not in errors:
        errors["lokr_factor"] = "0 splits nothing: use -1 (near the square root) or a factor such as 4, 8 or 16."
    if cfg.training_adapter and cfg.base_quantization != "none":
        # An adapter is merged into the base weights, which NF4 holds in 4 bits (adding to them is not exact).
        errors["training_adapter"] = ("a training adapter is merged into the base weights, which NF4 cannot take "
                                      "exactly: set base_quantization: none (fp8_base: true saves memory too).")
    if cfg.min_bucket_reso > cfg.max_bucket_reso:
        errors["min_bucket_reso"] = f"must not be larger than max_bucket_reso ({cfg.max_bucket_reso})."
    if cfg.is_image and not cfg.base_model:
        errors["base_model"] = ("required for image training: a .safetensors checkpoint, a diffusers "
                                "folder or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    if not cfg.train_data_dir:
        errors["train_data_dir"] = "required: the folder with your images (or your text data file)."
    if not cfg.output_dir:
        errors["output_dir"] = "required: where to save the LoRA."
    if cfg.name and re.search(r'[<>:"|?*\\/]', cfg.name):
        errors["output_name"] = f"{cfg.name!r} contains characters not allowed in file names."
    if fsdp_refusal(cfg) and "distributed" not in errors:
        errors["distributed"] = fsdp_refusal(cfg)
    if check_paths:
        errors.update(_check_paths(cfg, errors))
    return errors


def _vlm_refusals(cfg: TrainConfig) -> dict[str, str]:
    """What text_method vlm does not combine with (one sentence each)."""
    errors: dict[str, str] = {}
    if cfg.base_quantization != "none":
        errors["base_quantization"] = "text_method vlm loads the vision-language model unquantized: set none."
    if cfg.eval_file or cfg.eval_tasks:
        errors["eval_file" if cfg.eval_file else "eval_tasks"] = (
            "evaluation asks text questions; a vlm run shows its captions of sample_prompts (image files) "
            "instead: leave eval_file and eval_tasks empty.")
    if cfg.lora_variant == "pissa":
        errors["lora_variant"] = "PiSSA is not converted back for a vlm run yet: use lora, dora or rslora."
    if cfg.gguf_file or cfg.base_model.lower().endswith(".gguf"):
        errors["base_model"] = ("text_method vlm needs a transformers vision-language model (a folder, hub id or "
                                "smolvlm-256m), not GGUF.")
    return errors


def fsdp_refusal(cfg: TrainConfig) -> str | None:
    """Why `distributed: fsdp` cannot run with these settings (one sentence), or None."""
    if cfg.distributed != "fsdp":
        return None
    if cfg.ema:
        return "ema keeps its average of whole weights, not of shards: set ema: false, or use distributed: ddp."
    if cfg.lora_variant in ("lokr", "loha"):
        return f"lora_variant: {cfg.lora_variant} is not sharded yet: use lora, or distributed: ddp."
    if cfg.is_image and cfg.sample_base:
        return ("sample_base draws previews with the LoRA as saved, which a sharded run holds in pieces between "
                "saves; leave sample_base empty, or use distributed: ddp.")
    if cfg.base_quantization != "none":
        return ("fsdp shards the bf16/fp16 base over the GPUs and does not combine with "
                "base_quantization: nf4; use one of them (nf4 with distributed: ddp).")
    if cfg.is_image and cfg.blocks_to_swap > 0:
        return ("fsdp and blocks_to_swap both take the base off one GPU; use one of them "
                "(set blocks_to_swap: 0 to shard).")
    if cfg.is_image and cfg.fp8_base:
        return "fsdp does not shard an fp8 base; set fp8_base: false (sharding saves more)."
    if cfg.is_image and cfg.train_text_encoder:
        return ("fsdp trains the LoRA of the UNet / transformer only; set train_text_encoder: false "
                "or use distributed: ddp.")
    if not cfg.is_image and cfg.save_merged_model:
        return ("save_merged_model needs the whole base in one process, which a sharded run never holds; "
                "set it to false and merge the adapter afterwards (Tools tab), or use distributed: ddp.")
    if not cfg.is_image and cfg.text_method != "sft":
        return (f"text_method: {cfg.text_method} does not run sharded yet (its validation runs on the main process "
                "alone); use distributed: ddp, or text_method: sft.")
    if not cfg.is_image and cfg.lora_variant == "pissa":
        return ("PiSSA rewrites the base weights, which a sharded run holds in pieces; use lora, dora or "
                "rslora with distributed: fsdp, or distributed: ddp.")
    return None


def _is_ggml_v3(path: Path) -> bool:
    """A GGML v3 llama .bin is raw binary read by core.models.ggml_v3 (found by its magic bytes), not a pickle."""
    from core.models.ggml_v3 import is_ggml_v3  # imported here: core.models pulls in torch and diffusers

    return is_ggml_v3(path)


def _is_captioner_name(name: str) -> bool:
    """A short name of the Caption tab's captioners (smolvlm-256m ...), which a vlm run also takes as its base."""
    from core.caption.registry import CAPTIONERS  # plain data, no model code

    return name.strip().lower() in CAPTIONERS


def _check_paths(cfg: TrainConfig, known: dict[str, str]) -> dict[str, str]:
    errors: dict[str, str] = {}
    if cfg.train_data_dir and "train_data_dir" not in known and not Path(cfg.train_data_dir).exists():
        errors["train_data_dir"] = f"'{cfg.train_data_dir}' does not exist. Check the path."
    for name in ("metadata_path", "init_lora", "validation_file", "vae", "eval_file", "training_adapter",
                 "sample_base"):
        value = getattr(cfg, name)
        if value and not Path(value).exists() and not (name in ("vae", "sample_base") and _looks_like_hub_id(value)):
            errors[name] = f"'{value}' does not exist. Check the path, or leave it empty."
    model = cfg.base_model
    if model:
        path = Path(model)
        if path.exists():
            if (path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES and not cfg.allow_pickle
                    and not _is_ggml_v3(path)):
                if re.search(r"ggml", path.name, re.I):
                    errors["base_model"] = (f"'{path.name}' is an old GGML file but not GGML v3 (the only GGML "
                                            "version that loads). GGML was replaced by GGUF in 2023: convert it "
                                            "with llama.cpp's convert script, or download the .gguf version.")
                else:
                    errors["base_model"] = (f"'{path.name}' is a pickle file ({path.suffix}), which can run "
                                            "code when loaded. Use a .safetensors version, or set "
                                            "allow_pickle: true if you trust this file.")
        elif not _looks_like_hub_id(model) and not (cfg.text_method == "vlm" and _is_captioner_name(model)):
            errors["base_model"] = (f"'{model}' is neither an existing file or folder nor a hub id "
                                    "(owner/name). Check the path.")
    if cfg.resume_from and cfg.resume_from != "latest" and not Path(cfg.resume_from).exists():
        errors["resume_from"] = f"'{cfg.resume_from}' does not exist. Use a checkpoint folder, 'latest' or a LoRA file."
    return errors


def config_from_dict(raw: dict[str, Any] | None, *, check_paths: bool = True) -> TrainConfig:
    """Build and validate a TrainConfig from a plain dict (YAML, GUI form or CLI).

    `preset` is only checked as text here: merging a preset needs the device and the model
    (`core.presets.resolve_config`), which this module must not import.
    """
    raw = dict(raw or {})
    errors: dict[str, str] = {}
    for key in list(raw):
        if key in RETIRED_KEYS:
            del raw[key]
        elif key not in FIELDS:
            errors[str(key)] = _unknown_key_message(str(key))
            del raw[key]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            values[key] = coerce(key, value)
        except ValueError as exc:
            errors[key] = f"{exc} ({_type_name(TYPES[key])} expected)."
    cfg = TrainConfig(**values)
    for key, message in _check_values(cfg, check_paths).items():
        errors.setdefault(key, message)
    if errors:
        raise ConfigError(errors)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with messages a person can act on."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError({"config": f"'{file}' does not exist."})
    text = file.read_text(encoding="utf-8-sig", errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        hint = " YAML does not allow tabs for indenting: use spaces." if "\t" in text else ""
        raise ConfigError({"config": f"{file.name} is not valid YAML{where}: "
                                     f"{getattr(exc, 'problem', exc)}.{hint}"}) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError({"config": f"{file.name} must be a mapping of key: value lines."})
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, *,
                check_paths: bool = True) -> TrainConfig:
    """Read a YAML config (plus optional overrides) into a validated TrainConfig (no preset merged)."""
    raw = read_yaml(path)
    raw.update(overrides or {})
    return config_from_dict(raw, check_paths=check_paths)


def config_to_yaml(cfg: TrainConfig, *, only_changed: bool = False) -> str:
    """The config as YAML, keys in declaration order (seed keys first)."""
    data = cfg.to_dict()
    if only_changed:
        defaults = TrainConfig().to_dict()
        seed = list(FIELDS)[:14]
        data = {k: v for k, v in data.items() if k in seed or v != defaults[k]}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def save_config(cfg: TrainConfig, path: str | Path, *, only_changed: bool = False) -> Path:
    """Write the config as YAML atomically; `train.py --config` reads it back unchanged."""
    return atomic_write_text(path, config_to_yaml(cfg, only_changed=only_changed))
