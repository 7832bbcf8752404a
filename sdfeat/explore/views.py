"""What the explorer shows, computed from one open store: its metadata, which rows are finished, one image's
activations (LRU-cached), its token-norm and similarity maps, anomalies, and the cross-image top-k.

The maps are `sdfeat.report.maps` (`norm_map`, `similarity_map`, `cosine_to`: the functions `sdfeat show` uses);
anomalies are found with the metrics' label-free rule (`metrics.anomalies`: pooled ratios, robust threshold,
components) and its default parameters. No HTTP here (`app.py` maps this to endpoints). Every argument is checked
against the store (block, timestep, seed, crop, row); nothing is read from a path that came from a request.

A store still being written is served as it stands: the done markers say which rows are finished (re-read at
most every `STATUS_TTL_S` seconds); asking for an unfinished or failed row raises `RowNotReadyError` (a failed
row's maps and image alike, with the reason its unit's done marker records).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sdfeat import store
from sdfeat.errors import ArgumentError, RowNotReadyError, StoreError, UnknownBlockError
from sdfeat.explore.cache import ByteLRU
from sdfeat.explore.images import SourceImages
from sdfeat.metrics import anomalies
from sdfeat.metrics import results
from sdfeat.metrics.norms import token_norms
from sdfeat.metrics.tasks import MetricOptions, ref_size
from sdfeat.models.blocks import canonical_name
from sdfeat.report.maps import cosine_to, norm_map, similarity_map
from sdfeat.store.query import FeatureStore, open_store

STATUS_TTL_S = 2.0
MAX_PAGE = 200            # samples per page
MAX_TOPK_IMAGES = 512     # other images one top-k request may scan
MAX_K = 32                # tokens per image in a top-k answer
TOPK_CHUNK = 16           # rows read together by the top-k scan
THRESHOLD_IMAGES = 64     # the detection threshold comes from at most this many finished images, evenly spaced
ACTS_CACHE_BYTES = 512 * 2**20
NORMS_CACHE_BYTES = 64 * 2**20  # 4 KiB per image at 32 x 32 tokens


@dataclass(frozen=True)
class Selection:
    """One array of the store at one timestep and seed: what a map is drawn from."""

    block: str  # canonical name
    timestep: int
    seed: int
    crop: int | None  # crop margin in px; None = the full image

    def label(self) -> str:
        return f"{self.block} t={self.timestep} seed={self.seed}" + (f" crop {self.crop}px" if self.crop else "")


class StoreView:
    """One store as the explorer serves it (addressed by its index among the served stores)."""

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.features: FeatureStore = open_store(path)
        self.n = len(self.features)
        self.attrs = self.features.attrs
        self.images = SourceImages(path, self.features.spec.resolution, self.n)
        self._acts: ByteLRU[tuple[np.ndarray, np.ndarray]] = ByteLRU(ACTS_CACHE_BYTES)
        self._norms: ByteLRU[np.ndarray] = ByteLRU(NORMS_CACHE_BYTES)  # top-k chunks' token norms (small)
        self._lock = threading.Lock()
        self._status: tuple[float, np.ndarray, np.ndarray, int] | None = None
        self._thresholds: dict[tuple[Selection, int], float] = {}
        self._labels: np.ndarray | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdfeat-explore")

    # -- what is there ------------------------------------------------------------------------------------

    @property
    def crop_rows(self) -> int:
        """Crop variants exist for rows 0..crop_rows-1 (the job's `variants.samples`; all rows by default)."""
        return self.attrs.crop_samples

    def status(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(finished (n,) bool, ok (n,) bool, units done): re-read from the store at most every STATUS_TTL_S."""
        with self._lock:
            if self._status is None or time.monotonic() - self._status[0] > STATUS_TTL_S:
                fs, root = store.filesystem(self.features.path)
                fs.invalidate_cache(store.join(root, store.PROGRESS))  # s3fs caches listings: see new markers
                done = store.done_units(self.features.path)
                finished = np.zeros(self.n, dtype=bool)
                for unit in done:
                    rows = self.attrs.rows_of(unit)
                    finished[rows.start:rows.stop] = True
                self._status = (time.monotonic(), finished, self.features.ok & finished, len(done))
            return self._status[1], self._status[2], self._status[3]

    def _crop_blocks(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for margin in self.features.crops:
            for block in self.features.blocks:
                if f"crops/{margin}/{block}" in self.features.group:
                    found.setdefault(block, []).append(margin)
        return found

    def meta(self) -> dict:
        finished, ok, units_done = self.status()
        crops = self._crop_blocks()
        return {
            "index": self.index, "path": self.features.path, "model": self.attrs.model,
            "protocol": self.attrs.protocol, "resolution": self.features.spec.resolution, "samples": self.n,
            "finished": int(finished.sum()), "ok": int(ok.sum()), "failed": int((finished & ~ok).sum()),
            "units": self.attrs.units, "units_done": units_done, "unit_size": self.attrs.unit_size,
            "timesteps": self.features.timesteps, "seeds": self.features.seeds, "crops": self.features.crops,
            "crop_samples": self.crop_rows,
            "class_names": None if self.attrs.class_names is None else list(self.attrs.class_names),
            "blocks": [{"name": b, "shape": list(self.features.shape(b)[-3:]), "crops": crops.get(b, [])}
                       for b in self.features.blocks],
            "has_labels": len(self._stored_labels()) > 0,
        }

    def samples(self, offset: int, limit: int) -> dict:
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise ArgumentError(f"offset/limit: need offset >= 0 and 1 <= limit <= {MAX_PAGE}")
        finished, ok, _ = self.status()
        names = self.attrs.class_names or ()
        rows = range(offset, min(offset + limit, self.n))
        reasons = self.failure_reasons([row for row in rows if finished[row] and not ok[row]])
        items = []
        for row in rows:
            label = int(self.features.labels[row])
            items.append({"row": row, "id": self.features.sample_ids[row], "label": label,
                          "label_name": names[label] if 0 <= label < len(names) else None,
                          "finished": bool(finished[row]), "ok": bool(ok[row]), "reason": reasons.get(row)})
        return {"total": self.n, "offset": offset, "items": items}

    # -- arguments -----------------------------------------------------------------------------------------

    def selection(self, block: str, timestep: int | None, seed: int | None, crop: int | None) -> Selection:
        name = canonical_name(block)
        if name not in self.features.blocks:
            raise UnknownBlockError(f"block: '{block}' is not in store {self.index}; stored blocks: "
                                    f"{', '.join(self.features.blocks)}")
        t = self.features.timesteps[0] if timestep is None else timestep
        s = self.features.seeds[0] if seed is None else seed
        if t not in self.features.timesteps:
            raise StoreError(f"timestep: {t} is not in store {self.index} (stored: {self.features.timesteps})")
        if s not in self.features.seeds:
            raise StoreError(f"seed: {s} is not in store {self.index} (stored: {self.features.seeds})")
        if crop is not None:
            self.features.array(name, crop)  # raises StoreError naming the crop when it is not stored
        return Selection(name, t, s, crop)

    def failure_reasons(self, rows: list[int]) -> dict[int, str]:
        """{row: why its image could not be used} for finished, failed rows: the reasons their units' done markers
        record (each marker read once)."""
        units = sorted({self.attrs.unit_of(row) for row in rows})
        try:
            reports = store.read_markers(self.features.path, units)
        except StoreError:
            reports = []
        recorded = {f.get("sample_id"): f["reason"] for r in reports for f in r.failures}
        return {row: recorded.get(self.features.sample_ids[row], "its image could not be used") for row in rows}

    def failure_reason(self, row: int) -> str:
        """Why a failed row's image could not be used (`failure_reasons` of one row)."""
        return self.failure_reasons([row])[row]

    def check_not_failed(self, row: int) -> int:
        """The row, when in range and not a finished row that failed (RowNotReadyError with the recorded reason)."""
        if not 0 <= row < self.n:
            raise StoreError(f"row: {row} is out of range for {self.n} samples (0..{self.n - 1})")
        finished, ok, _ = self.status()
        if finished[row] and not ok[row]:
            raise RowNotReadyError(f"row {row} ({self.features.sample_ids[row]}) failed: {self.failure_reason(row)}")
        return row

    def check_row(self, row: int, sel: Selection | None = None) -> int:
        self.check_not_failed(row)
        finished, _, _ = self.status()
        if not finished[row]:
            raise RowNotReadyError(f"row {row} is not finished yet (unit {self.attrs.unit_of(row)} has no done marker)")
        if sel is not None and sel.crop is not None and row >= self.crop_rows:
            raise StoreError(f"crop: row {row} has no crop variant (crops cover the first "
                             f"{self.crop_rows} rows)")
        return row

    # -- maps ----------------------------------------------------------------------------------------------

    def acts(self, sel: Selection, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) float32 activations of one checked row and their (H, W) token norms (`maps.norm_map`)."""

        def read() -> tuple[np.ndarray, np.ndarray]:
            values = self.features.read(sel.block, slice(row, row + 1), sel.timestep, sel.seed, sel.crop)
            return values[0], norm_map(values[0])  # (C, H, W), (H, W)

        return self._acts.get((sel, row), read, lambda v: v[0].nbytes + v[1].nbytes)

    def similarity(self, sel: Selection, row: int, y: int, x: int) -> dict:
        acts, norms = self.acts(sel, self.check_row(row, sel))
        sim = similarity_map(acts, y, x)  # (H, W); raises for a token outside the map
        return {"shape": list(sim.shape), "values": sim.tolist(), "vmin": -1.0, "vmax": 1.0,
                "token": {"y": y, "x": x, "norm": float(norms[y, x])}}

    def norm(self, sel: Selection, row: int) -> dict:
        _, norms = self.acts(sel, self.check_row(row, sel))
        height = norms.shape[0]
        threshold, used = self._threshold(sel)
        pooled = anomalies.pooled_ratios(norms[None])  # (1, H/2, W/2)
        found = anomalies.detect(pooled, threshold)  # (M, 4): sample, x, y, peak ratio
        detected = [{"x": int(x), "y": int(y), "size": 2, "peak_ratio": round(float(r), 4)}
                    for _, x, y, r in found]
        labels = []
        if sel.crop is None:
            for _, x, y in self._labels_of(row):
                rows, cols = anomalies.label_patch(int(x), int(y), height, self._ref_size())
                labels.append({"y": rows.start, "x": cols.start, "size": rows.stop - rows.start})
        return {"shape": list(norms.shape), "values": norms.tolist(), "vmin": float(norms.min()),
                "vmax": float(norms.max()), "anomalies": detected, "labels": labels,
                "threshold": {"ratio": round(threshold, 4), "images": used}}

    # -- anomalies -----------------------------------------------------------------------------------------

    def _threshold(self, sel: Selection) -> tuple[float, int]:
        """The detection threshold of `anomalies.robust_threshold` over the pooled ratios of up to
        THRESHOLD_IMAGES finished images (all of them in small stores), cached until more rows finish."""
        _, ok, _ = self.status()
        rows = np.flatnonzero(ok)
        key = (sel, len(rows))
        if sel.crop is not None:
            rows = rows[rows < self.crop_rows]
        if len(rows) > THRESHOLD_IMAGES:
            rows = rows[np.linspace(0, len(rows) - 1, THRESHOLD_IMAGES).round().astype(np.int64)]
        if key not in self._thresholds:
            maps = np.concatenate([token_norms(self.features.read(sel.block, rows[i:i + TOPK_CHUNK], sel.timestep,
                                                            sel.seed, sel.crop))
                                   for i in range(0, len(rows), TOPK_CHUNK)])  # (k, H, W), not cached
            opts = MetricOptions()
            self._thresholds[key] = anomalies.robust_threshold(anomalies.pooled_ratios(maps), opts.detect_k,
                                                               opts.detect_min_ratio)
        return self._thresholds[key], len(rows)

    def _stored_labels(self) -> np.ndarray:
        """(L, 3) (store row, x, y) from results/anomalies_detected.parquet when `sdfeat metrics` wrote one."""
        if self._labels is None:
            table = results.read_results(self.features.path, results.DETECTIONS)  # None: no detections written
            labels = np.zeros((0, 3), dtype=np.int64)
            if table is not None:
                labels = np.stack([table.column(c).to_numpy() for c in ("sample", "x", "y")], axis=1)
            self._labels = labels.astype(np.int64).reshape(-1, 3)
        return self._labels

    def _labels_of(self, row: int) -> np.ndarray:
        labels = self._stored_labels()
        return labels[labels[:, 0] == row]

    def _ref_size(self) -> int:
        """The labels' map size, as the metrics take it (`tasks.ref_size`)."""
        return ref_size(self.features, MetricOptions())

    # -- cross-image top-k ---------------------------------------------------------------------------------

    def topk(self, sel: Selection, row: int, y: int, x: int, k: int, start: int, count: int) -> dict:
        """The k tokens most similar (cosine) to token (y, x) of `row` in each finished image among rows
        [start, start + count) other than `row`; rows read TOPK_CHUNK at a time."""
        if not 1 <= k <= MAX_K:
            raise ArgumentError(f"k: {k} is outside 1..{MAX_K}")
        if start < 0 or not 1 <= count <= MAX_TOPK_IMAGES:
            raise ArgumentError(f"start/n: need start >= 0 and 1 <= n <= {MAX_TOPK_IMAGES}")
        acts, _ = self.acts(sel, self.check_row(row, sel))
        similarity_map(acts, y, x)  # checks the token lies on the map
        query = acts[:, y, x]  # (C,)
        _, ok, _ = self.status()
        stop = min(start + count, self.n if sel.crop is None else self.crop_rows)
        rows = np.array([r for r in range(start, stop) if ok[r] and r != row], dtype=np.int64)
        chunks = [rows[i:i + TOPK_CHUNK] for i in range(0, len(rows), TOPK_CHUNK)]
        results = list(self._pool.map(lambda c: self._topk_chunk(sel, c, query, k), chunks))
        images = [item for part in results for item in part]
        names = self.features.sample_ids
        for item in images:
            item["id"] = names[item["row"]]
        return {"query": {"row": row, "y": y, "x": x}, "k": k, "scanned": len(rows),
                "shape": list(acts.shape[1:]), "images": images}

    def _topk_chunk(self, sel: Selection, rows: np.ndarray, query: np.ndarray, k: int) -> list[dict]:
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        samples = slice(lo, hi) if hi - lo == len(rows) else rows  # consecutive rows: a plain slice read
        raw = self.features.read(sel.block, samples, sel.timestep, sel.seed, sel.crop, raw=True)  # (n, C, H, W) fp16
        acts = raw.astype(np.float32)  # (n, C, H, W)
        norms = self._norms.get((sel, rows.tobytes()), lambda: token_norms(acts), lambda a: a.nbytes)  # (n, H, W)
        sims = cosine_to(acts, query, norms)  # (n, H, W)
        n, height, width = sims.shape
        flat = sims.reshape(n, -1)
        k = min(k, flat.shape[1])
        best = np.argpartition(-flat, k - 1, axis=1)[:, :k]  # (n, k) unordered
        order = np.argsort(-np.take_along_axis(flat, best, axis=1), axis=1, kind="stable")
        best = np.take_along_axis(best, order, axis=1)
        out = []
        for i, r in enumerate(rows):
            out.append({"row": int(r), "matches": [{"y": int(j // width), "x": int(j % width),
                                                     "similarity": float(flat[i, j])} for j in best[i]]})
        return out
