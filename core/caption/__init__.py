"""Image captioning: a registry of captioners, loading them, and the batch job.

The GUI and `tools/auto_label.py` use only these names:

    from core.caption import CaptionOptions, caption_folder, CAPTIONERS
    result = caption_folder(CaptionOptions(input_dir="data/style_train", model="blip-base"), ctx)

Heavy imports (torch, transformers) happen only when a model is loaded.
"""
from core.caption.filename import FilenameCaptioner, caption_from_filename
from core.caption.models import Captioner, CaptionerLoadError, ModelCaptioner, load_captioner
from core.caption.registry import (CAPTIONERS, CaptionerNotFoundError, CaptionerSpec, ResolvedCaptioner,
                                   captioner_names, captioner_status, offline_dir, resolve_captioner)
from core.caption.run import (EXISTING_MODES, CaptionJobError, CaptionOptions, CaptionResult, caption_folder,
                              find_images, join_caption)

__all__ = [
    "CAPTIONERS", "EXISTING_MODES", "CaptionJobError", "CaptionOptions", "CaptionResult", "Captioner",
    "CaptionerLoadError", "CaptionerNotFoundError", "CaptionerSpec", "FilenameCaptioner", "ModelCaptioner",
    "ResolvedCaptioner", "caption_folder", "caption_from_filename", "captioner_names", "captioner_status", "find_images",
    "join_caption", "load_captioner", "offline_dir", "resolve_captioner",
]
