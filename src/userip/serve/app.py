"""The HTTP API (FastAPI) over a :class:`~userip.serve.scorer.CTRScorer`, and ``serve`` to run it with uvicorn.

Endpoints: ``GET /healthz``, ``GET /v1/meta``, ``GET /v1/users/{user_id}/profile``, ``POST /v1/score``.
Ids are the dataset's own ids, as strings (a whole JSON number in a score request is read as its string
form). Every error is JSON ``{"error", "message", "detail"}``:
422 for a malformed request, 413 for too many items (or a body too large for ``max_batch`` ids),
503 when the bank was rebuilt into something the model cannot read, 500 (logged) for anything unexpected;
the server keeps answering after each of them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException

from userip.errors import UseripError
from userip.serve.bank_reader import Unavailable
from userip.serve.scorer import CTRScorer

log = logging.getLogger("userip.serve")

#: Longest id accepted (dataset ids are short; this bounds what one request can make the server hash).
MAX_ID_CHARS = 256



def _id_string(v: Any) -> Any:
    """JSON numbers as ids: a client of a MovieLens-style log sends ``1``, the CLI and the bank use ``"1"``.

    Whole numbers take their integer string form (``1`` and ``1.0`` -> ``"1"``); a fraction or a boolean has no
    unambiguous id string (``1.50`` vs ``"1.5"``), so it is refused like any other non-string.
    """
    if isinstance(v, bool):
        return v  # refused below as "not a valid string"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return v


Id = Annotated[str, BeforeValidator(_id_string), StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user_id": "1", "item_ids": ["50"]}]})

    user_id: Id = Field(description="Dataset user id (a string, or a whole JSON number read as its string form). "
                        "Unknown users are scored with ID 0 features.")
    item_ids: list[Id] = Field(
        min_length=1, description="Dataset item ids (strings or whole numbers, as user_id), at most max_batch "
        "(see /v1/meta). Duplicates allowed."
    )


class ItemScore(BaseModel):
    item_id: str
    score: float = Field(description="Click probability in (0, 1).")


class ScoreResponse(BaseModel):
    user_id: str
    scores: list[ItemScore] = Field(description="Known items, in request order.")
    known_user: bool = Field(description="The user has a dense index in the data or profile IDs in the bank.")
    unknown_items: list[str] = Field(description="Requested ids not in the item table; not scored.")
    profile_ids: dict[str, int] = Field(description="The bank IDs the model read (0 = unknown).")


class ProfileEntry(BaseModel):
    id: int = Field(description="Profile ID from the bank, 1..K; 0 = unknown user.")
    words: list[str] = Field(description="Nearest vocabulary words of the code (explanations.json; [] if none).")
    phrase: str | None = Field(description="Phrase the LM decodes from the code (null if no explanations).")
    genres: list[str] = Field(default_factory=list, description="Genres over-represented among the code's users.")
    titles: list[str] = Field(default_factory=list, description="Titles over-represented among the code's users.")


class ProfileResponse(BaseModel):
    user_id: str
    known: bool = Field(description="Whether the bank holds profile IDs for this user.")
    profiles: dict[str, ProfileEntry]


def _error(status: int, error: str, message: str, detail: Any = None) -> JSONResponse:
    content = {"error": error, "message": message, "detail": message if detail is None else detail}
    return JSONResponse(status_code=status, content=content)


_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
_REQUEST_SCHEMA = ScoreRequest.model_json_schema()


def _validation_error(raw_errors) -> JSONResponse:
    """422 with every problem (``loc``, ``msg``, ``type``) and a one-line message naming the fields."""
    errors = [
        {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
        for e in raw_errors
    ]
    parts = []
    for e in errors[:5]:
        where = ".".join(x for x in e["loc"] if x != "body") or "body"
        if e["type"] == "json_invalid":
            where = "body (invalid JSON)"
        parts.append(f"{where}: {e['msg']}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return _error(422, "invalid_request", "; ".join(parts) + more, errors)


class _BodyLimit:
    """Refuse a declared body larger than any valid request (Content-Length) before it is read or parsed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            for key, value in scope["headers"]:
                if key == b"content-length":
                    try:
                        n = int(value)
                    except ValueError:
                        n = 0  # the HTTP layer rejects a malformed header itself
                    if n > self.max_bytes:
                        msg = f"request body of {n} bytes exceeds {self.max_bytes} bytes (too many or too long ids)"
                        body = json.dumps({"error": "too_large", "message": msg, "detail": msg}).encode()
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 413,
                                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                            }
                        )
                        await send({"type": "http.response.body", "body": body})
                        return
                    break
        await self.app(scope, receive, send)


