"""Where core/memory.py's activation numbers come from, and how they compare with it.

Builds the real SD 1.5 / SD 2.1 / SDXL UNets (published configs, random weights) and
Llama-shaped decoders on the `meta` device: no memory, no weights, seconds. Marks the
LoRA targets trainable, replaces attention by a flash-style function that saves what
flash / memory-efficient SDPA saves on a GPU (q, k, v, output, log-sum-exp), and adds
up every tensor autograd keeps for the backward pass (each storage once, parameters
excluded). Prints bytes per latent pixel (UNets) and per token and layer (LLMs), with
and without gradient checkpointing, next to what core.memory predicts.

Then it runs a small Llama on real CPU tensors and counts the same way, to show the
meta count equals what real tensors keep (a check of the method and of the activation
term, not a CUDA measurement).

    .venv/bin/python bench/memory_calibration.py [--skip-cpu]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21 = dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), layers_per_block=2,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FlashLikeAttention(torch.autograd.Function):
    """Saves what flash attention saves: q, k, v, the output and a float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("meta-device measurement only")


class SavedTensors:
    """Counts the bytes autograd saves, each storage once, parameters excluded."""

    def __init__(self, module: torch.nn.Module):
        self.params = {p.untyped_storage()._cdata for p in module.parameters()}
        self.sizes: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        if key not in self.params and key not in self.sizes:
            self.sizes[key] = tensor.untyped_storage().nbytes()
        return tensor

    def total(self) -> int:
        return sum(self.sizes.values())


def lora_like(module: torch.nn.Module, targets: tuple[str, ...]) -> int:
    """Freeze everything, make the targets' weights trainable; returns sum of (in + out) features."""
    module.requires_grad_(False)
    features = 0
    for name, sub in module.named_modules():
        if name.endswith(targets) and isinstance(sub, torch.nn.Linear):
            sub.weight.requires_grad_(True)
            features += sub.in_features + sub.out_features
    return features


def measure_unet(name: str, config: dict, emb: int) -> None:
    from diffusers import UNet2DConditionModel

    from core import memory
    from core.model_info import ModelInfo

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    params = sum(p.numel() for p in unet.parameters())
    features = lora_like(unet, UNET_TARGETS)
    unet.to(torch.float16)
    print(f"{name}: {params:,} UNet parameters; LoRA (in+out) features {features:,}")
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        for resolution in (512, 1024):
            counter = SavedTensors(unet)
            side = resolution // 8
            latents = torch.empty(1, 4, side, side, device="meta", dtype=torch.float16)
            text = torch.empty(1, 77, emb, device="meta", dtype=torch.float16)
            extra = {}
            if "addition_embed_type" in config:
                extra["added_cond_kwargs"] = {"text_embeds": torch.empty(1, 1280, device="meta", dtype=torch.float16),
                                              "time_ids": torch.empty(1, 6, device="meta", dtype=torch.float16)}
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                unet(latents, torch.tensor([10], device="meta"), text, **extra)
            cfg = memory.TrainConfig(resolution=resolution, batch_size=1, mixed_precision="fp16",
                                     gradient_checkpointing=checkpointing)
            family = {"SD 1.5": "sd1", "SD 2.1": "sd2", "SDXL": "sdxl"}[name]
            parts = memory._parts(cfg, ModelInfo(family, params, ""), _gpu())
            print(f"  {resolution} px, checkpointing {'on ' if checkpointing else 'off'}: saved "
                  f"{counter.total() / 2**30:.3f} GiB = {counter.total() / side**2 / 1024:.1f} KiB per latent "
                  f"pixel; estimator activations {parts['activations'] / 2**30:.3f} GiB")


