"""Celery workers that run queued fine-tuning jobs (imports training, faithlens)."""
