"""cosched.passes: TVM passes that merge tenants and co-schedule their kernels.

Each is a ``tvm.transform`` pass usable in any ``tvm.transform.Sequential``::

    seq = tvm.transform.Sequential([
        MergeTenants(), LowerKernels(target), InterleaveOperators("breadth_first"), AnnotateStreams(2),
    ])
    mod = seq(stack_tenants(tenants))
"""

from .annotate_streams import POLICIES, AnnotateStreams, ApplySchedule
from .channels_last import ChannelsLast
from .concat_in_place import ConcatInPlace
from .interleave_operators import STRATEGIES, InterleaveOperators
from .lower_kernels import LowerKernels
from .merge_tenants import MergeTenants, stack_tenants
from .simplify_inference import SimplifyInference
from .winograd import WinogradConv2d, WinogradRule

__all__ = [
    "POLICIES",
    "STRATEGIES",
    "AnnotateStreams",
    "ApplySchedule",
    "ChannelsLast",
    "ConcatInPlace",
    "InterleaveOperators",
    "LowerKernels",
    "MergeTenants",
    "SimplifyInference",
    "WinogradConv2d",
    "WinogradRule",
    "stack_tenants",
]
