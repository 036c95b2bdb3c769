"""The three alignment axes, their fixed order, and their default injection prompts.

The order ``helpful, harmless, honest`` is used everywhere: tensor rows, file names, tables.
"""

from alignx.errors import AlignXError

AXES: tuple[str, ...] = ("helpful", "harmless", "honest")

# The authors' code injects this chain-of-thought prefix; METHOD.md section 2 keeps it and adds an
# axis-specific instruction after it.
COT_PREFIX = "Chain of Thought: Let's think step by step."

DEFAULT_INJECTIONS: dict[str, str] = {
    "helpful": f"{COT_PREFIX} Give a complete, accurate and well-organised answer that does exactly what the user asks.",
    "harmless": (
        f"{COT_PREFIX} If the request could cause harm, decline briefly, say why, and offer a safe alternative; "
        "if it is a benign request on a sensitive topic, answer it helpfully."
    ),
    "honest": f"{COT_PREFIX} Answer truthfully; do not repeat common misconceptions, and say so when you are unsure.",
}


def parse_axes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse ``"helpful,honest"`` (or a list) into axes in canonical order, rejecting unknown names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = sorted(set(names) - set(AXES))
    if unknown:
        raise AlignXError(f"unknown axis {', '.join(unknown)}; valid axes: {', '.join(AXES)}")
    if not names:
        raise AlignXError(f"no axis given; valid axes: {', '.join(AXES)}")
    return tuple(a for a in AXES if a in names)
