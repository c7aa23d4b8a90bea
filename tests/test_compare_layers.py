"""Every method of the comparison sparsifies the same layers as DRESS, whatever DRESS's rule for
which layers stay dense (``dense_first_last``, ``dense_layers``): otherwise a table would set
DRESS's sparse first layer against a peer whose first layer stayed dense."""
import itertools

import pytest

from minidress.app.compare import _make_peer
from minidress.app.experiment import RunConfig
from minidress.baselines import LCSLine, LCSPoint
from minidress.dress import Dress, DressOptions, sparsifiable_layers
from minidress.nn.metrics import macs
from minidress.nn.models import mlp, preact_resnet, small_cnn

RULES = [{"dense_first_last": dfl, "dense_layers": rule}
         for dfl, rule in itertools.product((True, False), ("first_last", "small"))]
# A first layer with rows of 30 weights (> SMALL_ROW): "small" sparsifies it, "first_last" not.
MODELS = {"mlp": lambda: mlp([30, 8, 7, 3], seed=0),
          "cnn": lambda: small_cnn(seed=0),
          "resnet": lambda: preact_resnet((1, 12, 12), widths=(4, 8, 8), seed=0)}


@pytest.mark.parametrize("model,rule", list(itertools.product(MODELS, range(len(RULES)))))
def test_peers_sparsify_the_layers_dress_sparsifies(model, rule):
    options = DressOptions(**RULES[rule])
    cfg = RunConfig(model="mlp", dress=options, quiet=True)
    expected = list(Dress(MODELS[model](), options).layers)
    for name in ("alternating", "LCS+P", "LCS+L"):
        peer, _, _ = _make_peer(name, MODELS[model](), cfg, None, 10, {}, 0.025, 1.0, 0.1)
        layers = peer.dress.layers if name == "alternating" else peer.layers
        assert list(layers) == expected, (name, RULES[rule])
        if name != "alternating":
            assert peer.options()["dense_layers"] == options.dense_layers


def test_the_rules_differ_where_the_first_layer_is_wide():
    """Else the test above could not tell a peer that ignores ``dense_layers``."""
    wide = MODELS["mlp"]()
    assert list(sparsifiable_layers(wide, True, "first_last")) == ["3"]
    assert list(sparsifiable_layers(wide, True, "small")) == ["1", "3"]
    assert list(LCSPoint(wide, dense_layers="small").layers) == ["1", "3"]
    assert list(LCSLine(MODELS["mlp"](), dense_layers="small").layers) == ["1", "3"]
    assert list(LCSPoint(MODELS["mlp"](), dense_layers="first_last").layers) == ["3"]
    assert list(LCSPoint(MODELS["mlp"]()).layers) == list(Dress(MODELS["mlp"]()).layers)  # defaults


@pytest.mark.parametrize("build", [lambda: small_cnn((1, 8, 8), seed=0),
                                   lambda: preact_resnet((1, 28, 28), seed=0)])
def test_small_is_first_last_on_the_digits_cnn_and_the_resnet(build):
    """Both start with a 3x3 conv on one channel (rows of 9 weights), which "small" keeps dense."""
    model = build()
    first = next(layer for _, layer in model.named_layers() if hasattr(layer, "params")
                 and "weight" in layer.params)
    assert first.params["weight"][0].size == 9
    assert list(sparsifiable_layers(model, True, "small")) == \
        list(sparsifiable_layers(model, True, "first_last"))


def test_small_sparsifies_most_of_the_mnist_mlps_macs():
    """MNIST's MLP 784-300-100-10: "first_last" sparsifies only the 300x100 layer (11% of the
    MACs), "small" every layer but the classifier."""
    def kept(rule, d):
        dress = Dress(mlp([784, 300, 100, 10], seed=0), dense_layers=rule)
        dense = macs(dress.model, (784,))
        return macs(dress.use(d).model, (784,)) / dense
    assert list(Dress(mlp([784, 300, 100, 10], seed=0), dense_layers="small").layers) == ["1", "3"]
    assert kept("first_last", 0.1) > 0.89 and kept("small", 0.1) < 0.11
    assert abs(kept("small", 0.5) - 0.5) < 0.01


def test_dense_layers_is_checked_and_recorded_in_checkpoints(tmp_path):
    for cls in (LCSPoint, LCSLine):
        with pytest.raises(ValueError, match="dense_layers must be one of"):
            cls(MODELS["mlp"](), dense_layers="big")
        peer = cls(MODELS["mlp"](), dense_layers="small")
        peer.save(tmp_path / "small.npz")
        with pytest.raises(ValueError, match="dense_layers: file 'small', here 'first_last'"):
            cls(MODELS["mlp"](), dense_layers="first_last").load(tmp_path / "small.npz")
        cls(MODELS["mlp"](), dense_layers="small").load(tmp_path / "small.npz")


def test_a_checkpoint_from_before_dense_layers_loads_as_first_last(tmp_path, monkeypatch):
    """Checkpoints written before the option existed sparsified as "first_last"."""
    peer = LCSPoint(MODELS["mlp"](), dense_layers="first_last")
    old_options = {k: v for k, v in peer.options().items() if k != "dense_layers"}
    monkeypatch.setattr(peer, "options", lambda: old_options)
    peer.save(tmp_path / "old.npz")
    LCSPoint(MODELS["mlp"](), dense_layers="first_last").load(tmp_path / "old.npz")
    with pytest.raises(ValueError, match="dense_layers: file 'first_last', here 'small'"):
        LCSPoint(MODELS["mlp"](), dense_layers="small").load(tmp_path / "old.npz")



def test_an_alternating_checkpoint_from_before_dense_layers_loads_as_first_last(tmp_path, monkeypatch):
    from minidress.baselines import Alternating
    peer = Alternating(MODELS["mlp"](), levels=(1.0, 0.5), dense_layers="first_last")
    old_options = {k: v for k, v in peer.options().items() if k != "dense_layers"}
    monkeypatch.setattr(peer, "options", lambda: old_options)
    peer.save(tmp_path / "old.npz")
    Alternating(MODELS["mlp"](), levels=(1.0, 0.5), dense_layers="first_last").load(tmp_path / "old.npz")
    with pytest.raises(ValueError, match="dense_layers: file 'first_last', here 'small'"):
        Alternating(MODELS["mlp"](), levels=(1.0, 0.5)).load(tmp_path / "old.npz")
