"""The lent GPU machine's Python environment: what it lacks, the wheels that carry it, and a CPU copy.

The lent machine (one H100/H200, Python 3.12, torch 2.11 + Triton, no network) has the packages
listed in ``benchmarks/device_packages.txt``. Whatever the project needs beyond them (today
megatron-core 0.16.1 and zstandard: :func:`carried_requirements`, computed from ``setup.py``
against that list) travels with the call as wheels in ``.whl/`` (git-ignored), which
``benchmarks/gpu_check.sh`` installs with ``pip install --target /tmp/site`` and reaches through
``PYTHONPATH``. Everything that travels (the working tree and ``.whl/``) must fit 64 MiB.

  python benchmarks/device_env.py wheels                 # .whl/ for the device (cp312), size checked
  python benchmarks/device_env.py wheels --python-version local --dest DIR   # for this interpreter
  python benchmarks/device_env.py environment DIR        # a venv like the device's (see below)
  python benchmarks/device_env.py tree DEST              # copy what a device call sends
  python benchmarks/device_env.py carried                # print the requirements that are carried

``environment`` builds the rehearsal's interpreter (``benchmarks/device_rehearsal.sh``): a fresh
``venv`` of this interpreter's base Python whose ``site-packages`` holds symbolic links to this
environment's installed distributions, except the project's own requirements the lent machine lacks
(megatron-core, zstandard, the test-only extras) and the project itself. So ``import megatron``
fails there exactly as on the device until the carried wheels are installed with ``--target`` and
put on ``PYTHONPATH``, while torch and the rest are the very files already installed here (no
second multi-GB torch). Links, not a ``.pth`` onto the whole ``site-packages``: a path entry would
make the hidden packages importable again.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from typing import Dict, Iterable, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES_FILE = os.path.join(ROOT, "benchmarks", "device_packages.txt")
CARRY_LIMIT = 64 * 2**20
"""Bytes a device call may carry: the working tree that travels plus the carried paths."""
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
NO_WHEEL = 3
"""Exit code of ``wheels`` when a wheel is neither in ``--dest`` nor downloadable (no network)."""


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0])


def lent_packages(path: str = PACKAGES_FILE) -> Set[str]:
    """Normalised names of the distributions installed on the lent machine."""
    with open(path, encoding="utf-8") as f:
        return {normalize(line.strip()) for line in f if line.strip() and not line.startswith("#")}


def project_requirements(setup_py: str = os.path.join(ROOT, "setup.py")) -> Dict[str, List[str]]:
    """``{"install": [...], extra: [...]}`` read from ``setup.py``'s literals (nothing executed)."""
    with open(setup_py, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found: Dict[str, List[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            found["install"] = list(ast.literal_eval(node.value))
        elif isinstance(node, ast.keyword) and node.arg == "extras_require":
            found.update(ast.literal_eval(node.value))
    if "install" not in found:
        raise SystemExit(f"{setup_py}: no install_requires list found")
    return found


def carried_requirements() -> List[str]:
    """The project's install requirements the lent machine lacks: what travels as wheels."""
    lent = lent_packages()
    return [r for r in project_requirements()["install"] if requirement_name(r) not in lent]


def hidden_distributions() -> Set[str]:
    """What the rehearsal environment leaves out: every project requirement (install and extras)
    the lent machine lacks, and the project itself (the device runs the checkout, on PYTHONPATH)."""
    lent = lent_packages()
    names = {requirement_name(r) for reqs in project_requirements().values() for r in reqs}
    return {n for n in names if n not in lent} | {"megatron-mmbert"}


# -- wheels ---------------------------------------------------------------------------------------


def _wheel_matches(filename: str, requirement: str, python_version: str) -> bool:
    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    try:
        name, version, _, tags = parse_wheel_filename(filename)
    except Exception:
        return False
    req = Requirement(requirement)
    if normalize(name) != normalize(req.name) or version not in req.specifier:
        return False
    if python_version == "local":
        return bool(set(tags) & set(sys_tags()))
    cp = "cp" + python_version.replace(".", "")
    return any(t.interpreter in (cp, "py3") and t.platform in PLATFORMS + ("any",) for t in tags)


def wheels(dest: str, python_version: str = DEVICE_PYTHON, requirements: Optional[List[str]] = None) -> List[str]:
    """The wheels of ``requirements`` (default: :func:`carried_requirements`) in ``dest``, for
    ``python_version`` (``local``: this interpreter), downloaded with pip where ``dest`` lacks one.
    Refuses a second version of a carried package in ``dest`` (pip would install both and fail)."""
    requirements = carried_requirements() if requirements is None else requirements
    os.makedirs(dest, exist_ok=True)
    paths = []
    for req in requirements:
        present = [f for f in sorted(os.listdir(dest)) if _wheel_matches(f, req, python_version)]
        if not present:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", dest, req]
            if python_version != "local":
                cmd[4:4] = ["--python-version", python_version, "--implementation", "cp",
                            *[a for p in PLATFORMS for a in ("--platform", p)]]
            print(f"[device_env] downloading {req} for Python {python_version}: {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            present = [f for f in sorted(os.listdir(dest)) if _wheel_matches(f, req, python_version)]
            if proc.returncode or not present:
                print(proc.stderr[-2000:], file=sys.stderr)
                print(f"[device_env] no wheel of {req} for Python {python_version} in {dest} and none could be "
                      "downloaded (no network?): put one there by hand", file=sys.stderr)
                sys.exit(NO_WHEEL)
        if len(present) > 1:
            sys.exit(f"[device_env] {dest} holds {len(present)} wheels of {req} ({', '.join(present)}): "
                     "keep one (two versions stop the device's pip install)")
        paths.append(os.path.join(dest, present[0]))
    return paths


# -- what a device call carries --------------------------------------------------------------------


def travelling_files(root: str = ROOT) -> List[str]:
    """Paths (relative to ``root``) a device call sends: tracked and untracked-not-ignored files
    that exist (the device tool's rule)."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-co", "--exclude-standard", "-z"],
                         capture_output=True, text=True, check=True).stdout
    return sorted({p for p in out.split("\0") if p and os.path.isfile(os.path.join(root, p))})


def size_of(paths: Iterable[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def check_carry(carried: List[str], root: str = ROOT) -> int:
    """Bytes of the working tree plus ``carried`` files; exits naming the sizes when over 64 MiB."""
    tree = size_of(os.path.join(root, p) for p in travelling_files(root))
    extra = size_of(carried)
    total = tree + extra
    print(f"[device_env] a call carries {total / 2**20:.1f} MiB: working tree {tree / 2**20:.1f} MiB + "
          f"wheels {extra / 2**20:.1f} MiB (limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    if total > CARRY_LIMIT:
        sys.exit(f"[device_env] over the {CARRY_LIMIT // 2**20} MiB a call carries: ignore large untracked files "
                 "or carry fewer wheels")
    return total


def ignore_in_git(path: str, root: str = ROOT) -> None:
    """Make ``/<path>/`` git-ignored through ``info/exclude`` (never committed, never travels
    unless carried)."""
    ignored = subprocess.run(["git", "-C", root, "check-ignore", "-q", f"{path}/x.whl"]).returncode == 0
    if ignored:
        return
    exclude = subprocess.run(["git", "-C", root, "rev-parse", "--git-path", "info/exclude"],
                             capture_output=True, text=True, check=True).stdout.strip()
    exclude = os.path.join(root, exclude) if not os.path.isabs(exclude) else exclude
    os.makedirs(os.path.dirname(exclude), exist_ok=True)
    with open(exclude, "a", encoding="utf-8") as f:
        f.write(f"/{path}/\n")
    print(f"[device_env] added /{path}/ to {exclude}")


def copy_tree(dest: str, root: str = ROOT) -> int:
    """Copy what a device call sends into ``dest`` (which must not exist); returns the file count."""
    if os.path.exists(dest):
        sys.exit(f"[device_env] {dest} exists: give a new folder")
    files = travelling_files(root)
    for rel in files:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)
    return len(files)


# -- the rehearsal's interpreter ---------------------------------------------------------------------


def top_level_entries(dist) -> Set[str]:
    """The names a distribution owns directly in ``site-packages`` (packages, modules, ``.pth``
    files, its ``.dist-info``), from its RECORD."""
    entries = set()
    for f in dist.files or ():
        first = str(f).replace("\\", "/").split("/")[0]
        if first and first != "..":
            entries.add(first)
    return entries


def build_environment(target: str) -> Dict[str, List[str]]:
    """A venv at ``target`` like the device's (see the module docstring); returns what was linked
    and what was hidden, by distribution name."""
    from importlib.metadata import distributions

    if os.path.exists(target):
        sys.exit(f"[device_env] {target} exists: give a new folder")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", target], check=True)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = os.path.join(target, "lib", version, "site-packages")
    here = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    hidden = hidden_distributions()
    report: Dict[str, List[str]] = {"linked": [], "hidden": []}
    for dist in distributions():
        name = normalize(dist.metadata["Name"] or "")
        location = os.path.realpath(str(dist.locate_file("")))
        if location not in here or not name:
            continue
        if name in hidden:
            report["hidden"].append(name)
            continue
        for entry in top_level_entries(dist):
            source, link = os.path.join(location, entry), os.path.join(site, entry)
            if os.path.exists(source) and not os.path.lexists(link):
                os.symlink(source, link)
        report["linked"].append(name)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheels", help="the carried wheels in --dest, downloaded where missing, size checked")
    w.add_argument("--dest", default=os.path.join(ROOT, ".whl"))
    w.add_argument("--python-version", default=DEVICE_PYTHON, help=f"default {DEVICE_PYTHON} (the device's); local: this interpreter")
    e = sub.add_parser("environment", help="a venv like the device's at DIR")
    e.add_argument("dir")
    t = sub.add_parser("tree", help="copy what a device call sends to DEST")
    t.add_argument("dest")
    sub.add_parser("carried", help="print the requirements the device lacks")
    args = p.parse_args(argv)

    if args.command == "carried":
        print("\n".join(carried_requirements()))
    elif args.command == "wheels":
        dest = os.path.abspath(args.dest)
        if dest == os.path.join(ROOT, ".whl"):
            ignore_in_git(".whl")
        paths = wheels(dest, args.python_version)
        for path in paths:
            print(f"[device_env] {os.path.basename(path)}: {os.path.getsize(path) / 2**20:.1f} MiB")
        if dest.startswith(ROOT + os.sep):
            check_carry(paths)
        else:
            print(f"[device_env] wheels {size_of(paths) / 2**20:.1f} MiB (outside the checkout: not carried)")
    elif args.command == "environment":
        report = build_environment(os.path.abspath(args.dir))
        print(f"[device_env] {args.dir}: {len(report['linked'])} distributions linked from {sys.prefix}; "
              f"hidden (absent on the device): {', '.join(sorted(report['hidden'])) or 'none'}")
    elif args.command == "tree":
        print(f"[device_env] copied {copy_tree(os.path.abspath(args.dest))} files to {args.dest}")


if __name__ == "__main__":
    main()
