"""DP building blocks: clipping, noise, and the RDP accountant against published numbers."""

import math

import numpy as np
import pytest
import torch

from p2pgrid.errors import BadRequest
from p2pgrid.protocols.dp import (DEFAULT_ORDERS, RDPAccountant, add_gaussian_noise, clip_update, global_norm,
                          rdp_sampled_gaussian, rdp_to_epsilon)


def test_clip_update_scales_to_the_bound_and_reports_the_norm():
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]]), "n": torch.tensor(7)}
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(5.0)
    assert global_norm(clipped) == pytest.approx(1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert clipped["n"] is delta["n"]  # integer buffers untouched
    small, norm = clip_update({"a": torch.tensor([0.3, 0.4])}, 1.0)
    assert norm == pytest.approx(0.5) and torch.equal(small["a"], torch.tensor([0.3, 0.4]))
    with pytest.raises(BadRequest):
        clip_update(delta, 0.0)


def test_gaussian_noise_has_the_right_scale_and_is_never_reproduced():
    base = {"w": torch.zeros(200_000), "i": torch.zeros(3, dtype=torch.int64)}
    torch.manual_seed(5)
    noisy = add_gaussian_noise(base, clip=2.0, noise_multiplier=1.5)
    assert float(noisy["w"].std()) == pytest.approx(3.0, rel=0.01)
    assert abs(float(noisy["w"].mean())) < 0.03
    assert torch.equal(noisy["i"], base["i"]) and noisy["w"].dtype == torch.float32
    torch.manual_seed(5)  # the global seed does not reach the noise either (OS CSPRNG)
    assert not torch.equal(add_gaussian_noise(base, 2.0, 1.5)["w"], noisy["w"])


@pytest.mark.parametrize("alpha", [1.5, 2, 7.3, 32, 63])
@pytest.mark.parametrize("sigma", [0.5, 1.1, 4.0])
def test_full_batch_gaussian_is_alpha_over_two_sigma_squared(alpha, sigma):
    assert rdp_sampled_gaussian(sigma, 1.0, alpha) == alpha / (2 * sigma ** 2)


def _numerical_rdp(sigma, q, alpha):
    """RDP of the sampled Gaussian by direct integration: (1/(a-1)) log E_{mu0}[(mu/mu0)^a]."""
    z = np.linspace(-40 * sigma, 40 * sigma + 1, 400_001)
    log_mu0 = -z ** 2 / (2 * sigma ** 2)
    log_ratio = np.logaddexp(np.log1p(-q), np.log(q) + (2 * z - 1) / (2 * sigma ** 2))
    integrand = np.exp(log_mu0 + alpha * log_ratio) / (sigma * np.sqrt(2 * np.pi))
    return np.log(np.trapezoid(integrand, z)) / (alpha - 1)


@pytest.mark.parametrize("sigma,q,alpha", [(1.1, 256 / 60000, 2), (1.1, 256 / 60000, 3.7),
                                           (0.8, 0.01, 10.9), (2.0, 0.3, 1.1), (1.0, 0.05, 6),
                                           (0.7, 0.2, 2.5)])
def test_sampled_gaussian_matches_numerical_integration(sigma, q, alpha):
    exact = rdp_sampled_gaussian(sigma, q, alpha)
    assert exact == pytest.approx(_numerical_rdp(sigma, q, alpha), rel=1e-6, abs=1e-12)


def test_integer_and_fractional_orders_agree_in_between():
    # the RDP curve is continuous: an order next to an integer gives nearly the same value
    for a in (2, 5, 20):
        assert rdp_sampled_gaussian(1.0, 0.01, a + 1e-7) == pytest.approx(
            rdp_sampled_gaussian(1.0, 0.01, a), rel=1e-4)


# TF Privacy's MNIST tutorial (Abadi et al. 2016 setting: N=60000, batch 256, delta=1e-5),
# README "Select Parameters" and "Expected Output": epsilon at the classic RDP conversion.
PUBLISHED = [(1.1, 60, 3.01), (1.3, 15, 1.19), (0.7, 45, 7.10), (1.1, 1, 1.03), (1.1, 2, 1.11)]


@pytest.mark.parametrize("sigma,epochs,eps", PUBLISHED)
def test_epsilon_matches_published_mnist_numbers(sigma, epochs, eps):
    acc = RDPAccountant()
    acc.step(sigma, 256 / 60000, steps=math.ceil(epochs * 60000 / 256))
    assert acc.epsilon(1e-5, conversion="classic") == pytest.approx(eps, abs=0.006)
    # the tighter conversion of Balle et al. (Opacus's default) never reports more
    assert acc.epsilon(1e-5) <= acc.epsilon(1e-5, conversion="classic")


def test_the_mnist_example_in_the_brief():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, steps=60 * 234)
    assert 2.95 <= acc.epsilon(1e-5, conversion="classic") <= 3.02
    assert 2.5 <= acc.epsilon(1e-5) <= 2.7


