"""The run report: markdown + a self-contained HTML page with matplotlib plots."""

from userip.report.build import build_report, headline

__all__ = ["build_report", "headline"]
