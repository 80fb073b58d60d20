"""Hashing in a job, one idea per file:

* ``resolve.py``: the hashing config -> each feature's rows and HashingSpec;
* ``report.py``: the per-feature hashing report over the eval batches (a collective);
* ``budget.py``: a memory budget (hashing.budget_bytes) -> the rows of the features it sizes;
* ``console.py``: that report, and what a budget chose, as console tables.
"""

from train.hashing.console import format_budget, format_hashing
from train.hashing.report import hashing_report
from train.hashing.resolve import FrequencyFile, check_hashing_names, resolve_hashing

__all__ = ["FrequencyFile", "check_hashing_names", "format_budget", "format_hashing",
           "hashing_report", "resolve_hashing"]
