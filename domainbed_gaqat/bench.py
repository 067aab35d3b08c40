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

Ratios are reported beside the targets of the setting (:data:`TARGETS`: CPU, CUDA, CUDA bf16).
``--sync_check`` runs every plugin algorithm's sync-free step (``update_tensors``) through step
0, a plain step, a GAQAT K boundary and QT-DoG's ``quant_start`` (:func:`sync_check`) and
reports each phase.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.plugin.algorithms import ALGORITHMS
from domainbed_gaqat.plugin.hooks import hosted
from domainbed_gaqat.plugin.hparams import params
from domainbed_gaqat.quant.config import integer_range
from domainbed_gaqat.quant.lsq import compile_kernels, lsq_quantize

STEPS = tuple(name for name, s in ALGORITHMS.items() if s.benchmark)
PREDICTS = {"predict_FP": "ERM_FP", "predict_LSQ": "LSQ"}
QUANTIZERS = ("quantizer", "quantizer_fused")
SHORT = {"ERM_FP": "FP"}
# name: (numerator, denominator): each benchmarked step to its baseline's, then the others
RATIOS = {
    **{f"{n}/{SHORT.get(s.baseline, s.baseline)}": (n, s.baseline)
       for n, s in ALGORITHMS.items() if s.benchmark and s.baseline in STEPS},
    "GAQAT/FP": ("GAQAT", "ERM_FP"),
    "predict_LSQ/predict_FP": ("predict_LSQ", "predict_FP"),
    "quantizer/fused": ("quantizer", "quantizer_fused"),
}
# targets per setting (cpu, cuda, cuda-bf16), ratio: (time ratio, memory ratio, floor of the
# time ratio). CPU: the first benchmark's; CUDA: issue 17's, GAQAT/FP <= 1 / 0.45 being
# "GAQAT's img/s >= 0.45 x ERM_FP's in bf16".
_CUDA = {"LSQ/FP": (1.25, 1.3, None), "SAGM_LSQ/LSQ": (2.05, None, None),
         "GAQAT/SAGM_LSQ": (1.02, None, None)}
TARGETS = {
    "cpu": {"LSQ/FP": (1.3, 1.5, None), "SAGM_LSQ/LSQ": (2.05, None, 2.0),
            "GAQAT/SAGM_LSQ": (1.03, None, 1.0)},
    "cuda": _CUDA,
    "cuda-bf16": {**_CUDA, "GAQAT/FP": (1 / 0.45, None, None)},
}
# sync check: hparams that bring a K boundary and quant_start within a few steps, and the
# phase each checked step stands for (the rest are the first step and a plain one)
SYNC_HPARAMS = {"gaqat_K": 2, "quant_start": 2}
SYNC_PHASES = {"gaqat": ("K_boundary", SYNC_HPARAMS["gaqat_K"]),
               "qtdog": ("quant_start", SYNC_HPARAMS["quant_start"])}
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
                        help="check that no plugin algorithm's step synchronises with the "
                        "host at step 0, a K boundary or quant_start (CUDA: its sync debug "
                        "mode; elsewhere: on the meta device); exit status 1 if one does")
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


def _hparams(algorithm: str, args: argparse.Namespace, **overrides) -> dict:
    """PACS defaults, random init, ``args.bits``; ``overrides`` of the hparams it has."""
    hparams = {name: p.default for name, p in params(ALGORITHMS[algorithm], "PACS").items()}
    hparams.update(resnet18=args.arch == "resnet18", init="none")
    hparams.update({k: v for k, v in {"w_bits": args.bits, "a_bits": args.bits,
                                      **overrides}.items() if k in hparams})
    return hparams


