"""Builds dspark_ext._C against the installed torch: CPU kernels always, CUDA kernels
whenever torch has CUDA and nvcc is found (no GPU needed to build).

Environment knobs: TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": sm_80 and sm_90 machine code
plus compute_90 PTX that newer GPUs JIT-compile), CUDA_HOME (default /usr/local/cuda when it
exists), DSPARK_FORCE_CPU=1 (skip CUDA), DSPARK_PTXAS_VERBOSE=1 (print ptxas register/spill
usage; the CI spill check reads it), DSPARK_KEEP_DEBUG_INFO=1 (keep the host debug info in a
wheel build, which otherwise strips it: about 22 MB of the 23 MB library).

The build records the torch it compiled against (dspark_ext/_build_info.py, read by
dspark_ext/_loader.py at import) and pins the package to that torch release.
"""

import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path

if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    # The nvcc on PATH may be a wrapper script outside the toolkit; point torch at the toolkit.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).resolve().parent
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")

# One build of the CPU kernels per instruction set; csrc/cpu/verify.cpp picks at run time.
CPU_ISA_FLAGS = {"DEFAULT": []}
if IS_X86:
    CPU_ISA_FLAGS["AVX2"] = ["-mavx2", "-mfma", "-mf16c"]
    CPU_ISA_FLAGS["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]


def cuda_is_buildable() -> bool:
    if os.environ.get("DSPARK_FORCE_CPU") == "1" or torch.version.cuda is None:
        return False
    home = cpp_extension.CUDA_HOME
    return home is not None and (Path(home) / "bin" / "nvcc").exists()


def nvidia_wheel_include_dirs() -> list:
    """CUDA 13 wheels of torch ship math-library headers under site-packages/nvidia/cu13."""
    site_packages = Path(torch.__file__).resolve().parent.parent
    return [str(p) for p in sorted((site_packages / "nvidia").glob("cu*/include")) if p.is_dir()]


def relative_sources(pattern: str) -> list:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


WITH_CUDA = cuda_is_buildable()
CUDA_ARCHS = os.environ["TORCH_CUDA_ARCH_LIST"] if WITH_CUDA else ""

# -fopenmp: at::parallel_for is a header template that is serial unless _OPENMP is defined.
# -ffp-contract=off: no a * b + c silently fused where FMA exists, so every CPU build rounds
# exactly as written (the same exp bits in every build; x / T - max never rounds above 0);
# kernels that want an FMA ask for one.
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=off"]
define_macros = [("DSPARK_CUDA_ARCHS", f'"{CUDA_ARCHS}"')]
if IS_X86:
    define_macros.append(("DSPARK_HAVE_X86_ISA_KERNELS", None))
sources = ["csrc/registration.cpp", "csrc/build_info.cpp"] + relative_sources("csrc/cpu/*.cpp")
extra_compile_args = {"cxx": cxx_flags}

if WITH_CUDA:
    define_macros.append(("DSPARK_WITH_CUDA", None))
    sources += relative_sources("csrc/cuda/*.cu")
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    for include_dir in nvidia_wheel_include_dirs():
        # -isystem is searched after the toolkit's own -I include directory.
        nvcc_flags += ["-isystem", include_dir]
        cxx_flags += ["-idirafter", include_dir]
    if os.environ.get("DSPARK_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    extra_compile_args["nvcc"] = nvcc_flags
    Extension = cpp_extension.CUDAExtension
else:
    Extension = cpp_extension.CppExtension


class BuildWithCpuIsaVariants(cpp_extension.BuildExtension):
    """Compiles csrc/cpu/isa/<op>_<isa>.cpp once per instruction set with its own flags,
    which setuptools cannot express per source file, then links them into _C.

    Objects go to a persistent build/temp.<platform>-<python> in the repository, where ninja finds
    them on the next build: pip's editable and wheel builds would otherwise use a fresh temporary
    folder and recompile every source (minutes) even when nothing changed."""

    def initialize_options(self):
        super().initialize_options()
        # Set before finalize_options, so the temporary folder of `build` does not replace it.
        self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    def building_a_wheel(self) -> bool:
        return "bdist_wheel" in self.distribution.commands and os.environ.get("DSPARK_KEEP_DEBUG_INFO") != "1"

    def build_extension(self, ext):
        if self.building_a_wheel():
            # Python's CFLAGS carry -g: drop the host debug info at link time (the objects, and so
            # an unchanged rebuild's reuse of them, stay as they are; symbols stay for backtraces).
            ext.extra_link_args = list(ext.extra_link_args or []) + ["-Wl,--strip-debug"]
        isa_objects = []
        for isa, flags in CPU_ISA_FLAGS.items():
            isa_objects += self.compiler.compile(
                relative_sources(f"csrc/cpu/isa/*_{isa.lower()}.cpp"),
                output_dir=self.build_temp,
                macros=ext.define_macros + [("CPU_CAPABILITY", isa), (f"CPU_CAPABILITY_{isa}", None)],
                include_dirs=ext.include_dirs,
                extra_postargs=(ext.extra_compile_args["cxx"] + flags)
                if not isinstance(ext.extra_compile_args, dict)
                else {"cxx": ext.extra_compile_args["cxx"] + flags, "nvcc": []},
                depends=relative_sources("csrc/core/*.h") + relative_sources("csrc/cpu/*.h"),
            )
        ext.extra_objects = list(ext.extra_objects or []) + isa_objects
        super().build_extension(ext)


TORCH_RELEASE = torch.__version__.split("+")[0]


def kernel_sources_sha256() -> str:
    """One hash of every kernel source (csrc/): a cost profile measured with other kernels is
    measured again (dspark_ext/cost_profile.py keys profiles by it)."""
    digest = hashlib.sha256()
    for path in relative_sources("csrc/**/*"):
        if (ROOT / path).is_file():
            digest.update(path.encode() + b"\0" + (ROOT / path).read_bytes() + b"\0")
    return digest.hexdigest()


def write_build_info() -> None:
    """The exact torch this build compiles against, checked by dspark_ext/_loader.py at import,
    and the hash of the kernel sources it compiles."""
    (ROOT / "dspark_ext" / "_build_info.py").write_text(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_GIT_VERSION = {getattr(torch.version, 'git_version', 'unknown')!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"CUDA_ARCHS = {CUDA_ARCHS!r}\n"
        f"KERNEL_SOURCES_SHA256 = {kernel_sources_sha256()!r}\n"
    )


write_build_info()

setup(
    packages=find_packages(include=["dspark_ext", "dspark_ext.*"]),
    # The compiled library only works with the torch release it was built against (C++ ABI).
    install_requires=[f"torch=={TORCH_RELEASE}"],
    ext_modules=[
        Extension(
            name="dspark_ext._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildWithCpuIsaVariants},
)
