"""Whole-model benchmark: a ResNet-50 training step (forward, backward, SGD step).

    python -m perf model [--batches 64,256] [--configs ...] [--precisions ...] [--out plots]

Configurations (the model of perf/resnet50.py, torchvision's ResNet-50 without torchvision):

    torch_eager     torch's model as written
    triton_convert  triton_bn.convert_model: every BatchNorm2d -> triton_bn's (unfused)
    triton_fuse     triton_bn.fuse_model: BN+ReLU and BN+add+ReLU fused (33 + 16), 4 plain
    torch_compile   torch.compile(torch's model) (Inductor; aot_eager on the CPU)

Precisions: ``bf16_cl`` (channels-last input and weights, bf16 autocast) and ``fp32_nchw``.
On a GPU each (config, precision, batch) row holds images/s over timed steps after warm-up
(autotuning, compilation), the peak GPU memory of a step, and the bytes saved for backward by
one forward (perf/saved.py). Writes ``<out>/model-<gpu>.csv`` (one row per run), then the PNG
(images/s and peak memory per configuration) from the CSV alone.

Without CUDA it is a labelled pipeline check, not a measurement: a tiny input through the
interpreter, one step per configuration, the loss and every gradient of each triton_bn
configuration checked against eager torch (float64; float32's tolerance), the saved-activation
bytes counted per configuration, plus ``triton_fuse_abn`` (the model with LeakyReLU,
save="output": In-Place ABN) against the same model in eager torch.
"""
from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import env
from .resnet50 import ResNet
from .results import write_commented_csv
from .saved import model_tensors, saved_activation_bytes

CONFIGS = ("torch_eager", "triton_convert", "triton_fuse", "torch_compile")
PRECISIONS = ("bf16_cl", "fp32_nchw")
COLUMNS = ("config", "precision", "batch", "image_size", "status", "images_per_s", "step_ms", "peak_mem_mb",
           "saved_mb", "max_rel_err", "note")


def _leaky(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.LeakyReLU(0.01, inplace=True))
    return model


def build(config: str, base: nn.Module, device: torch.device) -> nn.Module:
    """The configuration's model over a deep copy of ``base`` (same initial weights)."""
    import triton_bn
    model = copy.deepcopy(base)
    if config == "torch_eager":
        return model
    if config == "triton_convert":
        return triton_bn.convert_model(model)
    if config == "triton_fuse":
        return triton_bn.fuse_model(model)
    if config == "triton_fuse_abn":
        return triton_bn.fuse_model(model, save="output")
    if config == "torch_compile":
        return torch.compile(model, backend="inductor" if device.type == "cuda" else "aot_eager")
    raise ValueError(f"unknown config {config!r}; known: {', '.join(CONFIGS)}")


def _layout(t: torch.Tensor, precision: str) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last) if precision == "bf16_cl" else t


def _loss(model, x, target, precision):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16_cl"):
        return F.cross_entropy(model(x), target)


