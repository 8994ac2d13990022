"""GPU comparison, in two steps because the GPU machine has no TVM compiler and no package registry.

1. Here (any machine with nvcc): cross-compile every contender bundle for each mix and batch size.

       python benchmarks/gpu_compare.py build --out gpu_bundles --arch sm_90

2. On the GPU machine, with only the runtime (libtvm_runtime*.so + tvm-ffi) and PyTorch:

       python benchmarks/gpu_compare.py run --bundles gpu_bundles > benchmarks/results/gpu-h100.txt

Contenders per mix, all on the same inputs, runs alternated, medians: models one after another on
one stream (cosched's sequential schedule on one stream: the Relax VM's order), naive concurrency
(one stream per model, each model's kernels in its own order), cosched's fixed strategies, and
PyTorch eager with torchvision models of the same architectures (one after another, and one CUDA
stream per model) where torchvision has them. GPU utilisation comes from nvidia-smi when present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIXES = {
    "resnet50+squeezenet+inception_v1": ("resnet50", "squeezenet", "inception_v1"),
    "densenet121+inception_v2+shufflenet": ("densenet121", "inception_v2", "shufflenet"),
    "vgg19+resnet50+squeezenet": ("vgg19", "resnet50", "squeezenet"),
}
BATCHES = (1, 8)
# name -> (interleaving strategy, streams: "tenants" = one per model, policy)
CONTENDERS = {
    "one-after-another (1 stream)": ("sequential", 1, "tenant"),
    "naive per-model streams": ("sequential", "tenants", "tenant"),
    "cosched round_robin": ("round_robin", "tenants", "tenant"),
    "cosched breadth_first": ("breadth_first", "tenants", "tenant"),
    "cosched breadth_first balanced+1": ("breadth_first", "tenants+1", "balanced"),
}
TORCHVISION = {
    "resnet50": "resnet50",
    "squeezenet": "squeezenet1_0",
    "inception_v1": "googlenet",
    "densenet121": "densenet121",
    "vgg19": "vgg19",
    "shufflenet": "shufflenet_v2_x1_0",
}


def build(out: Path, arch: str) -> None:
    import cosched
    from cosched.compare import load_models

    for mix, names in MIXES.items():
        models = load_models(names)
        for batch in BATCHES:
            tenants = []
            for name, model in models.items():
                inits = {x.name for x in model.graph.initializer}
                first = next(i for i in model.graph.input if i.name not in inits)
                shape = [batch] + [d.dim_value for d in first.type.tensor_type.shape.dim[1:]]
                tenants.append(cosched.load_onnx(model, name=name, shapes={first.name: shape}))
            for contender, (strategy, streams, policy) in CONTENDERS.items():
                n = {"tenants": len(tenants), "tenants+1": len(tenants) + 1}.get(streams, streams)
                artifact = cosched.build(
                    tenants, target={"kind": "cuda", "arch": arch}, schedule=strategy, num_streams=n, policy=policy
                )
                folder = out / f"{mix}-b{batch}" / contender.replace(" ", "_")
                artifact.export(folder)
                print(f"built {folder}", file=sys.stderr)


def _nvidia_smi(query: str, default: str) -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return default


def _torch_contenders(names, batch):
    try:
        import torch
        import torchvision
    except ImportError:
        return {}
    nets = {}
    for name in names:
        if name in TORCHVISION:
            kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v1" else {}
            nets[name] = getattr(torchvision.models, TORCHVISION[name])(weights=None, **kwargs).eval().cuda()
    if not nets:
        return {}
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    streams = {n: torch.cuda.Stream() for n in nets}

    @torch.no_grad()
    def sequential():
        for net in nets.values():
            net(x)
        torch.cuda.synchronize()

    @torch.no_grad()
    def per_stream():
        for n, net in nets.items():
            with torch.cuda.stream(streams[n]):
                net(x)
        torch.cuda.synchronize()

    label = "+".join(nets)
    return {
        f"pytorch eager one-after-another ({label})": sequential,
        f"pytorch eager stream per model ({label})": per_stream,
    }


def run(bundles: Path, repeat: int) -> None:
    import numpy as np

    from cosched.runtime import load

    print(f"device  : {_nvidia_smi('name,driver_version', 'unknown')}")
    print(f"date    : {time.strftime('%Y-%m-%d %H:%M:%S')}; repeat {repeat}, runs alternated, medians")
    for folder in sorted(p for p in bundles.iterdir() if p.is_dir()):
        mix, batch = folder.name.rsplit("-b", 1)
        loaded = {c: load(folder / c.replace(" ", "_")) for c in CONTENDERS}
        first = next(iter(loaded.values()))
        inputs = first.random_inputs()
        reference = first.run(inputs)
        for name, bundle in loaded.items():
            out = bundle.run(inputs)
            for t in reference:
                for a, b in zip(out[t], reference[t], strict=True):
                    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name} {t}")
        runs = {name: (lambda b=bundle, x=inputs: b.run(x)) for name, bundle in loaded.items()}
        runs.update(_torch_contenders(MIXES[mix], int(batch)))
        samples = {name: [] for name in runs}
        for r in range(repeat + 2):
            for i in range(len(runs)):
                key = list(runs)[(i + r) % len(runs)]
                t0 = time.perf_counter()
                runs[key]()
                if r >= 2:
                    samples[key].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(samples["one-after-another (1 stream)"])
        print(f"\n== {mix}, batch {batch} (GPU utilisation now: {_nvidia_smi('utilization.gpu', 'n/a')})")
        print(f"{'contender':<60} {'median ms':>10} {'speedup vs 1 stream':>20}")
        for name, values in samples.items():
            med = statistics.median(values)
            print(f"{name:<60} {med:>10.3f} {base / med:>20.2f}")
        for name, bundle in loaded.items():
            trace = bundle.profile(inputs)
            trace.save_chrome(folder / f"{name.replace(' ', '_')}.trace.json")
        print(
            json.dumps(
                {"mix": mix, "batch": int(batch), "median_ms": {k: statistics.median(v) for k, v in samples.items()}}
            )
        )


def main() -> int:
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", default="sm_90")
    p = sub.add_parser("run")
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, args.arch)
    else:
        run(args.bundles, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
