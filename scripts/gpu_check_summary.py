"""The summary of `make gpu-check` (scripts/gpu_check.sh), from its stage table and logs.

Writes the result files (summary.txt, env_build.log, tests.log, sanitize.log, bench.log,
bench.md, bench.json and, on a GPU, RESULTS.md: at most 8, what the device tool brings back)
and prints the summary. Its first line is the verdict and the first failing stage with why;
then every failing stage with why, one line per stage (status, time, limit, detail), the
failing tests, the sanitizer reports, the kernels that spill, the performance targets met or
missed (benchmarks/targets.py) and the benchmark tables. Needs only the standard library,
benchmarks/report.py and benchmarks/targets.py, so it runs whatever else is broken.
"""
import argparse
import glob
import json
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import targets  # noqa: E402  (standard library only)

SANITIZERS = ("memcheck", "racecheck", "synccheck")
EXIT_INCOMPLETE = 3  # scripts/sanitize_kernels.py: --deadline left cases out
MAX_LISTED = 25


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def last_line(text):
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else "(no output)"


def clip(text, n=160):
    return text if len(text) <= n else text[: n - 3] + "..."


# ---- per-stage details -------------------------------------------------------------------------


def env_detail(log):
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    return "; ".join(lines[:4]) if lines else "(no output)"


def ptxas_spills(log):
    """{kernel: 'N bytes spill stores, M bytes spill loads'} for every kernel ptxas says spills."""
    spills, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current and (m.group(1) != "0" or m.group(2) != "0"):
            spills[current] = m.group(0)
    return spills


def build_detail(log, ok):
    if not ok:  # the compiler's first error (nvcc and gcc print 'error:'), else what failed last
        errors = [l.strip() for l in log.splitlines() if "error:" in l]
        return clip(errors[0] if errors else last_line(log))
    kernels = set(re.findall(r"Compiling entry function '(\S+)'", log))
    return f"{len(kernels)} kernels compiled, {len(ptxas_spills(log))} with register spills"


def failing_tests(log):
    names = re.findall(r"\b(?:FAILED|ERROR) ((?:tests|scripts)/\S+)", log)
    return list(dict.fromkeys(n.rstrip(",") for n in names))


def failure_reasons(log):
    """{test: its error's first 'E' lines} from the failure log the test run appends to as each test
    fails (scripts/pytest_failure_log.py)."""
    reasons = {}
    for block in re.split(r"^=== ", log, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        errors = [l[1:].strip() for l in body.splitlines() if l.startswith("E ")]
        last = [l.strip() for l in body.splitlines() if l.strip()]
        reasons[head.split(" (")[0]] = "; ".join(errors[:3]) if errors else (last[-1] if last else "")
    return reasons


def tests_detail(log, status):
    m = None
    for m in re.finditer(r"^=+ (.*\d+ \w+.*) in [\d.]+s", log, re.M):
        pass
    counts = m.group(1) if m else None
    failed = failing_tests(log)
    if status == "TIMEOUT" or counts is None:
        passed = len(re.findall(r"\bPASSED\b", log))
        started = re.findall(r"^(?:\[gw\d+\] )?(?:\[\s*\d+%\] )?\w* ?((?:tests|scripts)/\S+::\S+)", log, re.M)
        where = f"; last test seen: {started[-1]}" if started else ""
        return f"stopped before pytest's summary: {passed} passed, {len(failed)} failed so far{where}"
    if failed:
        return f"{counts}: {', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}"
    return counts


def sanitizer_errors(log):
    """The tool's reports: each 'Invalid ...' / 'Race ...' / 'Barrier ...' line with the kernel
    line after it, and the case that was running."""
    reports, case = [], None
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"case (\S+) \.\.\.$", line.strip())
        if m:
            case = m.group(1)
        body = line.lstrip("= ").strip()
        if re.match(r"(Invalid|Race|Barrier|Error:|Program hit|Misaligned|Out-of-range|Hardware|Uninitialized"
                    r"|Illegal|Warp|Divergent|Potential)", body) and "ERROR SUMMARY" not in body:
            where = ""
            for nxt in lines[i + 1: i + 4]:
                n = nxt.lstrip("= ").strip()
                if n.startswith("at "):
                    where = " " + clip(n, 140)
                    break
            reports.append(f"[{case or 'start-up'}] {body}{where}")
    return reports


