"""Architectures (features/head split, named blocks, last-k cut) and checkpoints that load safely."""
from __future__ import annotations

import pickle

import pytest
import torch

from robust_transfer.config import ConfigError
from robust_transfer.nets import build_net, from_spec, load_model, net_spec, save_model

ARCHS = [("small_cnn", 1, 8), ("small_cnn", 2, 28), ("preact_resnet18", 1, 8), ("wide_resnet", 1, 8)]


@pytest.mark.parametrize("arch,width,size", ARCHS)
def test_features_head_split_and_named_blocks(arch, width, size):
    torch.manual_seed(0)
    net = build_net(arch, 1, 4, size, width).eval()
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        logits = net(x)
        z = net.features(x)
        assert logits.shape == (3, 4) and z.shape == (3, net.feature_dim)
        assert torch.allclose(net.head(z), logits, atol=1e-6)
        names = net.block_names
        assert len(names) == len(set(names)) >= 3 and all(isinstance(n, str) and not n.isdigit() for n in names)
        stages = net.stages(x)
        assert len(stages) == len(names) and torch.allclose(stages[-1], z, atol=1e-6)
        for k in sorted({0, 1, 2, len(names) // 2, len(names)}):  # trunk then tail: the whole feature extractor
            h = net.trunk(x, k)
            assert torch.allclose(net.tail(h, k), z, atol=1e-5), k
        with pytest.raises(ConfigError, match="out of range"):
            net.trunk(x, len(names) + 1)


def test_normalisation_is_inside_the_model():
    net = build_net("small_cnn", 3, 2, 8, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2]).eval()
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    assert torch.allclose(net.normalize(x), expected)
    with torch.no_grad():
        assert torch.allclose(net.features(x), net.blocks(expected))


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="unknown architecture 'vgg'"):
        build_net("vgg", 1, 2, 8)


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    net = build_net("small_cnn", 1, 5, 8).eval()
    spec = net_spec("small_cnn", (8, 8, 1), 5, 1)
    path = tmp_path / "m.pt"
    save_model(net, spec, path, extra={"run_id": "abc", "data_hash": "123"})
    raw = torch.load(path, weights_only=True)  # what a consumer does: plain tensors and JSON-able values
    assert raw["spec"] == spec
    back, extra = load_model(path, expect_arch="small_cnn")
    assert extra == {"run_id": "abc", "data_hash": "123"}
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), net(x))
    assert from_spec(spec).feature_dim == net.feature_dim
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"], "save_model left a temporary file behind"


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "m.pt"
    save_model(build_net("preact_resnet18", 1, 5, 8), net_spec("preact_resnet18", (8, 8, 1), 5, 1), path)
    with pytest.raises(ConfigError, match="holds a 'preact_resnet18' checkpoint, expected 'small_cnn'"):
        load_model(path, expect_arch="small_cnn")
    # weights of one architecture under the spec of another
    torch.save({"spec": net_spec("small_cnn", (8, 8, 1), 5, 1),
                "state_dict": torch.load(path, weights_only=True)["state_dict"], "extra": {}}, path)
    with pytest.raises(ConfigError, match="does not fit architecture"):
        load_model(path)
    # the right architecture, another width
    save_model(build_net("small_cnn", 1, 5, 8, width=2), net_spec("small_cnn", (8, 8, 1), 5, 1), path)
    with pytest.raises(ConfigError, match="does not fit architecture"):
        load_model(path)


class _Exploit:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_that_is_not_a_state_dict_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"spec": {"arch": "small_cnn"}, "state_dict": _Exploit(str(marker))}, path)
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        load_model(path)
    assert not marker.exists(), "the checkpoint's code ran"
    # a plain pickle (not a torch zip archive) of the same
    path.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        load_model(path)
    assert not marker.exists()
    # sanity: the payload does run when unpickled, so the test above can fail
    pickle.loads(path.read_bytes()).close()
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_missing_empty_or_garbage_checkpoint(tmp_path, content):
    path = tmp_path / "m.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="m.pt"):
        load_model(path)


def test_state_dict_without_spec(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(build_net("small_cnn", 1, 5, 8).state_dict(), path)  # a bare state dict: no spec to rebuild from
    with pytest.raises(ConfigError, match="no spec/state_dict"):
        load_model(path)