def measure_flux(variant: str = "flux-dev", image_tokens: int = 4096, text_tokens: int = 512) -> None:
    """FLUX.1 / Chroma transformer at 1024 px (4096 packed image tokens + 512 T5 tokens), bf16:
    what core/families/flux/memory.py's FLUX_ACTIVATION holds (whole model, with and without gradient
    checkpointing, and one double block alone for the recompute)."""
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    from core.families.flux.lora import flux_lora_targets

    with torch.device("meta"):
        model = ChromaTransformer2DModel() if variant == "chroma" else \
            FluxTransformer2DModel(guidance_embeds=variant == "flux-dev")
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in flux_lora_targets(model, "all"):
        modules[name].weight.requires_grad_(True)
    model.to(torch.bfloat16)

    def empty(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    inputs = dict(hidden_states=empty(1, image_tokens, 64), encoder_hidden_states=empty(1, text_tokens, 4096),
                  timestep=empty(1), img_ids=empty(image_tokens, 3, dtype=torch.float32),
                  txt_ids=empty(text_tokens, 3, dtype=torch.float32), return_dict=False)
    if variant != "chroma":
        inputs["pooled_projections"] = empty(1, 768)
    if variant == "flux-dev":
        inputs["guidance"] = empty(1)
    tokens = image_tokens + text_tokens
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        counter = SavedTensors(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model(**inputs)
        print(f"{variant}, checkpointing {'on ' if checkpointing else 'off'}: saved {counter.total() / 2**30:.3f} GiB "
              f"({counter.total() / tokens:,.0f} bytes per token)")
    if variant == "chroma":
        return  # its blocks take the approximator's modulation instead of temb; same shapes otherwise
    model.disable_gradient_checkpointing()
    counter = SavedTensors(model)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    rope = (torch.empty(tokens, 128, device="meta"), torch.empty(tokens, 128, device="meta"))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        model.transformer_blocks[0](hidden_states=empty(1, image_tokens, width).requires_grad_(),
                                    encoder_hidden_states=empty(1, text_tokens, width).requires_grad_(),
                                    temb=empty(1, width), image_rotary_emb=rope)
    print(f"  one double block (recomputed with checkpointing): {counter.total() / 2**30:.3f} GiB")


def measure_llm(hidden: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int) -> None:
    import transformers.masking_utils as masking
    from transformers import LlamaConfig, LlamaForCausalLM

    masking.find_packed_sequence_indices = lambda *a, **k: None  # calls .item(), impossible on meta
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    lora_like(model, LLM_TARGETS)
    model.to(torch.bfloat16)
    tokens = 512
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        counter = SavedTensors(model)
        ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        layer_bytes = (counter.total() - tokens * vocab * 4) / tokens / layers
        formula = (2 * hidden if checkpointing else 10 * hidden + 4 * inter) * 2
        print(f"  h={hidden} i={inter} vocab={vocab} checkpointing {'on ' if checkpointing else 'off'}: "
              f"{layer_bytes:,.0f} bytes per token per layer (estimator {formula:,})")


def _gpu():
    from core.devices import DeviceInfo

    return DeviceInfo("cuda", "simulated", 24.0, 24.0, bf16=True)


def cpu_check() -> None:
    """Real tensors on the CPU: the same count as on meta, per decoder layer, and peak RSS."""
    import resource

    import transformers.masking_utils as masking
    from transformers import LlamaConfig, LlamaForCausalLM

    masking.find_packed_sequence_indices = lambda *a, **k: None
    real_sdpa = F.scaled_dot_product_attention
    hidden, inter, layers, vocab, tokens = 512, 1536, 4, 32000, 1024
    for device, dtype in (("cpu", torch.float32), ("meta", torch.float32), ("cpu", torch.bfloat16),
                          ("meta", torch.bfloat16)):
        # The CPU runs its real flash kernel; meta gets the stand-in that saves the same tensors.
        F.scaled_dot_product_attention = real_sdpa if device == "cpu" else (
            lambda q, k, v, *a, **kw: FlashLikeAttention.apply(q, k, v))
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, vocab_size=vocab,
                                                 num_hidden_layers=layers, num_attention_heads=8,
                                                 num_key_value_heads=8, attn_implementation="sdpa"))
        lora_like(model, LLM_TARGETS)
        model.to(dtype)
        counter = SavedTensors(model)
        in_layer = [False]
        layer_bytes = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            known = len(counter.sizes)
            counter.pack(tensor)
            if len(counter.sizes) > known and in_layer[0]:
                layer_bytes[0] += tensor.untyped_storage().nbytes()
            return tensor

        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda *a: in_layer.__setitem__(0, True))
            layer.register_forward_hook(lambda *a: in_layer.__setitem__(0, False))
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        if device == "cpu":
            loss.backward()
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before
        size = 4 if dtype == torch.float32 else 2
        formula = (10 * hidden + 4 * inter) * size
        rss = f"; peak RSS growth of forward+backward {growth:.2f} GiB" if device == "cpu" and growth > 0 else ""
        print(f"  {device:4} {str(dtype):14}: {layer_bytes[0] / tokens / layers:,.0f} bytes per token per layer "
              f"(estimator {formula:,}); outside the layers {(counter.total() - layer_bytes[0]) / 2**20:.0f} MiB "
              f"(tokens x vocab x 4 = {tokens * vocab * 4 / 2**20:.0f} MiB){rss}")
    F.scaled_dot_product_attention = real_sdpa


