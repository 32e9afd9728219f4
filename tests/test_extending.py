"""Plugins (`ktl.plugins`, ``ktl --plugin``, entry points) and the three examples of docs/extending.md,
run end to end through the real CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import ktl.plugins as plugins
from ktl.cli import main
from ktl.clients import ClientModel
from ktl.clients.backbones import BACKBONES, ModuleBackbone, build_backbone, register_backbone
from ktl.config import SimulateConfig
from ktl.data import DATASETS, DataConfig, build_federated_data, pool_clients
from ktl.errors import ConfigError, DataError, KtlError
from ktl.generator import available_generators
from ktl.generator import registry as generator_registry
from ktl.methods import METHODS, SECTIONS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


@pytest.fixture(autouse=True)
def isolated_registries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test registers is gone afterwards, and plugins load afresh (other test files see only
    the built-in names)."""
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    registries: list[dict[str, Any]] = [BACKBONES, METHODS, SECTIONS, DATASETS, generator_registry._LOADERS]
    saved = [dict(r) for r in registries]
    loaded, discovered = dict(plugins._loaded), plugins._discovered
    plugins._loaded.clear()
    yield
    for registry, before in zip(registries, saved, strict=True):
        registry.clear()
        registry.update(before)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    plugins._discovered = discovered


def summary_of(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def smoke(*args: str, out: Path) -> list[str]:
    return ["simulate", "--preset", "smoke", "--rounds", "1", "--no-progress", "--out", str(out), *args]


# -- the three examples of docs/extending.md, through the CLI -------------------------------------------


def test_custom_cnn_example_trains_and_its_state_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "--plugin",
            str(EXAMPLES / "custom_cnn.py"),
            *smoke("--models", "my-cnn,cnn4", "--rounds", "2", out=out),
        ]
    )
    assert rc == 0
    summary = summary_of(out)
    assert summary["models"] == ["my-cnn", "cnn4"] and summary["method"] == "fedktl"
    assert summary["final_accuracy"] > 0.3  # 10 synthetic classes: chance is 0.1
    saved = sorted(p.name for p in (out / "clients").iterdir())
    assert saved[0] == "client-00-my-cnn.safetensors"
    # The plain module's client (backbone, head and the projector it distilled with) reloads into a fresh model.
    state = load_file(str(out / "clients" / saved[0]))
    model = ClientModel.build("my-cnn", num_channels=1, image_size=28, proto_dim=10)
    assert isinstance(model.backbone, ModuleBackbone) and model.backbone.feature_dim == 64
    if "projector.weight" in state:
        model.ensure_projector(state["projector.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.backbone.model.layers[0].weight, state["backbone.model.layers.0.weight"])


def test_toy_method_example_runs_its_own_server_step(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["--plugin", str(EXAMPLES / "toy_method.py"), *smoke("--method", "proto-median", out=out)])
    assert rc == 0
    summary = summary_of(out)
    assert summary["method"] == "proto-median"
    assert summary["final_accuracy"] > 0.3
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["classes_in_table"] == 10  # the median table's metric: every class is held by someone


def _rounds(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_plugin_methods_own_section_is_a_setting_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """Registering proto-median registers its section ``median``: a flag with its description, a key of the
    run configuration and of a federation spec (validated by the section's model), a property of both
    JSON schemas; an unknown key of it gets a did-you-mean, a bad value one line."""
    from ktl.api.schemas import FederationSpec
    from ktl.config import build_config, iter_settings

    plugins.load_plugin(str(EXAMPLES / "toy_method.py"))
    assert "median" in SECTIONS and not SECTIONS["median"].builtin
    setting = next(s for s in iter_settings() if s.name == "median.min_clients")
    assert setting.default == 1 and "median table" in setting.description
    config = build_config(preset="smoke", overrides={"method": "proto-median", "median": {"min_clients": 3}})
    assert config.section("median").min_clients == 3  # type: ignore[attr-defined]
    assert METHODS["proto-median"].settings_from(config).median.min_clients == 3  # type: ignore[attr-defined]
    with pytest.raises(
        ConfigError, match=r"median.min_client: unknown setting \(did you mean median.min_clients"
    ):
        build_config(overrides={"median": {"min_client": 3}})
    with pytest.raises(ConfigError, match="median.min_clients: Input should be greater than or equal to 1"):
        build_config(overrides={"median": {"min_clients": 0}})
    spec = FederationSpec.model_validate(
        {"method": "proto-median", "num_classes": 4, "median": {"min_clients": 2}}
    )
    assert spec.method_settings().median.min_clients == 2  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="section\\(s\\) median do not apply to method 'fedproto'"):
        FederationSpec.model_validate({"method": "fedproto", "num_classes": 4, "median": {}})
    for schema in (SimulateConfig.model_json_schema(), FederationSpec.model_json_schema()):
        assert "MedianSettings" in schema["$defs"] and "median" in schema["properties"]
    with pytest.raises(SystemExit):
        main(["--plugin", str(EXAMPLES / "toy_method.py"), "simulate", "--help"])
    assert "--median.min-clients" in capsys.readouterr().out


def test_a_section_is_one_model_whoever_declares_it() -> None:
    """A second method may read ``privacy`` (the same model); another model under that name, or a section
    named like a run setting, is refused when the method registers."""
    from pydantic import BaseModel, Field

    from ktl.methods import Method, MethodSettings, PrivacySettings, register_method

    class Other(BaseModel):
        epsilon: float = 1.0

    class Shares(MethodSettings):
        privacy: PrivacySettings = Field(default_factory=PrivacySettings)

    class Clashes(MethodSettings):
        privacy: Other = Field(default_factory=Other)

    class Reserved(MethodSettings):
        client: Other = Field(default_factory=Other)

    def method(settings: type[MethodSettings]) -> type[Method]:
        return type("M", (Method,), {"settings_model": settings, "client_update": lambda *a: None})

    register_method("shares-privacy")(method(Shares))
    with pytest.raises(ValueError, match="section 'privacy' is PrivacySettings"):
        register_method("clashes")(method(Clashes))
    with pytest.raises(ValueError, match="'client' is a run setting"):
        register_method("reserved")(method(Reserved))
    assert (
        "clashes" not in METHODS
        and "reserved" not in METHODS
        and SECTIONS["privacy"].model is PrivacySettings
    )


def test_a_plugin_section_reaches_the_server_step_in_simulate_and_over_http(tmp_path: Path) -> None:
    """``--median.min-clients 99`` (more than the 4 clients): no class qualifies, the median table is empty
    in every round — in ``ktl simulate`` and in ``ktl demo`` (a real HTTP server, the setting carried by
    the federation spec), where the default (1) tables every class (test above)."""
    plugin = ["--plugin", str(EXAMPLES / "toy_method.py")]
    sim = tmp_path / "sim"
    assert main([*plugin, *smoke("--method", "proto-median", "--median.min-clients", "99", out=sim)]) == 0
    assert [r["classes_in_table"] for r in _rounds(sim)] == [0.0]
    assert json.loads((sim / "config.json").read_text())["median"] == {"min_clients": 99}
    demo = tmp_path / "demo"
    argv = ["demo", "--preset", "smoke", "--method", "proto-median", "--clients", "4", "--rounds", "1"]
    assert main([*plugin, *argv, "--median.min-clients", "99", "--out", str(demo)]) == 0
    spec = next(demo.rglob("spec.json"), None)
    rounds = _rounds(demo) if (demo / "metrics.jsonl").is_file() else []
    assert rounds and [r.get("classes_in_table") for r in rounds] == [0.0], (spec, sorted(demo.rglob("*")))


@pytest.mark.slow  # make test-all (make test keeps the plugin section in simulate and over HTTP; Flower carries the same config)
def test_a_plugin_section_reaches_the_server_step_on_flower(tmp_path: Path) -> None:
    """The same on Flower's Simulation Engine, whose ClientApps run in Ray workers: the configuration
    travels pickled with the plugins it needs (`SimulateConfig.__reduce__`), which each worker loads."""
    pytest.importorskip("flwr")
    out = tmp_path / "flower"
    argv = ["flower", "simulate", "--preset", "smoke", "--method", "proto-median", "--rounds", "1"]
    rc = main(
        ["--plugin", str(EXAMPLES / "toy_method.py"), *argv, "--median.min-clients", "99", "--out", str(out)]
    )
    assert rc == 0
    assert [r["classes_in_table"] for r in _rounds(out)] == [0.0]
    assert json.loads((out / "config.json").read_text())["median"] == {"min_clients": 99}


def test_toy_method_takes_the_median_not_the_mean() -> None:
    from ktl.methods import MethodContext
    from ktl.records import Prototypes

    plugins.load_plugin(str(EXAMPLES / "toy_method.py"))
    cls = METHODS["proto-median"]
    method = cls(cls.settings_from({}), MethodContext(num_classes=2, proto_dim=2, class_names=None))
    rows = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # two clients agree on class 0, an outlier disagrees
    uploads = {
        f"c{i}": Prototypes(
            vectors=torch.tensor([row]), class_ids=torch.tensor([0]), counts=torch.tensor([1])
        ).to_bytes()
        for i, row in enumerate(rows)
    }
    update = method.server_update(uploads, 1)
    assert update.payload is not None
    table = Prototypes.from_bytes(update.payload)
    assert table.class_ids.tolist() == [0] and table.counts.tolist() == [3]
    torch.testing.assert_close(table.vectors.float(), torch.tensor([[1.0, 0.0]]))  # the mean would tilt


def test_png_folder_example_trains_on_class_named_pngs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("png_folder_example", EXAMPLES / "png_folder.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "run"
    extra = ["--rounds", "1", "--client.epochs", "10", "--client.batch-size", "8", "--method", "fedproto"]
    rc = example.main([str(tmp_path / "shapes"), *extra, "--no-progress", "--out", str(out)])
    assert rc == 0
    summary = summary_of(out)
    assert summary["class_names"] == ["circle", "cross", "square", "triangle"]
    assert summary["data"].startswith("image-folder:")
    assert summary["final_accuracy"] > 0.5  # 4 classes: chance is 0.25


# -- --plugin, KTL_PLUGINS and entry points --------------------------------------------------------------


def test_plugin_names_are_known_to_ktl_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "--plugin",
                str(EXAMPLES / "custom_cnn.py"),
                "--plugin=" + str(EXAMPLES / "toy_method.py"),
                "list",
            ]
        )
        == 0
    )
    listing = capsys.readouterr().out
    assert "my-cnn" in listing and "proto-median" in listing


