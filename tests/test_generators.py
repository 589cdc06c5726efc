import pytest
import torch

from fdpipe.generators import load_generator
from fdpipe.generators.base import load_run_generator, resolve_factory
from fdpipe.generators.flow import FlowConfig, FlowMLP, build_flow, save_flow
from fdpipe.generators.pretrain import PretrainConfig, pretrain_flow
from fdpipe.sample import balanced_labels, sample_images

SMALL = FlowConfig(resolution=8, hidden=32, blocks=1)


def test_flow_sample_shape_and_range():
    model = FlowMLP(SMALL)
    torch.nn.init.normal_(model.output.weight, std=1.0)
    noise = torch.randn(6, 1, 8, 8)
    labels = torch.arange(6) % 10
    for steps in (1, 3):
        images = model.sample(noise, labels, steps)
        assert images.shape == (6, 1, 8, 8)
        assert float(images.abs().max()) <= 1.0


def test_one_step_is_euler_step():
    model = FlowMLP(SMALL)
    torch.nn.init.normal_(model.output.weight, std=0.01)
    noise = 0.1 * torch.randn(4, 1, 8, 8)
    labels = torch.zeros(4, dtype=torch.long)
    expected = noise + model.velocity(noise, torch.zeros(4), labels)
    torch.testing.assert_close(model.sample(noise, labels, 1), expected.clamp(-1, 1))


def test_one_step_path_is_differentiable():
    model = FlowMLP(SMALL)
    torch.nn.init.normal_(model.output.weight, std=0.01)
    images = model.sample(0.1 * torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 1)
    images.sum().backward()
    assert model.output.weight.grad is not None
    assert float(model.output.weight.grad.abs().sum()) > 0


def test_guidance_one_equals_conditional():
    model = FlowMLP(SMALL)
    torch.nn.init.normal_(model.output.weight, std=0.01)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    torch.testing.assert_close(model.guided_velocity(x, t, y, 1.0), model.velocity(x, t, y))
    guided = model.guided_velocity(x, t, y, 2.0)
    null = torch.full_like(y, 10)
    expected = 2 * model.velocity(x, t, y) - model.velocity(x, t, null)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    model = FlowMLP(SMALL)
    torch.nn.init.normal_(model.output.weight, std=0.01)
    path = tmp_path / "flow.pt"
    save_flow(path, model)
    loaded = load_generator("fdpipe.generators.flow:build_flow", str(path))
    noise = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(loaded.sample(noise, labels, 2), model.sample(noise, labels, 2))


def test_pretrain_lowers_loss():
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8).numpy()
    images[:, :, 2:6, 2:6] = 255
    labels = (torch.arange(64) % 10).numpy()
    _, _, history = pretrain_flow(images, labels, SMALL,
                                  PretrainConfig(steps=60, batch_size=32, lr=3e-3, log_every=20))
    assert history[-1]["loss"] < history[0]["loss"]


def test_plugin_factory_by_import_path(tmp_path):
    model = load_generator("tests.plugin_generator:build", None, {"resolution": 8})
    assert model.image_shape == (1, 8, 8)
    images, labels = sample_images(model, 25, 1, batch_size=10)
    assert images.shape == (25, 1, 8, 8)
    assert labels.tolist() == balanced_labels(25, 10).tolist()


def test_factory_path_errors():
    with pytest.raises(ValueError, match="package.module:function"):
        resolve_factory("tests.plugin_generator.build")
    with pytest.raises(ImportError, match="no_such_module"):
        resolve_factory("no_such_module:build")
    with pytest.raises(AttributeError, match="missing_function"):
        resolve_factory("tests.plugin_generator:missing_function")


def test_wrong_range_output_rejected():
    model = load_generator("tests.plugin_generator:build_wrong_range", None)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        sample_images(model, 4, 1)


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_flow(str(tmp_path / "absent.pt"))


def test_load_run_generator_uses_ema(tmp_path):
    base = FlowMLP(SMALL)
    save_flow(tmp_path / "base.pt", base)
    tuned = FlowMLP(SMALL)
    torch.nn.init.normal_(tuned.output.weight, std=0.01)
    torch.save({"generator": {"factory": "fdpipe.generators.flow:build_flow",
                              "checkpoint": str(tmp_path / "base.pt"), "options": {}},
                "state_dict": base.state_dict(), "ema_state_dict": tuned.state_dict()},
               tmp_path / "run.pt")
    loaded = load_run_generator(str(tmp_path / "run.pt"))
    torch.testing.assert_close(loaded.output.weight, tuned.output.weight)
