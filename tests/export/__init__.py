"""Tests of the LoRA files: inspection, kohya/WebUI names, LoKr/LoHa, several LoRAs together."""
