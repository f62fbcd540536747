"""LoRA tools: inspect, convert, merge, resize and extract LoRA files (the engine of tools/export.py
and the GUI's Tools tab).

    core.tools.convert  read any LoRA (kohya / diffusers / PEFT) and write it in another format
    core.tools.merge    bake LoRAs into a base model (SD single file, LLM folder); combine LoRAs
    core.tools.resize   SVD rank reduction with a reported error; extract a LoRA from two models
    core.tools.modules  the (down, up, alpha) module form every tool works on
"""
