"""The HTTP side: the aiohttp app (POST /infer, metrics, OpenAPI) and the health checks behind /health."""
