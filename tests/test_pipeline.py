"""`tckr-engine run`: a tiny end-to-end pipeline on digits, stage skipping, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tckr_engine.data.datasets import DEFAULT_FASHION_MNIST_DIR
from tckr_engine.errors import TckrError
from tckr_engine.pipeline import run_pipeline
from tckr_engine.run_config import load_run_config

TINY_RUN = """
[run]
dataset = "digits"
seed = 0
threads = 1

[caption]
captioner = "attributes"

[teacher]
arch = "small-cnn"
epochs = 2
width = 8

[generator]
mode = "reuse"
model = "tiny-digits"

[generate]
num_images = 120
shard_size = 40
batch_size = 40
steps = 2

[train]
arch = "small-cnn"
width = 8
epochs = 2
workers = 0
batch_size = 32

[[students]]
name = "student"

[[students]]
name = "student-hard"
images = 80
labels = "hard"

[evaluate]
num_shadows = 4
members = 60
epochs = 3
"""


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("pipeline")
    config = _write(root, TINY_RUN)
    out = root / "run"
    report = run_pipeline(load_run_config(config), out)
    return config, out, report


def test_tiny_run_writes_every_stage_and_the_report(tiny_pipeline) -> None:
    _, out, report = tiny_pipeline
    for path in ("config.toml", "captions.jsonl", "teacher/metrics.json", "synthetic/index.json",
                 "student/metrics.json", "student-hard/metrics.json", "report.md", "report.json",
                 "figures/roc.png", "figures/samples.png"):  # fmt: skip
        assert (out / path).is_file(), path
    names = [m["name"] for m in report["models"]]
    assert names == ["teacher", "student", "student-hard"]
    for m in report["models"]:
        assert 0 <= m["test_accuracy"] <= 1
        assert 0 <= m["privacy"]["max_auc"] <= 1
        assert m["aop"] > 0
    # the hard-label student trained on the first 80 images: two whole shards of 40
    hard = json.loads((out / "student-hard" / "metrics.json").read_text())
    assert hard["labels"] == "hard"
    md = (out / "report.md").read_text()
    assert "| teacher |" in md and "| student-hard |" in md and "AOP" in md
    # the resolved config repeats the run: loading it gives the same settings
    again = load_run_config(out / "config.toml")
    assert again.students == load_run_config(tiny_pipeline[0]).students


def test_rerun_skips_finished_stages(tiny_pipeline) -> None:
    config, out, _ = tiny_pipeline
    watched = [out / "teacher" / "model.safetensors", out / "student" / "model.safetensors",
               out / "synthetic" / "shards" / "000000.tar", out / "privacy" / "teacher.json"]  # fmt: skip
    before = [p.stat().st_mtime_ns for p in watched]
    report = run_pipeline(load_run_config(config), out)
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert report["seconds"]["teacher"] < 5 and report["seconds"]["train"] < 5


def test_changed_student_settings_redo_only_that_student(tiny_pipeline, tmp_path) -> None:
    _, out, _ = tiny_pipeline
    teacher_mtime = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    hard_mtime = (out / "student-hard" / "model.safetensors").stat().st_mtime_ns
    changed = _write(tmp_path, TINY_RUN.replace('name = "student"\n', 'name = "student"\nepochs = 1\n'))
    run_pipeline(load_run_config(changed), out)
    metrics = json.loads((out / "student" / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 1
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == teacher_mtime
    assert (out / "student-hard" / "model.safetensors").stat().st_mtime_ns == hard_mtime


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[caption]", "[captions]"), "unknown key"),
        (('captioner = "attributes"', 'captioner = "blip"'), "captioner must be one of"),
        (('mode = "reuse"', 'mode = "dreambooth"'), "mode must be one of"),
        (('name = "student-hard"', 'name = "Student Hard"'), "name must be"),
        (('labels = "hard"', 'labels = "fuzzy"'), "labels must be one of"),
        (("num_shadows = 4", "num_shadows = 4\nshadow_count = 3"), "unknown key"),
        (("num_shadows = 4", "num_shadows = 4\nshadows = 3"), "shadows must be a folder path"),
        (('dataset = "digits"', 'dataset = "/nonexistent/data"'), "does not exist"),
        (("steps = 2", "steps = 2\nmodel = 'fmnist'"), "set by the pipeline"),
        (("steps = 2", "steps = 2\nsource = 'dreams'"), "source must be one of diffusion"),
        (("steps = 2", "source = 'bss'"), "needs a student"),
        (("steps = 2", "source = 'activation-max'\nguidance = 2.0"), "unknown synth option"),
        (('labels = "hard"', "bss = 1"), "bss must be true or false"),
        # a value of the wrong TOML type is named with its table, never a TypeError / AttributeError
        (('dataset = "digits"', "dataset = 5"), r"^\[run\] dataset must be a string, got 5$"),
        (
            ("epochs = 2\nwidth = 8", 'epochs = 2\nwidth = 8\nlr = "1e-3"'),
            r"^\[teacher\] lr must be a finite",
        ),
        (("epochs = 2\nwidth = 8", "epochs = 0\nwidth = 8"), r"^\[teacher\]: epochs must be"),
        (("steps = 2", "steps = 2\nguidance = nan"), r"^\[generate\] guidance must be a finite number"),
        (
            ("num_shadows = 4", 'num_shadows = 4\nenabled = "no"'),
            r"^\[evaluate\] enabled must be true or false",
        ),
        (("num_images = 120", 'num_images = "many"'), r"^\[generate\] num_images must be a positive integer"),
        (("num_images = 120", "ratio = -1"), r"^\[generate\] ratio must be a positive number"),
        (
            ("workers = 0", "workers = 0\nepoch = 3"),
            r"^unknown key\(s\) epoch in \[train\] \(did you mean epochs\?\);",
        ),
        (
            ("workers = 0", "workers = 0\nzzz = 3"),
            r"^unknown key\(s\) zzz in \[train\]; valid keys: arch, ",
        ),  # no close key
        (
            ('labels = "hard"', 'labels = "hard"\nepoch = 3'),
            r"^unknown key\(s\) epoch in \[\[students\]\] student-hard \(did you mean epochs\?\);",
        ),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, change, message) -> None:
    text = TINY_RUN.replace(*change)
    assert text != TINY_RUN
    with pytest.raises(TckrError, match=message) as err:
        load_run_config(_write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_unknown_force_stage_is_refused(tmp_path) -> None:
    with pytest.raises(TckrError, match="unknown stage"):
        run_pipeline(load_run_config(_write(tmp_path, TINY_RUN)), tmp_path / "out", force=("teachr",))


def test_cli_run_prints_the_report_path_and_table(tiny_pipeline, cli) -> None:
    config, out, _ = tiny_pipeline
    result = cli("run", str(config), "--out", str(out))
    assert result.code == 0, result.err
    assert "report.md" in result.err and "| teacher |" in result.out


def test_cli_evaluate_reuses_the_run_shadows(tiny_pipeline, cli) -> None:
    """`evaluate` on the run's privacy folder attacks with the shadows `run` trained, training none."""
    _, out, report = tiny_pipeline
    shadows = out / "privacy" / "shadows"
    before = sorted(p.stat().st_mtime_ns for p in shadows.rglob("*.safetensors"))
    args = ["--teacher", out / "teacher", "--out", out / "privacy", "--num-shadows", "4", "--members", "60"]
    result = cli("evaluate", f"hard={out / 'student-hard'}", *args, "--epochs", "3", "--threads", "1")
    assert result.code == 0, result.err
    assert sorted(p.stat().st_mtime_ns for p in shadows.rglob("*.safetensors")) == before
    again = json.loads((out / "privacy" / "hard.json").read_text())
    run_result = next(m for m in report["models"] if m["name"] == "student-hard")
    assert again["privacy"]["max_auc"] == run_result["privacy"]["max_auc"]
    assert "| hard |" in result.out and "| teacher |" in result.out


