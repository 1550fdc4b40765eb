"""The feature store: ``manifest.json`` plus ``part-NNNNN.npz`` files of pooled features.

The manifest records what made the features (model config hash, layer, SAE hash, latent ids, columns,
dataset hash and every sample id in order) and how the ids are cut into parts. Each part is written
atomically by whichever worker owns it, so a killed run resumes by skipping finished parts, workers on
several processes or hosts can share one store, and a store can never mix features from two setups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from saerl_jax.errors import UserError
from saerl_jax.io import atomic_write

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Manifest keys that must agree before a run may add parts to an existing store.
IDENTITY_KEYS = ("format_version", "model", "layer", "sae", "dataset", "options", "latent_ids", "columns", "ids")
_ABSENT = object()  # a key one side of a comparison lacks


class StoreMismatchError(UserError):
    """An existing store was made with another model, layer, SAE, dataset or options, or is unreadable."""


def file_hash(*paths: Path) -> str:
    """sha256 over the bytes of the given files, in order (hex, first 16 characters)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def part_name(index: int) -> str:
    return f"part-{index:05d}.npz"


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStore:
    """A loaded store: ``features[i]`` is the row of ``ids[i]``; columns name the features' axis."""

    ids: list[str]
    features: np.ndarray
    """``[N, C]`` float32."""
    columns: list[str]
    manifest: dict

    def column(self, name: str) -> np.ndarray:
        """One column ``[N]`` by name."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r} in the feature store ({len(self.columns)} columns)")
        return self.features[:, self.columns.index(name)]


def read_manifest(directory: Path) -> dict:
    """The store's manifest; a file that is not a JSON object is an error naming it."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreMismatchError(f"{path}: not valid JSON ({err}); delete the store and extract it again") from err
    missing = [key for key in (*IDENTITY_KEYS, "part_size") if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise StoreMismatchError(f"{path}: not a feature store manifest (missing {', '.join(missing)})")
    return manifest


def check_store(directory: Path, manifest: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> dict | None:
    """Checks an existing store's ``keys`` against ``manifest``; returns the manifest on disk (None if none).

    Raises:
      StoreMismatchError: naming the store and every field that differs (``options.prompt_span``).
    """
    path = directory / MANIFEST
    if not path.is_file():
        return None
    existing = read_manifest(directory)
    differ = [field for key in keys for field in _differences(key, existing.get(key), manifest.get(key))]
    if differ:
        details = "; ".join(f"{name}: store has {_short(a)}, this run {_short(b)}" for name, a, b in differ)
        raise StoreMismatchError(
            f"{path}: this feature store was made differently ({details}); "
            "refusing to mix features - write to a new --out directory"
        )
    return existing


def open_store(directory: Path, manifest: dict) -> dict:
    """Creates the store with ``manifest``, or checks an existing one was made the same way.

    Returns:
      The manifest on disk.

    Raises:
      StoreMismatchError: naming every field that differs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    existing = check_store(directory, manifest)
    if existing is not None:
        return existing
    text = json.dumps(manifest, indent=1) + "\n"
    atomic_write(directory / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return manifest


def _differences(name: str, ours, theirs) -> list[tuple[str, object, object]]:
    """``(field, store's, this run's)`` per differing field; mappings are compared key by key, and a key
    one side lacks shows as ``(absent)``."""
    if ours == theirs:
        return []
    if isinstance(ours, dict) and isinstance(theirs, dict):
        keys = list(ours) + [k for k in theirs if k not in ours]
        return [d for k in keys for d in _differences(f"{name}.{k}", ours.get(k, _ABSENT), theirs.get(k, _ABSENT))]
    return [(name, ours, theirs)]


def _short(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(value) if hasattr(value, '__len__') else ''} items)"


def write_part(directory: Path, index: int, ids: list[str], features: np.ndarray) -> Path:
    """Writes one part atomically (ids + float32 features)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.asarray(ids), features=features.astype(np.float32))

    return atomic_write(directory / part_name(index), write)


def part_ranges(n: int, part_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` sample ranges of the parts."""
    return [(start, min(start + part_size, n)) for start in range(0, n, part_size)]


def finished_parts(directory: Path, manifest: dict) -> set[int]:
    """Indices of parts present on disk whose ids are the ones the manifest expects there."""
    done = set()
    for index, (start, end) in enumerate(part_ranges(len(manifest["ids"]), manifest["part_size"])):
        path = directory / part_name(index)
        if path.is_file():
            with np.load(path) as part:
                if part["ids"].tolist() != manifest["ids"][start:end]:
                    raise StoreMismatchError(f"{path}: holds other sample ids than the manifest expects there")
            done.add(index)
    return done


def load_store(directory: str | os.PathLike) -> FeatureStore:
    """Reads a complete store; a missing part is an error naming it (finish it by rerunning extract)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a feature store (no {MANIFEST})")
    manifest = read_manifest(directory)
    ranges = part_ranges(len(manifest["ids"]), manifest["part_size"])
    missing = [part_name(i) for i in range(len(ranges)) if not (directory / part_name(i)).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: {len(missing)} of {len(ranges)} parts missing ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); rerun the same extract command to finish them"
        )
    ids, rows = [], []
    for index, (start, end) in enumerate(ranges):
        with np.load(directory / part_name(index)) as part:
            if part["ids"].tolist() != manifest["ids"][start:end]:
                raise StoreMismatchError(f"{directory / part_name(index)}: ids differ from the manifest")
            ids += part["ids"].tolist()
            rows.append(part["features"])
    features = np.concatenate(rows) if rows else np.zeros((0, len(manifest["columns"])), np.float32)
    if len(set(ids)) != len(ids) or ids != manifest["ids"]:
        raise StoreMismatchError(f"{directory}: parts do not cover every manifest id exactly once")
    return FeatureStore(ids=ids, features=features, columns=list(manifest["columns"]), manifest=manifest)
