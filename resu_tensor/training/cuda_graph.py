"""A whole training step recorded as one CUDA graph, and recorded again when what it captured changes.

A CUDA graph replays raw addresses. A lifecycle change (prune, ``enter_resu``, commit, and the
optimizer-state reset after it, all of which a :class:`~resu_tensor.training.scheduler.ResuScheduler`
makes mid-run) gives the weights and the optimizer new tensors, so replaying a graph recorded
before it would read freed memory and write into it. :class:`CudaGraphStep` checks before every
replay that the model's parameters and buffers, each ResuTensor's tensors and the optimizer's
state (and the vectors inside its compact tensors) are the very objects it recorded, and that each
ResuTensor is in the mode and trainable set it was recorded in, and records again when not.
"""
import operator
from typing import Callable

import torch
from torch import nn

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.tensor import ResuTensor


# Every recording warms up on one side stream per device: cuBLAS keeps a workspace for each
# stream it has run on until the process ends, so a new stream per recording (one per mode change
# of a schedule) would hold tens of MB more each time.
_SIDE_STREAMS: dict = {}


def _side_stream(device: int) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class CudaGraphStep:
    """``step`` (no arguments: one whole training step) run as one CUDA graph per call.

    ``step`` should call ``optimizer.zero_grad(set_to_none=True)``, run forward and backward, call
    ``optimizer.step()`` and return what the loop needs (e.g. ``loss.detach()``). The optimizer must
    be made with ``capturable=True`` (Adam/AdamW), the model on CUDA. Each call is exactly one
    training step: a call that records runs the step eagerly on a side stream (what PyTorch's
    capture recipe calls warm-up: optimizer state, kernel autotuning) and then records it; later
    calls replay. What a replay returns is the recorded output tensor, overwritten by the next
    replay. Inputs: copy each batch into the tensors ``step`` reads (``static_x.copy_(x)``).

    Example::

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
        static_x, static_y = torch.empty_like(x0), torch.empty_like(y0)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(static_x), static_y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        graphed = rt.CudaGraphStep(step, model, optimizer)
        for x, y in loader:
            static_x.copy_(x), static_y.copy_(y)
            scheduler.step(graphed())   # mode changes: the next call records again
    """

    def __init__(self, step: Callable, model: nn.Module, optimizer: torch.optim.Optimizer):
        if not callable(step):
            raise TypeError(f"step must be a callable taking no arguments, got {type(step).__name__}")
        if optimizer.defaults.get("capturable") is False:
            raise ValueError(f"{type(optimizer).__name__} must be created with capturable=True to run inside a "
                             "CUDA graph (it keeps its step count on the GPU then)")
        not_cuda = [name for name, p in model.named_parameters() if p.device.type != "cuda"]
        if not_cuda:
            raise ValueError(f"CudaGraphStep needs the model on a CUDA device; {not_cuda[0]} is on "
                             f"{model.get_parameter(not_cuda[0]).device}")
        self.step, self.model, self.optimizer = step, model, optimizer
        self.recordings = 0  # how many times the step was recorded (once, plus once per change)
        self._graph = self._output = None
        self._recorded_objects: list = []
        self._recorded_sets: list = []

    def _trainable_sets(self) -> list:
        """Each ResuTensor parameter's mode and trainable set. They can change while every tensor
        stays the same object: entering RESU at sparsity 0.5 flips the trainable side over the same
        mask and values, and the optimizer state is reset in place at the same count, yet the
        recorded kernels select the old side."""
        return [(p.mode_name, p.trainable_key) for p in self.model.parameters() if isinstance(p, ResuTensor)]

    def _captured_objects(self) -> list:
        """Every object whose memory the recorded step reads or writes. Held (not their ids), so a
        new object can never pass for a freed one."""
        objects = list(self.model.buffers())
        for p in self.model.parameters():
            objects.append(p)
            if isinstance(p, ResuTensor):
                objects.extend(getattr(p, name) for name in p.optional_tensor_data_names)
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    objects.append(value)
                if isinstance(value, CompactTensor):  # a state reset may give it a new vector in place
                    objects.append(value.flat)
        return objects

    def __call__(self):
        if self._graph is not None:
            current = self._captured_objects()
            if len(current) == len(self._recorded_objects) and all(map(operator.is_, current,
                                                                         self._recorded_objects)) \
                    and self._trainable_sets() == self._recorded_sets:
                self._graph.replay()
                return self._output
        return self._record()

    def _record(self):
        self._graph = self._output = None  # the stale graph's memory goes back first
        self._recorded_objects, self._recorded_sets = [], []
        side = _side_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.step()  # this call's training step, eagerly
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the grads it writes
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._output = self.step()  # recorded, not run
        self._graph = graph
        self._recorded_objects = self._captured_objects()
        self._recorded_sets = self._trainable_sets()
        self.recordings += 1
        return result
