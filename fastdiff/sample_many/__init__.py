"""Many samples on many processes: resumable, verified shards, the same for any process count.

:func:`sample_many` draws ``num_samples`` samples in batches over the ranks of a
``torch.distributed`` job (NCCL on GPUs, gloo on CPUs; one process works too) into ``.npz``
shards. Sample ``i`` has the Philox seed ``seed * 2**32 + i``, so it is the same whatever the
process count, batch size or shard size. Every shard is recorded in ``index.json`` (count,
sha256, seed) and verified on resume and by :func:`load_samples`; the folder layout is in
:mod:`fastdiff.sample_many.shards`.

Command line (``--model gmm``: the built-in 2-D mixture; ``--model package.module:callable``:
see :func:`resolve_model`)::

    torchrun --nproc_per_node=8 -m fastdiff.sample_many --model gmm --sampler ddim \\
        --steps 50 --num-samples 50000 --shape 2 --batch-size 1000 --out samples/
    python -m fastdiff sample-many ...   # the same command, one process
"""

from fastdiff.sample_many.comm import SampleManyError
from fastdiff.sample_many.models import FACTORY_KWARGS, resolve_model
from fastdiff.sample_many.run import SampleManyResult, load_samples, sample_many
from fastdiff.sample_many.shards import INDEX, MANIFEST, FolderInUseError

__all__ = [
    "FACTORY_KWARGS",
    "INDEX",
    "MANIFEST",
    "FolderInUseError",
    "SampleManyError",
    "SampleManyResult",
    "load_samples",
    "resolve_model",
    "sample_many",
]
