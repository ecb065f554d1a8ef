"""Small bridges between PyTorch modules and rlflow's numpy parameters. Importing this module
imports torch; `import rlflow` never does.

    params = module_params(learner_net)      # list of numpy arrays: what Learner.get_params returns
    load_params(policy_net, params)          # what Policy.set_params does
    clip_grad_norm(net.parameters(), 10.0)   # torch's clip_grad_norm_, without the no-op rescale
    flat = FlatParams(net)                   # net's weights and grads as views of one tensor each
"""

from __future__ import annotations

import numpy as np
import torch

from rlflow.errors import SpecError, UsageError, is_real, mismatch


def module_params(module: torch.nn.Module) -> list:
    """The module's parameters and buffers (state_dict order) as numpy arrays (views, not copies:
    rlflow's parameter stores copy on publish)."""
    return [t.detach().cpu().numpy() for t in module.state_dict().values()]


def load_params(module: torch.nn.Module, params) -> None:
    """Copy numpy arrays (as from `module_params`) into the module's state, in place."""
    state = module.state_dict()
    if len(params) != len(state):
        raise SpecError(mismatch("params", type(module).__name__, f"{len(state)} arrays", len(params)))
    with torch.no_grad():
        for (name, t), value in zip(state.items(), params):
            value = np.asarray(value)
            if tuple(t.shape) != value.shape:
                raise SpecError(mismatch("params", name, f"shape {tuple(t.shape)}", f"shape {value.shape}"))
            if any(st < 0 for st in value.strides):   # torch takes no negative strides (a[:, ::-1])
                value = np.ascontiguousarray(value)
            t.copy_(torch.from_numpy(value))


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)` (L2 norm), with the same
    gradients bit for bit and the same returned total norm, but on CPU the rescaling pass runs only
    where it changes something (torch's clip coefficient max_norm / (norm + 1e-6) below 1).

    torch always multiplies every gradient by the clamped coefficient, usually 1.0, to avoid a
    host-device sync on GPUs; on CPU that pass is a full read and write of the gradients for
    nothing: ~25 of ~40 us per step for a 67k-parameter MLP (DQN on CartPole).
    """
    if not is_real(max_norm) or not max_norm > 0:       # NaN, None, "1", 0 and -1 too
        raise UsageError(mismatch("clip_grad_norm", "max_norm", "a number > 0", repr(max_norm)))
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    total = _total_norm(grads)
    if not grads:
        return total
    if all(g.device.type == "cpu" for g in grads) and not _clips(max_norm, total):
        return total
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def _total_norm(grads: list) -> torch.Tensor:
    """`torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)`. For one gradient (FlatParams) its
    own computation, the vector norm of the stacked `_foreach_norm`, without its grouping of the
    tensors by device and dtype: ~22 -> ~13 us on a CPU."""
    if len(grads) == 1 and hasattr(torch, "_foreach_norm"):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


def _clips(max_norm: float, total: torch.Tensor) -> bool:
    """torch's clip test, coefficient `max_norm / (total + 1e-6)` below 1 in the norm's dtype, on
    a CPU norm: for float32 and float64 in numpy scalars of that dtype, ~1 us instead of three
    tensor operations, ~12 us. The same IEEE operations as torch's: a Python number divided by a
    tensor is the tensor's reciprocal times the number, both rounded to the tensor's dtype (a
    plain division disagrees a few ulps either side of the edge)."""
    f = _NUMPY_FLOAT.get(total.dtype)
    if f is None:
        return bool(max_norm / (total + 1e-6) < 1.0)
    return bool((f(1.0) / (f(total.item()) + f(1e-6))) * f(max_norm) < 1.0)


class FlatParams:
    """A module's parameters re-homed into one contiguous tensor, and their gradients into another,
    so that the optimizer, the gradient clip and zeroing each handle one tensor instead of one per
    weight and bias:

        flat = FlatParams(net)             # net's parameters and their .grad are views into these now
        opt = torch.optim.Adam([flat.param], lr=1e-3, fused=True)
        flat.zero_grad()                   # not opt.zero_grad(): it would set flat.param.grad to None
        loss.backward()                    # accumulates into the views, so into flat.param.grad
        flat.clip_grad_norm(10.0)
        opt.step()                         # updates flat.param in place, so net's weights

    The same updates as an optimizer over `net.parameters()`: Adam (and SGD, RMSprop...) work
    element by element, and the L2 clip's norm over one tensor is the norm over all of them (up to
    the order of a float sum). The module runs, saves and loads its state_dict as before (its
    tensors are views; `load_state_dict` copies into them). Build it once the module is where it
    will train (a later `module.to(...)` makes new tensors and breaks the views). On a CPU this
    takes ~0.1 ms of Python and dispatch off each step of a 3-layer MLP (DQN on CartPole: Adam's
    step, the clip and the zeroing went from 6 tensors to 1; ~1.03 -> ~0.93 ms a learner step).
    """

    def __init__(self, module: torch.nn.Module):
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise SpecError(mismatch("FlatParams", "module", "a module with trainable parameters",
                                     f"{type(module).__name__} without any"))
        dtype, device = params[0].dtype, params[0].device
        for name, p in module.named_parameters():
            if p.requires_grad and (p.dtype != dtype or p.device != device):
                raise SpecError(mismatch("FlatParams", name, f"dtype {dtype} on {device} (as the first)",
                                         f"dtype {p.dtype} on {p.device}"))
        total = sum(p.numel() for p in params)
        self.param = torch.nn.Parameter(torch.empty(total, dtype=dtype, device=device))
        self.param.grad = torch.zeros_like(self.param)
        self.module = module
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.param[offset:offset + n].copy_(p.reshape(-1))
                p.data = self.param.data[offset:offset + n].view_as(p)
                p.grad = self.param.grad[offset:offset + n].view_as(p)
                offset += n

    def zero_grad(self) -> None:
        """Zero every gradient (in place: the views stay)."""
        self.param.grad.zero_()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm` over all of the module's gradients at once; returns their total L2 norm."""
        return clip_grad_norm(self.param, max_norm)
