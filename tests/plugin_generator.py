"""An external generator factory used by the tests through its import path."""

import torch


class TinyGenerator(torch.nn.Module):
    """One linear layer from noise to an 8x8 gray image, squashed into [-1, 1]."""

    def __init__(self, resolution: int = 8):
        super().__init__()
        self.image_shape = (1, resolution, resolution)
        self.num_classes = 10
        pixels = resolution * resolution
        self.linear = torch.nn.Linear(pixels, pixels)
        self.label = torch.nn.Embedding(10, pixels)

    def sample(self, noise, labels, steps, guidance_scale=1.0):
        flat = self.linear(noise.flatten(1)) + self.label(labels)
        return torch.tanh(flat).view(noise.shape)


def build(checkpoint=None, resolution=8):
    model = TinyGenerator(resolution)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    return model


def build_wrong_range(checkpoint=None):
    model = TinyGenerator()
    model.sample = lambda noise, labels, steps, guidance_scale=1.0: 3.0 * noise
    return model


def build_wrong_shape(checkpoint=None):
    model = TinyGenerator()
    model.sample = lambda noise, labels, steps, guidance_scale=1.0: noise[:, :, :4, :4].tanh()
    return model
