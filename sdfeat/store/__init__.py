"""The store: what an extraction writes and every reader reads, on a local disk or an object store.

Third in the flow (sources -> models -> **store** -> planning -> extract -> metrics -> report / explore):
`files` is the on-disk layout (the Zarr v3 template, a unit's shards through `shard_writer`, done markers, the
manifest and failures), `writer_lock` keeps one writer per store, `query` opens a store for reading
(`FeatureStore`, `open_store`) with `xarray_view` for xarray. Imports numpy, zarr, pyarrow and fsspec; never torch.

The writer's API is re-exported here (`store.write_unit`, `store.write_marker`, ...), as the code reads it.
"""

from sdfeat.store.files import (ATTRS_KEY, FAILURES, FEATURES, MANIFEST, PROGRESS, STORE_ENTRIES, check_writable,
                                clear_markers, create_template, done_units, existing_attrs, filesystem, join,
                                marker_path, missing_value, nan_fill, open_features, read_attrs, read_manifest,
                                read_markers, refuse_file, remove_store, store_entries, template_complete,
                                update_attrs, write_atomic, write_failures, write_manifest, write_marker,
                                write_parquet, write_unit, write_whole)

__all__ = ["ATTRS_KEY", "FAILURES", "FEATURES", "MANIFEST", "PROGRESS", "STORE_ENTRIES", "check_writable",
           "clear_markers", "create_template", "done_units", "existing_attrs", "filesystem", "join", "marker_path",
           "missing_value", "nan_fill", "open_features", "read_attrs", "read_manifest", "read_markers", "refuse_file",
           "remove_store", "store_entries", "template_complete", "update_attrs", "write_atomic", "write_failures",
           "write_manifest", "write_marker", "write_parquet", "write_unit", "write_whole"]
