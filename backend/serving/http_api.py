"""The worker service's HTTP API: one route per exported service method, plus health.

    GET  /health          200 while the process runs (no token needed)
    GET  /ready           200 once the cache file is open and the worker runs jobs, else 503
    GET  /api/settings    the worker's Settings (limits the pages show, folders)
    POST /api/<method>    a method of EXPORTED (backend.serving.methods): the body is its
                          arguments as JSON, the answer its result (JSON, npy or npz)

Errors are JSON {"error": class name, "message": ...}: a body that does not fit the method's
schema is a 422 InputError naming the argument; the service's own errors keep their class
(InputError 400, NotFoundError 404, ... see codec.ERRORS). With a token, every route but
/health needs the header `Authorization: Bearer <token>`.

The service is `app.state.service` (set here, or later by whatever wraps the app, e.g. a Ray
Serve ingress); until it is set every route but /health answers 503.
"""

import hmac
import json

import fastapi
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from backend.errors import AtlasError, WorkerUnavailable
from backend.serving import codec
from backend.serving.methods import METHODS, Method

OPEN_PATHS = {"/health"}


def create_app(service, token: str | None = None) -> fastapi.FastAPI:
    """The API over `service` (an AtlasService, or anything with the exported methods and
    `ready()` and `settings`). `token`: required of every request but /health when set."""
    app = fastapi.FastAPI(title="Attention Atlas worker",
                          description=__doc__.split("\n\n")[0])
    app.state.service = service

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _json(401, {"error": "AtlasError", "message":
                                   "The worker needs its token: set ATLAS_WORKER_TOKEN to it."})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError):
        problems = "; ".join(_problem(e) for e in error.errors())
        method = request.url.path.rsplit("/", 1)[-1]
        return _json(422, {"error": "InputError",
                           "message": f"A bad request to '{method}': {problems}."})

    @app.exception_handler(HTTPException)
    async def no_such_route(request: Request, error: HTTPException):
        return _json(error.status_code, {"error": "InputError", "message":
                                         f"{error.detail}: {request.method} {request.url.path}"})

    async def service_error(request: Request, error: Exception):
        status, body = codec.error_response(error)
        return Response(body, status, media_type=codec.JSON)

    # The service's own errors are answers; anything else is also logged with its traceback.
    for error in (AtlasError, TimeoutError, Exception):
        app.add_exception_handler(error, service_error)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready(request: Request) -> Response:
        _service(request)
        if not request.app.state.service.ready():
            raise WorkerUnavailable("The worker's job thread has stopped.")
        return _json(200, {"status": "ready"})

    @app.get("/api/settings")
    def settings(request: Request) -> Response:
        return _encoded(_service(request).settings)

    for method in METHODS.values():
        app.add_api_route(f"/api/{method.name}", _endpoint(method), methods=["POST"],
                          name=method.name, description=method.doc,
                          response_class=Response)
    return app


def _endpoint(method: Method):
    Arguments = method.arguments

    def endpoint(request: Request, arguments: Arguments) -> Response:
        return _encoded(method.call(_service(request), arguments))
    return endpoint


def _service(request: Request):
    service = request.app.state.service
    if service is None:
        raise WorkerUnavailable("The worker is starting.")
    return service


def _encoded(value) -> Response:
    body, content_type = codec.encode(value)
    return Response(body, media_type=content_type)


def _json(status: int, fields: dict) -> Response:
    return Response(json.dumps(fields).encode(), status,
                    media_type=codec.JSON)


def _problem(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    return f"{where or 'the body'}: {error['msg']}"

