"""Data layer: where the source data sets live (registry), how their rows are parsed (parsers) and read
(loading), and the canonical splits (splits)."""

from alignx.data.loading import LoadResult, clear_cache, load_source
from alignx.data.registry import SOURCES, Source, get_source, source_names
from alignx.data.splits import (
    Example,
    SplitReport,
    SplitResult,
    beavertails_half,
    check_all,
    evaluation_prompts,
    format_check_report,
    harmful_eval_prompts,
    training_examples,
    xstest_prompts,
)

__all__ = [
    "SOURCES",
    "Example",
    "LoadResult",
    "Source",
    "SplitReport",
    "SplitResult",
    "beavertails_half",
    "check_all",
    "clear_cache",
    "evaluation_prompts",
    "format_check_report",
    "get_source",
    "harmful_eval_prompts",
    "load_source",
    "source_names",
    "training_examples",
    "xstest_prompts",
]
