"""The model worker as its own service: AtlasService behind an HTTP API, and its client.

    python -m backend.serving [--host 127.0.0.1] [--port 8600]

http_api: the routes (create_app); methods: the exported service methods and their argument
schemas; codec: the wire format (JSON, npy, npz; never pickle); client: WorkerClient, with
AtlasService's interface; run_app: `make app`, the worker and the app started and stopped
together.
"""

DEFAULT_PORT = 8600
