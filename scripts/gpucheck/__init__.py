"""The prepared GPU check as a package: ``runner`` (time boxes, subprocesses, the log, the JSON, the summary)
and one module per stage in ``stages/``. The command is ``python scripts/gpu_check.py``."""
