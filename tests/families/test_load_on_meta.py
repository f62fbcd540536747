"""A diffusers model folder loads on the meta device with its file's weights assigned (nothing computed in
__init__ first, e.g. SD3.5's 0.9 GB position table), the same model as `from_pretrained`; where that cannot be
exact the caller is told (None) and loads as before."""
from __future__ import annotations

import torch

from core.families.dit.weights import model_folder_on_meta
from core.families.sd3.tiny import tiny_sd3_transformer


def test_an_sd3_transformer_folder_loads_on_meta_with_the_same_weights_and_buffers(tmp_path):
    from diffusers import SD3Transformer2DModel

    tiny_sd3_transformer("sd3").save_pretrained(tmp_path / "transformer")
    fast = model_folder_on_meta(SD3Transformer2DModel, tmp_path / "transformer", torch.float32)
    slow = SD3Transformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    assert fast is not None and not fast.training
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(fast.config) == public(slow.config)
    want = slow.state_dict()
    assert set(fast.state_dict()) == set(want) and "pos_embed.pos_embed" in want  # the buffer too
    assert all(torch.equal(t, want[k]) for k, t in fast.state_dict().items())
    sample = dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 5, 64),
                  pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500]))
    with torch.no_grad():
        assert torch.equal(fast(**sample).sample, slow(**sample).sample)


def test_a_folder_without_its_weights_file_or_with_other_tensors_is_left_to_from_pretrained(tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "transformer"
    tiny_sd3_transformer("sd3").save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("pos_embed.pos_embed")
    save_file(state, weights)
    assert model_folder_on_meta(SD3Transformer2DModel, folder, torch.float32) is None
    weights.unlink()
    assert model_folder_on_meta(SD3Transformer2DModel, folder, torch.float32) is None
