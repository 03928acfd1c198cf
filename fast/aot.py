"""
Compile every fast/ kernel ahead of time for a GPU target, without a GPU:

    python fast/aot.py 90          # sm_90 (H100/H200); 80 for A100

This runs Triton's real compiler (Triton IR -> LLVM -> PTX), which catches code the CPU
interpreter accepts but a GPU compiler rejects (dtypes, layouts, unsupported ops). Run it
without TRITON_INTERPRET: under the interpreter a jitted function is an interpreted one.
Each kernel is compiled with the block sizes and dtypes the wrappers launch it with.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("fast/aot.py: unset TRITON_INTERPRET (the interpreter replaces kernels with Python functions)")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences a warning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from fast import decode, decode_quant, merge, prefill, quant  # noqa: E402


def signature(fn, types: dict, constexprs: dict) -> dict:
    """Every argument of fn: its type from `types`, or "constexpr" when given in constexprs."""
    return {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}


def cases():
    """(kernel, argument types, constexpr values) for representative launches."""
    for elem in ("fp32", "fp16", "bf16"):
        for block_d, block_n, chunk in ((32, 64, 64), (64, 64, 128), (128, 32, 256)):
            for has_valid, varlen in ((False, False), (True, False), (False, True)):
                types = {"Q": f"*{elem}", "K": f"*{elem}", "V": f"*{elem}", "VALID": "*i8", "SCORES": "*fp32",
                         "M_PART": "*fp32", "L_PART": "*fp32", "ACC_PART": "*fp32", "STARTS": "*i64",
                         "LENS": "*i64", "G": "i32", "H": "i32", "L": "i32",
                         "D": "i32", "scale": "fp32", "S": "i32", **{n: "i32" for n in (
                             "sq_b", "sq_h", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n")}}
                yield decode.decode_partial_kernel, types, {"HAS_VALID": has_valid, "VARLEN": varlen, "CHUNK": chunk,
                                                            "BLOCK_N": block_n, "BLOCK_D": block_d}
            types = {"M_PART": "*fp32", "L_PART": "*fp32", "ACC_PART": "*fp32", "MZ": "*fp32",
                     "OUT": f"*{elem}", "D": "i32", "S": "i32"}
            yield decode.decode_reduce_kernel, types, {"BLOCK_S": 16, "BLOCK_D": block_d}
    for elem in ("fp32", "fp16", "bf16"):
        for block_d in (32, 64, 128):
            for has_valid in (False, True):
                common = {"Q": f"*{elem}", "K": f"*{elem}", "QPOS": "*i32", "KPOS": "*i32", "VALID": "*i8",
                          "H": "i32", "T": "i32", "L": "i32", "D": "i32", "scale": "fp32"}
                strides = {n: "i32" for n in ("sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h",
                                              "sv_n", "so_b", "so_h", "so_t")}
                consts = {"HAS_VALID": has_valid, "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": block_d}
                yield prefill.prefill_forward_kernel, {**common, **strides, "V": f"*{elem}", "OUT": f"*{elem}",
                                                       "LSE": "*fp32"}, consts
                yield prefill.prefill_colsum_kernel, {**common, **strides, "LSE": "*fp32", "COLSUM": "*fp32",
                                                      "COLWIN": "*fp32", "ROWS": "*fp32", "W": "i32"}, consts
    yield decode.probs_kernel, {"SCORES": "*fp32", "MZ": "*fp32", "L": "i32"}, {"BLOCK_P": 1024}
    for elem in ("fp32", "fp16", "bf16"):
        for bits in (2, 3, 4, 8):
            per, nbytes = quant.chunk_of(bits)
            types = {"Q": f"*{elem}", "KC": "*u8", "KS": "*fp16", "KZ": "*fp16", "VC": "*u8", "VS": "*fp16",
                     "VZ": "*fp16", "K": f"*{elem}", "V": f"*{elem}", "SCORES": "*fp32", "M_PART": "*fp32",
                     "L_PART": "*fp32", "ACC_PART": "*fp32", "H": "i32", "L": "i32", "LQK": "i32", "LQV": "i32",
                     "D": "i32", "scale": "fp32", "S": "i32"}
            types.update({n: "i32" for n in decode_quant.decode_quant_partial_kernel.arg_names if n.startswith("s")
                          and n not in types})
            for block_d, per_channel in ((64, False), (128, False), (128, True)):  # RTN/MiKV; KIVI's keys
                yield decode_quant.decode_quant_partial_kernel, types, {
                    "BITS": bits, "GROUP": 32, "PER": per, "NBYTES": nbytes, "KEY_PER_CHANNEL": per_channel,
                    "CHUNK": 128, "BLOCK_N": 32, "BLOCK_D": block_d}
            types = {"X": f"*{elem}", "PACKED": "*u8", "SCALE": "*fp16", "ZERO": "*fp16", "n": "i32",
                     "sx": "i32", "sp": "i32", "ss": "i32"}
            yield quant.quantize_pack_kernel, types, {"BITS": bits, "GROUP": 32, "PER": per, "NBYTES": nbytes}


    for use_v, nonneg in ((False, False), (True, True), (True, False)):  # D2O; EMS (nonneg_cos True / False)
        for block_d in (32, 64, 128):
            types = {"KN": "*fp32", "VN": "*fp32", "ROWS": "*i8", "CENTERS": "*i8", "BEST": "*fp32",
                     "CENTER": "*i32", "L": "i32", "D": "i32"}
            yield merge.nearest_center_kernel, types, {"USE_V": use_v, "NONNEG": nonneg, "BLOCK_T": 32,
                                                       "BLOCK_C": 32, "BLOCK_D": block_d}


def main(arch: int):
    target = GPUTarget("cuda", arch, 32)
    n = 0
    for fn, types, constexprs in cases():
        src = ASTSource(fn=fn, signature=signature(fn, types, constexprs), constexprs=constexprs)
        kernel = compile(src, target=target)
        assert "ptx" in kernel.asm, fn.__name__
        n += 1
    print(f"compiled {n} kernel variants for sm_{arch}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
