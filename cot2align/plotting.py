"""The one matplotlib guard: plots are extras (pip install 'cot2align[plots]'); without matplotlib every
command still writes its numbers and simply skips the picture."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
