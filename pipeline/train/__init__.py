"""One curriculum stage on Ray Train + DeepSpeed ZeRO: the driver (``driver``: preflight, identity,
records, the Ray Train run), the worker's loop (``worker``), which checkpoints can be resumed from
(``checkpoints``) and the progress lines of the job log (``progress``)."""
