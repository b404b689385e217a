"""Prints the stamp of a build of fastattn._C: what decides its binary, in one line.

That is a hash of setup.py and of every file under csrc/, the interpreter's ABI tag
(cpython-312), the torch build (2.11.0+cu130) and the TORCH_CUDA_ARCH_LIST it was built for.
`make gpu-prebuild` (csrc/cuda/gpu_versions_check.sh with PREBUILT_OUT) writes it beside an
extension built here for the GPU machine; benchmarks/gpu_check.sh installs that extension
instead of compiling one only when the stamp it computes there is the same.

    python csrc/cuda/extension_stamp.py --arch-list 9.0 [--root REPOSITORY]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def sources_digest(root: Path) -> str:
    """sha256 over the relative path and the bytes of setup.py and each file under csrc/."""
    files = [root / "setup.py", *sorted(path for path in (root / "csrc").rglob("*") if path.is_file())]
    digest = hashlib.sha256()
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def stamp(root: Path, arch_list: str) -> str:
    import torch

    return (f"fastattn._C sources {sources_digest(root)} | {sys.implementation.cache_tag} | "
            f"torch {torch.__version__} | TORCH_CUDA_ARCH_LIST={arch_list}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch-list", required=True, help="the TORCH_CUDA_ARCH_LIST of the build")
    parser.add_argument("--root", type=Path, default=REPOSITORY, help="the repository (default: this one)")
    arguments = parser.parse_args()
    print(stamp(arguments.root, arguments.arch_list))


if __name__ == "__main__":
    main()
