"""Extraction: a job's units run through a worker pipeline into the store.

Fifth in the flow (sources -> models -> store -> planning -> **extract** -> metrics -> report / explore):
`job` resolves a job once (`Job`: the store template written, or a resume) and ends it; `local.run_local` runs it in this process,
`driver.run_on_ray` on Ray actors; each runs a `worker.UnitRunner`, whose pipeline is `feed` (host: read, decode,
stage), `forward` (device: VAE, noise by `protocol`, the hooked U-Net, `summaries`) and the writer, with the
`latent_cache` beside it, `stages` timing it, `process` the process owner's settings, and `simdevice` standing
in for the device in benchmarks.

The job API is re-exported here: `from sdfeat.extract import run_local, prepare_job, open_job, UnitRunner`.
"""

from sdfeat.extract.job import Job, end_job, finalize_job, open_job, pending_units, prepare_job
from sdfeat.extract.local import run_local
from sdfeat.extract.worker import UnitRunner

__all__ = ["Job", "UnitRunner", "end_job", "finalize_job", "open_job", "pending_units", "prepare_job", "run_local"]