def measure_gpu(config: str, precision: str, batch: int, image_size: int = 224, steps: int = 10,
                warmup: int = 3) -> dict:
    device = torch.device("cuda")
    row = dict(config=config, precision=precision, batch=batch, image_size=image_size)
    torch.manual_seed(0)
    try:
        base = _layout(ResNet(num_classes=1000).to(device), precision)
        model = build(config, base, device)
        del base
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = _layout(torch.randn(batch, 3, image_size, image_size, device=device), precision)
        target = torch.randint(0, 1000, (batch,), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            _loss(model, x, target, precision).backward()
            opt.step()

        for _ in range(warmup):
            step()
        saved, loss = saved_activation_bytes(lambda: _loss(model, x, target, precision), model_tensors(model))
        del loss
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / steps
        row.update(status="ok", step_ms=ms, images_per_s=batch * 1000.0 / ms,
                   peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20, saved_mb=saved / 2**20)
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom", note="out of memory")
    except Exception as error:  # noqa: BLE001 - a failing config is a row, not a crash
        row.update(status="error", note=f"{type(error).__name__}: {error}"[:200])
    finally:
        torch.cuda.empty_cache()
    return row


def _max_rel_err(model, reference) -> float:
    worst = 0.0
    for p, q in zip(model.parameters(), reference.parameters()):
        scale = max(1.0, q.grad.abs().max().item())
        worst = max(worst, (p.grad - q.grad).abs().max().item() / scale)
    return worst


def check_cpu(configs=CONFIGS + ("triton_fuse_abn",), batch: int = 2, image_size: int = 32,
              layers=(3, 4, 6, 3), tol: float = 2e-5) -> list:
    """One float64 channels-last step per configuration: loss and gradients against eager
    torch's (``triton_fuse_abn`` against eager torch's LeakyReLU model), saved bytes."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    relu_base = ResNet(layers, num_classes=10).double().to(memory_format=torch.channels_last)
    leaky_base = _leaky(copy.deepcopy(relu_base))
    # save="output" scales by |gamma| + eps (In-Place ABN's guard): its eager reference is the
    # LeakyReLU model with exactly those weights (all gamma start positive, so the gradients
    # with respect to gamma agree too).
    guarded_base = copy.deepcopy(leaky_base)
    with torch.no_grad():
        for module in guarded_base.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(module.weight.abs() + module.eps)
    x = torch.randn(batch, 3, image_size, image_size, dtype=torch.float64).to(memory_format=torch.channels_last)
    target = torch.arange(batch) % 10
    references = {}
    rows = []
    for config in configs:
        base = leaky_base if config == "triton_fuse_abn" else relu_base
        row = dict(config=config, precision="fp64_cl", batch=batch, image_size=image_size)
        try:
            model = build(config, base, device)
            start = time.perf_counter()
            saved, loss = saved_activation_bytes(lambda: F.cross_entropy(model(x), target), model_tensors(model))
            loss.backward()
            ms = (time.perf_counter() - start) * 1000
            reference = guarded_base if config == "triton_fuse_abn" else base
            key = id(reference)
            if key not in references:
                eager = build("torch_eager", reference, device)
                eager_saved, eager_loss = saved_activation_bytes(lambda: F.cross_entropy(eager(x), target),
                                                                 model_tensors(eager))
                eager_loss.backward()
                references[key] = (eager, eager_loss, eager_saved)
            eager, eager_loss, eager_saved = references[key]
            err = max(abs(loss.item() - eager_loss.item()) / max(1.0, abs(eager_loss.item())),
                      _max_rel_err(model, eager))
            note = "" if config != "triton_fuse_abn" else \
                f"LeakyReLU model, save='output'; eager torch saves {eager_saved / 2**20:.2f} MB " \
                f"({1 - saved / eager_saved:.0%} less)"
            row.update(status="ok" if err <= tol else "error", step_ms=ms, saved_mb=saved / 2**20,
                       max_rel_err=err, note=note or "interpreter time: not a measurement")
        except Exception as error:  # noqa: BLE001
            row.update(status="error", note=f"{type(error).__name__}: {error}"[:200])
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    parts = [f"{row['config']:>16} {row['precision']:>9} batch {row['batch']:>3}: {row.get('status')}"]
    for key, fmt in (("images_per_s", "{:.0f} img/s"), ("step_ms", "{:.1f} ms/step"), ("peak_mem_mb", "peak {:.0f} MB"),
                     ("saved_mb", "saved {:.2f} MB"), ("max_rel_err", "err {:.1e}")):
        if row.get(key) is not None:
            parts.append(fmt.format(row[key]))
    if row.get("note"):
        parts.append(f"({row['note']})")
    return ", ".join(parts)


def write_csv(path: Path, meta: dict, rows: list) -> Path:
    return write_commented_csv(path, meta, COLUMNS, rows, ".6g")


def read_csv(path: Path):
    meta, lines = {}, []
    for line in Path(path).read_text().splitlines():
        if line.startswith("# ") and not lines:
            key, _, value = line[2:].partition(": ")
            meta[key] = value
        else:
            lines.append(line)
    return meta, list(csv.DictReader(lines))


def plot_csv(path: Path, out: Optional[Path] = None) -> Optional[Path]:
    """CSV -> one PNG: images/s (or, on the CPU, interpreter ms per step) and peak (or saved)
    memory per configuration, grouped by precision and batch. Reads only the CSV."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    meta, rows = read_csv(path)
    cpu = meta.get("mode") != env.GPU
    rows = [r for r in rows if r["status"] == "ok"]
    groups = sorted({(r["precision"], int(r["batch"])) for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    speed_key, speed_label = ("step_ms", "interpreter ms per step (not a measurement)") if cpu else \
        ("images_per_s", "images/s (higher is better)")
    mem_key, mem_label = ("saved_mb", "MB saved for backward") if cpu else ("peak_mem_mb", "peak GPU memory (MB)")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(configs), 1)
    for ax, key, label in ((axes[0], speed_key, speed_label), (axes[1], mem_key, mem_label)):
        for i, config in enumerate(configs):
            values = []
            for group in groups:
                match = [r for r in rows if (r["precision"], int(r["batch"])) == group and r["config"] == config]
                values.append(float(match[0][key]) if match and match[0][key] else 0.0)
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=config)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{p}\nbatch {b}" for p, b in groups])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    title = f"ResNet-50 training step, {meta.get('device', '')}"
    if cpu:
        title += f"\n{env.CPU_LABEL}"
    fig.suptitle(title)
    fig.tight_layout()
    png = (Path(out) if out else Path(path).parent) / (Path(path).stem + ".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("plots"))
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ",".join(CONFIGS))
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of " + ",".join(PRECISIONS))
    p.add_argument("--batches", default="64,256", help="GPU batch sizes (default 64,256)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (GPU)")
    p.add_argument("--image-size", type=int, default=224, help="GPU image size")
    p.add_argument("--cpu-layers", default="3,4,6,3",
                   help="CPU check: blocks per stage (3,4,6,3 is ResNet-50; 1,1,1,1 is quicker)")
    p.add_argument("--cpu-image-size", type=int, default=32)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    meta = {"mode": env.mode(), "device": env.device_name(), "torch": torch.__version__}
    path = args.out / f"model-{env.slug(meta['device'])}.csv"
    if env.mode() == env.GPU:
        rows = []
        for precision in args.precisions.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for config in configs:
                    rows.append(measure_gpu(config, precision, batch, args.image_size, args.steps))
                    print(_format_row(rows[-1]), flush=True)
                    write_csv(path, meta, rows)
    else:
        print(f"*** {env.CPU_LABEL} ***")
        layers = tuple(int(n) for n in args.cpu_layers.split(","))
        rows = check_cpu(tuple(configs) + ("triton_fuse_abn",), image_size=args.cpu_image_size, layers=layers)
    write_csv(path, meta, rows)
    print(f"wrote {path}")
    png = plot_csv(path, args.out)
    if png:
        print(f"wrote {png}")
    return 1 if any(r["status"] == "error" for r in rows) else 0
