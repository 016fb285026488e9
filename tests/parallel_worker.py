"""Run several short trainings in one torchrun launch (a launch costs seconds of start-up on CPU).

``torchrun ... tests/parallel_worker.py SPEC.json``: SPEC is a list of runs, each
``{"args": [key=value ...], "resume": bool}``, trained one after another in the same process group.
"""
import json
import sys

from fastsemdiff import distributed
from fastsemdiff.config import load_config
from fastsemdiff.train import train

if __name__ == "__main__":
    try:
        for run in json.loads(open(sys.argv[1]).read()):
            train(load_config(None, run["args"]), run.get("resume", False))
    finally:
        distributed.cleanup()
    distributed.exit_if_gloo_outlives_the_group()
