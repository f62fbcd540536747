"""Model families beyond SD 1.x/2.x/SDXL: their LoRA file names and formats (FLUX.1, Chroma)."""
