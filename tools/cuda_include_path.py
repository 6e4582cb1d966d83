"""Prints the include folder of pip's CUDA 13 runtime headers (the `nvidia/cu13` package).

torch's CUDA headers include CUDA library headers (cuBLAS, cuSPARSE, ...) that the CUDA
wheels ship inside site-packages rather than the toolkit; a CUDA build needs this folder on
CPATH. Prints nothing when the package is absent.
"""

from pathlib import Path

try:
    import nvidia
except ImportError:
    raise SystemExit(0) from None

for root in nvidia.__path__:
    include = Path(root) / "cu13" / "include"
    if include.is_dir():
        print(include)
        break
