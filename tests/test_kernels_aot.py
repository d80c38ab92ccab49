"""Every Triton kernel compiles ahead of time for H100/H200 (sm_90) and A100 (sm_80), on a CPU-only machine.

No GPU has run these kernels in CI, so the compiler checks what it can: each kernel is compiled by Triton's real
compiler and its bundled ptxas, with the arguments its launcher passes on a GPU (captured from the launcher, so
block sizes, num_warps, dtypes and flags such as HALF_IN_PLACE are the launcher's, not retyped here) and the
divisibility hints Triton's JIT would attach to them (`BaseBackend.get_tensor_specialization` /
`get_int_specialization`: 16 for pointers and ints divisible by 16). A kernel that fails to compile, spills
registers or uses local memory fails the test; the table (kernel, arch, registers, spills, shared memory: the
dynamic amount Triton launches with, and the cubin's static one, widest global load) is printed at the end of
the module, with or without -s.

TRITON_INTERPRET=1, which tests/conftest.py sets before triton is imported, breaks `triton.compile` in that
process: triton's own library functions (tl.max, tl.sum, ...) were then decorated as interpreted functions, and
constexpr functions return raw values while the switch is on. So the compiles run in a fresh interpreter with
TRITON_INTERPRET=0 (this file as a script, `--json`), on `JITFunction(kernel)` built directly.

    .venv/bin/python -m pytest -q tests/test_kernels_aot.py
    .venv/bin/python tests/test_kernels_aot.py --append      # also appends the table to benchmarks/RESULTS.md
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default (fused mul-add), without the warning

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import format_table  # noqa: E402

from ceiling_kernels import linear_loss as ll  # noqa: E402

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ARCHS = {"sm_90": 90, "sm_80": 80}
V_7B = 152064  # the Qwen2.5-7B head (divisible by 16, as 151936 of 1.5B and 128256 of Llama 3)
ROWS = 16  # chunk rows: only the alignment of row_stats' per-row output pointers depends on it
_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
                    torch.int32: "i32", torch.int64: "i64"}


def _capture(launch, *args):
    """Run a launcher with GPU launch settings and return (kernel, positional args, keyword args) of its one
    launch: the Triton kernel it would start is swapped for a recorder (nothing here can start it)."""
    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.kernel, a, kw))

    saved = os.environ.get("TRITON_INTERPRET"), ll._jit
    os.environ["TRITON_INTERPRET"], ll._jit = "0", Recorder  # the launchers' GPU block size and num_warps
    try:
        launch(*args)
    finally:
        ll._jit = saved[1]
        if saved[0] is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved[0]
    (call,) = calls
    return call


def _signature(kernel, args, kwargs):
    """(signature, constexprs, attrs, num_warps) as Triton's JIT would build them for this launch."""
    params = list(inspect.signature(kernel).parameters.values())
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        if p.annotation in (tl.constexpr, "tl.constexpr"):  # the kernel module has postponed annotations
            sig[p.name] = "constexpr"
            constexprs[p.name] = kwargs[p.name]
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            sig[p.name] = "*" + _TORCH_TO_TRITON[value.dtype]
            divisible = value.data_ptr() % 16 == 0
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{p.name}: no rule for {type(value).__name__}")
        elif isinstance(value, int):
            if value == 1:  # the JIT turns an int equal to 1 into a constant
                sig[p.name] = "constexpr"
                constexprs[p.name] = 1
                continue
            sig[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        else:
            sig[p.name] = "fp32"  # Python floats are passed as fp32, never specialised
            divisible = False
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs, kwargs["num_warps"]


def _launches(v=V_7B):
    """Every launch the driver makes on a GPU, one per dtype / flag combination: (name, kernel, launch), launch
    = (signature, constexprs, attrs, num_warps) as `_signature` builds them."""
    out = []
    tgt = torch.zeros(ROWS, dtype=torch.int32)
    for dt in (torch.float32, torch.float64):  # fp32 logits for bf16 / fp32 inputs; fp64 inputs stay fp64
        z = torch.empty(ROWS, v, dtype=dt)
        kernel, args, kwargs = _capture(ll.row_stats_triton, z, tgt, 1.0)
        out.append((f"row_stats z {_TORCH_TO_TRITON[dt]}", kernel, _signature(kernel, args, kwargs)))
    for g_dt, entropy in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True),
                          (torch.float64, True)):
        z = torch.empty(ROWS, v, dtype=torch.float64 if g_dt == torch.float64 else torch.float32)
        g = z if g_dt == z.dtype else z.view(g_dt)[:, :v]  # as linear_loss_forward: G over the logits
        vec = torch.zeros(ROWS, dtype=z.dtype)
        name = f"grad_logits G {_TORCH_TO_TRITON[g_dt]} over z {_TORCH_TO_TRITON[z.dtype]}" + (
            ", entropy" if entropy else "")
        kernel, args, kwargs = _capture(ll.grad_logits_triton, z, g, tgt, vec, vec, vec, vec if entropy else None, 1.0)
        out.append((name, kernel, _signature(kernel, args, kwargs)))
    return out


