"""XLA's cost analysis as the bench scripts read it (imported from scripts/, not a package)."""
from typing import Any


def cost(analysis: Any) -> dict[str, float]:
  """`Compiled.cost_analysis()` / `Lowered.cost_analysis()` as one dict.

  Older JAX returns a list with one dict per device program; None becomes {}.
  """
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return dict(analysis or {})


def flops(compiled: Any) -> float:
  """FLOPs of a compiled (or lowered) program, NaN where XLA gives none.

  XLA counts a while loop's body once, whatever its trip count.
  """
  return float(cost(compiled.cost_analysis()).get("flops", float("nan")))
