"""Tests only the qwen_image family has (the shared stories are the conformance suite in tests/families/)."""