def _ptxas(cap: int) -> str:
    """The ptxas Triton itself runs for this arch (triton 3.9 bundles two: CUDA 12.9 below sm_90, 13.x above)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cap).path
    except (ImportError, AttributeError, TypeError):
        return str(NVIDIA_BIN / "ptxas")


def compile_report(name, kernel, launch, arch):
    """Compile one launch for `arch` and read its resources from the cubin (cuobjdump) and ptxas -v."""
    sig, constexprs, attrs, num_warps = launch
    cap = ARCHS[arch]
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile in a process started without it"
    src = ASTSource(fn=JITFunction(kernel), signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(num_warps=num_warps))
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx_file = Path(tmp, "k.cubin"), Path(tmp, "k.ptx")
        cubin.write_bytes(compiled.asm["cubin"])
        ptx_file.write_text(ptx)
        usage = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        gpu_name = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"  # as Triton's ptxas call
        ptxas = subprocess.run([_ptxas(cap), "-v", f"--gpu-name={gpu_name}", str(ptx_file), "-o",
                                str(Path(tmp, "v.cubin"))], capture_output=True, text=True, check=True).stderr
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas)]
    assert spills, ptxas
    loads = re.findall(r"\bld\.global(?:\.[\w:]+)*?\.v([248])\.[bfsu](\d+)", ptx)
    widest = max((int(n) * int(bits) for n, bits in loads), default=0)
    return dict(kernel=name, arch=arch, num_warps=num_warps, block=constexprs.get("BLOCK_V"), regs=res["REG"],
                spill_bytes=sum(spills), stack=res["STACK"], local=res["LOCAL"],
                shared=compiled.metadata.shared, static_shared=res["SHARED"], ld_bits=widest or 32,
                barrier=bool(re.search(r"\b(bar|barrier)(\.cta)?\.sync\b", ptx)),
                constexprs=constexprs)


COLUMNS = [("kernel", "kernel", ""), ("arch", "arch", ""), ("num_warps", "warps", "d"), ("block", "BLOCK_V", "d"),
           ("regs", "registers", "d"), ("spill_bytes", "spill bytes", "d"), ("local", "local B", "d"),
           ("stack", "stack B", "d"), ("shared", "shared B", "d"),
           ("static_shared", "static shared B (cubin)", "d"), ("ld_bits", "widest global load (bits)", "d"),
           ("barrier_s", "bar.sync", ""), ("error", "compile error", "")]


def table(rows) -> str:
    return format_table([dict(r, barrier_s="yes" if r["barrier"] else "no") for r in rows], COLUMNS)


def compile_all() -> list[dict]:
    """One report per (launch, arch); a compile that fails gives a row with its error, the others still run."""
    rows = []
    for launch in _launches():
        for arch in ARCHS:
            try:
                rows.append(compile_report(*launch, arch))
            except Exception as exc:  # noqa: BLE001 (the test reports it per case)
                rows.append(dict(kernel=launch[0], arch=arch, barrier=False,
                                 error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"))
    return rows


# ---------------------------------------------------------------------------------------------- tests

LAUNCHES = _launches()
CASES = [(name, arch) for name, _, _ in LAUNCHES for arch in ARCHS]


@pytest.fixture(scope="module")
def reports(request):
    """Compile every case in a fresh interpreter with TRITON_INTERPRET=0: in this process triton was imported
    with the interpreter on (conftest), which made its own library functions (tl.max, tl.sum, ...) interpreted
    ones that the compiler cannot inline. Prints the table at the end of the module (shown without -s too)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, __file__, "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads(out.stdout.splitlines()[-1])
    yield {(r["kernel"], r["arch"]): r for r in rows}
    text = f"\nAOT compile (triton {triton.__version__}, torch {torch.__version__}), V = {V_7B}\n" + table(rows)
    capture = request.config.pluginmanager.get_plugin("capturemanager")  # what capsys.disabled() uses
    with capture.global_and_fixture_disabled():
        print(text)


