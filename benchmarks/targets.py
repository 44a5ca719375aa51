"""The open issues' GPU performance targets, checked against one benchmark run, so that the
summary of `make gpu-check` says at once which of them hold (issue 14: attention forward and
backward, RMSNorm, rotary; issue 12: decode). Each is read off the run's JSON (report.py: ops ->
cases -> results[provider]) at `make gpu-check`'s quick CUDA sizes, bf16. Standard library only:
scripts/gpu_check_summary.py imports it whatever else is broken."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

# The provider each target is for, and those shown beside it for comparison.
OURS = "llama_ext"
COMPARED = ("native", "llama_ext_100kb")


@dataclass(frozen=True)
class Target:
    name: str
    op: str
    mode: str
    size: int
    minimum: float
    # "throughput": the case's own unit (TFLOP/s); "ceiling": fraction of the measured ceiling
    # (copy bandwidth); "backward": TFLOP/s of the backward alone, (fwd+bwd - fwd) work over
    # (fwd+bwd - fwd) time, from the mode's case and the "fwd" case of the same size.
    kind: str
    dtype: str = "bfloat16"


ATTENTION = "attention, causal, seq 8192, 32/8 heads x 128"
DECODE = "decode, context 8192, 32/8 heads x 128"
TARGETS = (
    Target(f"{ATTENTION}: forward", "attention", "fwd", 8192, 350.0, "throughput"),
    Target(f"{ATTENTION}: backward", "attention", "fwd+bwd", 8192, 250.0, "backward"),
    Target("RMSNorm 32768 x 4096: forward", "rms_norm", "fwd", 32768, 0.90, "ceiling"),
    Target("RMSNorm 32768 x 4096: backward", "rms_norm", "bwd", 32768, 0.90, "ceiling"),
    Target("rotary 32768 tokens, 32/8 heads x 128: forward", "rotary", "fwd", 32768, 0.85, "ceiling"),
    Target("rotary 32768 tokens, 32/8 heads x 128: backward", "rotary", "bwd", 32768, 0.85, "ceiling"),
    Target(f"{DECODE}: batch 1, contiguous", "decode", "b1 contiguous", 8192, 0.80, "ceiling"),
    Target(f"{DECODE}: batch 1, paged (16-token blocks)", "decode", "b1 paged16", 8192, 0.80, "ceiling"),
    Target(f"{DECODE}: batch 32, contiguous", "decode", "b32 contiguous", 8192, 0.80, "ceiling"),
    Target(f"{DECODE}: batch 32, paged (16-token blocks)", "decode", "b32 paged16", 8192, 0.80, "ceiling"),
)


def _case(run: Dict[str, Any], op: str, mode: str, size: int, dtype: str) -> Optional[Dict[str, Any]]:
    for bench in run.get("ops", []):
        if bench.get("op") != op:
            continue
        for case in bench.get("cases", []):
            if case.get("mode") == mode and case.get("size") == size and case.get("dtype") == dtype:
                return case
    return None


def _ok(case: Optional[Dict[str, Any]], provider: str) -> Optional[Dict[str, Any]]:
    result = (case or {}).get("results", {}).get(provider)
    return result if result and result.get("status") == "ok" and result.get("median_ms") else None


def _value(target: Target, run: Dict[str, Any], provider: str) -> Optional[float]:
    """The target's measure for one provider, or None when the run has no usable result."""
    case = _case(run, target.op, target.mode, target.size, target.dtype)
    result = _ok(case, provider)
    if result is None:
        return None
    if target.kind == "throughput":
        return result.get("throughput")
    if target.kind == "ceiling":
        return result.get("fraction_of_ceiling")
    forward_case = _case(run, target.op, "fwd", target.size, target.dtype)
    forward = _ok(forward_case, provider)
    if forward is None or result["median_ms"] <= forward["median_ms"]:
        return None
    return (case["work"] - forward_case["work"]) / ((result["median_ms"] - forward["median_ms"]) * 1e-3) / 1e12


def _show(target: Target, value: float) -> str:
    return f"{value:.0%} of copy" if target.kind == "ceiling" else f"{value:.0f} TFLOP/s"


def check(run: Dict[str, Any]) -> List[str]:
    """One line per target: MET / MISSED / NO RESULT, the measured value against the minimum,
    and the compared providers' values."""
    lines = []
    for target in TARGETS:
        ours = _value(target, run, OURS)
        wanted = f"target >= {_show(target, target.minimum)}"
        if ours is None:
            lines.append(f"NO RESULT  {target.name} ({wanted}): no {OURS} result at this size")
            continue
        verdict = "MET" if ours >= target.minimum else "MISSED"
        line = f"{verdict:<10} {target.name}: {_show(target, ours)} ({wanted})"
        for provider in COMPARED:
            value = _value(target, run, provider)
            if value is not None:
                line += f"; {provider} {_show(target, value)}"
        lines.append(line)
    return lines
