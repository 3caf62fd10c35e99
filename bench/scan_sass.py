"""Static instruction counts of the selective-scan kernels (issue #33), without a GPU: the SASS for sm_90 of
bench/cuda_scan.cu (compiled by NVRTC) or of mamba_ssm's selective_scan_cuda extension, each loop (a backward branch)
with its instruction count and the MUFU.EX2, REDG (atomic add) and BAR.SYNC among them. How often each loop runs per
element is the kernel's (bench/cuda_scan.py's docstring works the counts out; docs/benchmarks.md §20).

    pip install nvidia-cuda-nvrtc            # NVRTC, for our kernels (or --nvrtc PATH/libnvrtc.so.N)
    pip install --no-deps triton==3.6.0      # its bundled cuobjdump (or CUDA's own on PATH, or --cuobjdump)
    python bench/scan_sass.py --ours 16:16 --ours 4:8:time/16:16
    python bench/scan_sass.py --so .../selective_scan_cuda*.so --cubin selective_scan_bwd_bf16_real \\
        --kernel ILi128ELi16ELb1ELb1ELb1ELb1ELb1E        # mamba_ssm's backward at 2,048 steps, B/C per step, z
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKS = ("MUFU.EX2", "REDG", "BAR.SYNC")


def _find(pattern: str, given: str | None) -> str:
    """`given`, else the first match of `pattern` under the import path's folders (where pip installed it)."""
    hits = [given] if given else sorted(h for d in sys.path if d for h in glob.glob(str(Path(d) / pattern)))
    if not hits or not Path(hits[0]).exists():
        sys.exit(f"not found: {given or pattern} (see the module's doc)")
    return hits[0]


def nvrtc_cubin(spec: str, nvrtc: str, out: Path, save: int = 0) -> Path:
    """The cubin of cuda_scan.cu for one `DB:TT[:time]` layout, as bench/cuda_scan.py compiles it."""
    db, tile, *layout = spec.split(":")
    opts = [f"-DDB={db}", "-std=c++17", "-arch=sm_90", "--use_fast_math"]
    opts += ["-DTIME_LAYOUT=1", f"-DIT={tile}"] if layout else [f"-DTT={tile}"]
    opts += [f"-DSAVE={save}"] if save else []
    lib, prog = ctypes.CDLL(nvrtc), ctypes.c_void_p()
    src = (HERE / "cuda_scan.cu").read_bytes()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"cuda_scan.cu", 0, None, None) == 0
    args = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    if lib.nvrtcCompileProgram(prog, len(opts), args) != 0:
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(f"{spec}: {log.value.decode()}")
    n = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    path = out / f"cuda_scan-{spec.replace(':', '_')}{f'-save{save}' if save else ''}.cubin"
    path.write_bytes(buf.raw)
    return path


def loops(sass: str, kernel: str = "") -> list[str]:
    """One line per function whose name holds `kernel`: its size, then each loop's size and marked instructions."""
    out = []
    for func in re.split(r"\n\s*Function : ", sass)[1:]:
        name = func.split("\n")[0].strip()
        if kernel not in name:
            continue
        ins = [(int(a, 16), i) for a, i in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", func)]
        out.append(f"{name}: {len(ins)} instructions")
        for addr, text in ins:
            target = re.search(r"BRA[^0-9]*0x([0-9a-f]+)", text)
            if target and int(target.group(1), 16) < addr:
                body = [i for a, i in ins if int(target.group(1), 16) <= a <= addr]
                ops = collections.Counter(i.split()[1] if i.startswith("@") else i.split()[0] for i in body)
                marks = ", ".join(f"{m} {sum(1 for i in body if m in i)}" for m in MARKS)
                out.append(f"  loop {target.group(1)}-{addr:x}: {len(body)} ({marks}); "
                           + ", ".join(f"{k} {v}" for k, v in ops.most_common(6)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", action="append", default=[], metavar="DB:TT[:time][/DB:TT]",
                   help="a layout of bench/cuda_scan.cu (a hybrid: its forward with -DSAVE, its backward)")
    p.add_argument("--so", help="a compiled extension (mamba_ssm's selective_scan_cuda*.so)")
    p.add_argument("--cubin", default="", help="the ELF in --so to read (cuobjdump -lelf lists them)")
    p.add_argument("--kernel", default="", help="only functions whose mangled name holds this")
    p.add_argument("--nvrtc", help="libnvrtc.so (default: the nvidia-cuda-nvrtc wheel's)")
    p.add_argument("--cuobjdump", help="default: on PATH, else triton's bundled one")
    a = p.parse_args(argv)
    dump = a.cuobjdump or shutil.which("cuobjdump") or _find("triton/backends/nvidia/bin/cuobjdump", None)
    work = Path(tempfile.mkdtemp(prefix="scan_sass-"))
    cubins = []
    for spec in a.ours:
        nvrtc = _find("nvidia/*/lib/libnvrtc.so*", a.nvrtc)
        fwd, _, bwd = spec.partition("/")
        if bwd:  # the hybrid's forward stores a state per backward tile
            cubins.append((spec, nvrtc_cubin(fwd, nvrtc, work, save=int(bwd.split(":")[1])), "scan_fwd"))
            cubins.append((spec, nvrtc_cubin(bwd, nvrtc, work), "scan_bwd"))
        else:
            cubins.append((spec, nvrtc_cubin(spec, nvrtc, work), a.kernel))
    if a.so:
        subprocess.run([dump, "-xelf", a.cubin, a.so], cwd=work, check=True, capture_output=True)
        cubins += [(Path(c).name, Path(c), a.kernel) for c in sorted(work.glob(f"{a.cubin}*.cubin"))]
    for label, cubin, kernel in cubins:
        sass = subprocess.run([dump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        print(f"== {label}")
        print("\n".join(loops(sass, kernel)))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