def test_ktl_plugins_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(plugins.ENV_VAR, f" {EXAMPLES / 'toy_method.py'} , ")
    assert main(["list"]) == 0
    assert "proto-median" in capsys.readouterr().out


def test_a_plugin_after_the_subcommand_is_refused_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["list", "--plugin", str(EXAMPLES / "toy_method.py")])
    assert stop.value.code == 2


def test_loading_a_plugin_twice_is_harmless() -> None:
    first = plugins.load_plugin(str(EXAMPLES / "custom_cnn.py"))
    again = plugins.load_plugin(str(EXAMPLES / ".." / "examples" / "custom_cnn.py"))
    assert first is again and "my-cnn" in BACKBONES


@pytest.mark.parametrize(
    ("make_spec", "expected"),
    [
        (lambda tmp: str(tmp / "missing.py"), "no such file"),
        (lambda tmp: "ktl_no_such_plugin_module", "no module named 'ktl_no_such_plugin_module'"),
        (lambda tmp: "not a module!", "neither a .py file nor a dotted module path"),
    ],
)
def test_a_plugin_that_cannot_be_found_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_spec: Any, expected: str
) -> None:
    spec = make_spec(tmp_path)
    assert main(["--plugin", spec, "list"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(f"ktl: error: plugin {spec!r}") and expected in lines[0]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            'from ktl.clients.backbones import register_backbone\n@register_backbone("cnn4", "again")\n'
            "def build(c, s): ...\n",
            "backbone 'cnn4' is registered twice",
        ),
        ("import ktl_surely_missing_dependency\n", "No module named 'ktl_surely_missing_dependency'"),
        ("raise RuntimeError('boom\\nsecond line')\n", "RuntimeError: boom"),
        ("def broken(:\n", "SyntaxError"),
    ],
)
def test_a_plugin_that_fails_to_load_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, expected: str
) -> None:
    file = tmp_path / "bad_plugin.py"
    file.write_text(source)
    assert main(["--plugin", str(file), "list"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(f"ktl: error: plugin {str(file)!r} failed to load") and expected in lines[0]
    assert "cnn4" in BACKBONES and BACKBONES["cnn4"].summary != "again"


ENTRY_POINTS = """\
[ktl.backbones]
ep-net = ktl_ep_demo:TinyNet

[ktl.datasets]
ep-clients = ktl_ep_demo:three_clients

[ktl.methods]
ep-local = ktl_ep_methods

[ktl.generators]
ep-gen = ktl_ep_demo:load_generator
"""

EP_DEMO = '''\
"""A package's plugins, offered as objects: registered under the entry points' names."""
import numpy as np
from torch import nn

from ktl.data import pool_clients


class TinyNet(nn.Module):
    """A linear map of the flattened pixels, D declared as an attribute."""

    feature_dim = 16

    def __init__(self, num_channels, image_size):
        super().__init__()
        self.fc = nn.Linear(num_channels * image_size * image_size, self.feature_dim)

    def forward(self, x):
        return self.fc(x.flatten(1))


def three_clients(config, seed):
    rng = np.random.default_rng(seed)
    clients = []
    for i in range(3):
        y = np.arange(40) % 2
        x = np.where(y[:, None, None, None] == 1, 200, 30) + rng.integers(0, 20, size=(40, 1, 16, 16))
        clients.append((x[:30].astype(np.uint8), y[:30], x[30:].astype(np.uint8), y[30:]))
    return pool_clients(clients, ["dark", "bright"], source="ep-clients")


def load_generator(spec, device):
    raise NotImplementedError
'''

EP_METHODS = '''\
"""A package's plugin module: importing it registers a method with the decorator."""
from ktl.methods import LocalOnly, register_method


@register_method("ep-local")
class EpLocal(LocalOnly):
    pass
'''


@pytest.fixture
def installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution with entry points in every group: a dist-info on sys.path."""
    site = tmp_path / "site"
    dist = site / "ktl_ep_demo-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ktl-ep-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    (site / "ktl_ep_demo.py").write_text(EP_DEMO)
    (site / "ktl_ep_methods.py").write_text(EP_METHODS)
    monkeypatch.syspath_prepend(str(site))
    for name in ("ktl_ep_demo", "ktl_ep_methods"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    plugins._discovered = False


@pytest.mark.usefixtures("installed_package")
def test_entry_points_of_an_installed_package_are_discovered(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "--num-clients",
        "3",
        "--models",
        "ep-net",
        "--method",
        "ep-local",
        "--data.dataset",
        "ep-clients",
    ]
    assert main(smoke(*args, out=out)) == 0
    summary = summary_of(out)
    assert summary["class_names"] == ["dark", "bright"] and summary["data"] == "ep-clients"
    assert summary["models"] == ["ep-net"] and summary["method"] == "ep-local"
    assert summary["final_accuracy"] > 0.9  # two classes, 30 vs 200 grey levels
    assert "ep-gen" in available_generators()
    assert BACKBONES["ep-net"].summary == "A linear map of the flattened pixels, D declared as an attribute."
    plugins.discover_plugins()  # once per process: nothing is registered twice


@pytest.mark.usefixtures("installed_package")
def test_a_broken_entry_point_names_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "site" / "ktl_ep_demo.py").write_text("raise ImportError('needs libfoo')\n")
    assert main(["list"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1
    assert "entry point 'ep-net' (ktl_ep_demo:TinyNet) of group ktl.backbones" in lines[0]
    assert "needs libfoo" in lines[0]


# -- plain nn.Module backbones ----------------------------------------------------------------------------


class FeatureMap(nn.Module):
    def __init__(self, num_channels: int, image_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(num_channels, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))  # (B, 3, S, S)


def test_a_module_backbone_flattens_and_measures_its_features_without_side_effects() -> None:
    register_backbone("test-map", "a feature map")(FeatureMap)
    backbone = build_backbone("test-map", num_channels=1, image_size=8)
    assert isinstance(backbone, ModuleBackbone) and backbone.feature_dim == 3 * 8 * 8
    bn = backbone.model.bn
    assert int(bn.num_batches_tracked) == 0 and bool(
        (bn.running_mean == 0).all()
    )  # the zero batch left no trace
    assert backbone.training
    assert backbone(torch.randn(5, 1, 8, 8)).shape == (5, 192)


def test_a_declared_feature_dim_skips_the_measuring_pass() -> None:
    class NoDummy(nn.Module):
        def __init__(self, num_channels: int, image_size: int) -> None:
            super().__init__()
            self.fc = nn.Linear(num_channels * image_size * image_size, 7)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.fc(x.flatten(1))

    register_backbone("test-declared", "declared", feature_dim=7)(NoDummy)
    backbone = build_backbone("test-declared", num_channels=1, image_size=4)
    assert backbone.feature_dim == 7 and backbone.model.calls == 0
    model = ClientModel(backbone, proto_dim=3)
    assert model(torch.zeros(2, 1, 4, 4)).shape == (2, 3)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda c, s: "not a module", "not a torch.nn.Module"),
        (lambda c, s: nn.Linear(3, 2), "failed on a zero batch of shape (2, 1, 4, 4)"),
        (lambda c, s: nn.Flatten(0), "must return (B, D) features"),
    ],
)
def test_a_bad_module_backbone_is_a_config_error(build: Any, expected: str) -> None:
    register_backbone("test-bad", "bad")(build)
    with pytest.raises(ConfigError) as err:
        build_backbone("test-bad", num_channels=1, image_size=4)
    assert "backbone 'test-bad'" in str(err.value) and expected in str(err.value)


# -- the image-folder data set and per-client arrays --------------------------------------------------------


def write_png(path: Path, mode: str, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_image_folder_reads_classes_from_subfolders(tmp_path: Path) -> None:
    for i in range(12):
        write_png(tmp_path / "zebra" / f"{i}.png", "L", (10, 10), 200)
        write_png(tmp_path / "ant" / f"{i}.png", "L", (10, 10), 20)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    data = build_federated_data(
        DataConfig(dataset="image-folder", path=tmp_path, min_samples=2), num_clients=2, seed=0
    )
    assert data.class_names == ["ant", "zebra"]
    assert (data.num_channels, data.image_size) == (1, 10)
    client = data.clients[0]
    x, y = torch.cat([client.train_x, client.test_x]), torch.cat([client.train_y, client.test_y])
    torch.testing.assert_close(x[y == 0].mean(), torch.tensor(20 / 255))
    torch.testing.assert_close(x[y == 1].mean(), torch.tensor(200 / 255))


def test_image_folder_resizes_mixed_sizes_and_colours(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "0.png", "L", (12, 9), 100)
    write_png(tmp_path / "b" / "0.png", "RGB", (20, 20), 250)
    from ktl.data.folder import load_image_folder

    mixed = load_image_folder(tmp_path)
    assert mixed.images.shape == (2, 3, 32, 32)  # one colour image: all RGB; mixed sizes: 32
    assert mixed.images[1, 0].min() == 250 and mixed.images[1, 1].max() == 0
    assert load_image_folder(tmp_path, 16).images.shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({}, "has no class subfolders"),
        ({"a/x.txt": b"text"}, "holds no .png files"),
        ({"a/x.png": b"not a png"}, "cannot read"),
    ],
)
def test_image_folder_errors_are_data_errors(tmp_path: Path, layout: dict[str, bytes], expected: str) -> None:
    for name, content in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=expected):
        build_federated_data(DataConfig(dataset="image-folder", path=tmp_path), num_clients=2, seed=0)


def test_image_folder_needs_a_path_at_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(smoke("--data.dataset", "image-folder", out=tmp_path / "run")) == 2
    assert error_lines(capsys)[-1] == (
        "ktl: error: dataset image-folder needs --data.path, a folder with one subfolder of PNGs per class"
    )


def test_pool_clients_keeps_each_clients_samples() -> None:
    a = (
        np.full((3, 1, 2, 2), 1, np.uint8),
        np.array([0, 1, 0]),
        np.full((1, 1, 2, 2), 2, np.uint8),
        np.array([1]),
    )
    b = (
        np.full((2, 1, 2, 2), 3, np.uint8),
        np.array([1, 1]),
        np.full((2, 1, 2, 2), 4, np.uint8),
        np.array([0, 0]),
    )
    pooled, splits = pool_clients([a, b], ["x", "y"])
    assert len(pooled) == 8 and pooled.class_names == ["x", "y"]
    for (train, test), (xtr, _, _, yte) in zip(splits, [a, b], strict=True):
        np.testing.assert_array_equal(pooled.images[train], xtr)
        np.testing.assert_array_equal(pooled.labels[test], yte)
    with pytest.raises(DataError, match="differ in length"):
        pool_clients([(a[0], a[1][:2], a[2], a[3])], ["x", "y"])


def test_registering_a_dataset_twice_is_refused() -> None:
    from ktl.data import register_dataset

    with pytest.raises(ValueError, match="dataset 'synthetic' is registered twice"):
        register_dataset("synthetic")(lambda cfg, seed: (None, None))  # type: ignore[arg-type,return-value]


def test_ktl_error_is_what_plugins_raise() -> None:
    with pytest.raises(KtlError):
        plugins.load_plugin("")


def test_a_ktl_error_inside_a_plugin_still_names_the_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "strict.py"
    file.write_text("from ktl.errors import ConfigError\nraise ConfigError('needs TEAM_TOKEN')\n")
    assert main(["--plugin", str(file), "list"]) == 2
    assert error_lines(capsys) == [f"ktl: error: plugin {str(file)!r} failed to load: needs TEAM_TOKEN"]
