"""The Ray cluster: which cluster a command joins (`connect`) and submitting a job to it (`submit`, the Ray Jobs
API behind `sdfeat submit|status|logs`). The extraction driver (`extract.driver`) and the metrics runner use
`connect`; nothing here runs extraction itself.
"""