def test_cli_evaluate_shares_another_runs_shadows(tiny_pipeline, cli, tmp_path) -> None:
    """`evaluate --shadows` attacks with a shared shadow folder, never retraining or replacing it; several
    students of different set sizes give the report's sweep."""
    _, out, report = tiny_pipeline
    shadows = out / "privacy" / "shadows"
    before = sorted(p.stat().st_mtime_ns for p in shadows.rglob("*"))
    common = ["--teacher", out / "teacher", "--num-shadows", "4", "--members", "60", "--threads", "1"]
    students = [f"soft={out / 'student'}", f"hard={out / 'student-hard'}"]
    result = cli(
        "evaluate", *students, *common, "--epochs", "3", "--out", tmp_path / "e", "--shadows", shadows
    )
    assert result.code == 0, result.err
    assert sorted(p.stat().st_mtime_ns for p in shadows.rglob("*")) == before
    assert not (tmp_path / "e" / "shadows").exists()
    again = json.loads((tmp_path / "e" / "report.json").read_text())
    by_name = {m["name"]: m for m in again["models"]}
    run_hard = next(m for m in report["models"] if m["name"] == "student-hard")
    assert by_name["hard"]["privacy"]["max_auc"] == run_hard["privacy"]["max_auc"]
    assert (by_name["soft"]["synthetic_images"], by_name["hard"]["synthetic_images"]) == (120, 80)
    assert "## Against synthetic-set size" in (tmp_path / "e" / "report.md").read_text()
    # another setup on a shared folder: one line, the folder untouched
    result = cli(
        "evaluate", *students, *common, "--epochs", "4", "--out", tmp_path / "f", "--shadows", shadows
    )
    assert result.code == 2 and "another setup (epochs 3 -> 4)" in result.err
    assert sorted(p.stat().st_mtime_ns for p in shadows.rglob("*")) == before


