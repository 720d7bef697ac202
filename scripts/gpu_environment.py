#!/usr/bin/env python
"""What the device check (``scripts/check_gpu.sh``) runs on, said before it spends the lease.

Prints the interpreter, each package the check needs with its version against the range ``pyproject.toml`` states,
the wheels carried beside the machine's own packages (``scripts/gpu_wheels.sh``), where ``zsam_hf`` is imported
from and whether its compiled CPU loops built, and the device. A lent GPU's image has its own versions (torch 2.11
and transformers 5.17 were seen there, below our lower bounds): a version outside the range is printed as such and
the check goes on, so the figures say what they were taken on. Exits 1 where the check cannot run at all:
``zsam_hf`` does not import, or ``--device cuda`` has no CUDA device.

    python scripts/gpu_environment.py --device cuda [--site DIR]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import platform
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
# The distributions the check imports, by the extra of pyproject.toml that states their range (None: the core).
CHECKED = {
    None: ("torch", "transformers", "accelerate", "huggingface_hub", "safetensors", "numpy"),
    "vision": ("timm",),
    "benchmark": ("pytorch-optimizer",),
}


def stated_ranges() -> dict[str, Requirement]:
    """pyproject.toml's requirement for each distribution in CHECKED, by its normalized name (any version, where
    Python is older than 3.11 and has no TOML reader)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        return {canonicalize_name(name): Requirement(name) for names in CHECKED.values() for name in names}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {}
    for extra, names in CHECKED.items():
        lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
        requirements = {canonicalize_name(r.name): r for r in map(Requirement, lines)}
        ranges.update({canonicalize_name(name): requirements[canonicalize_name(name)] for name in names})
    return ranges


def version_line(requirement: Requirement) -> str:
    """``name  installed  stated range  verdict`` for one distribution."""
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return f"{requirement.name:<20}{'missing':<24}{str(requirement.specifier):<14}MISSING"
    try:
        inside = requirement.specifier.contains(Version(installed), prereleases=True)
    except InvalidVersion:
        inside = False
    verdict = "ok" if inside else "OUTSIDE the stated range"
    return f"{requirement.name:<20}{installed:<24}{str(requirement.specifier):<14}{verdict}"


def carried_lines(site: Path) -> list[str]:
    """Each wheel installed into ``site``: its name, version, and whether Python imports it from there."""
    lines = []
    for info in sorted(site.glob("*.dist-info")):
        dist = metadata.Distribution.at(info)
        top = (dist.read_text("top_level.txt") or dist.metadata["Name"].replace("-", "_")).split()[0]
        try:
            origin = Path(importlib.import_module(top).__file__).resolve()
            where = "imported from here" if site.resolve() in origin.parents else f"SHADOWED by {origin}"
        except Exception as error:  # a carried package that does not import on this machine
            where = f"does not import: {type(error).__name__}: {error}"
        lines.append(f"carried: {dist.metadata['Name']} {dist.version}, {where}")
    return lines


def device_lines(device: str) -> list[str] | None:
    """The device's description, or None where the asked-for device is missing."""
    import torch

    if device != "cuda":
        return [f"device: {device}, {torch.get_num_threads()} threads"]
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return [
        f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor},"
        f" {props.multi_processor_count} multiprocessors; CUDA {torch.version.cuda}"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda", help="the device the check runs on (cuda, or cpu to rehearse)"
    )
    parser.add_argument("--site", type=Path, help="the folder the carried wheels were installed into")
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()} ({sys.executable}), {platform.machine()}")
    for requirement in stated_ranges().values():
        print(version_line(requirement))
    if args.site is not None and args.site.is_dir():
        print("\n".join(carried_lines(args.site)) or f"carried: nothing in {args.site}")
    try:
        import zsam_hf
        from zsam_hf.selection import kernel
    except Exception as error:
        print(f"zsam_hf does not import: {type(error).__name__}: {error}")
        return 1
    loops = "built" if kernel.library() is not None else "not built (the CPU filter uses NumPy)"
    print(f"zsam_hf {zsam_hf.__version__} from {Path(zsam_hf.__file__).parent}; compiled CPU loops {loops}")
    described = device_lines(args.device)
    if described is None:
        print("device: no CUDA device is visible to torch")
        return 1
    print("\n".join(described))
    return 0


if __name__ == "__main__":
    sys.exit(main())
