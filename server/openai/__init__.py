"""The OpenAI-compatible HTTP layer: the pydantic protocol, one serving class per endpoint family, the SSE
writers, image fetching, and the app factory with its routes, error handlers and OpenAPI document."""
