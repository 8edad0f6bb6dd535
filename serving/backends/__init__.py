"""Engines behind the API: the built-in batching engine (`local`) or an OpenAI-compatible upstream (`upstream`)."""
