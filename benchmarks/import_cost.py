"""Start-up cost: Snakefile parse time and each workflow script's import time.

    python benchmarks/import_cost.py [--repeat 3] [--scripts claims eigen_rows]
    python benchmarks/import_cost.py --smoke    # one run of each measurement, one script

(a) `snakemake --list-rules` (the Snakefile parsed and the config validated, no DAG), and the same
    with only `import snakemake` in a bare interpreter, so the difference is this workflow's share;
(b) for every script under workflow/scripts: a fresh interpreter runs only the script's own
    top-level import statements (read with `ast`), which is what each job pays before it works;
(c) which heavy libraries (torch, transformers, datasets, pandas, dask, zarr) each of those
    imports brings in.
Each figure is the median of --repeat runs, measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One run each, and one script (the lightest): every measurement once, in seconds.
SMOKE = "--repeat 1 --scripts overlap_summary".split()
HEAVY = ["torch", "transformers", "datasets", "pandas", "dask", "zarr", "scipy", "sklearn"]


def top_level_imports(script: Path) -> str:
    tree = ast.parse(script.read_text())
    lines = [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return "\n".join(lines)


def snakefile_imports() -> str:
    """The library imports the Snakefile and its rule files make at top level, as they are written there."""
    lines = []
    for f in [ROOT / "Snakefile", *sorted((ROOT / "workflow/rules").glob("*.smk"))]:
        lines += [ln for ln in f.read_text().splitlines() if re.match(r"(from|import) eigenattn\b", ln)]
    return "\n".join(dict.fromkeys(lines))


def timed(cmd: list[str], cwd: Path = ROOT) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t


def median_time(cmd: list[str], repeat: int) -> float:
    return statistics.median(timed(cmd) for _ in range(repeat))


def heavy_modules(code: str) -> list[str]:
    probe = code + f"\nimport sys, json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scripts", nargs="+", metavar="NAME", help="only these workflow/scripts (default: all)")
    ap.add_argument("--smoke", action="store_true", help=f"a smoke run: {' '.join(SMOKE)} (overrides those options)")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings come last, so they win over the same options given before
        args = ap.parse_args([*(sys.argv[1:] if argv is None else argv), *SMOKE])
    scripts = sorted((ROOT / "workflow/scripts").glob("*.py"))
    if args.scripts:
        unknown = set(args.scripts) - {s.stem for s in scripts}
        if unknown:
            ap.error(f"no such workflow script: {', '.join(sorted(unknown))}")
        scripts = [s for s in scripts if s.stem in args.scripts]
    python = sys.executable
    snakemake = str(Path(python).with_name("snakemake"))

    bare = median_time([python, "-c", "import snakemake.api"], args.repeat)
    parse = median_time([snakemake, "--list-rules", "--quiet"], args.repeat)
    print(
        f"snakefile parse (snakemake --list-rules): {parse:.2f} s; bare `import snakemake.api` "
        f"{bare:.2f} s; workflow's share {parse - bare:.2f} s"
    )
    code = snakefile_imports()
    print(f"  heavy libraries imported by the Snakefile's library imports: {heavy_modules(code) or 'none'}")

    baseline = median_time([python, "-c", "pass"], args.repeat)
    print(f"\nper-job import time (interpreter start {baseline:.2f} s included):")
    print(f"{'script':28s} {'seconds':>8s}  heavy imports")
    total = 0.0
    for script in scripts:
        code = top_level_imports(script)
        seconds = median_time([python, "-c", code], args.repeat)
        total += seconds
        print(f"{script.stem:28s} {seconds:8.2f}  {', '.join(heavy_modules(code)) or '-'}")
    print(f"{'sum over scripts':28s} {total:8.2f}")


if __name__ == "__main__":
    main()
