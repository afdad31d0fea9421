"""The report's size sweep: students grouped by label kind, every panel fed from the evaluate() results."""

import json
import math

from tckr_engine.eval.evaluate import _origin
from tckr_engine.report import sweep_reference, sweep_series, write_report


def _student(name, images, labels, acc, auc, aop):
    return {
        "name": name,
        "trained_on": f"{images} synthetic images",
        "synthetic_images": images,
        "labels": labels,
        "test_accuracy": acc,
        "privacy": {"max_auc": auc, "variants": {}},
        "aop": aop,
    }


ROWS = [
    _student("s-1x", 60000, "online", 0.90, 0.51, 86.5),
    _student("s-0.2x-hard", 12000, "hard", 0.80, 0.50, 80.0),
    _student("s-0.2x", 12000, "online", 0.88, 0.52, 81.4),
]


def test_sweep_series_groups_by_labels_and_reads_the_attack_auc():
    series = sweep_series(ROWS)
    assert list(series) == ["hard labels", "online labels"]
    assert series["online labels"] == [(12000, 88.0, 52.0, 81.4), (60000, 90.0, 51.0, 86.5)]
    assert series["hard labels"] == [(12000, 80.0, 50.0, 80.0)]
    missing = sweep_series([{**ROWS[0], "privacy": None, "aop": None}])["online labels"][0]
    assert math.isnan(missing[2]) and math.isnan(missing[3])


def test_sweep_reference_is_the_model_not_trained_on_synthetic_images():
    teacher = {"name": "teacher", "test_accuracy": 0.91, "privacy": {"max_auc": 0.503}, "aop": 90.5}
    assert sweep_reference(ROWS) is None
    name, point = sweep_reference([ROWS[0], teacher, {**teacher, "name": "other"}])
    assert name == "teacher" and point[1:] == (91.0, 50.3, 90.5)
    _, bare = sweep_reference([{"name": "t", "test_accuracy": 0.5}])
    assert math.isnan(bare[2]) and math.isnan(bare[3])


def test_report_has_a_sweep_only_for_several_sizes(tmp_path):
    teacher = {"name": "teacher", "trained_on": "real train split", "test_accuracy": 0.91, "aop": 90.0}
    write_report(tmp_path / "one", {"dataset": "digits", "models": [teacher, ROWS[2]]})
    assert "synthetic-set size" not in (tmp_path / "one" / "report.md").read_text()
    write_report(tmp_path / "two", {"dataset": "digits", "models": [teacher, *ROWS]})
    assert "## Against synthetic-set size" in (tmp_path / "two" / "report.md").read_text()
    assert (tmp_path / "two" / "figures" / "sweep.png").stat().st_size > 0


def test_origin_of_a_student_gives_its_set_size_and_labels(tmp_path):
    rounds = [{"round": 0, "images": 500}, {"round": 1, "images": 500}]
    metrics = {"dataset": "digits", "labels": "hard", "regeneration": {"mode": "pool", "rounds": rounds}}
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "metrics.json").write_text(json.dumps(metrics))
    assert _origin(tmp_path / "student") == {
        "trained_on": "1,000 synthetic images (hard labels, 2 round(s))",
        "synthetic_images": 500,
        "labels": "hard",
    }
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.json").write_text(json.dumps({"dataset": "digits"}))
    assert _origin(tmp_path / "teacher") == {"trained_on": "real digits train split"}
    assert _origin(tmp_path / "nothing") == {"trained_on": "unknown"}
