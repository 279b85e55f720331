"""Serving: a continuous-batching engine over a shared KV cache, and an OpenAI-compatible
HTTP API on it."""
