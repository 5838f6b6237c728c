"""Process start-up: distributed init, Megatron parallel state, seeds, and the CPU adapter.

One call, :func:`initialize`, does everything in a fixed order (as torchtitan does):

1. read the launcher's environment (torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain
   ``python`` start is a world of one);
2. validate the model against the layout and world size (before any process group exists);
3. pick the device and backend: NCCL on GPUs, gloo on CPU, where the CPU adapter for
   megatron-core's CUDA hard-codes is installed (see :mod:`megatron_mmbert.cpu_adapter`);
4. create the default process group and Megatron's tensor/pipeline/context/data groups;
5. seed Python, NumPy and torch, and Megatron's tensor-parallel RNG tracker.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_mmbert import cpu_adapter
from megatron_mmbert.config import ModelConfig, ParallelConfig, validate_layout

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the rest of the program needs to know about this process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tensor_parallel_rank: int
    pipeline_parallel_rank: int
    data_parallel_rank: int
    data_parallel_size: int
    cpu_adapter: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(
    model: ModelConfig,
    parallel: ParallelConfig,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> Runtime:
    """Initialise this process; see the module docstring for the order of steps."""
    world_size = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    validate_layout(model, parallel, world_size)

    cpu_adapter.check_megatron_version()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
        adapter = False
    else:
        device, backend = torch.device("cpu"), "gloo"
        adapter = cpu_adapter.install()

    if not torch.distributed.is_initialized():
        # A plain `python` start is a world of one on a private port; the environment is left
        # alone so that tools this process launches do not inherit a rendezvous address.
        init_method = None
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        torch.distributed.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            context_parallel_size=parallel.context_parallel,
            distributed_timeout_minutes=timeout_minutes,
        )

    set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if rank == 0:
        logger.info(
            "initialised %d process(es) on %s (%s)%s: TP=%d PP=%d%s CP=%d DP=%d",
            world_size,
            device.type,
            backend,
            ", CPU adapter for megatron-core active" if adapter else "",
            parallel.tensor_parallel,
            parallel.pipeline_parallel,
            f" VPP={parallel.virtual_pipeline}" if parallel.virtual_pipeline else "",
            parallel.context_parallel,
            parallel_state.get_data_parallel_world_size(),
        )
    return Runtime(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tensor_parallel_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_parallel_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        cpu_adapter=adapter,
    )


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank (model init must agree across DP)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron's groups and the default process group (tests start several worlds)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


__all__ = ["Runtime", "initialize", "shutdown", "set_seed", "barrier", "Optional"]
