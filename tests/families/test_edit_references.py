"""Edit training with several references, and plain images in the same run: Qwen-Image-Edit-2509 / 2511
(QwenImageEditPlusPipeline) and FLUX.2 klein (Flux2KleinPipeline's `image=` list) on a folder of 2 targets
with 2 references each (control/, control_2/) and 1 plain captioned image. Each trains as its pipeline draws
(every reference's tokens after the target's, the loss on the target's alone), never batches a pair with a
plain image, resumes exactly, previews the first target's references, and its file loads in the pipeline."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.fixtures.edit_data import make_edit_folder
from tests.fixtures.tiny_sd import lora_header, run_collect, tiny_run_config
from tests.helpers import read_loss_csv


@dataclass(frozen=True)
class EditFamily:
    name: str
    label: str
    loss_module: str
    loss_function: str

    def __str__(self) -> str:
        return self.name


QWEN = EditFamily("qwen-image-edit-2511", "Qwen-Image-Edit-2511", "core.families.qwen_image.loss", "qwen_loss")
KLEIN = EditFamily("flux2-klein-4b", "FLUX.2 klein 4B", "core.families.flux2.loss", "flux2_loss")


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory) -> Path:
    from core.families.flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("tiny_klein")).folder


@pytest.fixture()
def model_of(request, tiny_qwen_edit_2511, klein_folder):
    return {QWEN.name: tiny_qwen_edit_2511.folder, KLEIN.name: klein_folder}


@pytest.fixture()
def small_edit_pipelines(monkeypatch):
    """QwenImageEditPlusPipeline sizes each reference to about 1 megapixel for the VAE: 64 px keeps the
    previews of this tiny CPU run quick (the wiring is what is checked)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    monkeypatch.setattr(plus, "calculate_dimensions", lambda area, ratio: (64, 64))


def _pipeline(family: EditFamily, folder: Path) -> Any:
    if family is QWEN:
        from diffusers import QwenImagePipeline

        from core.families.qwen_image.tiny import edit_pipeline

        pipe = edit_pipeline(QwenImagePipeline.from_pretrained(folder).components, plus=True)
    else:
        from diffusers import Flux2KleinPipeline

        pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_edit_plus_prompt_is_the_pipelines_with_a_picture_per_reference(tiny_qwen_edit_2511):
    from core.families.qwen_image.text import encode_prompt_list, stack_prompts

    pipe = _pipeline(QWEN, tiny_qwen_edit_2511.folder)
    first, second = Image.new("RGB", (64, 48), (200, 30, 40)), Image.new("RGB", (48, 64), (10, 200, 40))
    ours = stack_prompts(encode_prompt_list(pipe.text_encoder, pipe.tokenizer, ["put the hat on"],
                                            variant=QWEN.name, processor=pipe.processor, images=[[first, second]]))
    theirs, _ = pipe.encode_prompt(["put the hat on"], image=[first, second], device=torch.device("cpu"))
    torch.testing.assert_close(ours.embeds, theirs)
    one = stack_prompts(encode_prompt_list(pipe.text_encoder, pipe.tokenizer, ["put the hat on"], variant=QWEN.name,
                                           processor=pipe.processor, images=[[first]]))
    assert one.embeds.shape[1] < ours.embeds.shape[1]  # the second picture's tokens are in the prompt


def test_the_klein_edit_loss_puts_the_references_after_the_target_with_the_pipelines_ids(klein_folder):
    from core.families.flux2.loss import flux2_loss, reference_tokens

    pipe = _pipeline(KLEIN, klein_folder)
    latents = torch.randn(2, 16, 4, 4)
    refs = [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 4)]
    tokens, ids = reference_tokens(refs)
    assert tokens.shape == (2, 16 + 8, 16)
    assert ids[0, :16, 0].unique().tolist() == [10] and ids[0, 16:, 0].unique().tolist() == [20]
    embeds = torch.randn(2, 5, pipe.transformer.config.joint_attention_dim)
    noise, sigmas = torch.randn_like(latents), torch.tensor([0.3, 0.7])
    plain = flux2_loss(pipe.transformer, latents, embeds, noise=noise, sigmas=sigmas)
    edited = flux2_loss(pipe.transformer, latents, embeds, noise=noise, sigmas=sigmas, references=refs)
    assert torch.isfinite(edited) and not torch.allclose(plain, edited)  # the references reach the target's tokens


