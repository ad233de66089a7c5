"""Install from a folder of wheels what this Python is missing for the given packages, and nothing else.

    python benchmarks/install_wheels.py --wheels .whl --target /tmp/site deepspeed webdataset pytest
    python benchmarks/install_wheels.py --wheels .whl --target /tmp/site --dry-run deepspeed   # plan only

For a lent GPU machine with no network (benchmarks/gpu.sh runs this first). Starting from the named
packages, each requirement (markers evaluated, extras ignored) is met by the installed distribution when
its version satisfies every specifier seen for it, else by the carried wheel, whose own requirements are
then followed. The chosen wheels go to --target with `pip install --no-index --no-deps` (put --target on
PYTHONPATH afterwards). The device's own packages (torch, numpy, ...) are never replaced unless too old
for a carried wheel, and then only on the PYTHONPATH.

Exit 0: everything satisfied (the plan is printed as one JSON line); exit 1 with one line per problem on
stderr when a requirement has neither a satisfying installed version nor a wheel, or pip fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version


def canonical(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wheels(folder: str) -> dict[str, tuple[str, str, list[str]]]:
    """canonical name -> (wheel path, version, Requires-Dist lines), from each wheel's METADATA."""
    wheels: dict[str, tuple[str, str, list[str]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        with zipfile.ZipFile(path) as z:
            meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            meta = Parser().parsestr(z.read(meta_name).decode("utf-8"))
        name = canonical(meta["Name"])
        if name in wheels:
            raise SystemExit(f"install_wheels: two wheels of {name}: {wheels[name][0]} and {path}")
        wheels[name] = (path, meta["Version"], meta.get_all("Requires-Dist") or [])
    return wheels


def installed_version(name: str) -> str | None:
    """The version of `name` importable now (None when absent)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _satisfies(version: str, specifiers: list) -> bool:
    return all(s.contains(Version(version), prereleases=True) for s in specifiers)


def plan(roots: list[str], wheels: dict[str, tuple[str, str, list[str]]]) -> tuple[dict, list[str]]:
    """(decisions {name: {"use": "installed"|"wheel", "version", "why"}}, problems)."""
    specs: dict[str, list[Requirement]] = {}
    decisions: dict[str, dict] = {}
    problems: dict[str, str] = {}
    queue = [Requirement(r) for r in roots]
    while queue:
        req = queue.pop(0)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonical(req.name)
        specs.setdefault(name, []).append(req)
        wanted = [r.specifier for r in specs[name]]
        spec_text = ", ".join(str(s) for s in wanted if str(s)) or "any version"
        have = installed_version(name)
        if have is not None and _satisfies(have, wanted):
            if name not in decisions:
                decisions[name] = {"use": "installed", "version": have}
            continue
        if name in wheels and _satisfies(wheels[name][1], wanted):
            if decisions.get(name, {}).get("use") != "wheel":
                why = "missing" if have is None else f"installed {have} does not satisfy {spec_text}"
                decisions[name] = {"use": "wheel", "version": wheels[name][1], "why": why}
                queue.extend(Requirement(r) for r in wheels[name][2])
            continue
        carried = f"wheel {wheels[name][1]}" if name in wheels else "no wheel"
        problems[name] = f"{name}: needs {spec_text}; installed: {have or 'none'}; carried: {carried}"
        decisions.pop(name, None)
    return decisions, [problems[n] for n in sorted(problems)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", required=True, help="folder of .whl files")
    parser.add_argument("--target", required=True, help="install folder (then put it on PYTHONPATH)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    parser.add_argument("packages", nargs="+", help="what must be importable afterwards (requirement strings)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.wheels):
        print(f"install_wheels: no wheel folder {args.wheels!r} (build it with benchmarks/build_wheels.sh and "
              "carry it)", file=sys.stderr)
        wheels = {}
    else:
        wheels = read_wheels(args.wheels)
    decisions, problems = plan(args.packages, wheels)
    for problem in problems:
        print(f"install_wheels: UNMET {problem}", file=sys.stderr)
    chosen = sorted(n for n, d in decisions.items() if d["use"] == "wheel")
    print(json.dumps({"python": sys.version.split()[0], "install": {n: decisions[n] for n in chosen},
                      "installed": sorted(n for n in decisions if n not in chosen), "unmet": problems}))
    if problems:
        return 1
    if chosen and not args.dry_run:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", args.target,
               *(wheels[n][0] for n in chosen)]
        done = subprocess.run(cmd, env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
        if done.returncode != 0:
            print(f"install_wheels: pip failed (exit {done.returncode}): {' '.join(cmd)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
