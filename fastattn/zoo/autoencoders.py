"""Autoencoders for flat inputs in [0, 1] (the 64 pixels of an 8x8 digit):

- ``undercomplete``: x -> ReLU(W1 x + b1) -> sigmoid(W2 h + b2), one hidden layer narrower than x;
- ``deep``: a mirrored stack, input -> 2*hidden -> hidden -> 2*hidden -> input;
- ``denoising``: the undercomplete network fed x + N(0, noise_std^2) while training,
  its loss still measured against the clean x (Vincent et al. 2008);
- ``linear``: x -> W1 x + b1 -> W2 h + b2 with no non-linearity; trained with squared
  error its decoder's columns span the same subspace as the top principal components.

``principal_angles_degrees`` and ``pca_basis`` compare that subspace with PCA's.
"""

from __future__ import annotations

import torch

from fastattn import checks

KINDS = ("undercomplete", "deep", "denoising", "linear")


class Autoencoder(torch.nn.Module):
    def __init__(self, input_dim: int, widths: list[int], *, linear: bool = False, noise_std: float = 0.0):
        """``widths``: the encoder's layer sizes after the input, the code size last; the
        decoder mirrors them back to ``input_dim``."""
        super().__init__()
        checks.positive_int("input_dim", input_dim)
        for width in widths:
            checks.positive_int("widths", width)
        self.noise_std = checks.finite_number("noise_std", noise_std)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.linear = checks.flag("linear", linear)
        sizes = [input_dim, *widths]
        self.encoder = self._stack(sizes, final_activation=None if linear else torch.nn.ReLU())
        self.decoder = self._stack(sizes[::-1], final_activation=None if linear else torch.nn.Sigmoid())

    def _stack(self, sizes: list[int], final_activation: torch.nn.Module | None) -> torch.nn.Sequential:
        layers: list[torch.nn.Module] = []
        for index, (inputs, outputs) in enumerate(zip(sizes, sizes[1:])):
            layers.append(torch.nn.Linear(inputs, outputs))
            last = index == len(sizes) - 2
            activation = final_activation if last else (None if self.linear else torch.nn.ReLU())
            if activation is not None:
                layers.append(activation)
        return torch.nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) -> reconstruction (B, input_dim); the input is corrupted with
        Gaussian noise first when the model is training and ``noise_std`` > 0."""
        checks.float_tensor("inputs", inputs)
        features = self.encoder[0].in_features
        checks.shape("inputs", inputs, (None, features), f"(B, {features})")
        if self.training and self.noise_std > 0:
            inputs = inputs + self.noise_std * torch.randn_like(inputs)
        return self.decoder(self.encoder(inputs))


def build_autoencoder(kind: str, input_dim: int, hidden: int, noise_std: float = 0.3) -> Autoencoder:
    """One of ``KINDS`` with a code of ``hidden`` units (``noise_std`` is used by ``denoising`` only)."""
    checks.choice("kind", kind, KINDS)
    checks.positive_int("hidden", hidden)
    if kind == "deep":
        return Autoencoder(input_dim, [2 * hidden, hidden])
    if kind == "denoising":
        return Autoencoder(input_dim, [hidden], noise_std=noise_std)
    return Autoencoder(input_dim, [hidden], linear=kind == "linear")


def pca_basis(data: torch.Tensor, components: int) -> torch.Tensor:
    """(N, D) samples -> (D, components): orthonormal top principal directions of the centred data."""
    checks.float_tensor("data", data)
    checks.positive_int("components", components)
    if data.dim() != 2 or components > min(data.shape):
        raise ValueError(f"data must be (N, D) with components <= min(N, D), got {checks.describe(data)} and {components}")
    _, _, right = torch.linalg.svd(data - data.mean(0), full_matrices=False)
    return right[:components].T


def principal_angles_degrees(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """The principal angles between the column spaces of (D, k) ``basis_a`` and (D, k)
    ``basis_b`` (any bases, orthonormalised here), in degrees, smallest first:
    arccos of the singular values of Q_a^T Q_b (Bjorck and Golub 1973), arcsin of those of
    Q_b - Q_a Q_a^T Q_b for the small ones."""
    for name, basis in (("basis_a", basis_a), ("basis_b", basis_b)):
        checks.float_tensor(name, basis)
        if basis.dim() != 2 or basis.shape[1] > basis.shape[0]:
            raise ValueError(f"{name} must be (D, k) with k <= D, got {checks.describe(basis)}")
    if basis_a.shape != basis_b.shape:
        raise ValueError(f"basis_a and basis_b must have the same shape, got {tuple(basis_a.shape)} and {tuple(basis_b.shape)}")
    orthonormal_a, _ = torch.linalg.qr(basis_a.double())
    orthonormal_b, _ = torch.linalg.qr(basis_b.double())
    cross = orthonormal_a.T @ orthonormal_b
    cosines = torch.linalg.svdvals(cross).clamp(-1.0, 1.0)  # descending: angles ascend
    sines = torch.linalg.svdvals(orthonormal_b - orthonormal_a @ cross).flip(0).clamp(0.0, 1.0)  # ascending
    # arccos loses small angles (cos ~ 1: 1e-16 in the cosine is 1e-6 degrees), arcsin
    # large ones: each angle from the one that is exact there (Knyazev and Argentati 2002).
    return torch.rad2deg(torch.where(cosines > 0.5**0.5, torch.arcsin(sines), torch.arccos(cosines)))
