"""The HTTP service (``ktl.api``): FastAPI app, routers, durable store — the "knowledge-transfer server over HTTP" issue."""
