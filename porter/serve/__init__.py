"""porter's OpenAI-compatible HTTP server: :func:`create_app` (FastAPI), ``porter serve``."""

__all__ = ["create_app"]


def __getattr__(name):  # fastapi is imported only when the server is wanted
    if name == "create_app":
        from porter.serve.app import create_app

        return create_app
    raise AttributeError(name)
