"""Tests only the sd3 family has (the shared stories are the conformance suite in tests/families/)."""
