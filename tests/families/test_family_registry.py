"""The family table: every family the trainer knows, with sizes that match the real networks."""
import pytest

from core.family_api.registry import FAMILIES, family_info, family_label


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell", "chroma"])
def test_the_flux_sizes_are_the_real_transformers_built_on_the_meta_device(name):
    from core.families.flux.lora import flux_param_counts

    assert family_info(name).trained_params == flux_param_counts(name, 4, "all")["total"]


def test_every_family_has_a_name_for_people_and_for_webui():
    for info in FAMILIES.values():
        assert info.label and info.ss_base_model_version and info.modelspec_architecture
        assert info.kind in ("unet", "flux", "dit") and info.native_resolution in (512, 640, 768, 960, 1024, 1328)
        assert info.kind == "unet" or (info.impl != "core.families.sd.family" and "flow" in info.config_groups)
    assert family_label("sdxl") == "SDXL" and family_label("llm") == "LLM"


def test_an_unknown_family_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model family 'sd4'.*sd1, sd2, sdxl, flux2-klein-4b"):
        family_info("sd4")
