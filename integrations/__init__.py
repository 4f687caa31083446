"""Integrations with task queues and web frameworks (Celery, SQS, Kafka, ASGI)."""
