"""rlflow.torch_utils: parameter bridges and the CPU gradient clip."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rlflow.errors import SpecError  # noqa: E402
from rlflow.torch_utils import FlatParams, clip_grad_norm, load_params, module_params  # noqa: E402


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_tensor_clip_matches_torch_bit_for_bit_at_the_edge(dtype):
    """One gradient tensor (FlatParams' case) takes a shorter path to the norm and the clip test:
    over scales from 1e-6 to 1e6, and over max_norm a few ulps either side of the norm (where
    torch's test max_norm / (norm + 1e-6) < 1 flips), the norm and the clipped gradient equal
    torch.nn.utils.clip_grad_norm_'s exactly."""
    from rlflow.torch_utils import _clips

    rng = np.random.default_rng(0)
    flips = set()
    for i in range(300):
        g = torch.from_numpy(rng.standard_normal(1000) * 10.0 ** rng.uniform(-6, 6)).to(dtype)
        a = torch.zeros(1000, dtype=dtype, requires_grad=True)
        b = torch.zeros(1000, dtype=dtype, requires_grad=True)
        a.grad, b.grad = g.clone(), g.clone()
        norm = torch.nn.utils.get_total_norm([g])
        edge = float(norm + 1e-6)
        max_norm = float(np.nextafter(edge, np.inf if i % 2 else -np.inf) if i % 3 else edge) \
            if i < 200 else edge * rng.uniform(0.5, 1.5)
        for _ in range(int(rng.integers(0, 3))):
            max_norm = float(np.nextafter(max_norm, np.inf if rng.random() < 0.5 else -np.inf))
        ref = torch.nn.utils.clip_grad_norm_([a], max_norm, foreach=True)
        got = clip_grad_norm(b, max_norm)
        assert torch.equal(ref, got) and torch.equal(a.grad, b.grad), (i, max_norm)
        torch_says = bool(max_norm / (ref + 1e-6) < 1.0)
        assert _clips(max_norm, got) == torch_says
        flips.add(torch_says)
    assert flips == {True, False}


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


def _train(net, opt_params, zero, clip, steps, max_norm, seed):
    """`steps` Adam steps of a regression loss on seeded random data; returns the losses."""
    opt = torch.optim.Adam(opt_params, lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    true_w = torch.randn(4, 3, generator=gen) * 10
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        y = x @ true_w
        loss = torch.nn.functional.mse_loss(net(x), y)
        zero()
        loss.backward()
        clip(max_norm)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("max_norm", [float("inf"), 1.0])
def test_flat_params_train_as_the_per_parameter_optimizer(max_norm):
    """Adam over FlatParams' one tensor (zeroed and clipped there) against Adam over the module's
    parameters with torch's own zero_grad and clip_grad_norm_: the same weights after 40 steps,
    bit for bit without clipping; with clipping (max_norm 1 clips every step here) up to the
    float order of the norm's sum."""
    ref, net = _net(3), _net(3)
    ref_params = list(ref.parameters())
    ref_losses = _train(ref, ref_params, lambda: [setattr(p, "grad", None) for p in ref_params],
                        lambda m: torch.nn.utils.clip_grad_norm_(ref_params, m), 40, max_norm, 0)
    flat = FlatParams(net)
    losses = _train(net, [flat.param], flat.zero_grad, flat.clip_grad_norm, 40, max_norm, 0)
    for a, b in zip(ref.parameters(), net.parameters()):
        if max_norm == float("inf"):
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0] and np.allclose(losses, ref_losses, rtol=1e-5)
    # the module's tensors are views of the flat ones: an update to one is an update to the other
    assert all(p.data_ptr() >= flat.param.data_ptr() for p in net.parameters())
    with torch.no_grad():
        flat.param.zero_()
    assert all(float(p.detach().abs().sum()) == 0.0 for p in net.parameters())


def test_flat_params_keep_state_dict_and_checkpoint_loading():
    net, other = _net(0), _net(1)
    flat = FlatParams(net)
    net.load_state_dict(other.state_dict())             # copies into the views
    assert torch.equal(flat.param, torch.cat([p.reshape(-1) for p in other.parameters()]))
    assert all(np.array_equal(a, b) for a, b in zip(module_params(net), module_params(other)))
    before = flat.param.detach().clone()
    opt = torch.optim.Adam([flat.param], lr=0.1)
    net(torch.ones(2, 4)).sum().backward()
    assert float(flat.param.grad.abs().sum()) > 0       # backward wrote into the flat gradient
    opt.step()
    assert not torch.equal(flat.param, before)
    flat.zero_grad()
    assert float(flat.param.grad.abs().sum()) == 0.0 and all(float(p.grad.abs().sum()) == 0.0
                                                           for p in net.parameters())


def test_flat_params_refuse_modules_they_cannot_flatten():
    with pytest.raises(SpecError, match="module"):
        FlatParams(torch.nn.ReLU())
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    with pytest.raises(SpecError, match=r"1\.weight.*torch\.float32.*torch\.float64"):
        FlatParams(mixed)


def test_load_params_takes_views_with_negative_strides():
    net = torch.nn.Linear(3, 2)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::-1]        # a view torch cannot wrap
    load_params(net, [w, np.array([1.0, 2.0], np.float32)[::-1]])
    np.testing.assert_array_equal(net.weight.detach().numpy(), w)
    np.testing.assert_array_equal(net.bias.detach().numpy(), [2.0, 1.0])
