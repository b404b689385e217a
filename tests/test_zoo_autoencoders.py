"""Autoencoders: forward/backward of every kind on tiny shapes, the denoising model's
corruption (training only), the principal-angle computation on known subspaces, and the
autoencoder task end to end on a few steps."""

import argparse
import math

import pytest
import torch

from fastattn.zoo.autoencoder_task import AutoencoderTask
from fastattn.zoo.autoencoders import KINDS, Autoencoder, build_autoencoder, pca_basis, principal_angles_degrees
from tests.zoo_helpers import train_arguments


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_every_kind(kind):
    torch.manual_seed(0)
    model = build_autoencoder(kind, input_dim=13, hidden=6)
    inputs = torch.rand(5, 13)
    reconstruction = model(inputs)
    assert reconstruction.shape == (5, 13)
    torch.nn.functional.mse_loss(reconstruction, inputs).backward()
    gradients = [parameter.grad for parameter in model.parameters()]
    assert all(gradient is not None and torch.isfinite(gradient).all() for gradient in gradients)
    assert model.encoder[0].weight.grad.abs().sum() > 0 and model.decoder[-2 if kind != "linear" else -1].bias.grad.abs().sum() > 0
    if kind != "linear":
        assert ((reconstruction > 0) & (reconstruction < 1)).all()  # sigmoid output for pixels in [0, 1]


def test_layer_sizes_are_mirrored():
    deep = build_autoencoder("deep", input_dim=64, hidden=7)
    sizes = [(layer.in_features, layer.out_features) for layer in deep.modules() if isinstance(layer, torch.nn.Linear)]
    assert sizes == [(64, 14), (14, 7), (7, 14), (14, 64)]
    linear = build_autoencoder("linear", input_dim=64, hidden=7)
    assert all(isinstance(layer, torch.nn.Linear) for layer in [*linear.encoder, *linear.decoder])


def test_linear_autoencoder_is_affine():
    model = build_autoencoder("linear", input_dim=6, hidden=2)
    a, b = torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(model(a + b) - model(b), model(a) - model(torch.zeros(3, 6)), atol=1e-5, rtol=0)


def test_denoising_corrupts_only_while_training():
    torch.manual_seed(0)
    model = build_autoencoder("denoising", input_dim=8, hidden=4, noise_std=0.5)
    inputs = torch.rand(4, 8)
    model.eval()
    assert torch.equal(model(inputs), model(inputs))
    model.train()
    assert not torch.equal(model(inputs), model(inputs))
    plain = build_autoencoder("undercomplete", input_dim=8, hidden=4)
    plain.train()
    assert torch.equal(plain(inputs), plain(inputs))


def test_principal_angles_of_known_subspaces():
    theta = 0.3
    plane = torch.eye(3)[:, :2]
    tilted = torch.tensor([[1.0, 0.0], [0.0, math.cos(theta)], [0.0, math.sin(theta)]])
    angles = principal_angles_degrees(plane, tilted)
    torch.testing.assert_close(angles, torch.tensor([0.0, math.degrees(theta)], dtype=torch.float64), atol=1e-6, rtol=0)
    # any basis of the same span gives the same angles; orthogonal spans give 90 degrees
    mixed = tilted @ torch.tensor([[2.0, 1.0], [-1.0, 3.0]])
    torch.testing.assert_close(principal_angles_degrees(plane, mixed), angles, atol=1e-6, rtol=0)
    torch.testing.assert_close(principal_angles_degrees(torch.eye(4)[:, :2], torch.eye(4)[:, 2:]), torch.full((2,), 90.0, dtype=torch.float64))


def test_pca_basis_finds_the_spread_directions():
    torch.manual_seed(0)
    directions = torch.linalg.qr(torch.randn(10, 2)).Q
    data = torch.randn(500, 2) * torch.tensor([5.0, 3.0]) @ directions.T + 0.01 * torch.randn(500, 10) + 4.0
    assert principal_angles_degrees(pca_basis(data, 2), directions).max() < 1.0


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: principal_angles_degrees(torch.eye(3)[:, :2], torch.eye(3)[:, :1]), ValueError),
        (lambda: principal_angles_degrees(torch.eye(3, dtype=torch.int64), torch.eye(3)), TypeError),
        (lambda: build_autoencoder("sparse", 8, 2), ValueError),
        (lambda: Autoencoder(8, [4], noise_std=-1.0), ValueError),
        (lambda: build_autoencoder("deep", 8, 2)(torch.rand(3, 9)), ValueError),
    ],
)
def test_bad_input(call, error):
    with pytest.raises(error):
        call()


def _task(*flags):
    return AutoencoderTask(train_arguments("autoencoder", *flags), torch.device("cpu"))


def test_task_trains_evaluates_plots_and_restores(tmp_path):
    torch.manual_seed(0)
    task = _task("--model", "denoising", "--hidden", "8")
    optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-2)
    with torch.no_grad():
        before, _ = task.evaluate(task.model, "test")
    for batch in task.batches("train", 64, torch.Generator().manual_seed(0)):
        loss, count = task.loss(task.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after, lines = task.evaluate(task.model, "test")
        paths = task.plot(task.model, "test", tmp_path)
    assert count == len(batch) and after["mse"] < 0.7 * before["mse"]
    assert len(lines) == after["images"] and lines[0].startswith("label=")
    assert paths[0].stat().st_size > 0
    restored = AutoencoderTask(argparse.Namespace(data=None), torch.device("cpu"), task.state_dict())
    restored.model.load_state_dict(task.model.state_dict())
    with torch.no_grad():
        assert restored.evaluate(restored.model, "test")[0] == after
