"""Start-up time of every command: ``--help``, ``--version`` and a rejected config typo, each in a fresh process.

    python bench/cli_startup.py [--repeats 3]

Targets on a 2-core CPU machine: ``--help`` and ``--version`` under 1 s, a config typo rejected under 3 s. Prints
the best-of wall time per command and which modules the process had imported (torch / timm / torchvision), so a
regression names its cause.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "demo_digits.yaml")

# (label, argv after the interpreter): every command's --help and --version.
_ENTRIES: list[tuple[str, list[str]]] = [
    ("train", ["-m", "ssl_vil.train"]),
    ("eval.knn", ["-m", "ssl_vil.eval.knn"]),
    ("eval.linear", ["-m", "ssl_vil.eval.linear"]),
    ("eval.finetune", ["-m", "ssl_vil.eval.finetune"]),
    ("export", ["-m", "ssl_vil.export"]),
    ("report", ["-m", "ssl_vil.report"]),
    ("data.make_shards", ["-m", "ssl_vil.data.make_shards"]),
    ("demo", ["-m", "ssl_vil.demo"]),
    ("cluster/submit.py", [str(ROOT / "cluster" / "submit.py")]),
]
COMMANDS: list[tuple[str, list[str]]] = [
    (f"{label} {flag}", [*argv, flag]) for label, argv in _ENTRIES for flag in ("--help", "--version")
]
TYPO = ("train: config typo", ["-m", "ssl_vil.train", "--config", RECIPE, "--output-dir", "/nonexistent/run",
                              "optim.lrr=0.1"])

# Appended to each process: report which heavy modules were imported by the time it exits.
PROBE = "import atexit, sys; atexit.register(lambda: print('\\nIMPORTED', [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules], file=sys.stderr))"


def time_command(argv: list[str], repeats: int) -> tuple[float, int, str]:
    best, code, imported = float("inf"), 0, "?"
    for _ in range(repeats):
        # sys.argv as the command would see it: the module (or script) name, then its arguments.
        script_argv = argv[1:] if argv[0] == "-m" else argv
        cmd = [sys.executable, "-c", f"{PROBE}\nimport runpy, sys\nsys.argv = {script_argv!r}\n"
               + (f"runpy.run_module({argv[1]!r}, run_name='__main__', alter_sys=True)" if argv[0] == "-m"
                  else f"sys.path.insert(0, {str(Path(argv[0]).parent)!r}); runpy.run_path({argv[0]!r}, run_name='__main__')")]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t0)
        code = out.returncode
        imported = next((ln.split(" ", 1)[1] for ln in out.stderr.splitlines() if ln.startswith("IMPORTED")), "?")
    return best, code, imported


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'command':30s} {'best s':>7s} {'target':>7s}  exit  heavy imports")
    for (label, argv), target in [*((c, 1.0) for c in COMMANDS), (TYPO, 3.0)]:
        best, code, imported = time_command(argv, args.repeats)
        flag = "ok" if best < target else "SLOW"
        print(f"{label:30s} {best:7.2f} {target:7.1f}  {code:4d}  {imported}  {flag}")


if __name__ == "__main__":
    main()
