"""A GGML v3 llama file as a transformers `LlamaForCausalLM` + `LlamaTokenizer`.

The weights are dequantized tensor by tensor into the wanted dtype (a 7B q4_0 file becomes
~13.5 GB in bf16, ~27 GB in fp32), renamed to HF's Llama names, and the q/k rows put back
in HF's rotary order. The tokenizer is rebuilt from the file's vocabulary and scores.

What a GGML v3 file does not store, and what is assumed instead:
- rms_norm_eps: 1e-5 (Llama 2, CodeLlama). LLaMA-1 based files were trained with 1e-6; the
  difference shifts the logits by well under 1% and LoRA training absorbs it.
- context length: 4096 (Llama 2), 16384 and rope_theta 1e6 when the file name says CodeLlama
  (the GGML CodeLlama files needed `--rope-freq-base 1e6` in llama.cpp too).
- key/value heads: from the shape of `attention.wk` (llama.cpp needed `--gqa 8` for the 70B files;
  here the shapes say it).
- the tokenizer: SentencePiece BPE rebuilt as merges ordered by the scores (as transformers does for
  GGUF files without merges). ASCII and byte-fallback text round-trips; a rare word can split
  differently from the original tokenizer.model, and there is no chat template in the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.models.ggml_v3 import GGMLFile, GGMLFormatError, dequantize

# GGML (original Meta) names -> HF Llama names; per-layer names take the layer number.
_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
                "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
                "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
                "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# The byte tokens <0x00>..<0xFF> sit at ids 3..258 of a llama SentencePiece vocabulary.
_FIRST_BYTE_ID = 3
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


@dataclass(frozen=True)
class LlamaShape:
    """What the config needs, from the hparams checked against the tensor shapes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rms_norm_eps: float
    context: int
    rope_theta: float


def hf_name(ggml_name: str) -> str:
    """HF Llama name of a GGML llama tensor; GGMLFormatError for a name llama never had."""
    if ggml_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[ggml_name]
    match = _LAYER.match(ggml_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise GGMLFormatError(f"tensor '{ggml_name}' is not part of a llama model; only GGML llama files "
                          "(LLaMA, Llama 2, CodeLlama and their fine-tunes) load.")


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo the q/k row order of GGML llama files (Meta's interleaved rotary pairs) for HF's half-split order.

    Per head, GGML row 2*j + s holds what HF keeps at row s*(head_dim/2) + j.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_shape(ggml: GGMLFile) -> LlamaShape:
    hp, tensors = ggml.hparams, ggml.tensors
    for needed in ("tok_embeddings.weight", "layers.0.attention.wk.weight", "layers.0.feed_forward.w1.weight"):
        if needed not in tensors:
            raise GGMLFormatError(f"'{ggml.path.name}' has no '{needed}' tensor; it is not a llama GGML file.")
    head_dim = hp.n_embd // hp.n_head
    if hp.n_rot != head_dim:
        raise GGMLFormatError(f"'{ggml.path.name}' rotates {hp.n_rot} of {head_dim} head dimensions; only full "
                              "rotary (llama) files load.")
    # The shapes are the truth: llama.cpp derived n_ff from n_mult (2/3 of 4*n_embd rounded up to a
    # multiple of n_mult), which the 70B files broke, and the key/value heads (GQA) are not in the hparams.
    intermediate = tensors["layers.0.feed_forward.w1.weight"].shape[0]
    kv_rows = tensors["layers.0.attention.wk.weight"].shape[0]
    vocab = tensors["tok_embeddings.weight"].shape[0]
    name = ggml.path.name.lower()
    codellama = "codellama" in name.replace("-", "").replace("_", "")
    return LlamaShape(hidden=hp.n_embd, intermediate=intermediate, layers=hp.n_layer, heads=hp.n_head,
                      kv_heads=kv_rows // head_dim, vocab=vocab, rms_norm_eps=1e-5,
                      context=16384 if codellama else 4096, rope_theta=1e6 if codellama else 10000.0)


def llama_config(shape: LlamaShape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.context,
                       rms_norm_eps=shape.rms_norm_eps, rope_theta=shape.rope_theta, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None, attn_implementation="sdpa")


def hf_state_dict(ggml: GGMLFile, shape: LlamaShape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor dequantized, renamed and (q/k) reordered; each is cast to `dtype` as soon as it is read,
    so the peak is the model in `dtype` plus one tensor in fp32."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in ggml.tensors.items():
        values = dequantize(ggml, tensor)
        if name.endswith("attention.wq.weight"):
            values = unpermute_rows(values, shape.heads)
        elif name.endswith("attention.wk.weight"):
            values = unpermute_rows(values, shape.kv_heads)
        state[hf_name(name)] = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    return state


def build_model(ggml: GGMLFile, dtype: torch.dtype = torch.float32) -> Any:
    """`LlamaForCausalLM` (eval mode, SDPA attention) holding the file's weights in `dtype`."""
    from transformers import LlamaForCausalLM

    shape = llama_shape(ggml)
    config = llama_config(shape)
    state = hf_state_dict(ggml, shape, dtype)
    # Built on the meta device: random init of billions of weights only to overwrite them costs
    # minutes and doubles the memory; the file's tensors are then assigned in place.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise GGMLFormatError(f"'{ggml.path.name}' lacks {len(missing)} llama tensors (first: {missing[0]}); "
                              "the file is incomplete or not a llama model.")
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are a computed (non-persistent) buffer, not in any file: rebuild it for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise GGMLFormatError(f"internal: {left_on_meta[0]} was not loaded from '{ggml.path.name}'.")
    model.config.dtype = dtype
    return model.eval()


def sentencepiece_pieces(tokens: list[bytes]) -> list[str]:
    """The vocabulary as SentencePiece spells it.

    llama.cpp's GGML writer stored each piece with its "▁" turned into a space, the byte tokens
    <0xNN> as the single raw byte, and the control tokens as empty strings; this undoes that,
    as llama.cpp's GGML-to-GGUF converter does.
    """
    pieces: list[str] = []
    for index, raw in enumerate(tokens):
        if index < len(SPECIAL_TOKENS):
            pieces.append(SPECIAL_TOKENS[index])
        elif _FIRST_BYTE_ID <= index < _FIRST_BYTE_ID + 256 and len(raw) == 1:
            pieces.append(f"<0x{raw[0]:02X}>")
        elif not raw:
            pieces.append(f"<ctrl{index}>")  # an unnamed control token: kept so the ids stay in place
        else:
            pieces.append(raw.decode("utf-8", errors="replace").replace(" ", "\u2581"))
    # A piece that is not valid UTF-8 would collide after decoding; keep every id reachable.
    seen: set[str] = set()
    for index, piece in enumerate(pieces):
        if piece in seen:
            pieces[index] = f"<dup{index}>"
        seen.add(piece)
    return pieces


def build_tokenizer(ggml: GGMLFile) -> Any:
    """A `LlamaTokenizer` (byte-fallback BPE, "▁" for spaces, BOS added) from the file's vocabulary."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    pieces = sentencepiece_pieces(ggml.tokens)
    vocab = {piece: index for index, piece in enumerate(pieces)}
    # SentencePiece BPE merges in the order of the merged piece's score (higher first).
    scores = {piece: score for piece, score in zip(pieces, ggml.scores)}
    skip = [p for i, p in enumerate(pieces) if i < _FIRST_BYTE_ID + 256 and (p.startswith("<") and p.endswith(">"))]
    merges = generate_merges(vocab, scores, skip_tokens=skip)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               add_bos_token=True, add_eos_token=False, legacy=False)
    return tokenizer
