"""Training on several processes with torch.distributed: data-parallel local learning.

``_context``: the process group, device mesh and stopping together; ``_launch``: ``--nproc-per-node``
through torch's elastic launcher (the code behind torchrun); ``_grad_sync``: each local layer's gradients
averaged over the data-parallel ranks as soon as its backward ends, overlapped with the next layer's
compute; ``_data``: sharded samplers. See docs/distributed.md.
"""
from ._context import (DistContext, DistError, current_context, describe_failure, destroy, fail_together, in_job,
                       init_distributed, single_process)
from ._grad_sync import LayerGradSync, SyncStats

__all__ = ["DistContext", "DistError", "init_distributed", "destroy", "fail_together", "single_process",
           "current_context", "in_job", "describe_failure", "LayerGradSync", "SyncStats"]
