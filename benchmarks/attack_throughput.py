"""Benchmark 3: the project's PGD-20 against torchattacks' PGD, images per second.

Same model (the default small CNN, or PreAct ResNet-18 in full mode) in eval mode, same images
(Fashion-MNIST test images), same eps / step / steps, random start, same torch threads. Contenders
run in turns, repeated, and the medians are compared. Also timed: the project's PGD with its
speed-ups switched off (`attacks.FAST_EVAL_COPY = False`), which shows what they buy, and on a GPU
bf16 autocast and torch.compile variants. The goal is a ratio >= 1.0 against torchattacks.
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import alternate, log, machine, median, write_result

EPS, STEP, STEPS = 0.1, 0.025, 20  # params.yaml's threat model: Linf eps 0.1, step eps/4; PGD-20


def _images(n: int, channels: int, size: int):
    """Real images: Fashion-MNIST test images (as 3-channel 32x32 for the ResNet)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.common import data_root
    from robust_transfer.data import load_fashion_mnist

    split = load_fashion_mnist(data_root())["test"]
    x = torch.from_numpy(split.images[:n].copy()).permute(0, 3, 1, 2).float().div_(255.0)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.from_numpy(split.labels[:n].astype("int64")) % 5
    return x, y


def _model(arch: str, channels: int, size: int, device: str):
    import torch

    from robust_transfer.nets import build_net

    torch.manual_seed(0)
    net = build_net(arch, channels, 5, size)
    net.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as after training
        for _ in range(3):
            net(torch.rand(64, channels, size, size))
    return net.to(device).eval()


def compare(arch: str, n: int, reps: int, device: str, threads: int, extra: bool) -> dict:
    import torch
    import torchattacks

    from robust_transfer import attacks

    torch.set_num_threads(threads)
    channels, size = (1, 28) if arch == "small_cnn" else (3, 32)
    x, y = _images(n, channels, size)
    x, y = x.to(device), y.to(device)
    net = _model(arch, channels, size, device)
    ta = torchattacks.PGD(net, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def project(fast: bool = True, bf16: bool = False, model=None):
        def run():
            attacks.FAST_EVAL_COPY, attacks.BF16_ON_GPU = fast, bf16
            try:
                attacks.pgd(model or net, x, y, EPS, STEP, STEPS)
                sync()
            finally:
                attacks.FAST_EVAL_COPY, attacks.BF16_ON_GPU = True, False
        return run

    def theirs():
        ta(x, y)
        sync()

    contenders = {"project": project(), "torchattacks": theirs}
    if extra:  # what the speed-ups buy (full mode: a quick run has no time for a third contender)
        contenders["project_no_speedups"] = project(fast=False)
    compile_s = None
    if extra and device != "cpu":
        contenders["project_bf16"] = project(bf16=True)
        t0 = time.perf_counter()
        compiled = torch.compile(net)
        project(fast=False, model=compiled)()  # compiles here, outside the timed runs
        compile_s = time.perf_counter() - t0
        contenders["project_compiled"] = project(fast=False, model=compiled)
    cpu0 = {}

    def timed_cpu(name, fn):  # CPU seconds too: steadier than wall time on a shared machine
        def run():
            c0 = time.process_time()
            fn()
            cpu0.setdefault(name, []).append(time.process_time() - c0)
        return run

    log(f"[attack] {arch} {tuple(x.shape)} on {device}, {threads} threads: PGD-{STEPS}, {reps} rounds of "
        f"{', '.join(contenders)}")
    times = alternate({k: timed_cpu(k, f) for k, f in contenders.items()}, reps=reps, warmup=1)
    ips = {k: n / median(v) for k, v in times.items()}
    cpu = {k: median(v[1:]) for k, v in cpu0.items()}  # the first entry is the warm-up
    out = {"arch": arch, "images": n, "device": device, "threads": threads, "steps": STEPS, "eps": EPS,
           "wall_s": times, "images_per_s": {k: round(v, 1) for k, v in ips.items()},
           "cpu_s_median": {k: round(v, 3) for k, v in cpu.items()},
           "ratio_vs_torchattacks": round(ips["project"] / ips["torchattacks"], 4),
           "cpu_ratio_vs_torchattacks": round(cpu["torchattacks"] / cpu["project"], 4),
           "speedups_gain": round(ips["project"] / ips["project_no_speedups"], 4) if extra else None,
           "compile_s": compile_s}
    log(f"[attack] {arch}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in ips.items()) +
        f"; ratio vs torchattacks {out['ratio_vs_torchattacks']:.3f} (CPU time {out['cpu_ratio_vs_torchattacks']:.3f})")
    return out


def run(quick: bool = True, device: str = "cpu", threads: int = 2) -> dict:
    started = machine()  # the load average as the benchmark starts
    n = 256 if device == "cpu" else 4096
    cases = [("small_cnn", n)] if quick else [("small_cnn", n), ("preact_resnet18", n // 4 if device == "cpu" else n)]
    results = {arch: compare(arch, n_img, reps=3 if quick else 5, device=device, threads=threads,
                             extra=not quick) for arch, n_img in cases}
    summary = {"pgd_throughput_ratio_vs_torchattacks": results["small_cnn"]["ratio_vs_torchattacks"],
               "pgd_throughput_cpu_ratio_vs_torchattacks": results["small_cnn"]["cpu_ratio_vs_torchattacks"],
               "pgd_images_per_s": results["small_cnn"]["images_per_s"]["project"]}
    return {"quick": quick, "machine": started, "results": results, "summary": summary, "goal": "ratio >= 1.0"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    res = run(quick=not args.full, device=args.device, threads=args.threads)
    write_result("attack_throughput" if args.device == "cpu" else f"attack_throughput_{args.device}", res)
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
