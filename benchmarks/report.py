"""The benchmarks' saved files, written once: JSON (non-finite floats as strings), the command
line a result came from, paths as the repository names them, and matplotlib figures (headless).
The tables stay with each benchmark."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def save_json(path: Path, data, indent: int = 1) -> None:
    Path(path).write_text(json.dumps(jsonable(data), indent=indent) + "\n")


def command(module: str, argv: list[str] | None) -> str:
    """How a result was produced: `python -m benchmarks.<module>` and its arguments."""
    return " ".join([f"python -m benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it."""
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (None, with a note, when not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def save_figure(fig, path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
