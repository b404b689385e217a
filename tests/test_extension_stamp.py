"""csrc/cuda/extension_stamp.py: the stamp that lets `make gpu-check` install an extension
built elsewhere (`make gpu-prebuild`) only for the tree, Python and torch it was built from."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "csrc" / "cuda" / "extension_stamp.py"


def _stamp(root: Path, arch_list: str = "9.0") -> str:
    completed = subprocess.run([sys.executable, str(SCRIPT), "--arch-list", arch_list, "--root", str(root)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def _tree(path: Path) -> Path:
    (path / "csrc" / "cuda").mkdir(parents=True)
    (path / "setup.py").write_text("setup()\n")
    (path / "csrc" / "ops.cpp").write_text("int ops;\n")
    (path / "csrc" / "cuda" / "kernel.cu").write_text("__global__ void kernel() {}\n")
    return path


def test_the_stamp_names_the_python_the_torch_build_and_the_arch_list(tmp_path):
    stamp = _stamp(_tree(tmp_path), "9.0")
    assert stamp.startswith("fastattn._C sources ")
    assert stamp.endswith(f" | {sys.implementation.cache_tag} | torch {torch.__version__} | TORCH_CUDA_ARCH_LIST=9.0")
    assert _stamp(tmp_path, "8.0;9.0a").endswith("TORCH_CUDA_ARCH_LIST=8.0;9.0a")


def test_the_stamp_changes_with_every_source_of_the_binary_and_only_with_them(tmp_path):
    tree = _tree(tmp_path / "tree")
    stamp = _stamp(tree)
    copy = shutil.copytree(tree, tmp_path / "copy")
    assert _stamp(copy) == stamp  # the same sources elsewhere: the same stamp
    (copy / "csrc" / "cuda" / "__pycache__").mkdir()
    (copy / "csrc" / "cuda" / "__pycache__" / "emulation.cpython-312.pyc").write_bytes(b"\0")
    (copy / "README.md").write_text("not a source of the binary\n")
    assert _stamp(copy) == stamp
    for edit in (lambda root: (root / "csrc" / "cuda" / "kernel.cu").write_text("__global__ void kernel2() {}\n"),
                 lambda root: (root / "setup.py").write_text("setup(name='x')\n"),
                 lambda root: (root / "csrc" / "new.h").write_text(""),
                 lambda root: (root / "csrc" / "ops.cpp").rename(root / "csrc" / "ops2.cpp")):
        edited = shutil.copytree(tree, tmp_path / f"edited{len(list(tmp_path.iterdir()))}")
        edit(edited)
        assert _stamp(edited) != stamp

