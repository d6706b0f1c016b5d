"""The MLflow registry: log -> register -> alias -> load gives the very network that was logged;
the champion rule and where its decisions are recorded; URIs that cannot be resolved fail in one
line; loading never unpickles anything."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from models import registry
from models.card import ModelCard, Normalization
from models.zoo import build, build_from_card
from tasks.engine.model_io import load_model
from tasks.errors import ScanError

UNET_ARGS = {"channels": [4, 8], "num_res_units": 1}
UNET_CARD = ModelCard(architecture="unet", architecture_args=UNET_ARGS, in_channels=1,
                      classes=["interior", "membrane"], label_mapping={255: 0, 0: 1}, spatial_dims=2,
                      tile=[16, 16], normalization=Normalization(kind="zscore", mean=[0.5], std=[0.25]),
                      dataset="toy_em")
DEEPLAB_ARGS = {"aspp_channels": 16}
DEEPLAB_CARD = ModelCard(architecture="deeplab", architecture_args=DEEPLAB_ARGS, in_channels=4,
                         classes=["background", "building"], spatial_dims=2, tile=[32, 32], dataset="toy_sat")


@pytest.fixture(scope="module", autouse=True)
def registry_home(tmp_path_factory):
    """A registry of this module's own (fresh SQLite under a fresh TILEWISE_HOME)."""
    import os

    import mlflow
    import mlflow.models

    original_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("registry-home").resolve()
    mp.setenv("TILEWISE_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.chdir(home)  # MLflow's cwd-relative defaults (./mlruns) must not land in the repository
    # Speed only: MLflow otherwise spawns a Python subprocess per logged model to guess its pip
    # requirements (15-25 s each here); the fallback is MLflow's own default list.
    mp.setattr(mlflow.models, "infer_pip_requirements",
               lambda model_uri, flavor, fallback=None, **kw: list(fallback or []))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is fastest
    yield home
    torch.set_num_threads(threads)
    mp.undo()
    # mlflow.set_tracking_uri (called by registry.client) also exports MLFLOW_TRACKING_URI: undo that too
    mlflow.set_tracking_uri(original_uri)


def _perturbed(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights and BatchNorm statistics unlike any fresh build's, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        net.train()
        for _ in range(2):  # moves BatchNorm running statistics away from 0 / 1
            net(torch.rand((2, *_input_shape(net)), generator=g) * 3 + 1)
    return net.eval()


def _input_shape(net) -> tuple[int, ...]:
    return (4, 32, 32) if hasattr(net, "aspp") else (1, 16, 16)


def _log(net, card: ModelCard, example: np.ndarray, dataset: str) -> tuple[str, str]:
    import mlflow

    with mlflow.start_run(experiment_id=registry.experiment_id(dataset)) as run:
        info = registry.log_model(net, card, example)
    return info.model_uri, run.info.run_id


def _out(module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return module(torch.from_numpy(x))


@pytest.fixture(scope="module")
def unet_champion():
    torch.manual_seed(1)
    net = _perturbed(build("unet", 2, 1, 2, **UNET_ARGS), seed=1)
    example = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    uri, run_id = _log(net, UNET_CARD, example, "toy_em")
    promotion = registry.register_and_promote("toy_em-unet", uri, run_id, "val_dice", 0.5)
    return net, promotion


def test_embedded_artifacts_live_under_tilewise_home(registry_home):
    """The embedded default keeps artifacts in $TILEWISE_HOME/mlflow-artifacts/<dataset>, not in
    MLflow's ./mlruns of whatever the current directory is."""
    import mlflow

    experiment = registry.client().get_experiment(registry.experiment_id("toy_where"))
    assert experiment.artifact_location == (registry_home / "mlflow-artifacts" / "toy_where").as_uri()
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_dict({"a": 1}, "probe.json")
    assert run.info.artifact_uri.startswith((registry_home / "mlflow-artifacts").as_uri())
    assert not (registry_home / "mlruns").exists()


def test_unet_loaded_by_alias_is_the_logged_network(unet_champion):
    net, promotion = unet_champion
    assert (promotion.name, promotion.version, promotion.alias) == ("toy_em-unet", "1", "champion")
    loaded = load_model("models:/toy_em-unet@champion")
    assert loaded.identity == "models:/toy_em-unet/1"  # outputs record the version, not the alias
    assert loaded.card == UNET_CARD
    assert not loaded.module.training
    rng = np.random.default_rng(5)
    for shape in [(1, 1, 16, 16), (3, 1, 32, 48)]:
        x = rng.random(shape, dtype=np.float32)
        assert torch.equal(_out(loaded.module, x), _out(net, x))
    # the check can fail: a network merely rebuilt from the card is a different function
    torch.manual_seed(1)
    fresh = build_from_card(UNET_CARD).eval()
    assert not torch.allclose(_out(fresh, x), _out(net, x))


def test_unet_loaded_by_version_is_the_logged_network(unet_champion):
    net, _ = unet_champion
    loaded = load_model("models:/toy_em-unet/1")
    assert loaded.identity == "models:/toy_em-unet/1"
    x = np.random.default_rng(6).random((2, 1, 16, 16), dtype=np.float32)
    assert torch.equal(_out(loaded.module, x), _out(net, x))


def test_deeplab_roundtrip_is_identical():
    torch.manual_seed(2)
    net = _perturbed(build("deeplab", 2, 4, 2, **DEEPLAB_ARGS), seed=2)
    example = np.random.default_rng(1).random((1, 4, 32, 32), dtype=np.float32)
    uri, run_id = _log(net, DEEPLAB_CARD, example, "toy_sat")
    promotion = registry.register_and_promote("toy_sat-deeplab", uri, run_id, "val_dice", 0.3)
    assert promotion.alias == "champion"
    x = np.random.default_rng(7).random((2, 4, 33, 47), dtype=np.float32)  # odd sizes, batch of 2
    for uri in ("models:/toy_sat-deeplab@champion", f"models:/toy_sat-deeplab/{promotion.version}"):
        loaded = load_model(uri)
        assert loaded.card == DEEPLAB_CARD
        assert not loaded.module.training  # BatchNorm in inference mode, with the logged statistics
        assert torch.equal(_out(loaded.module, x), _out(net, x))
        bn = dict(loaded.module.named_buffers())
        for name, value in net.named_buffers():
            assert torch.equal(bn[name], value), name


def test_champion_rule_and_where_decisions_are_recorded():
    c = registry.client()
    name = "toy_rule-unet"
    versions = {}
    for i, value in enumerate([0.60, 0.70, 0.65, 0.70]):
        torch.manual_seed(10 + i)
        net = build("unet", 2, 1, 2, **UNET_ARGS)
        x = np.zeros((1, 1, 16, 16), np.float32)
        uri, run_id = _log(net, UNET_CARD, x, "toy_rule")
        p = registry.register_and_promote(name, uri, run_id, "val_dice", value)
        versions[p.version] = (p, run_id)
        assert p.version == str(i + 1)
        mv = c.get_model_version(name, p.version)
        # recorded on the version and on its run, read back through MLflow
        assert mv.tags["promotion"] == p.decision
        assert mv.tags["metric_name"] == "val_dice" and float(mv.tags["metric_value"]) == value
        assert mv.tags["run_id"] == run_id
        run_tags = c.get_run(run_id).data.tags
        assert run_tags["tilewise.promotion"] == p.decision
        assert run_tags["tilewise.registered_version"] == f"{name}/{p.version}"

        champion = c.get_model_version_by_alias(name, "champion").version
        if i == 0:  # first version: champion
            assert p.alias == "champion" and p.decision.startswith("champion: first version")
            assert str(champion) == "1"
        elif i == 1:  # better: the new champion
            assert p.alias == "champion" and p.decision.startswith("champion:")
            assert "beats version 1" in p.decision
            assert str(champion) == "2"
            assert "champion" not in c.get_model_version(name, "1").aliases
        elif i == 2:  # worse: challenger, the champion stays
            assert p.alias == "challenger" and p.decision.startswith("challenger:")
            assert "champion version 2" in p.decision
            assert str(champion) == "2"
            assert str(c.get_model_version_by_alias(name, "challenger").version) == "3"
        else:  # equal is not better
            assert p.alias == "challenger"
            assert str(champion) == "2"
            assert str(c.get_model_version_by_alias(name, "challenger").version) == "4"
    assert load_model(f"models:/{name}@champion").identity == f"models:/{name}/2"


def test_champion_rule_lower_is_better():
    name = "toy_loss-unet"
    aliases = []
    for i, value in enumerate([0.40, 0.30, 0.35]):
        torch.manual_seed(20 + i)
        uri, run_id = _log(build("unet", 2, 1, 2, **UNET_ARGS), UNET_CARD, np.zeros((1, 1, 16, 16), np.float32),
                           "toy_loss")
        aliases.append(registry.register_and_promote(name, uri, run_id, "val_loss", value,
                                                     higher_is_better=False).alias)
    assert aliases == ["champion", "champion", "challenger"]
    assert str(registry.client().get_model_version_by_alias(name, "champion").version) == "2"


@pytest.mark.parametrize("uri, problem", [
    ("models:/no_such_model@champion", "no registered model named 'no_such_model'"),
    ("models:/toy_em-unet@bogus", "registered model 'toy_em-unet' has no alias 'bogus'"),
    ("models:/toy_em-unet/99", "registered model 'toy_em-unet' has no version 99"),
    ("models:/toy_em-unet", "not a model URI"),
    ("models:/toy_em-unet/latest", "not a model URI"),
    ("models:/toy_em-unet@", "not a model URI"),
    ("models:/a/b/c", "not a model URI"),
    ("models:/", "not a model URI"),
])
def test_unresolvable_uris_fail_in_one_line(unet_champion, uri, problem):
    with pytest.raises(ScanError) as info:
        load_model(uri)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{uri}: ")
    assert problem in message
    assert info.value.path == uri


def test_loading_never_unpickles(unet_champion, monkeypatch):
    import _pickle

    import mlflow.pytorch

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled while loading a registered model")

    class Refuser:
        def __init__(self, *args, **kwargs):
            refuse()

    for module in (pickle, _pickle):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "loads", refuse)
        monkeypatch.setattr(module, "Unpickler", Refuser)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(mlflow.pytorch, "load_model", refuse)
    with pytest.raises(AssertionError):  # the guard itself works
        pickle.loads(pickle.dumps(1))

    net, _ = unet_champion
    loaded = registry.load_registered("models:/toy_em-unet@champion")
    x = np.random.default_rng(8).random((1, 1, 16, 16), dtype=np.float32)
    assert torch.equal(_out(loaded.module, x), _out(net, x))


def test_logged_model_stores_its_weights_once_with_a_small_input_example(registry_home):
    """The review found 12-19 MB input examples per model (a whole training patch serialised as JSON,
    twice) and every model's weights stored twice (an mlflow.pytorch model plus tilewise's
    safetensors). The bound: the safetensors weights once (x 1.3 leaves room for nothing like a second
    copy), plus 1 MB for the card, MLmodel, the pyfunc's code and a 2 x 1 x 64 x 64 float32 example
    (32 KB of numbers, ~0.2 MB as MLflow's JSON; the full 256 x 256 patch given here would be ~3 MB of
    JSON in each of two files). The network is big enough (3.3 MB of weights) that a second copy
    would break the bound."""
    import json

    args = {"channels": [32, 64, 128, 256], "num_res_units": 1}
    card = UNET_CARD.model_copy(update={"architecture_args": args})
    torch.manual_seed(3)
    net = build("unet", 2, 1, 2, **args).eval()
    patch = np.random.default_rng(3).standard_normal((1, 1, 256, 256)).astype(np.float32)
    uri, run_id = _log(net, card, patch, "toy_small")
    root = registry_home / "mlflow-artifacts" / "toy_small"
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    weights = [path for path in sizes if path.endswith("weights.safetensors")]
    assert len(weights) == 1, sizes
    state_bytes = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    assert sizes[weights[0]] >= state_bytes > 1_500_000  # the weights are in it, and big enough to see twice
    assert sum(sizes.values()) < 1.3 * sizes[weights[0]] + 1_000_000, sizes
    example_file = next(p for p in root.rglob("input_example.json"))
    data = json.loads(example_file.read_text())
    values = np.asarray(data["inputs"] if isinstance(data, dict) and "inputs" in data else data)
    assert values.shape == (2, 1, 64, 64)  # a centre crop, batch of two
    np.testing.assert_allclose(values[0, 0], patch[0, 0, 96:160, 96:160], rtol=1e-6)
    # the signature leaves batch and spatial axes free: MLflow's tools take any tile size
    import mlflow

    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.inputs[0].shape == (-1, 1, -1, -1)
    assert signature.outputs.inputs[0].shape == (-1, 2, -1, -1)


def test_mlflow_pyfunc_predicts_what_the_network_computes(unet_champion):
    """MLflow's own tools load the logged model (a models-from-code pyfunc) and predict any tile size;
    the reference is the network that was logged, run directly."""
    import mlflow.pyfunc

    net, promotion = unet_champion
    model = mlflow.pyfunc.load_model(f"models:/{promotion.name}/{promotion.version}")
    x = np.random.default_rng(9).random((3, 1, 32, 48), dtype=np.float32)
    y = model.predict(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (3, 2, 32, 48)
    np.testing.assert_array_equal(y, _out(net, x).numpy())


def test_versions_logged_in_the_old_layout_still_load(registry_home):
    """Versions registered before issue 8 keep their weights in the run's tilewise/ folder (beside an
    mlflow.pytorch model, left out here): they load from there."""
    import mlflow
    from safetensors.torch import save_file

    torch.manual_seed(4)
    net = _perturbed(build("unet", 2, 1, 2, **UNET_ARGS), seed=4)
    c = registry.client()
    with mlflow.start_run(experiment_id=registry.experiment_id("toy_old")) as run:
        folder = registry_home / "old-layout"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "weights.safetensors"))
        (folder / "card.json").write_text(UNET_CARD.model_dump_json())
        mlflow.log_artifacts(str(folder), artifact_path=registry.ARTIFACT_DIR)
    c.create_registered_model("toy_old-unet")
    version = c.create_model_version("toy_old-unet", source=f"{run.info.artifact_uri}/model",
                                     run_id=run.info.run_id).version
    loaded = registry.load_registered(f"models:/toy_old-unet/{version}")
    assert loaded.card == UNET_CARD
    x = np.random.default_rng(10).random((2, 1, 16, 16), dtype=np.float32)
    assert torch.equal(_out(loaded.module, x), _out(net, x))


def test_a_calibrator_stored_after_registration_comes_with_the_loaded_model():
    """The run's tilewise/ folder now holds only what comes later (models/calibrator_store.py): the
    loader still finds the calibrator there, beside weights that live in the MLflow model."""
    import json

    from models import calibrator_store

    torch.manual_seed(5)
    uri, run_id = _log(build("unet", 2, 1, 2, **UNET_ARGS), UNET_CARD, np.zeros((1, 1, 16, 16), np.float32),
                       "toy_cal")
    promotion = registry.register_and_promote("toy_cal-unet", uri, run_id, "val_dice", 0.5)
    version_uri = f"models:/{promotion.name}/{promotion.version}"
    assert registry.load_registered(version_uri).calibrator is None
    calibrator_store.store_calibrator(version_uri, json.dumps({"method": "cubic", "params": [1, 2]}),
                                      {"method": "cubic"}, {})
    assert registry.load_registered(version_uri).calibrator == {"method": "cubic", "params": [1, 2]}


def test_logging_a_model_prints_no_advice_about_type_hints(tmp_path):
    """MLflow advised type hints on the pyfunc's predict at every logged model (six times a nightly,
    with raw ANSI colour codes in a log): the hint is there now, one MLflow accepts without
    inferring a schema from it, so nothing is printed and the logged signature still holds. A fresh
    process: MLflow warns once per process and function."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np, mlflow
from models import registry
from models.zoo import build
from tests.test_registry import UNET_ARGS, UNET_CARD
net = build("unet", 2, 1, 2, **UNET_ARGS).eval()
with mlflow.start_run(experiment_id=registry.experiment_id("toy_hints")):
    info = registry.log_model(net, UNET_CARD, np.zeros((1, 1, 16, 16), np.float32))
print(mlflow.models.get_model_info(info.model_uri).signature.inputs.inputs[0].shape)
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    from pathlib import Path

    env.update(TILEWISE_HOME=str(tmp_path), PYTHONWARNINGS="always",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "(-1, 1, -1, -1)"
    assert "type hint" not in done.stderr.lower(), done.stderr[-3000:]
