"""Tests only the sd family has (the shared stories are the conformance suite in tests/families/)."""
