"""Start-up time of the `lora-lego` command (issue 32, item 5), side by side. Not a test.

    python benchmarks/startup.py [--repeats 7] [--baseline OTHER/src] [--markdown FILE]

Cases, each one a fresh process, timed by wall clock:
  python         `python -c pass`: the interpreter's own start
  import torch   `python -c "import torch"`: the floor of every command that computes
  --help         `lora-lego --help`
  methods        `lora-lego methods`
  merge          the README's example: `lora-lego merge examples/rt_polarity examples/snips_intent
                 examples/hyperbaton -o OUT --rank 4 --overwrite`
`lora-lego` runs as `python -m lora_lego` with PYTHONPATH set to this checkout's src/ (and, with --baseline, to
another checkout's src/, e.g. one made by `git worktree add /tmp/base main`). The cases run round robin, each
repeat going through every case and checkout in turn, so that a busy machine slows them all alike. Printed:
each case's median and fastest wall time, its ratio to `import torch`, and with --baseline, baseline / this;
"merge: its work" is the time the merge prints on its last line (reading, merging, writing: no start-up).
Targets (issue 32): --help and methods under 0.5 s, the example merge under 2 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [str(ROOT / "examples" / name) for name in ("rt_polarity", "snips_intent", "hyperbaton")]
TARGETS = {"--help": 0.5, "methods": 0.5, "merge": 2.0}  # seconds (issue 32, item 5)


def cases(out: Path) -> dict[str, list[str]]:
    """Case name -> the arguments after `python` (a lora-lego case starts with -m lora_lego)."""
    cli = ["-m", "lora_lego"]
    return {"python": ["-c", "pass"], "import torch": ["-c", "import torch"], "--help": [*cli, "--help"],
            "methods": [*cli, "methods"],
            "merge": [*cli, "merge", *EXAMPLES, "-o", str(out), "--rank", "4", "--overwrite"]}


def timed(argv: list[str], src: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of one run of `python argv` with `src` first on the import path; raises if it fails."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} (PYTHONPATH={src}) failed with exit {done.returncode}: {done.stderr}")
    return seconds, done.stdout


def work_seconds(stdout: str) -> float:
    """The seconds `lora-lego merge` prints at the end of its summary line ("merge: ... with ties: ..., 1.5 s")."""
    line = next(line for line in stdout.splitlines() if line.startswith("merge: "))
    return float(re.search(r", ([0-9.]+) s$", line).group(1))


def measure(trees: dict[str, Path], repeats: int, scratch: Path) -> dict[tuple[str, str], list[float]]:
    """(case, tree label) -> wall times; the trees share the cases that do not run lora-lego."""
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(repeats + 1):  # repeat 0 warms the page cache and the .pyc files; not recorded
        for label, src in trees.items():
            for case, argv in cases(scratch / label).items():
                if argv[:2] != ["-m", "lora_lego"] and label != next(iter(trees)):
                    continue  # python and import torch: once per repeat
                seconds, stdout = timed(argv, src)
                if repeat:
                    times.setdefault((case, label), []).append(seconds)
                if repeat and case == "merge":
                    times.setdefault(("merge: its work", label), []).append(work_seconds(stdout))
    return times


def table(times: dict[tuple[str, str], list[float]], trees: dict[str, Path]) -> str:
    first = next(iter(trees))
    floor = statistics.median(times[("import torch", first)])
    baseline = "baseline" if "baseline" in trees else None
    head = "| case | checkout | median s | fastest s | x import torch |" + (" baseline / this |" if baseline else "") \
        + " target |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = [(case, label) for case in [*cases(Path()), "merge: its work"] for label in trees if (case, label) in times]
    for case, label in order:
        values = times[(case, label)]
        median = statistics.median(values)
        ratio = ""
        if baseline and label == "this" and (case, baseline) in times:
            ratio = f" {statistics.median(times[(case, baseline)]) / median:.1f}x |"
        elif baseline:
            ratio = " |"
        target = TARGETS.get(case)
        met = "met" if target is not None and median < target else "NOT met"
        verdict = "" if target is None or label != "this" else f"< {target:g} s: {met}"
        shown = label if case in TARGETS or case.startswith("merge") else "-"
        lines.append(f"| {case} | {shown} | {median:.2f} | {min(values):.2f} | {median / floor:.2f} "
                     f"|{ratio} {verdict} |")
    return "\n".join(lines)


def machine() -> str:
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=False).stdout.strip()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, torch {torch_version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each case (default 7), after one warm-up")
    parser.add_argument("--baseline", type=Path, help="another checkout's src/ folder, timed side by side")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    trees = {"this": ROOT / "src"}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lora-lego-startup-") as scratch:
        times = measure(trees, args.repeats, Path(scratch))
    load_after = os.getloadavg()[0]
    text = (f"{machine()}; {args.repeats} runs per case (medians); load average {load_before:.1f} before, "
            f"{load_after:.1f} after\n\n{table(times, trees)}\n")
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
