"""Merged outputs equal each model run alone (Relax VM) and ONNX Runtime, for every strategy and 1-4 streams."""

import numpy as np
import onnxruntime as ort
import pytest

from cosched.compiler import reschedule
from cosched.reference import AloneRunner
from cosched.target import host_target

STRATEGIES = ["sequential", "round_robin", "breadth_first", "explicit"]


@pytest.fixture(scope="module")
def references(demo_tenants, demo_models, demo_inputs):
    alone, onnxrt = {}, {}
    for tenant in demo_tenants:
        alone[tenant.name] = AloneRunner(tenant, host_target()).run(demo_inputs[tenant.name])
        session = ort.InferenceSession(demo_models[tenant.name].SerializeToString(), providers=["CPUExecutionProvider"])
        onnxrt[tenant.name] = session.run(None, demo_inputs[tenant.name])
    return alone, onnxrt


def _explicit_order(bundle):
    """A valid order that is none of the built-in strategies: tenants in reverse, each in its own order."""
    per = {}
    for k in sorted(bundle.schedule.kernels, key=lambda k: k.id):
        per.setdefault(k.tenant, 0)
        per[k.tenant] += 1
    return [f"{t}:{i}" for t in reversed(list(per)) for i in range(per[t])]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_streams", [1, 2, 3, 4])
def test_outputs_match_alone_and_onnxruntime(demo_bundle, demo_inputs, references, strategy, num_streams):
    alone, onnxrt = references
    order = _explicit_order(demo_bundle) if strategy == "explicit" else None
    bundle = reschedule(demo_bundle, strategy, num_streams, order=order)
    assert bundle.schedule.num_streams == num_streams
    bundle.schedule.validate()
    out = bundle.run(demo_inputs)
    for tenant, outputs in out.items():
        assert len(outputs) == len(alone[tenant])
        for got, vm, ref in zip(outputs, alone[tenant], onnxrt[tenant], strict=True):
            # The same kernels as the VM's on the same inputs: any difference is a bug (a softmax over
            # random weights squashes a wrong activation below any tolerance).
            np.testing.assert_array_equal(got, vm)
            np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-6)


def test_outputs_are_informative(references):
    """Seeded random weights must give outputs that differ between classes, or the comparisons prove little."""
    _, onnxrt = references
    for outputs in onnxrt.values():
        assert np.ptp(outputs[0]) > 1e-4
