"""The HTML report of what the database holds about models (``harness report``).

The report reads stored runs only (it never loads or scans a model): ``data`` reads them
through ``harness.store``, ``plots`` draws them with matplotlib, ``html`` renders the page.
"""

from harness.report.data import DetectorRun, ModelReport, TokenRow, load_model, load_models
from harness.report.html import build_report, render

__all__ = ["DetectorRun", "ModelReport", "TokenRow", "build_report", "load_model",
           "load_models", "render"]
