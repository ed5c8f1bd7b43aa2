"""User-facing errors. Each names the problem, where it is (node, op, model source line) and the fix."""
from __future__ import annotations

from typing import Optional

import torch.fx as fx


class OasesError(ValueError):
    """A user's mistake or an unsupported model pattern; the message says how to fix it."""


class ShardingError(OasesError):
    """The model cannot be sharded as planned (an op, a size or a layout does not allow it)."""


class PlanMismatchError(OasesError):
    """Ranks disagree on the plan, or a saved plan does not fit this model."""


class InputError(OasesError):
    """The inputs given to compile() or to the compiled module do not fit."""


def source_line(node: Optional[fx.Node]) -> str:
    """The innermost model source line that produced `node` (from export's stack trace)."""
    if node is None:
        return "<unknown source>"
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # Skip frames inside torch.nn so the user sees their own model's line.
    frames = []
    for i, ln in enumerate(lines):
        if ln.startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            frames.append((ln, code))
    for frame, code in reversed(frames):
        if "/torch/nn/" not in frame and "/torch/_" not in frame:
            return f"{frame}: {code}" if code else frame
    if frames:
        frame, code = frames[-1]
        return f"{frame}: {code}" if code else frame
    return f"<no source for node {node.name}>"


def describe(node: fx.Node) -> str:
    """`name = op(...)` plus its source line, for error messages."""
    return f"node '{node.name}' ({node.target}) from {source_line(node)}"
