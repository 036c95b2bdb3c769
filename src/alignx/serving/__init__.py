"""Serving: an OpenAI-compatible HTTP server with per-request MoCaE routing, and the vLLM hand-off."""
