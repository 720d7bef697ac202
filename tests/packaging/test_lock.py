"""The lock file: CI's exact versions are the project's own closure, nothing more (needs the dev install)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_lock_is_the_closure_of_the_projects_own_dependencies():
    """.ci/constraints.txt pins exactly what pyproject's dependencies and extras pull in (nothing of this
    machine's other packages), each once: the closure is walked here through the installed metadata."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pinned[canonicalize_name(name)] = version.strip()
    assert "make lock" in (ROOT / ".ci" / "constraints.txt").read_text()[:200]

    def closure(requirements: list[str], extras: set[str]) -> set[str]:
        names: set[str] = set()
        visited: set[tuple[str, frozenset]] = set()  # a package is entered again for each set of extras
        queue = [(r, extras) for r in requirements]
        while queue:
            text, active = queue.pop()
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (active or {""})):
                continue
            name = canonicalize_name(req.name)
            key = (name, frozenset(req.extras))
            if key in visited:
                continue
            visited.add(key)
            if name != "zsam-hf":
                names.add(name)
            try:
                queue += [(r, set(req.extras)) for r in md.requires(req.name) or []]
            except md.PackageNotFoundError:
                pass
        return names

    wanted = closure(md.requires("zsam-hf") or [], {"dev"})
    assert set(pinned) <= wanted, f"pinned but not pulled in: {sorted(set(pinned) - wanted)}"
    installed_wanted = {n for n in wanted if _installed(n)}
    assert installed_wanted <= set(pinned), (
        f"pulled in but not pinned: {sorted(installed_wanted - set(pinned))}"
    )
    assert pinned["torch"] == "2.14.1" and "awscli" not in pinned and "boto3" not in pinned


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False
