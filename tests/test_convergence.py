"""Grid convergence of the reference FEM solution against a manufactured solution.

    u(x)  = (1 - x1) + 0.8 sin(pi x1) C(x2, x3) + 0.3 sin(2 pi x1) cos(2 pi x2)
    C     = cos(pi x2)                                   (2-D)
          = cos(pi x2) cos(pi x3) + 0.3 cos(2 pi x3)      (3-D)
    nu(x) = exp(0.7 sin(2 x1 + 3 x2 [- x3]))             (non-constant, no symmetry)
    f     = -div(nu grad u)

u = 1 at x1 = 0 and u = 0 at x1 = 1 (every extra term has a sin(k pi x1) factor), and every
x2 / x3 dependence is a cos(k pi .) factor, so du/dn = 0 on the natural faces: u is the exact
solution of the METHOD.md problem. f is formed exactly by torch autograd on the analytic
expressions (two nested derivatives), and handed to the solver as a nodal field. Q1 elements
with Q1-interpolated nu and f converge at O(h^2) in the nodal L2 norm.
"""

from __future__ import annotations

import math

import pytest
import torch

from pdeds.physics import reference

PI = math.pi


def u_exact(x: torch.Tensor) -> torch.Tensor:
    """Manufactured solution at points x of shape (P, d)."""
    x1, x2 = x[:, 0], x[:, 1]
    c = torch.cos(PI * x2)
    if x.shape[1] == 3:
        c = c * torch.cos(PI * x[:, 2]) + 0.3 * torch.cos(2 * PI * x[:, 2])
    return (
        1
        - x1
        + 0.8 * torch.sin(PI * x1) * c
        + 0.3 * torch.sin(2 * PI * x1) * torch.cos(2 * PI * x2)
    )


def nu_exact(x: torch.Tensor) -> torch.Tensor:
    """A smooth diffusivity with contrast e^1.4 ~ 4."""
    s = 2 * x[:, 0] + 3 * x[:, 1]
    if x.shape[1] == 3:
        s = s - x[:, 2]
    return torch.exp(0.7 * torch.sin(s))


def manufactured_fields(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, nu, f) at the nodes of linspace(0, 1, n)^dim, each (1, 1, n, .., n), float64.

    f = -sum_k d/dx_k (nu du/dx_k): the per-point derivatives come from autograd of the sum
    over points, since each point's value depends only on its own coordinates.
    """
    axis = torch.linspace(0, 1, n, dtype=torch.float64)
    grid = torch.meshgrid(*(axis,) * dim, indexing="ij")
    x = torch.stack(grid, -1).reshape(-1, dim).requires_grad_(True)
    u, nu = u_exact(x), nu_exact(x)
    (grad_u,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    flux = nu[:, None] * grad_u
    div = sum(
        torch.autograd.grad(flux[:, k].sum(), x, retain_graph=True)[0][:, k] for k in range(dim)
    )
    shape = (1, 1) + (n,) * dim
    return u.detach().reshape(shape), nu.detach().reshape(shape), (-div).detach().reshape(shape)


def test_manufactured_solution_satisfies_the_boundary_conditions() -> None:
    """The truth itself: Dirichlet values and zero normal derivative on the natural faces."""
    for dim in (2, 3):
        pts = torch.rand(200, dim, dtype=torch.float64)
        for face in range(1, dim):
            for value in (0.0, 1.0):
                p = pts.clone()
                p[:, face] = value
                p.requires_grad_(True)
                (g,) = torch.autograd.grad(u_exact(p).sum(), p)
                assert g[:, face].abs().max().item() < 1e-12
        p = pts.clone()
        p[:, 0] = 0.0
        assert torch.allclose(u_exact(p), torch.ones(200, dtype=torch.float64), atol=1e-14)
        p[:, 0] = 1.0
        assert u_exact(p).abs().max().item() < 1e-14


def test_source_matches_hand_derivative_2d() -> None:
    """Cross-check the autograd f with one term done by hand: u = sin(pi x1) cos(pi x2), nu = 1.

    -lap u = 2 pi^2 sin(pi x1) cos(pi x2).
    """
    x = torch.rand(50, 2, dtype=torch.float64, requires_grad=True)
    u = torch.sin(PI * x[:, 0]) * torch.cos(PI * x[:, 1])
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(g[:, k].sum(), x, retain_graph=True)[0][:, k] for k in range(2))
    torch.testing.assert_close(-lap, 2 * PI**2 * u, rtol=1e-12, atol=1e-12)


def nodal_l2_error(n: int, dim: int, method: str = "amg") -> float:
    """sqrt(h^d sum_nodes (U - u)^2) for the reference solution on an n^dim grid."""
    u, nu, f = manufactured_fields(n, dim)
    solution = reference.solve(nu, f, method=method)
    return math.sqrt((1.0 / (n - 1)) ** dim * ((solution - u) ** 2).sum().item())


@pytest.mark.parametrize(("dim", "sizes"), [(2, (17, 33, 65)), (3, (9, 17, 33))])
def test_second_order_convergence(dim: int, sizes: tuple[int, ...]) -> None:
    errors = [nodal_l2_error(n, dim) for n in sizes]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    assert all(1.8 <= p <= 2.2 for p in orders), (errors, orders)
    assert errors[-1] < 2e-3  # and the constant is sane, not just the rate


def test_matrix_free_path_converges_too() -> None:
    errors = [nodal_l2_error(n, 2, method="matrix_free") for n in (9, 17, 33)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    assert all(1.8 <= p <= 2.2 for p in orders), (errors, orders)
