"""Tests of captioning: the captioners and batch captioning."""
