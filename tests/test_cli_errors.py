"""Bad input: one clear line on stderr, exit != 0, no traceback, no output that looks complete."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tckr_engine.models.classifier import Classifier, save_classifier

FAST = [
    "--model",
    "tiny-digits",
    "--dataset",
    "digits",
    "--num-images",
    "8",
    "--batch-size",
    "8",
    "--steps",
    "2",
]


def assert_one_line_error(result, *needles):
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2, result.err
    assert len(lines) == 1, f"expected one line, got:\n{result.err}"
    assert lines[0].startswith("error:") and "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def captions(tmp_path):
    def write(text):
        path = tmp_path / "captions.jsonl"
        path.write_text(text)
        return path

    return write


CASES = {
    "missing dataset folder": (["--dataset", "/no/such/dataset"], ["/no/such/dataset"]),
    "unknown preset": (["--model", "no-such-preset"], ["unknown model 'no-such-preset'", "tiny-fmnist"]),
    "missing generator folder": (["--model", "./no/such/generator"], ["generator folder not found"]),
    "negative count": (["--num-images", "-5"], ["num_images must be a positive integer"]),
    "zero shard size": (["--shard-size", "0"], ["shard_size"]),
    "oversized shard": (["--shard-size", "200000"], ["shard_size must be at most 99999"]),
    "negative guidance": (["--guidance", "-1"], ["guidance"]),
    "nan guidance": (["--guidance", "nan"], ["guidance must be a finite number >= 0, got nan"]),
    "unknown source beside --model": (
        ["--source", "gan"],
        ["--source must be diffusion, activation-max, bss"],
    ),
    "s3 without s3fs": ([], ["Install s3fs"]),
    "unknown url scheme": ([], ["unknown storage protocol 's3x'"]),
    "unknown sampler": (["--sampler", "plms"], ["sampler must be one of ddim, dpm++, euler"]),
    "unknown format": (["--format", "gif"], ["image_format"]),
    "missing captions": (["--captions", "/no/captions.jsonl"], ["captions file not found"]),
    "missing teacher": (["--teacher", "/no/teacher"], ["classifier not found at /no/teacher"]),
    "cuda without gpu": (["--device", "cuda"], ["no CUDA GPU"]),
    "template without name": (["--prompt-template", "a photo"], ["{name}"]),
    "missing config file": (["--config", "/no/config.toml"], ["config file not found"]),
    "xformers not installed": (["--attention", "xformers"], ["needs the xformers package"]),
    "unknown backend": (["--backend", "bogus"], ["backend must be one of torch, compile, onnxruntime"]),
    "tensorrt on cpu": (["--device", "cpu", "--backend", "tensorrt"], ["backend tensorrt needs a CUDA GPU"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_generate_flag(cli, tmp_path, name):
    if name == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if name == "xformers not installed" and importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    if name == "s3 without s3fs" and importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    args, needles = CASES[name]
    out = tmp_path / "out"
    urls = {"s3 without s3fs": "s3://bucket/shards", "unknown url scheme": "s3x://bucket/shards"}
    flags = FAST + args  # later flags win in click, so the bad value is the one used
    result = cli("generate", "--shards", urls.get(name, out), *flags)
    assert_one_line_error(result, *needles)
    assert not out.exists(), "a refused run must not create its output folder"


@pytest.mark.parametrize(
    "text,needle",
    [
        ('{"class_name": "3", "prompt": "3: a digit"}\nnot json\n', "line 2: expected a JSON object"),
        ('{"class_name": "cat", "prompt": "cat: meow"}\n', "unknown class name 'cat'"),
        ('{"class_name": "3", "class_index": 4, "prompt": "3: x"}\n', "class_index 4 for '3'"),
        ('{"class_name": "3", "prompt": "3: only one class"}\n', "no caption for class(es): 0, 1, 2"),
        ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "not UTF-8"),
    ],
)
def test_corrupt_captions(cli, tmp_path, captions, text, needle):
    path = tmp_path / "captions.jsonl"
    if needle == "not UTF-8":
        path.write_bytes(b"\xff\xfe\x00bad")
    else:
        captions(text)
    result = cli("generate", "--shards", tmp_path / "out", *FAST, "--captions", path)
    assert_one_line_error(result, needle)


def test_unwritable_output(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli("generate", "--shards", blocker / "sub", *FAST)
    assert_one_line_error(result, "cannot write to")


def test_foreign_non_empty_folder_is_refused(cli, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = cli("generate", "--shards", out, *FAST)
    assert_one_line_error(result, "not empty and holds no run.json")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_spec_mismatch_on_resume(cli, tiny_run, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(tiny_run, out)
    result = cli(
        "generate",
        "--shards",
        out,
        "--model",
        "tiny-digits",
        "--dataset",
        "digits",
        "--num-images",
        "100",
        "--shard-size",
        "40",
        "--batch-size",
        "16",
        "--steps",
        "5",
        "--threads",
        "1",
    )
    assert_one_line_error(result, "holds a different run (changed: steps)", "--overwrite")


def test_teacher_with_other_classes(cli, tmp_path):
    teacher = Classifier("small-cnn", 3, 1, 8, ("a", "b", "c"), width=4)
    save_classifier(teacher, tmp_path / "teacher")
    result = cli("generate", "--shards", tmp_path / "out", *FAST, "--teacher", tmp_path / "teacher")
    assert_one_line_error(result, "differ from the dataset's")


def test_broken_toml(cli, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[generate]\nnum-imagez = 3\n")
    result = cli("generate", "--shards", tmp_path / "out", "--config", cfg)
    assert_one_line_error(result, f"unknown key 'num-imagez' in [generate] of {cfg}")  # markup kept


@pytest.mark.parametrize("source", ["diffusion", "activation-max"])
def test_config_without_a_generate_table_is_refused(cli, tmp_path, source):
    cfg = tmp_path / "other.toml"
    cfg.write_text("[train]\nepochs = 3\n")
    result = cli("generate", "--shards", tmp_path / "out", "--config", cfg, "--source", source)
    assert_one_line_error(result, f"config file {cfg} has no [generate] table (it has [train])")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda t: (t / "model.safetensors").write_bytes(b"\x00garbage"), "cannot read the weights"),
        (lambda t: (t / "model.safetensors").write_bytes(b""), "cannot read the weights"),
        (lambda t: (t / "classifier.json").write_text("{not json"), "cannot read"),
        (
            lambda t: (t / "classifier.json").write_text('{"arch": "small-cnn"}'),
            "no num_classes, in_channels",
        ),
        (
            lambda t: save_classifier(Classifier("small-cnn", 10, 1, 8, tuple("0123456789"), width=8), t),
            "do not fit",  # weights of another width under the first config
        ),
    ],
)
def test_damaged_teacher_folder(cli, tmp_path, damage, needle):
    teacher = tmp_path / "teacher"
    save_classifier(Classifier("small-cnn", 10, 1, 8, tuple("0123456789"), width=4), teacher)
    config = (teacher / "classifier.json").read_text()
    damage(teacher)
    if needle == "do not fit":
        (teacher / "classifier.json").write_text(config)  # width 4 config, width 8 weights
    result = cli("generate", "--shards", tmp_path / "out", *FAST, "--teacher", teacher)
    assert_one_line_error(result, str(teacher), needle)
    if needle == "do not fit":
        assert "size mismatch" in result.err


@pytest.mark.parametrize(
    "text,needle",
    [("{broken", "cannot read"), ('{"image_size": "big", "channels": 1}', "needs integer image_size")],
)
def test_damaged_generator_folder(cli, tmp_path, text, needle):
    from tckr_engine.models.generator import CONFIG_NAME, build_preset, save_generator

    folder = save_generator(build_preset("tiny-digits"), tmp_path / "gen")
    (folder / CONFIG_NAME).write_text(text)
    result = cli("generate", "--shards", tmp_path / "out", *FAST, "--model", folder)
    assert_one_line_error(result, str(folder / CONFIG_NAME), needle)


def test_caption_checks_its_output_path_first(cli, tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    assert_one_line_error(cli("caption", "--dataset", "digits", "--out", folder), "is a folder")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(cli("caption", "--dataset", "digits", "--out", blocker / "c.jsonl"), "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "existing"] and not any(folder.iterdir())


def test_verify_names_the_corrupt_shard(cli, tiny_run, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(tiny_run, out)
    (out / "shards" / "000001.tar").write_bytes(b"garbage")
    result = cli("verify", out)
    assert result.code == 1 and "000001.tar" in result.err and "000000.tar" not in result.err
    assert cli("verify", tiny_run).code == 0
    assert_one_line_error(cli("verify", tmp_path / "nothing"), "shard folder not found")
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(cli("verify", tmp_path / "a-file"), "is a file, not a shard folder")


def test_real_subprocess_exit_code(tmp_path):
    """The installed entry point itself (not only the in-process runner) exits 2 with one line."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tckr_engine.cli",
            "generate",
            "--shards",
            str(tmp_path / "o"),
            "--num-images",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: num_images must be a positive integer, got 0"
    ]
    assert json.dumps(proc.stdout) == '""'


