"""Jobs shared by the service and the workers: their settings, their models (OpenAI's fine-tuning job
shape) and their Redis store. ``training`` stays pure algorithm: it never touches Redis."""
