"""The Gradio app: one module per tab, talking to `core` only through Job and plain functions."""
