"""Co-schedule two models: load, merge with the passes, inspect the annotated IR, compile, run, export, reload, plot.

Run it with ``python tutorials/01_co_schedule_two_models.py [output folder]``. It uses two real model
graphs that ship inside the ``onnx`` package (SqueezeNet and ShuffleNet) with seeded random weights.
"""

import os
import sys
import tempfile
from pathlib import Path

# Must be set before TVM creates a thread pool, or the pool pins every worker to core 0.
os.environ.setdefault("TVM_BIND_THREADS", "0")

import numpy as np
import tvm

import cosched
from cosched.models import light_model
from cosched.passes import AnnotateStreams, InterleaveOperators, LowerKernels, MergeTenants, stack_tenants
from cosched.target import host_target

out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="cosched-tutorial-"))
out_dir.mkdir(parents=True, exist_ok=True)

# 1. Tenants: each ONNX model becomes a Relax module with named inputs.
tenants = [cosched.load_onnx(light_model(name, seed=0), name=name) for name in ("squeezenet", "shufflenet")]
for t in tenants:
    print(f"tenant {t.name}: inputs {[(i.name, i.shape) for i in t.inputs]}")

# 2. The passes are ordinary TVM passes: merge, lower to kernels, interleave, give each kernel a stream.
target = host_target()
pipeline = tvm.transform.Sequential(
    [MergeTenants(), LowerKernels(target), InterleaveOperators("breadth_first"), AnnotateStreams(num_streams=2)]
)
mod = pipeline(stack_tenants(tenants))

# 3. The schedule is in the IR: each kernel's name says tenant, stream and order; main lists the waits.
script = mod["main"].script()
print("\n".join(line for line in script.splitlines() if "R.call_tir" in line)[:1200])

# 4. cosched.compile runs the same pipeline, builds the kernels and returns a runnable bundle.
bundle = cosched.compile(tenants, target=target, schedule="breadth_first", num_streams=2)
print(bundle.schedule.summary())
print(
    f"planned memory: {bundle.planned_bytes / 2**20:.1f} MiB (without reuse {bundle.unplanned_bytes / 2**20:.1f} MiB)"
)

rng = np.random.default_rng(0)
inputs = {t.name: {i.name: rng.standard_normal(i.shape).astype(i.dtype) for i in t.inputs} for t in tenants}
outputs = bundle.run(inputs)
for name, outs in outputs.items():
    print(f"{name}: top class {int(outs[0].argmax())}")

# 5. Export one folder (kernels .so + schedule JSON + params npz) and reload it with the runtime alone.
exported = bundle.export(out_dir / "bundle")
reloaded = cosched.runtime.load(exported)
again = reloaded.run(inputs)
assert all(np.array_equal(a, b) for n in outputs for a, b in zip(outputs[n], again[n], strict=True))
print(f"exported to {exported} and reloaded: identical outputs")

# 6. Look at it: a Gantt chart (one row per stream, a colour per tenant) and a Chrome/Perfetto trace.
trace = bundle.profile(inputs)
print(f"wrote {trace.plot(out_dir / 'gantt.png')} and {trace.save_chrome(out_dir / 'trace.json')}")
