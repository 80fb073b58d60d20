"""Hashing in a job, one idea per file:

* ``resolve.py``: the hashing config -> each feature's rows and HashingSpec;
* ``report.py``: the per-feature hashing report over the eval batches (a collective);
* ``console.py``: that report as a console table.
"""

from train.hashing.console import format_hashing
from train.hashing.report import hashing_report
from train.hashing.resolve import FrequencyFile, check_hashing_names, resolve_hashing

__all__ = ["FrequencyFile", "check_hashing_names", "format_hashing", "hashing_report",
           "resolve_hashing"]