def sanitizer_detail(log, status):
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", log)
    errors = f"{m.group(1)} errors" if m else "no error summary"
    cases = re.search(r"sanitize cases \((\S+), (\S+)\): (\d+) of (\d+) run in (\d+)s", log)
    ran = f"{cases.group(3)} of {cases.group(4)} cases" if cases else "case list did not finish"
    reports = sanitizer_errors(log)
    if reports:
        return f"{errors}, {ran}; first: {clip(reports[0], 200)}"
    if status == "TIMEOUT":
        started = re.findall(r"^case (\S+) \.\.\.$", log, re.M)
        return f"stopped at its limit in case {started[-1] if started else '(none started)'}; {ran}"
    if status == "INCOMPLETE":
        left = re.search(r"left out at the .*", log)
        return f"{errors}, {ran}; {clip(left.group(0) if left else 'cases left out', 200)}"
    if status == "FAIL" and not m:
        return clip(last_line(log))
    return f"{errors}, {ran}"


def bench_detail(log, ok):
    if ok:
        rows = re.findall(r"^\|", log, re.M)
        return f"{len(rows)} table lines"
    return clip(last_line(log))


# ---- stage table ---------------------------------------------------------------------------------


def load_stages(work):
    stages = []
    for row in read(os.path.join(work, "stages.tsv")).splitlines():
        name, rc, seconds, limit, *reason = row.split("\t")
        stages.append(dict(name=name, rc=rc, seconds=int(seconds), limit=int(limit),
                           reason=reason[0] if reason else ""))
    return stages


def status_of(stage):
    rc = stage["rc"]
    if rc == "skip":
        return "SKIPPED"
    rc = int(rc)
    if rc == 0:
        return "ok"
    if rc == 124:
        return "TIMEOUT"
    if rc == EXIT_INCOMPLETE and stage["name"] in SANITIZERS:
        return "INCOMPLETE"
    return "FAIL"


def detail_of(stage, status, work):
    name = stage["name"]
    if status == "SKIPPED":
        return stage["reason"]
    log = read(os.path.join(work, f"{name}.log"))
    why = f"stopped at its {stage['limit']} s limit; " if status == "TIMEOUT" and name != "tests" else ""
    if name == "env":
        return why + env_detail(log) if status == "ok" else why + clip(last_line(log))
    if name == "build":
        return why + build_detail(log, status == "ok")
    if name == "tests":
        return tests_detail(log, status)
    if name in SANITIZERS:
        return sanitizer_detail(log, status)
    return why + bench_detail(log, status == "ok")


# ---- outputs -------------------------------------------------------------------------------------


def concat(work, names, dest):
    with open(dest, "w") as out:
        for name in names:
            path = os.path.join(work, f"{name}.log")
            if os.path.exists(path):
                out.write(f"===== {name}\n{read(path)}\n")


def merge_bench(work, results, dry_run):
    """One JSON and one markdown of the per-op benchmark runs; RESULTS.md's device section
    rewritten on a GPU. Returns the merged run and its markdown (None and '' when no op
    produced numbers)."""
    from benchmarks import report

    runs = []
    for path in sorted(glob.glob(os.path.join(work, "bench", "*", "results-*.json"))):
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError):
            continue
    runs = [r for r in runs if r.get("ops")]
    if not runs:
        return None, ""
    merged = dict(runs[0])
    merged["ops"] = [op for r in runs for op in r["ops"]]
    merged["command"] = "; ".join(r["command"] for r in runs)
    merged["elapsed_s"] = sum(r.get("elapsed_s", 0.0) for r in runs)
    report.write_json(merged, os.path.join(results, "bench.json"))
    text = report.markdown(merged)
    with open(os.path.join(results, "bench.md"), "w") as f:
        f.write(text)
    if not dry_run and merged["env"]["device"].startswith("cuda"):
        results_md = os.path.join(ROOT, "benchmarks", "RESULTS.md")
        try:
            report.update_results_md(merged, results_md)
            shutil.copy(results_md, os.path.join(results, "RESULTS.md"))
        except (OSError, ValueError) as e:
            print(f"RESULTS.md not updated: {e}", file=sys.stderr)
    return merged, text


