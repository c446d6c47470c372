"""Build the C fusion kernel into the extension module `coordinator._fusion_c`.

cffi in API mode: the declarations are read from fusion.h (between its cdef markers)
and the module is compiled at install time, so no compiler is needed at run time.
`pip install -e .` runs this through setup.py's `cffi_modules`. To rebuild in place by
hand, run `python csrc/build_fusion.py` from the repository root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cffi

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ["fusion.c", "fusion_dense.c", "fusion_lists.c", "fusion_sample.c"]
CDEF_BEGIN = "/* cdef begin */"
CDEF_END = "/* cdef end */"

# -O3 vectorizes the hot loops. -ffp-contract=fast allows fused multiply-add.
# -fopenmp-simd honours the `omp simd` reduction pragmas without linking OpenMP.
# -fno-math-errno and -fno-trapping-math let gcc if-convert and vectorize loops with
# conditional float code. None of them assumes finite math, so NaN and infinity
# checks keep working. No -march: the kernel selects AVX2 or AVX-512 code paths at
# load time (target_clones in fusion.c), so the module stays portable.
GCC_FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp-simd", "-fno-math-errno",
             "-fno-trapping-math", "-std=gnu11"]


def read_declarations(header: Path) -> str:
    """Return the part of the header that cffi parses (between the cdef markers)."""
    text = header.read_text(encoding="utf-8")
    begin = text.find(CDEF_BEGIN)
    end = text.find(CDEF_END)
    if begin < 0 or end < begin:
        raise RuntimeError(f"{header}: missing '{CDEF_BEGIN}' ... '{CDEF_END}' markers")
    return text[begin + len(CDEF_BEGIN):end]


def relative_to_cwd(path: Path) -> str:
    # setuptools expects extension sources relative to the directory of setup.py,
    # which is the working directory during a build.
    return os.path.relpath(path, Path.cwd())


ffibuilder = cffi.FFI()
ffibuilder.cdef(read_declarations(SOURCE_DIR / "fusion.h"))
ffibuilder.set_source(
    "coordinator._fusion_c",
    '#include "fusion.h"',
    sources=[relative_to_cwd(SOURCE_DIR / name) for name in SOURCES],
    include_dirs=[relative_to_cwd(SOURCE_DIR)],
    extra_compile_args=[] if sys.platform == "win32" else GCC_FLAGS,
    libraries=[] if sys.platform == "win32" else ["m"],
)


if __name__ == "__main__":
    # Build in place: the module lands in coordinator/ next to the binding.
    ffibuilder.compile(tmpdir=str(SOURCE_DIR.parent), verbose=True)
