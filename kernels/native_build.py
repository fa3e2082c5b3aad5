"""C kernels compiled once with the system's C compiler and loaded with ctypes (``bf16_head``, ``cpu_swiglu``,
``cpu_rms_norm``, and the decoding's ``engine.decoding.int8_dot``, ``int4_dot`` and ``native_step``).

``load(name, source)`` compiles ``source`` with ``$CC`` (else ``cc``), ``-O3``, libm and OpenMP where the compiler has
it, into the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``, ``finetune-studio/kernels``, one file per
source's hash, earlier versions removed), through a temporary file renamed at the end (two processes building at
once each finish a whole file), and loads it; it returns None, with a log line saying why, where that fails (no
compiler, a read-only home) or the machine is not x86-64. The kernels pass torch's thread count to OpenMP.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# exp over 16 float32 lanes, shared by the kernels' C sources (``cpu_swiglu``, ``cpu_attention``): pasted in after the
# source's ``#include <immintrin.h>`` and its ``#define AVX512 __attribute__((target("avx512f")))``.
EXP_PS = r"""
/* exp(x) for float32 lanes: x = n ln2 + r (Cody-Waite), exp(r) by its Taylor series to r^7 (|r| <= ln2 / 2),
   scaled by 2^n; x clamped to [-87.3, 88.7] */
AVX512 static inline __attribute__((always_inline)) __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
"""

# float32 <-> bf16 over AVX-512 lanes, shared by the kernels' C sources that read or write bf16 (``cpu_swiglu``,
# ``cpu_rms_norm``): pasted in after the source's ``#include <immintrin.h>``; defines ``AVX512BW`` (the target of the
# functions that use them: AVX-512 BW/VL's masked 16-bit loads and stores, AVX512_BF16's rounding instruction).
BF16_PS = r"""
#define AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* float32 lanes rounded to bf16, to nearest even (a NaN to a quiet NaN, whose bits may differ from torch's
   0xFFFF), 32 at a time (lo's lanes first): otherwise what
   torch's .to(torch.bfloat16) gives. vcvtne2ps2bf16 rounds so but takes subnormals as zero: a pair with a lane
   below the smallest normal in magnitude (a subnormal, or a zero) or a NaN (rare) is rounded with integer
   operations instead */
AVX512BW static inline __m256i to_bf16_int(__m512 x) {
  __m512i b = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

AVX512BW static inline __m512i to_bf16_pair(__m512 lo, __m512 hi) {
  __m512 tiny = _mm512_set1_ps(1.17549435e-38f);
  __mmask16 odd = _mm512_cmp_ps_mask(_mm512_abs_ps(lo), tiny, _CMP_NGE_UQ) |
                  _mm512_cmp_ps_mask(_mm512_abs_ps(hi), tiny, _CMP_NGE_UQ);
  if (__builtin_expect(odd == 0, 1)) return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  return _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_int(lo)), to_bf16_int(hi), 1);
}

/* bf16 lanes widened to float32 (exact) */
AVX512BW static inline __m512 from_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
"""


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetune-studio" / "kernels"


def _build(name: str, source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC") or "cc"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source_file, built = Path(tmp) / f"{name}.c", Path(tmp) / target.name
        source_file.write_text(source, encoding="utf-8")
        for openmp in (["-fopenmp"], []):  # without OpenMP (a compiler lacking it): one thread, the same numbers
            command = [compiler, "-O3", "-shared", "-fPIC", *openmp, "-o", str(built), str(source_file), "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-800:]}")
        os.replace(built, target)


def load(name: str, source: str) -> ctypes.CDLL | None:
    """``source`` compiled (once) and loaded, or None where this machine cannot (the log says why)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # the kernels are AVX-512's
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    target = cache_folder() / f"{name}-{digest}.so"
    try:
        if not target.is_file():
            _build(name, source, target)
            for old in target.parent.glob(f"{name}-*.so"):  # earlier versions' builds
                if old != target:
                    old.unlink(missing_ok=True)
        return ctypes.CDLL(str(target))
    except Exception as exc:  # no compiler, a read-only home, an unsupported platform
        log.warning("%s: the C kernel is not available (%s: %s)", name, type(exc).__name__, exc)
        return None