def summarize(work, results, total_limit, grace, elapsed, dry_run):
    stages = load_stages(work)
    rows, failures = [], []
    for s in stages:
        status = status_of(s)
        detail = detail_of(s, status, work)
        rows.append(f"{s['name']:<26} {status:<10} {s['seconds']:>4} / {s['limit']:>3} s  {detail}")
        if status not in ("ok", "SKIPPED"):
            failures.append(f"{s['name']} {status}: {detail}")
    planned = sum(s["limit"] + grace for s in stages)
    mode = " (DRY RUN: GPU stages stubbed)" if dry_run else ""
    if failures:
        head = [f"gpu-check: FAIL{mode} - first failure: {failures[0]}"]
        head += [f"  also: {f}" for f in failures[1:]]
    else:
        head = [f"gpu-check: PASS{mode} - {len(stages)} stages"]
    head.append(f"time: {elapsed} s of the {total_limit} s limit; stage limits add up to {planned} s with {grace} s grace each"
                + ("  WARNING: over the limit" if planned > total_limit else ""))

    lines = head + ["", f"{'stage':<26} {'status':<10} time / limit  detail"] + rows
    tests_log = read(os.path.join(work, "tests.log"))
    failed = failing_tests(tests_log)
    reasons = failure_reasons(read(os.path.join(work, "test_failures.log")))
    if failed:
        lines += ["", f"failing tests ({len(failed)}):"]
        for n in failed[:MAX_LISTED]:  # -v's names stop at a space in a parameter id
            reason = reasons.get(n) or next((r for test, r in reasons.items() if test.startswith(n)), "")
            lines.append(f"  {n}" + (f": {clip(reason, 200)}" if reason else ""))
        if len(failed) > MAX_LISTED:
            lines.append(f"  ... and {len(failed) - MAX_LISTED} more (tests.log)")
    reports = [f"{tool}: {r}" for tool in SANITIZERS for r in sanitizer_errors(read(os.path.join(work, f"{tool}.log")))]
    if reports:
        lines += ["", f"sanitizer reports ({len(reports)}, first {min(len(reports), 10)}):"]
        lines += [f"  {clip(r, 300)}" for r in reports[:10]]
    spills = ptxas_spills(read(os.path.join(work, "build.log")))
    if spills:
        lines += ["", "kernels with register spills:"] + [f"  {k}: {v}" for k, v in spills.items()]

    concat(work, ["env", "build"], os.path.join(results, "env_build.log"))
    concat(work, ["test_failures", "tests"], os.path.join(results, "tests.log"))
    concat(work, SANITIZERS, os.path.join(results, "sanitize.log"))
    concat(work, [s["name"] for s in stages if s["name"].startswith("bench")], os.path.join(results, "bench.log"))
    run, bench = merge_bench(work, results, dry_run)
    if run is not None:
        lines += ["", "performance targets (benchmarks/targets.py: issues 12 and 14, bf16):"]
        lines += [f"  {line}" for line in targets.check(run)]
    lines += ["", "benchmark (bench.md):" if bench else "benchmark: no op produced numbers", bench]
    text = "\n".join(lines).rstrip() + "\n"
    with open(os.path.join(results, "summary.txt"), "w") as f:
        f.write(text)
    print(text)
    print(head[0])  # again last: the device tool shows the end of the output
    return 1 if failures else 0


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", required=True, help="the stage logs and stages.tsv")
    p.add_argument("--results", required=True, help="where the result files go")
    p.add_argument("--total-limit", type=int, required=True)
    p.add_argument("--grace", type=int, required=True, help="seconds between a stage's SIGINT and SIGKILL")
    p.add_argument("--elapsed", type=int, required=True)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    return summarize(args.work, args.results, args.total_limit, args.grace, args.elapsed, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