@pytest.mark.slow
@pytest.mark.parametrize("family", [QWEN, KLEIN], ids=str)
def test_pairs_with_two_references_and_a_plain_image_train_resume_and_load(family, model_of, small_edit_pipelines,
                                                                          tmp_path, monkeypatch):
    import importlib

    from core.tools.convert import read_lora
    from core.train.image import ImageRun

    data = make_edit_folder(tmp_path / "data", pairs=2, references=2, plain=1)
    model = model_of[family.name]
    module = importlib.import_module(family.loss_module)
    real_loss, seen = getattr(module, family.loss_function), []

    def spy(*args, **kwargs):
        batch = args[1] if len(args) > 1 else None
        refs = kwargs.get("references", getattr(batch, "references", ()))
        seen.append(len(refs))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(module, family.loss_function, spy)
    batches: list[list[int]] = []
    real_batch_loss = ImageRun.batch_loss

    def record(run, indices, **kwargs):
        batches.append([len(run.references_of(i)) for i in indices])
        return real_batch_loss(run, indices, **kwargs)

    monkeypatch.setattr(ImageRun, "batch_loss", record)
    import diffusers

    pipeline_class = getattr(diffusers, "QwenImageEditPlusPipeline" if family is QWEN else "Flux2KleinPipeline")
    real_call, drawn = pipeline_class.__call__, []

    def draw(pipe, *args, **kwargs):
        drawn.append(len(kwargs.get("image") or []))
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", draw)

    def config(out: Path, **more) -> dict:
        return tiny_run_config(model, data, out, batch_size=2, max_train_steps=4, save_steps=2, seed=3,
                               lr_scheduler="cosine", lr_warmup_steps=1, caption_dropout=0.3, **more)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    first, events = run_collect(config(straight, sample_prompts=["put the hat on the cat"], sample_steps=4,
                                       output_name="edit"))
    logs = [e.message for e in events if e.kind == "log"]
    assert any("2 target(s) with reference images (2 with 2); 1 plain image(s) train as text-to-image" in m
               for m in logs), logs
    # Pairs batch together (each with its 2 references), the plain image alone: never mixed.
    assert batches and all(b in ([2, 2], [0]) for b in batches), batches
    assert sorted(set(seen)) == [0, 2], seen
    assert (straight / "samples" / "step-000004-0.png").is_file()
    assert drawn == [2]  # the preview edits the first target's 2 references
    from core.family_api.registry import family_info

    assert lora_header(first["lora"])[1]["ss_base_model_version"] == family_info(family.name).ss_base_model_version
    _, events = run_collect(config(stopped), stop_at=2)
    assert [e for e in events if e.kind == "done"][0].stopped
    second, resumed = run_collect(config(stopped, resume_from="latest"))
    assert [e.step for e in resumed if e.kind == "progress"] == [3, 4]
    for row_a, row_b in zip(read_loss_csv(straight), read_loss_csv(stopped)):
        assert row_a.loss == pytest.approx(row_b.loss, rel=1e-5), f"step {row_a.step}"
    x, y = read_lora(first["lora"], family=family.name), read_lora(second["lora"], family=family.name)
    assert x.modules.keys() == y.modules.keys()
    for key, module_ in x.modules.items():
        torch.testing.assert_close(y.modules[key].delta(), module_.delta(), atol=1e-6, rtol=1e-5, msg=key)
    # The diffusers file loads in the family's edit pipeline, every module of it, and edits with it.
    pipe = _pipeline(family, model)
    pipe.load_lora_weights(str(first["diffusers"]), adapter_name="edit")
    adapted = {n for n, m in pipe.transformer.named_modules() if "edit" in getattr(m, "lora_A", {})}
    keys, _ = lora_header(first["diffusers"])
    assert adapted == {k.removeprefix("transformer.").rsplit(".lora_A", 1)[0] for k in keys if ".lora_A" in k}
    refs = [Image.open(data / "control" / "pair_0.png"), Image.open(data / "control_2" / "pair_0.png")]
    image = pipe(prompt="put the hat on the cat", image=refs, width=64, height=64, num_inference_steps=2,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and float(abs(image).sum()) > 0


def test_edit_plus_is_named_from_its_folder_its_file_name_or_its_hub_id(tiny_qwen_edit_2511, tmp_path):
    import json
    import shutil

    from core.families.qwen_image.load import detect
    from core.model_info import detect_model

    assert detect(str(tiny_qwen_edit_2511.folder)) == "qwen-image-edit-2511"  # zero_cond_t in its transformer
    older = shutil.copytree(tiny_qwen_edit_2511.folder, tmp_path / "edit-2509")
    config = json.loads((older / "transformer" / "config.json").read_text())
    (older / "transformer" / "config.json").write_text(json.dumps({**config, "zero_cond_t": False}))
    assert detect(str(older)) == "qwen-image-edit-2509"
    assert detect_model(str(older)).family == "qwen-image-edit-2509"
    assert detect_model("Qwen/Qwen-Image-Edit-2511").family == "qwen-image-edit-2511"
    assert detect_model("Qwen/Qwen-Image-Edit").family == "qwen-image-edit"
    from core.families.qwen_image.load import variant_from_name

    # ComfyUI's single files hold the same tensor names: their file names tell them apart.
    assert variant_from_name("qwen_image_edit_2509_fp8_e4m3fn.safetensors") == "qwen-image-edit-2509"
    assert variant_from_name("qwen_image_edit_2511_bf16.safetensors") == "qwen-image-edit-2511"
    assert variant_from_name("qwen_image_edit_fp8_e4m3fn.safetensors") == "qwen-image-edit"


def test_the_test_tab_edits_the_uploaded_references_and_refuses_them_for_a_text_model(
        klein_folder, tiny_qwen_edit_2511, tiny_sd1, small_edit_pipelines, tmp_path):
    import numpy as np

    from core.sample import clear_pipeline_cache, generate_images

    data = make_edit_folder(tmp_path / "data", pairs=1, references=2, plain=0)
    refs = [data / "control" / "pair_0.png", data / "control_2" / "pair_0.png"]
    settings = dict(steps=2, guidance=1.0, width=64, height=64, device="cpu")
    try:
        for folder in (klein_folder, tiny_qwen_edit_2511.folder):
            plain = np.asarray(generate_images(str(folder), None, ["a cat"], **settings)[0])
            edited = np.asarray(generate_images(str(folder), None, ["a cat"], references=refs, **settings)[0])
            assert plain.shape == edited.shape == (64, 64, 3) and not np.array_equal(plain, edited), folder
        with pytest.raises(ValueError, match="makes images from text alone; remove the reference images"):
            generate_images(str(tiny_sd1.folder), None, ["a cat"], references=refs, **settings)
    finally:
        clear_pipeline_cache()


def test_references_train_without_the_latent_cache_flipped_with_their_target(klein_folder, tmp_path, monkeypatch):
    from core.families.flux2 import loss as klein_loss

    data = make_edit_folder(tmp_path / "data", pairs=2, references=2, plain=1)
    real, seen = klein_loss.flux2_loss, []

    def spy(transformer, latents, embeds, *args, references=(), **kwargs):
        seen.append([tuple(r.shape) for r in references] + [tuple(latents.shape)])
        return real(transformer, latents, embeds, *args, references=references, **kwargs)

    monkeypatch.setattr(klein_loss, "flux2_loss", spy)
    _, events = run_collect(tiny_run_config(klein_folder, data, tmp_path / "out", batch_size=2, max_train_steps=2,
                                            cache_latents=False, random_flip=True))
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # Each reference encoded at its target's bucket, beside it; the plain image alone.
    assert sorted(seen) == sorted([[(2, 16, 16, 16)] * 3, [(1, 16, 16, 16)]]), seen