def preset_table() -> None:
    """The README table: each GPU preset's predicted peak on a GPU of its tier, by part."""
    from core import presets
    from core.devices import DeviceInfo
    from core.memory import estimate_memory
    from core.model_info import SMOLLM2_135M, detect_model

    models = {"sd1": detect_model("stable-diffusion-v1-5/stable-diffusion-v1-5"),
              "sdxl": detect_model("stabilityai/stable-diffusion-xl-base-1.0"),
              "flux": detect_model("black-forest-labs/FLUX.1-dev"),
              "llm": detect_model("meta-llama/Llama-3.2-1B", "text-generation")}
    print("| preset | model | weights | LoRA + optimizer | activations | logits / transient | predicted peak "
          "(GB) | measured on CUDA |")
    print("|---|---|---|---|---|---|---|---|")
    for family in ("sd1", "sdxl", "flux", "llm"):
        for info in presets.family_presets(family):
            model = SMOLLM2_135M if family == "llm" and info.memory_gb <= 4 else models[family]
            card = DeviceInfo("cuda", "", info.memory_gb, info.memory_gb, bf16=True, bitsandbytes=True)
            values, _ = presets.adapt_to_device(presets.load_preset(info.name), card)
            parts = estimate_memory(presets.loose_config(values), model, card).parts
            weights = sum(v for k, v in parts.items() if "weights" in k)
            other = parts.get("logits + loss", 0) + parts.get("backward transient", 0)
            print(f"| {info.name} | {model.label} | {weights:.1f} | {parts['LoRA + optimizer']:.2f} | "
                  f"{parts['activations']:.2f} | {other:.2f} | {sum(parts.values()):.1f} | not yet |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cpu", action="store_true", help="only the meta-device measurements")
    parser.add_argument("--table", action="store_true", help="only print the README's preset table")
    args = parser.parse_args()
    if args.table:
        preset_table()
        return
    real_sdpa = F.scaled_dot_product_attention
    # Keyword names too: diffusers' FLUX attention calls it with query=, key=, value=.
    F.scaled_dot_product_attention = lambda query, key, value, *a, **kw: FlashLikeAttention.apply(query, key, value)
    try:
        measure_flux("flux-dev")
        measure_unet("SD 1.5", SD15, 768)
        measure_unet("SD 2.1", SD21, 1024)
        measure_unet("SDXL", SDXL, 2048)
        print("LLM (Llama-shaped, LoRA on all 7 projections, bf16):")
        for shape in ((576, 1536, 2, 49152, 9, 3), (4096, 11008, 2, 32000, 32, 32), (2048, 8192, 2, 128256, 32, 8)):
            measure_llm(*shape)
    finally:
        F.scaled_dot_product_attention = real_sdpa
    if not args.skip_cpu:
        print("Real CPU tensors vs the meta count (Llama h=512 x4, 1024 tokens):")
        cpu_check()


if __name__ == "__main__":
    main()
