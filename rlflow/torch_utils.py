"""Small bridges between PyTorch modules and rlflow's numpy parameters. Importing this module
imports torch; `import rlflow` never does.

    params = module_params(learner_net)      # list of numpy arrays: what Learner.get_params returns
    load_params(policy_net, params)          # what Policy.set_params does
"""

from __future__ import annotations

import numpy as np
import torch

from rlflow.errors import SpecError, mismatch


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
            t.copy_(torch.from_numpy(value))
