"""Tests only the zimage family has (the shared stories are the conformance suite in tests/families/)."""
