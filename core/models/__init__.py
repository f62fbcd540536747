"""Model loading: Stable Diffusion (single file / diffusers folder / hub id)."""
from core.models.sd import FAMILIES, SDModel, load_sd_model, model_family, module_identity  # noqa: F401
from core.models.sd_single_file import ModelLoadError, read_checkpoint  # noqa: F401
