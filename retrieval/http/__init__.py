"""The HTTP/JSON API and the web dashboard, served beside gRPC by the same process (``http_port``).

Modules: :mod:`.server` (uvicorn on the server's loop), :mod:`.app` (the FastAPI app, health, status,
the dashboard's files), :mod:`.gate` (keys, admission, metrics, request ids: the gRPC interceptor's
parts), :mod:`.errors` (the one gRPC -> HTTP code table), and the routes per engine: :mod:`.vectors`,
:mod:`.jobs`, :mod:`.engines`. The routes call the gRPC servicers' methods, so both APIs share every
check and sentence. docs/http.md describes the API.
"""
