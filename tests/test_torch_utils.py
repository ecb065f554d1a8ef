"""rlflow.torch_utils: parameter bridges and the CPU gradient clip."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rlflow.errors import SpecError  # noqa: E402
from rlflow.torch_utils import clip_grad_norm, load_params, module_params  # noqa: E402


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


@pytest.mark.parametrize("seed", range(12))
def test_clip_grad_norm_matches_torch_bit_for_bit(seed):
    """Random gradients scaled so that some cases clip and some do not (and one sits at the edge):
    the gradients and the returned norm equal torch.nn.utils.clip_grad_norm_'s exactly."""
    rng = np.random.default_rng(seed)
    a, b = _net(0), _net(0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        g = torch.from_numpy(rng.standard_normal(pa.shape).astype(np.float32))
        pa.grad, pb.grad = g.clone(), g.clone()
    norm = torch.nn.utils.get_total_norm([p.grad for p in a.parameters()])
    max_norm = float(norm) * [0.1, 0.5, 0.999, 1.0, 1.5, 10.0][seed % 6]
    ref = torch.nn.utils.clip_grad_norm_(list(a.parameters()), max_norm, foreach=True)
    got = clip_grad_norm(b.parameters(), max_norm)
    assert torch.equal(ref, got)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    clipped = bool(max_norm / (ref + 1e-6) < 1.0)      # torch's rule (max_norm = norm clips, barely)
    after = float(torch.nn.utils.get_total_norm([p.grad for p in b.parameters()]))
    assert (after < float(ref)) == clipped


def test_clip_grad_norm_skips_missing_grads_and_takes_a_tensor():
    net = _net(1)
    w = net[0].weight
    w.grad = torch.full_like(w, 3.0)
    total = clip_grad_norm(net.parameters(), 1.0)       # only one parameter has a gradient
    assert float(total) == pytest.approx(3.0 * w.numel() ** 0.5)
    assert float(torch.linalg.vector_norm(w.grad)) == pytest.approx(1.0, rel=1e-5)
    v = torch.ones(4, requires_grad=True)
    v.grad = torch.ones(4)
    assert float(clip_grad_norm(v, 10.0)) == pytest.approx(2.0) and torch.equal(v.grad, torch.ones(4))
    assert float(clip_grad_norm([], 1.0)) == 0.0


def test_module_params_round_trip_and_shape_errors():
    a, b = _net(2), _net(3)
    load_params(b, module_params(a))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    params = module_params(a)
    with pytest.raises(SpecError, match="params"):
        load_params(b, params[:-1])
    params[0] = np.zeros((2, 2), np.float32)
    with pytest.raises(SpecError, match="shape"):
        load_params(b, params)
