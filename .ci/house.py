"""The house's size figures for the package (epicfeat/**/*.py), each against its target: PASS or FAIL.

    python .ci/house.py

It reports and always exits 0: CI does not gate on it. Standard library only (ast); duplicated code is measured by
the `duplicates` command where it is installed.
"""
import ast
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def walk(node, path: str, prefix: str = "", in_function: bool = False):
    """(kind, path, node, qualified name) for every function and every import inside a function, depth first."""
    for child in ast.iter_child_nodes(node):
        name = prefix
        if isinstance(child, FUNCTIONS):
            yield "function", path, child, prefix + child.name
        elif isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
            yield "import", path, child, prefix
        if isinstance(child, (*FUNCTIONS, ast.ClassDef)):
            name = f"{prefix}{child.name}."
        yield from walk(child, path, name, in_function or isinstance(child, FUNCTIONS))


def parameters(function) -> int:
    """Named parameters, *args and **kwargs included, self and cls not."""
    args = function.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a]
    return len([n for n in names if n not in ("self", "cls")])


def report(title: str, value: int, target: int | None, rows: list[str]) -> None:
    if target is None:
        verdict = "information, no target"
    else:
        limit = f"<= {target:,}" if target else "none"
        verdict = f"target {limit}   {'PASS' if value <= target else 'FAIL'}"
    print(f"{title:<44}{value:>7,}   {verdict}")
    for row in rows:
        print(f"    {row}")


def duplicate_pairs() -> tuple[int | None, list[str]]:
    """Pairs of places sharing 6+ identical or same-shape lines, by the `duplicates` command (None: not installed)."""
    if shutil.which("duplicates") is None:
        return None, []
    out = subprocess.run(["duplicates", "--repo", "epicfeat", "--most", "200", "--seconds", "60"], cwd=ROOT,
                         capture_output=True, text=True).stdout.splitlines()
    rows = [line for line in out if re.match(r"D\d+ ", line)]
    notes = [line for line in out if line.startswith(("(+", "left out:", "incomplete:"))]
    more = sum(int(line.split()[0][2:]) for line in notes if line.startswith("(+") and "more pairs" in line)
    return len(rows) + more, rows + notes


def main() -> None:
    files = sorted(ROOT.glob("epicfeat/**/*.py"))
    lines = {str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in files}
    found = [item for f in files for item in walk(ast.parse(f.read_text()), str(f.relative_to(ROOT)))]
    functions = [(path, node, name) for kind, path, node, name in found if kind == "function"]
    imports = Counter(path for kind, path, _, _ in found if kind == "import")

    print(f"epicfeat/**/*.py: {len(files)} modules")
    report("total lines", sum(lines.values()), 9_500, [])
    big = sorted(((n, path) for path, n in lines.items() if n > 800), reverse=True)
    report("modules over 800 lines", len(big), 0, [f"{path}  {n:,}" for n, path in big])
    wide = [(path, node.lineno, name, parameters(node)) for path, node, name in functions if parameters(node) > 8]
    report("functions over 8 parameters", len(wide), 0, [f"{p}:{line} {name} {n}" for p, line, name, n in wide])
    report("imports inside functions", sum(imports.values()), 40,
           [f"{path}  {n}" for path, n in imports.most_common(10)])
    pairs, rows = duplicate_pairs()
    if pairs is None:
        print(f"{'pairs sharing 6+ identical/same-shape lines':<44}not measured (duplicates not installed)")
    else:
        report("pairs sharing 6+ identical/same-shape lines", pairs, 3, rows)
    long = [(path, node.lineno, name, node.end_lineno - node.lineno + 1) for path, node, name in functions
            if node.end_lineno - node.lineno + 1 > 60]
    report("functions over 60 lines", len(long), None, [f"{p}:{line} {name} {n}" for p, line, name, n in long])


if __name__ == "__main__":
    main()
