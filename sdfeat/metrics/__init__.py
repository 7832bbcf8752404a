"""The paper's three metrics (position probe, corner/border similarity, high-norm anomalies).

`position`, `corners` and `anomalies` are pure functions over numpy arrays / CPU torch tensors; `labels` reads and
writes anomaly labels; `runner` fans the metrics out over a feature store (Ray tasks, or in-process) and writes
tidy tables to `<store>/results/<metric>.parquet`.
"""
