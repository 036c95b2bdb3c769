"""Evaluation: metrics, judges, suites and reports."""
