"""ONNX export: the UNet and classifier contracts, dynamic axes checked with real onnxruntime, fp16 pass,
atomic export folders and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import tckr_engine.export.onnx_export as onnx_export
from tckr_engine.errors import TckrError
from tckr_engine.export.api import ExportConfig, export_model
from tckr_engine.export.modules import UNetExport
from tckr_engine.models.classifier import Classifier, save_classifier
from tckr_engine.models.generator import build_preset

ort = pytest.importorskip("onnxruntime")


def session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def unet_module():
    return UNetExport(build_preset("tiny-digits"), opt_batch=8)


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "unet"
    export_model(ExportConfig(model="tiny-digits", out=str(out), batch_size=8, max_batch_size=32))
    return out


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = Classifier("small-cnn", 10, 1, 8, tuple(str(i) for i in range(10)), width=8).eval()
    return save_classifier(model, tmp_path_factory.mktemp("clf") / "small-cnn"), model


def unet_inputs(batch, size=8, tokens=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=g)  # (B, C, h, w)
    t = torch.tensor([731.0])  # (1,)
    c = torch.randn(batch, tokens, 384, generator=g)  # (B, L, D)
    return x, t, c


def test_unet_export_json_describes_the_contract(unet_export):
    info = json.loads((unet_export / "export.json").read_text())
    assert info["kind"] == "unet" and info["opset"] == 17 and info["precision"] == "fp32"
    assert info["source"] == "preset:tiny-digits" and "TorchScript" in info["exporter"]
    assert [i["name"] for i in info["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert info["inputs"][0] == {
        "name": "sample",
        "dtype": "float32",
        "shape": ["batch", 1, "height", "width"],
    }
    assert info["outputs"] == [
        {"name": "noise_pred", "dtype": "float32", "shape": ["batch", 1, "height", "width"]}
    ]
    assert info["contract"]["profile"]["sample"] == {
        "min": [1, 1, 8, 8],
        "opt": [8, 1, 8, 8],
        "max": [32, 1, 8, 8],
    }
    assert {"torch", "onnx", "onnxruntime", "tckr_engine"} <= set(info["versions"])
    assert info["check"]["max_abs_diff"] < 1e-4
    model = onnx.load(str(unet_export / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert not list(unet_export.parent.glob(".*"))  # no temp folders left behind


@pytest.mark.parametrize(("batch", "size", "tokens"), [(1, 8, 32), (3, 8, 32), (6, 16, 32), (2, 8, 7)])
def test_unet_onnx_matches_torch_on_dynamic_shapes(unet_export, unet_module, batch, size, tokens):
    x, t, c = unet_inputs(batch, size, tokens)
    got = session(unet_export).run(
        None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy()}
    )
    with torch.no_grad():
        ref = unet_module(x, t, c).numpy()
    assert got[0].shape == ref.shape == (batch, 1, size, size)
    np.testing.assert_allclose(got[0], ref, atol=1e-4, rtol=1e-4)


def test_fp16_export_keeps_the_timestep_fp32_and_stays_close(tmp_path, unet_module):
    out = tmp_path / "unet16"
    info = export_model(ExportConfig(model="tiny-digits", out=str(out), fp16=True))
    dtypes = {i["name"]: i["dtype"] for i in info["inputs"] + info["outputs"]}
    assert dtypes == {
        "sample": "float16",
        "timestep": "float32",
        "encoder_hidden_states": "float16",
        "noise_pred": "float16",
    }
    model = onnx.load(str(out / "model.onnx"))
    weights = [t for t in model.graph.initializer if t.data_type in (1, 10)]
    assert sum(t.data_type == 10 for t in weights) > 0.9 * len(weights)  # almost every weight is fp16
    x, t, c = unet_inputs(4)
    feeds = {"sample": x.half().numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.half().numpy()}
    got = session(out).run(None, feeds)[0].astype(np.float32)
    with torch.no_grad():
        ref = unet_module(x, t, c).numpy()
    assert np.abs(got - ref).max() < 2e-2 * max(1.0, np.abs(ref).max())


def test_sd_checkpoint_unet_exports_with_its_clip_context(tmp_path, tiny_sd):
    out = tmp_path / "sd-unet"
    info = export_model(ExportConfig(model=str(tiny_sd), out=str(out), batch_size=2))
    assert info["check"]["max_abs_diff"] < 1e-4
    assert info["inputs"][0]["shape"] == ["batch", 4, "height", "width"]  # latent channels
    assert info["contract"]["profile"]["encoder_hidden_states"]["opt"] == [
        2,
        16,
        32,
    ]  # CLIP length 16, dim 32
    sess = session(out)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 5):
        feeds = {
            "sample": torch.randn(batch, 4, 8, 8, generator=g).numpy(),
            "timestep": np.array([41.0], dtype=np.float32),
            "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g).numpy(),
        }
        assert sess.run(None, feeds)[0].shape == (batch, 4, 8, 8)


def test_external_weights_are_written_beside_the_graph(tmp_path, monkeypatch, unet_module):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "external"
    info = export_model(ExportConfig(model="tiny-digits", out=str(out), verify=False))
    assert info["files"] == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    x, t, c = unet_inputs(2)
    got = session(out).run(
        None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy()}
    )
    with torch.no_grad():
        np.testing.assert_allclose(got[0], unet_module(x, t, c).numpy(), atol=1e-4, rtol=1e-4)


def test_cli_exports_a_classifier_with_dynamic_batch_and_size(cli, tmp_path, small_cnn):
    folder, model = small_cnn
    out = tmp_path / "clf-onnx"
    result = cli("export", folder, "--out", out, "--batch-size", "4", "--max-batch-size", "64")
    assert result.code == 0, result.err
    info = json.loads((out / "export.json").read_text())
    assert info["kind"] == "classifier" and info["contract"]["classes"] == [str(i) for i in range(10)]
    assert info["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["batch", "height", "width", 1]}]
    sess = session(out)
    g = torch.Generator().manual_seed(1)
    for batch, size in [(1, 8), (7, 8), (3, 12)]:
        images = torch.randint(0, 256, (batch, size, size, 1), dtype=torch.uint8, generator=g)
        got = sess.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            ref = model(images).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def assert_one_line_error(result, *needles):
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["./no/such/generator"], ["generator folder not found"]),
        (["no-such-preset"], ["unknown model 'no-such-preset'"]),
        (["tiny-digits", "--opset", "12"], ["opset must be an integer from 17 to 20"]),
        (["tiny-digits", "--opset", "21"], ["opset"]),
        (["tiny-digits", "--kind", "vae"], ["kind must be one of"]),
        (["tiny-digits", "--batch-size", "8", "--max-batch-size", "4"], ["min <= batch <= max"]),
    ],
)
def test_bad_export_inputs_are_one_line_errors(cli, tmp_path, args, needles):
    out = tmp_path / "out"
    result = cli("export", *args, "--out", out)
    assert_one_line_error(result, *needles)
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_unwritable_or_occupied_targets_are_refused(cli, tmp_path, unet_export):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(
        cli("export", "tiny-digits", "--out", blocker / "sub"), "a-file is a file, not a folder"
    )
    assert_one_line_error(cli("export", "tiny-digits", "--out", blocker), "a-file is a file, not a folder")
    before = (unet_export / "export.json").read_text()
    assert_one_line_error(cli("export", "tiny-digits", "--out", unet_export), "--overwrite")
    assert (unet_export / "export.json").read_text() == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = cli("export", "tiny-digits", "--out", foreign, "--overwrite")
    assert_one_line_error(result, "holds other files", "replaces only an earlier export")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::something\nmore details")

    monkeypatch.setattr(torch.onnx, "export", broken)
    out = tmp_path / "unet"
    with pytest.raises(TckrError, match=r"ONNX export of unet failed: unsupported operator aten::something$"):
        export_model(ExportConfig(model="tiny-digits", out=str(out)))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_export_whole(tmp_path):
    out = tmp_path / "unet"
    export_model(ExportConfig(model="tiny-digits", out=str(out), verify=False))
    (out / "stale.txt").write_text("from before")
    info = export_model(
        ExportConfig(model="tiny-digits", out=str(out), opset=18, overwrite=True, verify=False)
    )
    assert info["opset"] == 18 and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


@pytest.mark.gpu
def test_tensorrt_engine_from_the_fp16_export_matches_torch(tmp_path, unet_module):
    pytest.importorskip("tensorrt")
    from tckr_engine.export.tensorrt import TrtRunner

    out = tmp_path / "trt"
    info = export_model(
        ExportConfig(model="tiny-digits", out=str(out), fp16=True, tensorrt=True, batch_size=4)
    )
    assert info["tensorrt"]["engine"] == "model.plan"
    runner = TrtRunner(out / "model.plan", torch.device("cuda"))
    x, t, c = unet_inputs(4)
    got = runner.run({"sample": x.cuda(), "timestep": t.cuda(), "encoder_hidden_states": c.cuda()})
    with torch.no_grad():
        ref = unet_module(x, t, c)
    assert (got["noise_pred"].float().cpu() - ref).abs().max() < 2e-2 * max(1.0, ref.abs().max().item())
