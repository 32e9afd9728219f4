"""HTTP service (issue 4)."""