@pytest.mark.parametrize("name,arch", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_kernel_compiles_without_spills(reports, name, arch):
    r = reports[(name, arch)]
    assert "error" not in r, r["error"]
    assert r["spill_bytes"] == 0 and r["local"] == 0 and r["stack"] == 0, r
    assert r["ld_bits"] == 128, f"{name}: the logits are not loaded 128 bits at a time: {r}"


def test_launcher_settings_are_the_gpu_ones():
    # What the cases above compile: 4096-wide V tiles and 8 warps, the fp64 variants included.
    for name, _, (_, constexprs, _, num_warps) in LAUNCHES:
        assert constexprs["BLOCK_V"] == 4096 and num_warps == 8, (name, constexprs, num_warps)
    flags = {name: launch[1].get("HALF_IN_PLACE") for name, _, launch in LAUNCHES if "grad" in name}
    assert flags == {"grad_logits G bf16 over z fp32": True, "grad_logits G bf16 over z fp32, entropy": True,
                     "grad_logits G fp32 over z fp32, entropy": False, "grad_logits G fp64 over z fp64, entropy": False}


@pytest.mark.parametrize("arch", ARCHS)
def test_in_place_grad_logits_orders_its_stores_with_a_barrier(reports, arch):
    # bf16 G written over the fp32 logits it reads: the compiled kernel must hold a CTA barrier between the
    # loads of a tile and its stores (the argument is in _grad_logits_kernel's docstring); where G has its own
    # bytes, or fp32 G overwrites fp32 z element by element, there is none (no cost).
    grads = [r for (name, a), r in reports.items() if a == arch and name.startswith("grad_logits")]
    assert len(grads) == 4
    for r in grads:
        assert "error" not in r, r["error"]
        assert r["barrier"] == ("G bf16 over z fp32" in r["kernel"]), r


def main(argv=None) -> None:
    """Compile everything; print the table (--json: the rows as one JSON line), --append: add it to RESULTS.md."""
    import argparse
    import datetime

    ap = argparse.ArgumentParser(description="AOT compile report of the Triton kernels")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line (for the test)")
    args = ap.parse_args(argv)
    rows = compile_all()
    if args.json:
        print(json.dumps(rows))
        return
    title = "Triton kernels compiled ahead of time (no GPU): tests/test_kernels_aot.py"
    header = (f"date: {datetime.date.today()}, triton {triton.__version__} (its bundled ptxas), torch "
              f"{torch.__version__}, V = {V_7B}, launch settings captured from the launchers, divisibility "
              f"hints as the JIT's")
    text = f"\n## {title}\n\n{header}\n\n{table(rows)}\n"
    print(text)
    if args.append:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
