"""Builds and installs fastattn.

``fastattn._C`` holds the C++ CPU kernels (and, in a later build, the CUDA ones).  Set
``FASTATTN_SKIP_EXTENSION=1`` to install without it: ``import fastattn`` then runs on the
reference backend and ``fastattn.info()`` says the extension is missing.  A failed
compile stops the install unless ``FASTATTN_EXTENSION_OPTIONAL=1``.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are
installed as ``fastattn.kernels``.
"""

import os
import warnings

from setuptools import find_packages, setup

CPU_SOURCES = [
    "csrc/module.cpp", "csrc/ops.cpp", "csrc/decoder_step.cpp", "csrc/cpu/attention.cpp", "csrc/cpu/recurrent.cpp",
]


def extension_build():
    """-> (ext_modules, cmdclass) for the setup() call."""
    if os.environ.get("FASTATTN_SKIP_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                if os.environ.get("FASTATTN_EXTENSION_OPTIONAL") != "1":
                    raise
                warnings.warn(f"fastattn._C was not built ({error}); the reference backend will be used")

    extension = CppExtension(
        "fastattn._C",
        CPU_SOURCES,
        include_dirs=[os.path.abspath("csrc")],
        # -fopenmp: ATen's at::parallel_for is inlined from its headers and is only
        # parallel where _OPENMP is defined; it links the libgomp torch already loads.
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = extension_build()
setup(
    packages=find_packages(include=["fastattn", "fastattn.*"]) + ["fastattn.kernels"],
    package_dir={"fastattn.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
