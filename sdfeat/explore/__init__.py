"""`sdfeat explore STORE [STORE ...]`: an interactive token explorer served from feature stores.

`views` computes what is shown from one store (maps from `sdfeat.report.maps`, anomalies by the metrics' rule, the
cross-image top-k), `images` reads the source images through the store's manifest, `app` exposes both as
read-only JSON/PNG endpoints (FastAPI) beside a static page (`static/`: plain JS modules and a canvas overlay).
"""
