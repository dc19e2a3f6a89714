"""The OpenAI-compatible /v1 API: keys, rate limits, model registry, usage accounting."""
