"""Every family with a written-out reference: its loss hook (ImageFamily.make_loss on the model its `load`
gives, prompts through its `encode_prompts`) equals the objective of diffusers' training example for that
family on the same latents, prompts and seed (tests/families/references.py)."""
from __future__ import annotations

import pytest
import torch

from tests.families.table import FAMILIES, TinyFamily
from tests.fixtures.tiny_sd import tiny_run_config


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_the_loss_is_the_diffusers_training_examples_objective(family: TinyFamily, built, tmp_path):
    import diffusers

    from core.family_api.contract import Batch
    from core.family_api.lookup import family_impl
    from core.presets import resolve_config

    if family.reference_loss is None:
        pytest.skip(f"no reference written out yet: tests/families/{family.name}/ checks its loss")
    tiny = built(family)
    impl = family_impl(family.name)
    cfg = resolve_config(tiny_run_config(tiny.folder, tmp_path, tmp_path / "out"))
    model = impl.load(cfg)
    if impl.load_network is not None:  # training loads the network after caching; here at once
        impl.load_network(model)
    prompts = ["a photo of a red thing", "a blue cat"]
    with torch.no_grad():
        cond = impl.encode_prompts(model, prompts, torch.device("cpu"))
    latents = torch.randn(2, family.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    size = 8 * 8  # the pixel size these latents stand for (the VAE's 8x)
    batch = Batch(latents, cond, sizes=[((size, size), (0, 0), (size, size))] * 2)
    torch.manual_seed(5)
    with torch.no_grad():
        ours = impl.make_loss(model, cfg, torch.float32)(impl.network(model), batch)
    pipe = getattr(diffusers, family.pipeline).from_pretrained(str(tiny.folder))
    theirs = family.reference_loss(tiny.folder, pipe, prompts, latents, 5)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-6)