def test_composition_adds_rdp_and_steps_can_be_split():
    a, b = RDPAccountant(), RDPAccountant()
    a.step(1.0, 0.01, steps=100)
    for _ in range(4):
        b.step(1.0, 0.01, steps=25)
    assert np.allclose(a.rdp, b.rdp)
    c = RDPAccountant()
    c.step(1.0, 0.01, steps=100)
    c.step(2.0, 0.1, steps=10)
    assert c.epsilon(1e-5) > a.epsilon(1e-5)
    eps, order = c.get_privacy_spent(1e-5)
    assert order in DEFAULT_ORDERS and eps == c.epsilon(1e-5)


def test_edge_cases():
    assert rdp_sampled_gaussian(1.0, 0.0, 2) == 0.0
    assert rdp_sampled_gaussian(0.0, 0.5, 2) == math.inf
    assert RDPAccountant().epsilon(1e-5) == 0.0
    acc = RDPAccountant()
    acc.step(0.0, 0.5)
    assert acc.epsilon(1e-5) == math.inf
    for bad in [lambda: rdp_sampled_gaussian(1.0, 1.5, 2), lambda: rdp_sampled_gaussian(1.0, 0.5, 1.0),
                lambda: RDPAccountant().epsilon(0.0), lambda: rdp_to_epsilon([2], [1.0], 1e-5, "nope")]:
        with pytest.raises(BadRequest):
            bad()


def test_more_noise_or_less_sampling_means_less_epsilon():
    def eps(sigma, q, steps=1000):
        acc = RDPAccountant()
        acc.step(sigma, q, steps)
        return acc.epsilon(1e-5)
    assert eps(2.0, 0.01) < eps(1.0, 0.01) < eps(0.7, 0.01)
    assert eps(1.0, 0.001) < eps(1.0, 0.01) < eps(1.0, 0.1)


def test_rdp_curves_compose_like_steps():
    from p2pgrid.protocols.dp import rdp_curve
    a, b = RDPAccountant(), RDPAccountant()
    a.step(1.1, 0.01, 30)
    b.add_rdp(rdp_curve(1.1, 0.01, 10))
    b.add_rdp(rdp_curve(1.1, 0.01, 20))
    assert b.epsilon(1e-5) == pytest.approx(a.epsilon(1e-5))
    with pytest.raises(BadRequest):
        b.add_rdp([1.0])


def test_private_random_samples_have_the_promised_distributions():
    from p2pgrid.protocols.private_random import PrivateRandom
    r = PrivateRandom()
    z = r.normal((200_000,), std=3.0)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 3.0) < 0.05
    lap = r.laplace((200_000,), scale=2.0)   # E|X| = scale
    assert abs(float(lap.abs().mean()) - 2.0) < 0.05
    kept = r.bernoulli(100_000, 0.3)
    assert abs(len(kept) / 100_000 - 0.3) < 0.01 and bool((kept[1:] > kept[:-1]).all())
    u = r.uniform((100_000,))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    # two instances are keyed independently from the OS: no shared stream
    assert not torch.equal(PrivateRandom().normal((8,)), PrivateRandom().normal((8,)))
