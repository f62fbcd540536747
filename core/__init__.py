"""lora-scripts engine: config, data, models, training, export. Never imports the UI."""
