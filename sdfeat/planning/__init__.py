"""Planning: what a job stores, how it is cut into units, and what it will cost, before anything runs.

Fourth in the flow (sources -> models -> store -> **planning** -> extract -> ...): `checks` refuses a job that
cannot run (cheaply, before heavy imports), `layout` says which arrays a job stores and which forward passes
make them, `units` cuts the rows into units that own whole shards and estimates sizes, `costs` counts FLOPs per
pass, `rates` turns measurements into rates and `budget` into hours (`sdfeat plan`). Torch-free except `costs`
(its FLOPs come from a meta-device forward).
"""