def create_app(
    bank: str | os.PathLike | Any,
    ctr_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    backbone: str | None = None,
    max_batch: int = 1000,
    *,
    explanations: str | os.PathLike | None = None,
    history: str = "all",
    torch_threads: int | None = 1,
    scorer: CTRScorer | None = None,
) -> FastAPI:
    """Load the model, feature tables and bank once (errors surface here, not on the first request) and
    return the app. ``torch_threads=1``: one request at a time per core beats intra-op threads for batches
    this small. ``scorer`` reuses an already loaded one (the other loading arguments are then ignored)."""
    import torch

    from userip import __version__

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UseripError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if torch_threads is not None:
        torch.set_num_threads(int(torch_threads))
    if scorer is None:
        scorer = CTRScorer(bank, ctr_dir, data_dir, backbone, explanations=explanations, history=history)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        scorer.close()

    app = FastAPI(
        title="userip",
        version=__version__,
        description="CTR scores from a trained model with profile IDs read from the feature bank (no LLM call).",
        lifespan=lifespan,
    )
    app.state.scorer = scorer
    app.state.max_batch = max_batch
    # A valid body holds at most max_batch ids of MAX_ID_CHARS (JSON-escaped up to 6 bytes a char) + syntax.
    app.add_middleware(_BodyLimit, max_bytes=4096 + max_batch * (MAX_ID_CHARS * 6 + 4))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, _HTTP_ERRORS.get(exc.status_code, f"http_{exc.status_code}"), str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # backstop; handlers catch first
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal_error", "internal server error (logged)")

    def _failed(what: str, exc: Exception) -> JSONResponse:
        if isinstance(exc, Unavailable):
            log.warning("%s: %s", what, exc)
            return _error(503, "unavailable", str(exc))
        log.exception("%s failed", what)
        return _error(500, "internal_error", f"internal error while {what} (logged)")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/meta")
    async def meta() -> JSONResponse:
        try:
            out = scorer.meta()
        except Exception as e:
            return _failed("reading the meta", e)
        out["max_batch"] = max_batch
        return JSONResponse(out)

    @app.get("/v1/users/{user_id:path}/profile", response_model=ProfileResponse)  # :path: ids may hold "/"
    async def profile(user_id: str) -> Any:
        if not user_id or len(user_id) > MAX_ID_CHARS:
            return _error(422, "invalid_request", f"user_id must have 1..{MAX_ID_CHARS} characters")
        try:
            return scorer.profile(user_id)
        except Exception as e:
            return _failed("reading the profile", e)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses={
            413: {"description": "More than max_batch item ids"},
            422: {"description": "Malformed request (see message)"},
            503: {"description": "Bank unusable"},
        },
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}},
    )
    async def score(request: Request) -> Any:
        # Parsed and validated in one pass by pydantic-core (JSON bytes -> model): about half the per-request
        # overhead of FastAPI's body handling (json.loads, then validation), same errors.
        try:
            req = ScoreRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return _validation_error(e.errors(include_url=False))
        n = len(req.item_ids)
        if n > max_batch:
            return _error(
                413, "too_many_items", f"item_ids has {n} ids; at most {max_batch} per request (split the batch)"
            )
        try:
            res = scorer.score(req.user_id, req.item_ids)
        except Exception as e:
            return _failed("scoring", e)
        body = {
            "user_id": res.user_id,
            "scores": [
                {"item_id": i, "score": s} for i, s in zip(res.item_ids, res.scores.tolist(), strict=True)
            ],
            "known_user": res.known_user,
            "unknown_items": res.unknown_items,
            "profile_ids": res.profile_ids,
        }
        # Built here, so FastAPI skips re-validating it against ScoreResponse (1.3 ms for 1000 items);
        # ScoreResponse still documents the shape in the OpenAPI schema.
        return Response(content=to_json(body), media_type="application/json")

    return app


def serve(
    bank: str | os.PathLike,
    ctr_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    backbone: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 1000,
    explanations: str | os.PathLike | None = None,
    history: str = "all",
    access_log: bool = False,
    log_level: str = "info",
) -> None:
    """Load everything, then run the app with uvicorn (one process, one event loop) until interrupted."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(bank, ctr_dir, data_dir, backbone, max_batch, explanations=explanations, history=history)
    gc.collect()
    gc.freeze()  # the loaded tables never die: keep them out of every later GC pass (fewer latency spikes)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
