"""Serving: a continuous-batching engine over a shared KV cache (engine.py), and an
OpenAI-compatible HTTP API on it: api.py makes the app and serves it, validation.py checks each
request's fields, completions.py answers chat and text completions in responses.py's shapes,
status.py answers /health and /metrics, errors.py gives errors OpenAI's shape."""
