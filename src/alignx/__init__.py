"""AlignX: helpful, harmless and honest alignment without Axis Collapse."""

__version__ = "0.1.0"
