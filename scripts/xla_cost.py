"""XLA's cost analysis as the bench scripts read it (imported from scripts/, not a package)."""
import re
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


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "all-reduce-start", "all-gather-start", "collective-permute-start")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += size * _DTYPE_BYTES[dtype]
  return total


def collective_bytes(hlo_text: str, unknown_trip_count: int = 32) -> int:
  """Bytes of collective results one device produces per run of a compiled HLO module.

  Each collective counts the size of its result (an all-gather's whole gathered array, a
  reduce-scatter's shard). A while loop counts its body times its trip count: XLA's
  `known_trip_count` where it found one, else `unknown_trip_count` (32: the most passes a
  bisection over 32-bit keys takes, the only loops of unknown length in the contrast loss).
  A conditional counts its most expensive branch.
  """
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif line.strip() == "}":
      current = None
    elif current is not None:
      comps[current].append(line)

  def callees(line: str, key: str) -> list[str]:
    m = re.search(key + r"=\{?([%\w.\-, ]+)\}?", line)
    return [c.strip().lstrip("%") for c in m.group(1).split(",")] if m else []

  memo = {}

  def cost(name: str) -> int:
    if name in memo:
      return memo[name]
    total = 0
    for line in comps.get(name, []):
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      shape, opcode = m.groups()
      if opcode in _COLLECTIVES:
        total += _shape_bytes(shape)
      elif opcode == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        n = int(trips.group(1)) if trips else unknown_trip_count
        total += n * sum(cost(c) for c in callees(line, "body") + callees(line, "condition"))
      elif opcode == "conditional":
        branches = (callees(line, "branch_computations") or
                    callees(line, "true_computation") + callees(line, "false_computation"))
        total += max((cost(c) for c in branches), default=0)
      elif opcode == "call":
        total += sum(cost(c) for c in callees(line, "to_apply"))
    memo[name] = total
    return total

  return cost(entry)