def test_output_paths_that_are_files_are_refused_up_front(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for args in (
        ["teacher", "--dataset", "digits", "--epochs", "1", "--out", blocker],
        ["train", "--shards", tmp_path, "--out", blocker / "student"],
        ["finetune", "--preset", "tiny-digits", "--dataset", "digits", "--out", blocker],
        ["bench", "--preset", "tiny-digits", "--out", blocker],
    ):
        assert_one_line_error(cli(*args), str(blocker), "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--lr"])
def test_finetune_zero_is_an_error_not_the_default(cli, tmp_path, flag):
    out = tmp_path / "gen"
    result = cli("finetune", "--preset", "tiny-digits", "--dataset", "digits", "--out", out, flag, "0")
    assert_one_line_error(result, flag.lstrip("-").replace("-", "_"))
    assert not out.exists()


def test_evaluate_checks_every_model_before_training_shadows(cli, tmp_path):
    teacher = tmp_path / "teacher"
    save_classifier(Classifier("small-cnn", 10, 1, 8, tuple("0123456789"), width=4), teacher)
    out = tmp_path / "eval"
    result = cli("evaluate", tmp_path / "no-such-student", "--teacher", teacher, "--out", out)
    assert_one_line_error(result, "classifier not found", "no-such-student")
    assert not out.exists()
    other = tmp_path / "other"
    save_classifier(Classifier("small-cnn", 3, 1, 8, ("a", "b", "c"), width=4), other)
    assert_one_line_error(
        cli("evaluate", other, "--teacher", teacher, "--out", out), "has classes ['a', 'b', 'c']"
    )
    assert_one_line_error(
        cli("evaluate", teacher, "--teacher", tmp_path / "x" / "metrics.json", "--out", out)
    )
    assert not out.exists()