def test_run_attacks_with_another_runs_shadows(tiny_pipeline, tmp_path) -> None:
    """A run with `[evaluate] shadows` (the 1x study's setup: another run's teacher and shadow models) trains
    no shadow, leaves the shared folder untouched and writes its own privacy results."""
    _, first, report = tiny_pipeline
    shadows = first / "privacy" / "shadows"
    before = sorted(p.stat().st_mtime_ns for p in shadows.rglob("*"))
    text = (
        TINY_RUN.replace('arch = "small-cnn"\nepochs = 2\nwidth = 8', f'path = "{first / "teacher"}"', 1)
        .replace("num_images = 120", "num_images = 40")
        .replace('[[students]]\nname = "student-hard"\nimages = 80\nlabels = "hard"\n', "")
        .replace("epochs = 3\n", f'epochs = 3\nshadows = "{shadows}"\n')
    )
    assert text.count(str(first)) == 2 and "student-hard" not in text
    out = tmp_path / "second"
    second = run_pipeline(load_run_config(_write(tmp_path, text)), out)
    assert sorted(p.stat().st_mtime_ns for p in shadows.rglob("*")) == before
    assert not (out / "privacy" / "shadows").exists()
    assert (out / "privacy" / "student.json").is_file() and (out / "report.md").is_file()
    teacher = {m["name"]: m for m in second["models"]}["teacher"]
    first_teacher = {m["name"]: m for m in report["models"]}["teacher"]
    assert teacher["privacy"]["max_auc"] == first_teacher["privacy"]["max_auc"]  # same model, same shadows


AM_RUN = """
[run]
dataset = "digits"
seed = 0
threads = 1

[caption]
captioner = "none"

[teacher]
arch = "small-cnn"
epochs = 2
width = 8

[generate]
source = "activation-max"
num_images = 40
shard_size = 20
batch_size = 20
activation_max = { steps = 5, tv = 0.2 }

[train]
arch = "small-cnn"
width = 8
epochs = 2
workers = 0
batch_size = 16

[[students]]
name = "student"

[[students]]
name = "student-bss"
bss = true
bss_attack_size = 4
bss_steps = 2

[evaluate]
enabled = false
"""


def test_teacher_driven_source_and_a_bss_student(tmp_path) -> None:
    """[generate] source = activation-max replaces the generator; [[students]] bss = true adds BSS."""
    out = tmp_path / "run"
    report = run_pipeline(load_run_config(_write(tmp_path, AM_RUN)), out)
    run = json.loads((out / "synthetic" / "run.json").read_text())
    assert run["spec"]["source"] == "activation-max" and run["spec"]["activation_max"]["steps"] == 5
    assert run["spec"]["activation_max"]["tv"] == 0.2
    assert not (out / "generator").exists() and "generator" not in report["seconds"]
    bss = json.loads((out / "student-bss" / "metrics.json").read_text())["bss"]
    assert bss is not None and bss["attack_size"] == 4 and bss["steps"] == 2
    assert [m["name"] for m in report["models"]] == ["teacher", "student", "student-bss"]
    assert "activation_max = { steps = 5, tv = 0.2 }" in (out / "config.toml").read_text()
    again = run_pipeline(load_run_config(out / "config.toml"), out)  # the written config repeats the run
    assert again["seconds"]["generate"] < 2 and again["seconds"]["train"] < 2


REPO = Path(__file__).resolve().parents[1]
FASHION = DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"


SHIPPED_CONFIGS = {  # config -> the error it must give here (None: it validates)
    "fashion-mnist-cpu.toml": None,
    "fashion-mnist-full.toml": None,
    "fashion-mnist-0.2x.toml": None,
    # the 1x half reuses the 0.2x run's teacher, made first
    "fashion-mnist-1x.toml": "runs/fashion-mnist-0.2x/teacher is not a finished teacher folder",
    "sd-lora.toml": "unknown dataset '/data/my-dataset'",  # a template: the user's folder goes there
}


def test_every_shipped_config_is_checked() -> None:
    assert set(SHIPPED_CONFIGS) == {p.name for p in (REPO / "configs").glob("*.toml")}


@pytest.mark.parametrize(("name", "error"), SHIPPED_CONFIGS.items())
def test_shipped_configs_validate(name, error, monkeypatch) -> None:
    """Every config in configs/ builds all its stage configs (what `run` checks before any stage starts)."""
    if not FASHION.is_file() and name.startswith("fashion"):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    monkeypatch.chdir(REPO)  # configs name repo-relative paths
    if name == "fashion-mnist-1x.toml" and (REPO / "runs/fashion-mnist-0.2x/teacher/metrics.json").is_file():
        error = None  # the study's teacher was made in this checkout
    monkeypatch.delenv("TCKR_FASHION_MNIST_DIR", raising=False)
    if error is None:
        cfg = load_run_config(REPO / "configs" / name)
        assert cfg.dataset
    else:
        with pytest.raises(TckrError, match=error):
            load_run_config(REPO / "configs" / name)
