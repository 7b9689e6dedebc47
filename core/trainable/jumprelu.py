"""JumpReLU and its step function with straight-through threshold gradients (rectangle kernel).

``jumprelu(z, theta) = z * H(z - theta)`` has no gradient in ``theta`` almost everywhere. Following
Rajamanoharan et al. (2024, "Jumping Ahead"), the backward pass replaces the Dirac delta of
``dH/dtheta`` by a rectangle kernel of width ``bandwidth``::

    d jumprelu / d theta = -(theta / eps) * K((z - theta) / eps)
    d H(z - theta) / d theta = -(1 / eps) * K((z - theta) / eps),      K(u) = 1 if |u| < 1/2 else 0

while gradients in ``z`` are the exact ones (``H(z - theta)`` for JumpReLU, 0 for the step). The
step function is what an L0 sparsity penalty trains the thresholds with.
"""

from __future__ import annotations

import torch

__all__ = ["jumprelu", "step", "rectangle"]


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel ``1[|u| < 1/2]`` in ``u``'s dtype."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad
        return grad_z, _reduce_to(grad_theta, theta.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((z - theta) / eps) * grad
        return torch.zeros_like(z), _reduce_to(grad_theta, theta.shape), None


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the parameter's shape."""
    while grad.ndim > len(shape):
        grad = grad.sum(0)
    for i, n in enumerate(shape):
        if n == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float = 1e-3) -> torch.Tensor:
    """``z * (z > theta)`` with the rectangle-kernel gradient in ``theta`` (see the module doc)."""
    return _JumpReLU.apply(z, theta, float(bandwidth))


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float = 1e-3) -> torch.Tensor:
    """``(z > theta)`` as a float, with the rectangle-kernel gradient in ``theta`` (an L0 penalty's)."""
    return _Step.apply(z, theta, float(bandwidth))