def test_bench_device_and_corrupt_run_record(cli, tiny_run, tmp_path):
    assert_one_line_error(cli("bench", "--device", "tpu", "--out", tmp_path / "b"), "device must be one of")
    out = tmp_path / "list-run"
    shutil.copytree(tiny_run, out)
    (out / "run.json").write_text("[]")
    assert_one_line_error(cli("verify", out), "run.json is corrupt", "generate --shards")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--threads", "-1"], "threads must be a positive integer"),
        (["--mode", "lora", "--base", "x", "--epochs", "inf"], "epochs must be finite numbers > 0"),
        (["--mode", "lora", "--base", "x", "--threads", "0"], "threads must be a positive integer"),
    ],
)
def test_finetune_settings_are_checked(cli, tmp_path, args, needle):
    out = tmp_path / "gen"
    result = cli("finetune", "--preset", "tiny-digits", "--dataset", "digits", "--out", out, *args)
    assert_one_line_error(result, needle)
    assert not out.exists()


@pytest.mark.parametrize("content", [b"[]", b'{"teacher": 3}', b"\xff\xfe"])
def test_run_with_a_damaged_stages_file(tmp_path, content):
    from tckr_engine.errors import TckrError
    from tckr_engine.pipeline import Stages

    (tmp_path / "stages.json").write_bytes(content)
    with pytest.raises(TckrError, match=r"stages\.json is unreadable; delete it"):
        Stages(tmp_path, set())


def test_an_interrupted_training_run_is_not_used_as_a_model(cli, tiny_run, tmp_path):
    """A teacher or student folder holds best-so-far weights from its first epoch; metrics.json comes last.
    Without it (the run was interrupted) no command may use the folder as a finished model."""
    teacher = tmp_path / "teacher"
    save_classifier(Classifier("small-cnn", 10, 1, 8, tuple("0123456789"), width=4), teacher)
    (teacher / "train_log.jsonl").write_text('{"epoch": 1}\n')  # epoch 1 of many, then Ctrl-C
    for args in (
        ["generate", "--shards", tmp_path / "out", *FAST, "--teacher", teacher],
        ["train", "--shards", tiny_run, "--out", tmp_path / "student", "--teacher", teacher, "--epochs", "1"],
        ["evaluate", teacher, "--teacher", teacher, "--out", tmp_path / "eval"],
    ):
        assert_one_line_error(cli(*args), str(teacher), "unfinished training run", "no metrics.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "student" / "metrics.json").exists()
    (teacher / "metrics.json").write_text("{}")  # finished: the same folder loads
    from tckr_engine.models.classifier import load_classifier

    assert load_classifier(teacher).classes == tuple("0123456789")
