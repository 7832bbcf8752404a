"""The explorer's web app (FastAPI): JSON/PNG endpoints over the served stores, and the static page.

    GET /                                         the page (static/index.html; plain JS modules, no build step)
    GET /api/stores                               every served store's metadata (blocks with shapes, timesteps,
    GET /api/stores/{s}                             seeds, crops, samples, finished units)
    GET /api/stores/{s}/samples?offset&limit      a page of rows: id, label, finished, ok
    GET /api/stores/{s}/samples/{row}/image.png?size&crop   the row's image as the extractor decoded it
    GET /api/stores/{s}/norm?block&row&t&seed&crop          token norms + detected anomalies + stored labels
    GET /api/stores/{s}/similarity?block&row&t&seed&y&x&crop   cosine similarity of token (y, x) to every token
    GET /api/stores/{s}/topk?block&row&t&seed&y&x&k&start&n    its k most similar tokens in each of n other images
    GET /api/colormap                             the overlay's colour table (matplotlib's viridis, 256 steps)

Stores are addressed by their index on the command line, never by a path; the app only reads (GET). Bad requests
get a 4xx JSON `{"detail": message}`: unknown store/block/row/crop/timestep 404, an unfinished or failed row 409,
other bad arguments 400, malformed parameters 422; anything unexpected a 500 with one line, never a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from sdfeat.errors import RowNotReadyError, SdfeatError, SourceError, StoreError, UnknownBlockError
from sdfeat.explore.views import MAX_K, MAX_PAGE, MAX_TOPK_IMAGES, StoreView

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# Parameter types at module level: the endpoints' annotations are strings (PEP 563) that FastAPI resolves here.
Block = Annotated[str, Query(min_length=1, max_length=200)]
Row = Annotated[int, Query()]
Opt = Annotated[int | None, Query()]


def _json(payload: object, status: int = 200) -> Response:
    # json.dumps directly: FastAPI's encoder walks every float of a map one by one.
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json")


def _status_of(err: SdfeatError) -> int:
    if isinstance(err, RowNotReadyError):
        return 409
    if isinstance(err, (UnknownBlockError, StoreError, SourceError)):
        return 404
    return 400


def colormap(name: str = "viridis", steps: int = 256) -> list[list[int]]:
    """[[r, g, b], ...] 0..255 of a matplotlib colour map: the page colours value v as entry
    round((v - vmin) / (vmax - vmin) * (steps - 1))."""
    import matplotlib
    import numpy as np

    rgba = matplotlib.colormaps[name](np.linspace(0.0, 1.0, steps))  # (steps, 4) in 0..1
    return np.round(rgba[:, :3] * 255).astype(int).tolist()


def create_app(paths: Sequence[str]) -> FastAPI:
    """The app serving `paths` (opened now: a path without a store raises StoreError here)."""
    views = [StoreView(i, p) for i, p in enumerate(paths)]
    app = FastAPI(title="sdfeat explore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.views = views

    @app.exception_handler(SdfeatError)
    async def domain_error(_: Request, err: SdfeatError) -> Response:
        return _json({"detail": str(err)}, _status_of(err))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> Response:
        return _json({"detail": str(err.detail)}, err.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return _json({"detail": f"{where}: {first.get('msg', 'invalid value')}"}, 422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> Response:
        log.exception("explore: unexpected error")
        return _json({"detail": f"internal error ({type(err).__name__}); see the server log"}, 500)

    def view(s: int) -> StoreView:
        if not 0 <= s < len(views):
            raise StoreError(f"store: index {s} is out of range (serving {len(views)} store(s): 0..{len(views) - 1})")
        return views[s]

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/colormap")
    def get_colormap() -> Response:
        return _json({"name": "viridis", "colors": colormap()})

    @app.get("/api/stores")
    def stores() -> Response:
        return _json([v.meta() for v in views])

    @app.get("/api/stores/{s}")
    def store_meta(s: int) -> Response:
        return _json(view(s).meta())

    @app.get("/api/stores/{s}/samples")
    def samples(s: int, offset: int = 0, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 48) -> Response:
        return _json(view(s).samples(offset, limit))

    @app.get("/api/stores/{s}/samples/{row}/image.png")
    def image(s: int, row: int, size: Opt = None, crop: Opt = None) -> Response:
        v = view(s)
        if crop is not None and crop not in v.features.crops:
            raise StoreError(f"crop: no crop variant {crop} in store {s} (stored: {v.features.crops or 'none'})")
        v.check_not_failed(row)  # a failed row: 409 with its recorded reason (unfinished rows are shown)
        return Response(v.images.png(row, size, crop or 0), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/stores/{s}/norm")
    def norm(s: int, block: Block, row: Row, t: Opt = None, seed: Opt = None, crop: Opt = None) -> Response:
        v = view(s)
        return _json(v.norm(v.selection(block, t, seed, crop), row))

    @app.get("/api/stores/{s}/similarity")
    def similarity(s: int, block: Block, row: Row, y: int, x: int, t: Opt = None, seed: Opt = None,
                   crop: Opt = None) -> Response:
        v = view(s)
        return _json(v.similarity(v.selection(block, t, seed, crop), row, y, x))

    @app.get("/api/stores/{s}/topk")
    def topk(s: int, block: Block, row: Row, y: int, x: int, t: Opt = None, seed: Opt = None, crop: Opt = None,
             k: Annotated[int, Query(ge=1, le=MAX_K)] = 3, start: Annotated[int, Query(ge=0)] = 0,
             n: Annotated[int, Query(ge=1, le=MAX_TOPK_IMAGES)] = 48) -> Response:
        v = view(s)
        return _json(v.topk(v.selection(block, t, seed, crop), row, y, x, k, start, n))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

