"""Data sets: image folders with captions, text data files."""
