"""faithlens' HTTP API: annotated generation, OpenAI-compatible endpoints, adapters, jobs."""
