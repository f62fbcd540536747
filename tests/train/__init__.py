"""Tests of the training loop: image runs, resume, recovery, several processes and sharding, EMA, distilled models."""
