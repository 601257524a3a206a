"""The run as stages: plan -> calibration and baseline -> per variant quantize, evaluate -> report -> upload.

``planning`` checks everything before heavy work, ``steps`` holds the cached stages and their
keys, ``sequential`` chains them in one process. The Prefect flow wraps the same functions.
"""

from quantflow.pipeline.planning import Plan, plan
from quantflow.pipeline.sequential import run

__all__ = ["Plan", "plan", "run"]
