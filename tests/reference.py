"""Float64 references and dtype-scaled comparisons shared by the test files."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Relative-to-scale tolerances by dtype: fp32 lands near 1e-6, fp16/bf16 near their epsilon.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, name: str = "",
                 tol: float = None):
    """|actual - expected| <= tol * max(1, max|expected|), elementwise; NaN anywhere fails.

    On failure says where and by how much, not just "False".
    """
    dtype = dtype or actual.dtype
    tol = TOLERANCE[dtype] if tol is None else tol
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    assert not torch.isnan(actual).any(), f"{name}: {int(torch.isnan(actual).sum())} NaN (unwritten?) elements"
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs()
    worst = err.max().item()
    if worst > tol * scale:
        idx = tuple(int(i) for i in torch.nonzero(err == worst)[0])
        raise AssertionError(f"{name}: max abs error {worst:.3e} > {tol:.1e} * {scale:.3g} at {idx}: "
                             f"got {actual[idx].item():.8g}, expected {expected[idx].item():.8g}; "
                             f"{int((err > tol * scale).sum())} of {err.numel()} elements off")


def reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, dy=None):
    """torch's batch_norm on float64 copies. Returns (y, running_mean, running_var, grads) where
    grads = (dx, dweight, dbias) (None entries where not applicable) if dy is given."""
    def up(t, grad=False):
        if t is None:
            return None
        t = t.detach().to(torch.float64).clone()
        return t.requires_grad_(grad)
    x64 = up(x, dy is not None)
    w64, b64 = up(weight, dy is not None), up(bias, dy is not None)
    rm64, rv64 = up(running_mean), up(running_var)
    y = F.batch_norm(x64, rm64, rv64, w64, b64, training, momentum, eps)
    grads = None
    if dy is not None:
        y.backward(dy.to(torch.float64))
        grads = (x64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad)
    return y.detach(), rm64, rv64, grads


def random_input(shape, dtype, device, layout="contiguous", seed=0, mean=0.0, std=1.0):
    """Seeded non-zero input in the named layout: contiguous, channels_last, or strided
    (a view with a non-unit innermost stride and a channel slice)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        big = list(shape)
        big[1] = shape[1] * 2
        big[-1] = shape[-1] * 2
        base = (torch.randn(big, generator=g, dtype=torch.float64) * std + mean).to(dtype).to(device)
        index = [slice(None)] * len(shape)
        index[1] = slice(0, 2 * shape[1], 2)
        index[-1] = slice(1, 2 * shape[-1], 2)
        return base[tuple(index)]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype).to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def assert_no_host_sync(step):
    """Run ``step`` once to autotune (which synchronizes), then again with CUDA's sync debug mode
    set to raise on any host synchronization."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def random_statistics(model, seed=0):
    """Every batch norm of ``model`` with seeded running statistics and affine parameters (not
    the init's zeros and ones, which would hide a swapped or dropped one); returns the model."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.normal_(0.0, 0.3, generator=g)
                    m.running_var.uniform_(0.5, 1.5, generator=g)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0.0, 0.3, generator=g)
    return model