def make_batch(args: argparse.Namespace, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """``args.domains`` minibatches of random images and PACS labels (seeded)."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.resolution, args.resolution)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return [(torch.randn(shape, generator=g).to(device, memory_format=fmt),
             torch.randint(0, 7, (args.batch,), generator=g).to(device))
            for _ in range(args.domains)]


def move(module: torch.nn.Module, device: torch.device, channels_last: bool = False) -> None:
    """``module.to(device)`` keeping every parameter object, as a move to a GPU does (an
    algorithm's parameter lists and optimizer hold them); the ``meta`` device needs PyTorch's
    swapping conversion for that."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(device.type == "meta" or swap)
    try:
        module.to(device)
        if channels_last:
            module.to(memory_format=torch.channels_last)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def build(algorithm: str, args: argparse.Namespace, device: torch.device, **hparams):
    """A plugin algorithm built on the CPU and moved to ``device`` (random init, PACS defaults,
    ``args.bits``, ``hparams`` overriding those it has). Built as hosted by a training loop
    (SWAD's algorithms need one); this one only steps them, as a loop does between
    evaluations."""
    torch.manual_seed(0)
    with hosted():
        alg = ALGORITHMS[algorithm].cls((3, args.resolution, args.resolution), 7,
                                        args.domains, _hparams(algorithm, args, **hparams))
    move(alg, device, args.channels_last)
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


def sync_phases(algorithm: str) -> dict[int, str]:
    """The steps (0-based) the sync check runs an algorithm through, and the phase each is:
    ``step0`` (range initialisation of a quantized algorithm, Adam's first step), ``steady``,
    and with :data:`SYNC_HPARAMS` GAQAT's ``K_boundary`` (the step closing the first window)
    and QT-DoG's ``quant_start`` (quantizers switched on and initialised)."""
    phases = {0: "step0", 1: "steady"}
    for family, (phase, step) in SYNC_PHASES.items():
        if family in ALGORITHMS[algorithm].families:
            phases[step] = phase
    return phases


@contextmanager
def _sync_debug(device: torch.device) -> Iterator[None]:
    """CUDA's sync debug mode set to error inside (any host sync raises); elsewhere nothing."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def sync_check(args: argparse.Namespace, device: torch.device,
               algorithms: Sequence[str] = tuple(ALGORITHMS)) -> dict[str, dict[str, str]]:
    """Run each algorithm's ``update_tensors`` (the sync-free step a training loop calls)
    through its :func:`sync_phases`, checking each phase's step for a host sync; returns
    ``{algorithm: {phase: "ok" or the error}}``. On CUDA, the sync debug mode catches every
    sync; on ``meta`` (the CPU stand-in) any read of a device value by the host (``item``,
    ``tolist``, ``bool``, data-dependent shapes) fails, and so does a tensor made on the CPU
    beside the model's. On the CPU itself nothing is detected: the phases only run."""
    batch = make_batch(args, device)
    results = {}
    for name in algorithms:
        alg = build(name, args, device, **SYNC_HPARAMS)
        phases, results[name], failed = sync_phases(name), {}, None
        for step in range(max(phases) + 1):
            phase = phases.get(step, f"step{step}")
            if failed is not None:
                results[name][phase] = f"not run: {failed} failed"
                continue
            try:
                with _sync_debug(device), _autocast(args, device):
                    alg.update_tensors(batch)
                results[name][phase] = "ok"
            except Exception as err:  # noqa: BLE001 (reported per phase, not raised)
                results[name][phase] = f"{type(err).__name__}: {err}".splitlines()[0]
                failed = phase
        del alg
    return results


def summary(values: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2],
            "min": min(values), "max": max(values), "n": len(values)}


def targets(args: argparse.Namespace) -> dict[str, tuple]:
    """The :data:`TARGETS` of the run's setting: ``cpu``, ``cuda`` or ``cuda-bf16``."""
    cuda = args.device.startswith("cuda")
    return TARGETS["cuda-bf16" if cuda and args.bf16 else "cuda" if cuda else "cpu"]


def ratios(times: dict[str, list[float]], memory: dict[str, float],
           goals: dict[str, tuple]) -> dict[str, dict]:
    """Every ratio of :data:`RATIOS`: time per repeat (interleaved runs), memory of the peaks,
    beside its ``goals`` (a :data:`TARGETS` entry) and whether the medians meet them."""
    out = {}
    for name, (num, den) in RATIOS.items():
        measured = memory.get(num) is not None and memory.get(den)
        target_time, target_memory, floor = goals.get(name, (None, None, None))
        time_ratio = summary([a / b for a, b in zip(times[num], times[den])])
        memory_ratio = memory[num] / memory[den] if measured else None
        met = [time_ratio["median"] <= target_time] if target_time is not None else []
        if target_memory is not None and memory_ratio is not None:
            met.append(memory_ratio <= target_memory)
        out[name] = {"time": time_ratio, "memory": memory_ratio, "target_time": target_time,
                     "target_memory": target_memory, "floor": floor,
                     "met": all(met) if met else None}
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
                 f"{'target':>14}{'met':>5}")
    for name, r in result["ratios"].items():
        target = "/".join("-" if t is None else f"{t:.3g}"
                          for t in (r["target_time"], r["target_memory"]))
        if r["floor"] is not None:
            target += f" >={r['floor']:g}"
        mem = "-" if r["memory"] is None else f"{r['memory']:.3f}"
        met = {None: "", True: "yes", False: "NO"}[r["met"]]
        lines.append(f"{name:<24}{_fmt(r['time']):>44}{mem:>9}{target:>14}{met:>5}")
    if result["sync_check"] is not None:
        check = result["sync_check"]
        lines.append(f"sync check ({check['method']}):")
        for name, phases in check["results"].items():
            lines.append(f"  {name:<20}" + "  ".join(f"{p}: {v}" for p, v in phases.items()))
    return "\n".join(lines)


def sync_check_failed(result: dict) -> bool:
    """Whether a phase of the result's sync check was not ``ok``."""
    check = result["sync_check"]
    return check is not None and any(v != "ok" for phases in check["results"].values()
                                     for v in phases.values())


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
    check = None
    if args.sync_check:
        on = device if device.type == "cuda" else torch.device("meta")
        method = ("CUDA sync debug mode 'error'" if on.type == "cuda"
                  else "meta device: host reads of device values and CPU-made tensors fail")
        check = {"device": on.type, "method": method, "hparams": SYNC_HPARAMS,
                 "results": sync_check(args, on)}
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
            "variants": variants, "ratios": ratios(times, memory, targets(args)),
            "sync_check": check, "raw_times_s": times}


def run(args: argparse.Namespace) -> int:
    args = resolve(args)
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists: pass --overwrite or another --output_dir")
    result = measure(args)
    print(report(result))
    outputs.write_text(args.out, json.dumps(result, indent=2), args.overwrite)
    print(f"wrote {args.out}")
    if sync_check_failed(result):
        print("sync check failed: a step synchronised with the host (see above)")
        return 1
    return 0


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("bench")
