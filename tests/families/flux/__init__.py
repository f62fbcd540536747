"""Tests only the flux family has (the shared stories are the conformance suite in tests/families/)."""
