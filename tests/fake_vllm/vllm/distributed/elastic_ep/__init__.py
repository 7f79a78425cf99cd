"""Stand-in package for tests (not vLLM)."""
