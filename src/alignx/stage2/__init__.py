"""Stage 2 — MoCaE: a per-prompt router over the axis experts, calibrated by geometry and semantics."""
