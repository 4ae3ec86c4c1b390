"""The HTTP and WebSocket handlers, one module per endpoint family (routes: proxy/routes.py)."""
