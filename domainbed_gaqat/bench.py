"""Benchmark of the training step: ``gaqat bench`` / ``make bench``.

Measures side by side, in one process, on one device, batch and resolution: the step of every
algorithm the registry marks for the benchmark (``update()``, as DomainBed's train script calls
it; each also as a ratio to its baseline), evaluation (``predict`` of the full-precision and
the quantized featurizer) and the LSQ quantizer alone against PyTorch's fused
``_fake_quantize_learnable_per_tensor_affine``.
Variants are interleaved within every repeat (in an order rotated per repeat), ratios are taken
per repeat and summarised by median, quartiles and min/max.

Peak memory of a variant is what building it, loading its calibrated state, and running its
warm-up and one more call add at the peak. CUDA: ``max_memory_allocated`` (peak reset before the
build) minus ``memory_allocated`` before it. CPU (Linux, glibc): the peak resident set size
``VmHWM`` (reset through ``/proc/self/clear_refs``) minus ``VmRSS`` before the build, after
``malloc_trim`` and with glibc's ``mmap`` threshold fixed at 64 KiB so freed tensors leave the
resident set at once. Both count the model, gradients, Adam state and the step's working set;
the CPU figure also counts allocator slack. No ``tracemalloc``.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.plugin.algorithms import ALGORITHMS
from domainbed_gaqat.plugin.hparams import params
from domainbed_gaqat.quant.config import integer_range
from domainbed_gaqat.quant.lsq import compile_kernels, lsq_quantize

STEPS = tuple(name for name, s in ALGORITHMS.items() if s.benchmark)
PREDICTS = {"predict_FP": "ERM_FP", "predict_LSQ": "LSQ"}
QUANTIZERS = ("quantizer", "quantizer_fused")
SHORT = {"ERM_FP": "FP"}
# algorithm: (target time ratio to its baseline, target memory ratio, floor of the time ratio)
TARGETS = {"LSQ": (1.3, 1.5, None), "SAGM_LSQ": (2.05, None, 2.0), "GAQAT": (1.03, None, 1.0)}
# name: (numerator, denominator, target time ratio, target memory ratio, floor)
RATIOS = {
    **{f"{n}/{SHORT.get(s.baseline, s.baseline)}": (n, s.baseline, *TARGETS.get(n, (None,) * 3))
       for n, s in ALGORITHMS.items() if s.benchmark and s.baseline in STEPS},
    "predict_LSQ/predict_FP": ("predict_LSQ", "predict_FP", None, None, None),
    "quantizer/fused": ("quantizer", "quantizer_fused", None, None, None),
}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def add_arguments(parser) -> None:
    """Shapes default to the paper's on CUDA and to a CPU-sized model."""
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--arch", choices=("resnet18", "resnet50"),
                        help="default: resnet50 on CUDA, resnet18 on CPU")
    parser.add_argument("--resolution", type=options.positive_int,
                        help="default: 224 on CUDA, 96 on CPU")
    parser.add_argument("--batch", type=options.positive_int,
                        help="per domain; default: 32 on CUDA, 16 on CPU")
    parser.add_argument("--domains", type=options.positive_int, default=3,
                        help="training domains (PACS: 3)")
    parser.add_argument("--bits", type=int, default=4, help="W/A bits of the quantized variants")
    parser.add_argument("--repeats", type=options.positive_int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--threads", type=options.positive_int,
                        help="torch.set_num_threads (CPU)")
    parser.add_argument("--channels_last", action="store_true", help="models and inputs NHWC")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (meant for CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="compiled quantizer kernels (quant.lsq.compile_kernels)")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--sync_check", action="store_true",
                        help="CUDA: fail if a GAQAT step synchronises with the host")
    parser.add_argument("--output_dir", default=os.path.join("out", "bench"),
                        help="where the JSON goes, named <device>-<arch>-<time>.json "
                             "(default: out/bench)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one repeat (for the test suite)")
    for old, new in (("--channels-last", "--channels_last"), ("--no-memory", "--no_memory"),
                     ("--sync-check", "--sync_check")):
        parser.add_argument(old, action=options.Renamed, new=new, nargs=0, const=True,
                            dest=new[2:])
    parser.add_argument("--out", action=options.Renamed, new="--output_dir")  # the JSON file


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the device-dependent defaults (and ``--quick``'s shapes)."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    integer_range(args.bits, signed=False)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.arch, args.resolution, args.batch, args.domains = "resnet18", 32, 2, 2
        args.repeats, args.warmup = 1, 1
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.resolution = args.resolution or (224 if cuda else 96)
    args.batch = args.batch or (32 if cuda else 16)
    if args.out is None:  # given: the former --out, the file itself
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join(args.output_dir, f"{args.device}-{args.arch}-{stamp}.json")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hparams(algorithm: str, args: argparse.Namespace) -> dict:
    hparams = {name: p.default for name, p in params(ALGORITHMS[algorithm], "PACS").items()}
    hparams.update(resnet18=args.arch == "resnet18", init="none")
    if "w_bits" in hparams:
        hparams.update(w_bits=args.bits, a_bits=args.bits)
    return hparams


def make_batch(args: argparse.Namespace, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """``args.domains`` minibatches of random images and PACS labels (seeded)."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.resolution, args.resolution)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return [(torch.randn(shape, generator=g).to(device, memory_format=fmt),
             torch.randint(0, 7, (args.batch,), generator=g).to(device))
            for _ in range(args.domains)]


def build(algorithm: str, args: argparse.Namespace, device: torch.device):
    """A plugin algorithm on ``device`` (random init, PACS defaults, ``args.bits``)."""
    torch.manual_seed(0)
    hparams = _hparams(algorithm, args)
    alg = ALGORITHMS[algorithm].cls((3, args.resolution, args.resolution), 7,
                                         args.domains, hparams)
    alg.to(device)
    if args.channels_last:
        alg.to(memory_format=torch.channels_last)
    return alg


def _autocast(args: argparse.Namespace, device: torch.device):
    """bf16 autocast without its weight-cast cache: the cache is keyed by the parameter, so in
    one SAGM step the perturbed pass would reuse the clean pass's casts."""
    if not args.bf16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def step_fn(alg, batch: list, args: argparse.Namespace, device: torch.device) -> Callable:
    """One DomainBed ``update()`` of ``alg`` on ``batch``."""
    def run() -> None:
        with _autocast(args, device):
            alg.update(batch)
    return run


def predict_fn(alg, batch: list, args: argparse.Namespace, device: torch.device) -> Callable:
    """Evaluation as ``misc.accuracy`` runs it: ``eval()``, ``predict`` without grad,
    ``train()``."""
    x = torch.cat([x for x, _ in batch])

    def run() -> None:
        alg.eval()
        with torch.no_grad(), _autocast(args, device):
            alg.predict(x)
        alg.train()
    return run


def quantizer_fns(args: argparse.Namespace, device: torch.device) -> dict[str, Callable]:
    """Forward+backward of one activation quantizer on a ResNet ``layer1`` input
    (``[N, 64, H/4, W/4]``): the plugin's :func:`lsq_quantize` and PyTorch's fused learnable
    fake-quant op."""
    lower, upper = integer_range(args.bits, signed=False)
    side = max(args.resolution // 4, 1)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch * args.domains, 64, side, side)
    v = torch.randn(shape, generator=g).relu_().to(device).requires_grad_()
    grad_out = torch.randn(shape, generator=g).to(device)
    scale = torch.full((), 0.2, device=device, requires_grad=True)
    scale1 = torch.full((1,), 0.2, device=device, requires_grad=True)
    zero_point = torch.zeros(1, device=device)
    grad_scale = 1.0 / (v[0].numel() * upper) ** 0.5

    def call(quantize: Callable, s: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            v.grad = s.grad = None  # an activation's gradient is not accumulated in training
            quantize(v, s).backward(grad_out)
        return run

    fns = (lambda v, s: lsq_quantize(v, s, lower, upper, grad_scale),
           lambda v, s: torch._fake_quantize_learnable_per_tensor_affine(
               v, s, zero_point, lower, upper, grad_scale))
    return {name: call(fn, s) for name, fn, s in zip(QUANTIZERS, fns, (scale, scale1))}


def time_interleaved(fns: dict[str, Callable], repeats: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every function: ``warmup`` untimed calls each, then ``repeats``
    rounds that call every function once, starting one later in the list each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def prepare_cpu_memory() -> bool:
    """Fix glibc's ``mmap`` threshold at 64 KiB (freed tensors leave the resident set at once);
    False where the peak RSS cannot be reset or glibc is not the allocator."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 16))
    except (OSError, AttributeError):
        return False


def peak_memory_mib(run: Callable[[], None], device: torch.device) -> float:
    """MiB that ``run()`` adds at its peak (see the module docstring for CPU and CUDA); on CPU
    call :func:`prepare_cpu_memory` first."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ctypes.CDLL(None).malloc_trim(0)  # free heap pages leave the resident set
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    run()
    return (_proc_status_kib("VmHWM") - base) / 2**10


def memory_fns(args: argparse.Namespace, device: torch.device,
               states: dict[str, dict]) -> dict[str, Callable]:
    """Per variant: build it, load ``states[algorithm]`` (initialised scales: no range
    calibration), run its warm-up and one measured call, release it."""
    def variant(algorithm: str, make: Callable) -> Callable[[], None]:
        def run() -> None:
            alg = build(algorithm, args, device)
            alg.load_state_dict(states[algorithm])
            fn = make(alg, make_batch(args, device), args, device)
            for _ in range(args.warmup + 1):
                fn()
        return run

    fns = {name: variant(name, step_fn) for name in STEPS}
    fns.update({name: variant(alg, predict_fn) for name, alg in PREDICTS.items()})
    return fns


def check_sync_free(alg, batch: list) -> None:
    """Run one ``step()`` of ``alg`` with CUDA's sync debug mode set to error: raises if the step
    synchronises with the host. Call it after warm-up (scale initialisation syncs) and away from
    a K-step boundary."""
    x = torch.cat([x for x, _ in batch])
    y = torch.cat([y for _, y in batch])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        alg.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def summary(values: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2],
            "min": min(values), "max": max(values), "n": len(values)}


def ratios(times: dict[str, list[float]], memory: dict[str, float]) -> dict[str, dict]:
    """Every ratio of :data:`RATIOS`: time per repeat (interleaved runs), memory of the peaks."""
    out = {}
    for name, (num, den, target_time, target_memory, floor) in RATIOS.items():
        measured = memory.get(num) is not None and memory.get(den)
        out[name] = {"time": summary([a / b for a, b in zip(times[num], times[den])]),
                     "memory": memory[num] / memory[den] if measured else None,
                     "target_time": target_time, "target_memory": target_memory,
                     "floor": floor}
    return out


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            info["processor"] = next(line.split(":", 1)[1].strip() for line in f
                                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(s: dict[str, float], scale: float = 1.0) -> str:
    return (f"{s['median'] * scale:9.3f}  [{s['q1'] * scale:.3f}, {s['q3'] * scale:.3f}]"
            f"  ({s['min'] * scale:.3f}..{s['max'] * scale:.3f})")


def report(result: dict) -> str:
    """The printed table."""
    cfg, rows = result["config"], result["variants"]
    lines = [f"device {cfg['device']}  {cfg['arch']}  {cfg['resolution']}px  "
             f"batch {cfg['batch']} x {cfg['domains']} domains  W{cfg['bits']}A{cfg['bits']}  "
             f"repeats {cfg['repeats']}  threads {result['machine']['threads']}",
             f"{'variant':<20}{'ms median  [q1, q3]  (min..max)':>46}{'img/s':>10}"
             f"{'peak MiB':>10}"]
    for name, row in rows.items():
        mem, ips = row["peak_memory_mib"], row["images_per_s"]
        lines.append(f"{name:<20}{_fmt(row['time_s'], 1e3):>46}"
                     f"{'' if ips is None else f'{ips:.1f}':>10}"
                     f"{'' if mem is None else f'{mem:.1f}':>10}")
    lines.append(f"{'ratio':<24}{'time median  [q1, q3]  (min..max)':>44}{'memory':>9}"
                 f"{'target':>14}")
    for name, r in result["ratios"].items():
        target = "/".join("-" if t is None else f"{t:g}"
                          for t in (r["target_time"], r["target_memory"]))
        if r["floor"] is not None:
            target += f" >={r['floor']:g}"
        mem = "-" if r["memory"] is None else f"{r['memory']:.3f}"
        lines.append(f"{name:<24}{_fmt(r['time']):>44}{mem:>9}{target:>14}")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args``; returns the JSON-ready result."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        compile_kernels()
    load_before = os.getloadavg()
    batch = make_batch(args, device)
    n_images = args.batch * args.domains
    algs = {name: build(name, args, device) for name in STEPS}
    fns = {name: step_fn(algs[name], batch, args, device) for name in STEPS}
    fns.update({name: predict_fn(algs[alg], batch, args, device)
                for name, alg in PREDICTS.items()})
    fns.update(quantizer_fns(args, device))
    times = time_interleaved(fns, args.repeats, args.warmup, device)
    sync_free = None
    if args.sync_check and device.type == "cuda":
        check_sync_free(algs["GAQAT"], batch)
        sync_free = True
    states = {name: {k: t.to("cpu", copy=True) for k, t in alg.state_dict().items()}
              for name, alg in algs.items()}
    del algs, fns
    memory: dict[str, float] = {}
    if not args.no_memory and (device.type == "cuda" or prepare_cpu_memory()):
        memory = {name: peak_memory_mib(fn, device)
                  for name, fn in memory_fns(args, device, states).items()}
    variants = {name: {"time_s": summary(t),
                       "images_per_s": None if name in QUANTIZERS
                       else n_images / statistics.median(t),
                       "peak_memory_mib": memory.get(name)}
                for name, t in times.items()}
    config = {k: getattr(args, k) for k in ("device", "arch", "resolution", "batch", "domains",
                                            "bits", "repeats", "warmup", "channels_last",
                                            "bf16", "compile", "quick")}
    return {"config": config, "machine": machine(device),
            "loadavg": {"before": load_before, "after": os.getloadavg()},
            "variants": variants, "ratios": ratios(times, memory), "sync_free_step": sync_free,
            "raw_times_s": times}


def run(args: argparse.Namespace) -> int:
    args = resolve(args)
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists: pass --overwrite or another --output_dir")
    result = measure(args)
    print(report(result))
    outputs.write_text(args.out, json.dumps(result, indent=2), args.overwrite)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("bench")
