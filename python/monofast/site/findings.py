"""The findings stage's files (`<run>/findings/`), read for the site.

    findings.json     every number of the four findings
    family.npz        per family member: purity, dominant source, density, top tokens, its
                      parent in the next smaller member and its children in the next larger
                      one; the 2-D map of all decoder directions
    universality.npz  per feature (and neuron) of the run's SAE: best match in model B
    specificity.npz   per feature (and neuron): firings per activation level and source
    steering.json     clamped and clean continuations of a few source-pure features

The folder counts only when the stage finished (its manifest.json is there); each file is
checked against the digest that manifest recorded. steering.json is read leniently: it may
be a stub (`{"skipped": ..., "features": []}`) and any entry may lack any key.

The file names are those `monofast.findings.run` writes; that module is not imported here
because it pulls in torch and the models, and site workers load this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from monofast.common import files
from monofast.common.errors import DataError

FINDINGS_FILE = "findings.json"
FAMILY_FILE = "family.npz"
UNIVERSALITY_FILE = "universality.npz"
SPECIFICITY_FILE = "specificity.npz"
STEERING_FILE = "steering.json"
FORMAT = 1
REDO = "re-run `monofast run --with findings --from findings`"


class Link(NamedTuple):
    """A feature of a family member, seen from a related one (its parent or child)."""

    member: str
    feature: int
    cos: float
    """Cosine of the two decoder directions."""
    corr: float
    """Correlation of the two features' activations over the findings' tokens."""


class Family:
    """family.npz: SAEs of several widths (members, smallest first) and their parent links."""

    def __init__(self, arrays: dict[str, np.ndarray], main: str):
        self.arrays = arrays
        self.order: list[str] = [str(name) for name in arrays["order"]]
        """Member names, smallest first (`w512`, `w1024`, ...)."""
        self.main = main
        """The member that is the run's own SAE (its features have the site's feature pages)."""
        self.threshold = float(arrays["threshold"])
        """Decoder cosine from which a parent is clear (and a child counts as a child)."""
        if main not in self.order:
            raise DataError(f"family.npz has no member {main!r} (members: {', '.join(self.order)}); {REDO}")

    def size(self, member: str) -> int:
        return len(self.arrays[f"{member}_purity"])

    def _next(self, member: str, step: int) -> Optional[str]:
        i = self.order.index(member) + step
        return self.order[i] if 0 <= i < len(self.order) else None

    def parent(self, member: str, f: int) -> Optional[Link]:
        """The most similar feature of the next smaller member (clear or not), or None for the smallest."""
        small = self._next(member, -1)
        if small is None:
            return None
        p = int(self.arrays[f"{member}_parent"][f])
        if p < 0:
            return None
        return Link(small, p, float(self.arrays[f"{member}_parent_cos"][f]),
                    float(self.arrays[f"{member}_parent_corr"][f]))

    def children(self, member: str, f: int) -> list[Link]:
        """The features of the next larger member whose clear parent `f` is, most similar first."""
        large = self._next(member, 1)
        if large is None:
            return []
        ptr = self.arrays[f"{member}_child_ptr"]
        ids = self.arrays[f"{member}_child_ids"][int(ptr[f]):int(ptr[f + 1])]
        cos, corr = self.arrays[f"{large}_parent_cos"], self.arrays[f"{large}_parent_corr"]
        return [Link(large, int(j), float(cos[j]), float(corr[j])) for j in ids]

    def ancestors(self, member: str, f: int) -> list[Link]:
        """The chain of parents up to the smallest member, nearest first."""
        chain: list[Link] = []
        link = self.parent(member, f)
        while link is not None:
            chain.append(link)
            link = self.parent(link.member, link.feature)
        return chain


class Findings(NamedTuple):
    """Everything the site shows of the findings."""

    numbers: dict[str, Any]
    """findings.json."""
    family: Family
    universality: dict[str, np.ndarray]
    specificity: dict[str, np.ndarray]
    steering: dict[str, Any]
    """steering.json (possibly a stub without numbers)."""

    @property
    def sources(self) -> list[str]:
        return [str(s) for s in self.numbers.get("sources", [])]

    def steered(self) -> dict[int, dict[str, Any]]:
        """The steered features' entries by feature id (entries without an id are left out)."""
        out: dict[int, dict[str, Any]] = {}
        entries = self.steering.get("features")
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and type(entry.get("feature")) is int:  # not a bool
                out.setdefault(int(entry["feature"]), entry)
        return out


def _npz(path: Path) -> dict[str, np.ndarray]:
    return files.read_npz(path, REDO)


def _main_member(numbers: dict[str, Any]) -> str:
    for width in numbers.get("family", {}).get("widths", []):
        if isinstance(width, dict) and width.get("main"):
            return str(width["name"])
    raise DataError(f"findings.json names no family member as the run's SAE (`main`); {REDO}")


def load(folder: str | Path, verify: bool = True) -> Optional[Findings]:
    """The findings in `folder`, or None when the stage has not finished there. Each file is
    checked against the stage's manifest first (`verify=False` where the same process tree
    has just checked them)."""
    folder = Path(folder)
    if not (folder / files.MANIFEST_FILE).is_file():
        return None
    names = (FINDINGS_FILE, FAMILY_FILE, UNIVERSALITY_FILE, SPECIFICITY_FILE, STEERING_FILE)
    for name in names if verify else ():
        if (folder / name).is_file():  # a missing one is named below, by the reader that needs it
            files.verify_recorded(folder / name)
    numbers = files.read_json(folder / FINDINGS_FILE, "findings")
    if not isinstance(numbers, dict) or numbers.get("format") != FORMAT:
        raise DataError(f"{folder / FINDINGS_FILE} is not findings format {FORMAT}; {REDO}")
    steering: Any = {}
    if (folder / STEERING_FILE).is_file():
        steering = files.read_json(folder / STEERING_FILE, "steering results")
    return Findings(numbers, Family(_npz(folder / FAMILY_FILE), _main_member(numbers)),
                    _npz(folder / UNIVERSALITY_FILE), _npz(folder / SPECIFICITY_FILE),
                    steering if isinstance(steering, dict) else {})


def check(findings: Findings, n_features: int, n_neurons: int, folder: str | Path) -> None:
    """A `DataError` when the findings were measured on another SAE or model than the
    analysis the site shows (the pages would name the wrong features)."""
    sizes = {"family.npz's run SAE": findings.family.size(findings.family.main),
             "universality.npz": len(findings.universality["feature_match"]),
             "specificity.npz": len(findings.specificity["feature_levels"])}
    for what, size in sizes.items():
        if size != n_features:
            raise DataError(f"{folder}: {what} has {size} features but the analysis {n_features}; "
                            f"the findings are of another SAE: {REDO}")
    if len(findings.specificity["neuron_levels"]) != n_neurons:
        raise DataError(f"{folder}: specificity.npz has {len(findings.specificity['neuron_levels'])} neurons but "
                        f"the analysis {n_neurons}; {REDO}")
