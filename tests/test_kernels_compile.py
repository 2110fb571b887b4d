"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, without a GPU.

The interpreter tests check the maths; they cannot catch what only the real
compiler rejects (dot shape limits, types of loop bounds, constexpr use). This
compiles each kernel ahead of time with the configuration its launcher picks
for the production shapes, using the ptxas that ships with triton.
"""
import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.lm_head_argmax import _lm_head_argmax_kernel  # noqa: E402
from kernels.rmsnorm import _rmsnorm_kernel  # noqa: E402
from kernels.rotary import _rotary_kernel  # noqa: E402
from kernels.span_attention import _combine_splits_kernel, _span_attention_kernel  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


@pytest.fixture(autouse=True)
def compiled_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


def _compile(kernel, pointers: dict, floats: tuple, constexprs: dict, num_warps=4):
    """Compile with every argument an i32 unless named as a pointer, a float or a constexpr."""
    fn = triton.jit(kernel.fn)
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(pointers)
    signature.update({name: "fp32" for name in floats})
    signature.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=H100,
                              options=dict(num_warps=num_warps, num_stages=2))
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"
    return compiled


@pytest.mark.parametrize("dtype,precision", [("bf16", "tf32"), ("fp32", "tf32x3")])
def test_span_attention_kernels_compile(dtype, precision):
    ptr = "*" + dtype
    pointers = {n: ptr for n in ("Q", "KC", "VC", "KS", "VS", "O")}
    pointers.update(CTX_LENS="*i32", M_PART="*fp32", L_PART="*fp32", O_PART="*fp32")
    # NUM_SPLITS > 1: the partial-output epilogue (one chunk only swaps in a direct store).
    _compile(_span_attention_kernel, pointers, ("qk_scale",),
             dict(NUM_SPLITS=8, BLOCK_M=64, BLOCK_N=32, BLOCK_D=128, PRECISION=precision))
    _compile(_combine_splits_kernel, dict(M_PART="*fp32", L_PART="*fp32", O_PART="*fp32", O=ptr), (),
             dict(NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=128), num_warps=2)


def test_lm_head_argmax_kernel_compiles():
    _compile(_lm_head_argmax_kernel,
             dict(X="*bf16", W="*bf16", E="*bf16", BANNED="*i32", M_PART="*fp32", S_PART="*fp32", I_PART="*i32"),
             ("eps",), dict(NUM_SPLITS=64, HAS_BANNED=True, BLOCK_M=16, BLOCK_V=64, BLOCK_K=64, BLOCK_B=4,
                            PRECISION="tf32"))


def test_rmsnorm_and_rotary_kernels_compile():
    _compile(_rmsnorm_kernel, dict(X="*bf16", R="*bf16", W="*fp32", Y="*bf16", H="*bf16"), ("eps",),
             dict(HAS_RESIDUAL=True, BLOCK=1024))
    _compile(_rotary_kernel, dict(Q="*bf16", K="*bf16", COS="*fp32", SIN="*fp32", POS="*i64", QO="*bf16", KO="*bf16"),
             (), dict(HAS_POSITIONS=True, BLOCK_H=16, BLOCK_HALF=64))
