"""Check a wheel folder for the GPU machine before it travels: complete, installable there, small enough.

    python benchmarks/gpu/check_wheels.py benchmarks/gpu/wheels [--python-version 3.12] [--extra NAME==VERSION]

Checks, printing one line per wheel and the folder's size:

- every pin of ``benchmarks/gpu/requirements.txt`` and every ``--extra`` has exactly one wheel, at
  its version (two versions of one name stop a ``--no-deps`` install), and the package itself
  (``promoter-dist`` at the tree's ``__version__``) has one, with ``SOURCES.sha256`` beside it;
- no wheel is there that the list does not name;
- every wheel installs on CPython ``--python-version`` on manylinux x86_64 up to glibc 2.35
  (a ``cp3X``, ``abi3`` or ``py3`` wheel of a matching platform);
- the folder is under ``--limit-mib`` (the working tree that travels to the GPU machine is 64 MiB
  in all, the repository included).

It also says where a pin differs from the version installed in the interpreter running it (the
project's environment, where the CPU check passes). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

from packaging import tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "benchmarks" / "gpu" / "requirements.txt"
PACKAGE = "promoter-dist"
GLIBC_MINOR = 35
"""Newest manylinux_2_N a wheel may need (the GPU machine's Python 3.12.3 comes with a newer glibc)."""


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def package_version() -> str:
    """``__version__`` of the package in this tree."""
    text = (REPO / "promoter_dist" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise SystemExit("promoter_dist/__init__.py: no __version__")
    return match.group(1)


def supported_tags(python_version: str) -> set[tags.Tag]:
    """Tags of wheels CPython ``python_version`` installs on manylinux x86_64 up to glibc 2.:data:`GLIBC_MINOR`."""
    major, minor = (int(part) for part in python_version.split("."))
    interpreter = f"cp{major}{minor}"
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(GLIBC_MINOR, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    found = set(tags.cpython_tags((major, minor), abis=[interpreter, "abi3", "none"], platforms=platforms))
    found |= set(tags.compatible_tags((major, minor), interpreter=interpreter, platforms=platforms))
    return found


def check(folder: Path, python_version: str, extras: list[str], limit_mib: float) -> list[str]:
    """The folder's problems ([] when it is ready); prints what it finds."""
    problems = []
    expected = read_pins(REQUIREMENTS)
    for extra in extras:
        name, _, version = extra.partition("==")
        expected[canonicalize_name(name)] = version
    expected[canonicalize_name(PACKAGE)] = package_version()
    supported = supported_tags(python_version)
    wheels: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
        wheels.setdefault(name, []).append((str(version), path))
        fits = "ok" if wheel_tags & supported else "NOT INSTALLABLE"
        print(f"  {path.name:<80} {path.stat().st_size / 2**20:6.2f} MiB  {fits}")
        if not wheel_tags & supported:
            problems.append(f"{path.name}: no tag CPython {python_version} on manylinux x86_64 installs")
    for name, version in sorted(expected.items()):
        found = wheels.get(name, [])
        if not found:
            problems.append(f"{name}=={version}: no wheel")
        elif len(found) > 1:
            problems.append(f"{name}: {len(found)} wheels ({', '.join(p.name for _, p in found)}); keep one")
        elif found[0][0] != version:
            problems.append(f"{name}: wheel {found[0][0]}, pinned {version}")
    for name in sorted(set(wheels) - set(expected)):
        problems.append(f"{name}: a wheel the list does not name ({wheels[name][0][1].name})")
    if not (folder / "SOURCES.sha256").exists():
        problems.append(f"{folder / 'SOURCES.sha256'}: missing (the fingerprint of the package's sources)")
    for name, version in sorted(expected.items()):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if name != canonicalize_name(PACKAGE) and installed != version:
            print(f"  note: {name} is {installed} in this environment, pinned {version}")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20
    print(f"{folder}: {len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB (limit {limit_mib:g} MiB)")
    if size > limit_mib:
        problems.append(f"{size:.1f} MiB is over the {limit_mib:g} MiB limit")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Check the folder; prints the problems; returns 1 when there are any."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="wheel folder, e.g. benchmarks/gpu/wheels")
    parser.add_argument("--python-version", default="3.12", help="the target Python, MAJOR.MINOR (default: 3.12)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME==VERSION",
                        help="a wheel expected beside the list (deepspeed, built by prepare_wheels.sh)")
    parser.add_argument("--limit-mib", type=float, default=60.0, help="largest folder size (default: 60)")
    args = parser.parse_args(argv)
    problems = check(args.folder, args.python_version, args.extra, args.limit_mib)
    for problem in problems:
        print(f"PROBLEM {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
