"""Tests of data sets: images, clips, pairs, buckets, the health check."""
