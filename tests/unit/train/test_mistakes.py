"""A user's common mistakes: each is one line naming the key or file, exit code 2, and a
refused run changes nothing in train.output. Warnings for jobs that run but mislead."""

import pytest

from conftest import run_cli, write_config
from imagefiles import folder


def job(tmp_path, **sections):
    doc = {"model": {"name": "resnet18_v2", "image_size": 32},
           "data": {"train": "demo", "batch_size": 8, "workers": 0},
           "train": {"max_steps": 1, "output": str(tmp_path / "out")},
           "metrics": {"port": 0, "report": False, "probe_batches": 0}}
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    return write_config(tmp_path / "c.yaml", doc)


def one_line_error(proc):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_empty_trainable_list_is_a_config_error(tmp_path, capsys):
    from distft import cli

    assert cli.main(["--config", job(tmp_path, freeze={"trainable": []})]) == 2
    assert capsys.readouterr().err.strip() == (
        "distft: error: freeze.trainable: empty, so nothing would train; name at least one block (e.g. [output]) "
        "or /.*/ for everything")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, size, smallest", [("densenet121", 32, 221), ("inceptionv3", 48, 299)])
def test_image_size_too_small_names_the_smallest_that_works(tmp_path, name, size, smallest):
    proc = run_cli(["plan", "--config", job(tmp_path, model={"name": name, "image_size": size})], timeout=300)
    assert one_line_error(proc) == (f"distft: error: model.image_size: {size} is too small for {name}; "
                                    f"the smallest size it takes is {smallest}")
    assert proc.stdout == ""  # MXNet's shape-inference dump is not shown


def test_too_small_image_size_stops_training_before_any_data_is_read_or_anything_written(tmp_path):
    train = folder(tmp_path / "train", {"ant": 2, "bee": 2})
    (tmp_path / "train" / "ant" / "bad.png").write_bytes(b"not an image")  # would be fatal, if it were read
    proc = run_cli(["--config", job(tmp_path, model={"name": "densenet121", "image_size": 32},
                                    data={"train": train, "max_bad_files": 0})], timeout=300)
    assert one_line_error(proc) == ("distft: error: model.image_size: 32 is too small for densenet121; "
                                    "the smallest size it takes is 221")
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_refused_run_leaves_the_run_folder_as_it_was(tmp_path):
    train = folder(tmp_path / "train", {"ant": 8, "bee": 8})
    proc = run_cli(["--config", job(tmp_path, data={"train": train})], timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    before = {f: (out / f).read_bytes() for f in ("config.yaml", "classes.json", "summary.json", "model.params")}
    val = folder(tmp_path / "val", {"ant": 1, "wasp": 1})
    proc = run_cli(["--config", job(tmp_path, data={"train": train, "val": val}, optimizer={"lr": 0.5})],
                   timeout=300)
    assert one_line_error(proc) == (f"distft: error: data.val: {val} has classes that data.train lacks: wasp "
                                    "(data.train has ant, bee)")
    assert {f: (out / f).read_bytes() for f in before} == before
    # refused later, once the model is built (after the output folder was opened)
    proc = run_cli(["--config", job(tmp_path, data={"train": train}, freeze={"trainable": ["features.99"]},
                                    train={"resume": False})], timeout=300)
    assert one_line_error(proc).startswith("distft: error: freeze.trainable[0]: no block named 'features.99'")
    assert {f: (out / f).read_bytes() for f in before} == before


def test_random_backbone_with_frozen_blocks_and_tiny_epochs_are_warned_about(tmp_path):
    train = folder(tmp_path / "train", {"ant": 8, "bee": 8})
    proc = run_cli(["--config", job(tmp_path, data={"train": train})], timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[distft] warning: model.pretrained: false, yet ") and "parameters are frozen" in line
               for line in lines), proc.stdout
    assert "[distft] warning: data.train: 16 samples make 2 step(s) per epoch at the global batch; under 10, " \
           "per-epoch figures (validation, checkpoints, throughput) say little: use more data or a smaller " \
           "data.batch_size" in lines


def test_no_warnings_for_a_pretrained_job_with_enough_steps(tmp_path, pretrained):
    proc = run_cli(["--config", job(tmp_path, model={"pretrained": pretrained})], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[distft] warning" not in proc.stdout + proc.stderr


MODEL_MISTAKES = [({"pretrained": "/nonexistent/backbone.params"},
                   "model.pretrained: /nonexistent/backbone.params: no such file"),
                  ({"name": "resnet18_v3"}, "model.name: no model-zoo network named 'resnet18_v3' (did you mean")]


def fatal_data(tmp_path):
    """A folder with an unreadable file and no allowance for it: fatal once it is read."""
    train = folder(tmp_path / "train", {"ant": 2, "bee": 2})
    (tmp_path / "train" / "ant" / "bad.png").write_bytes(b"not an image")
    return {"train": train, "max_bad_files": 0, "max_bad_fraction": 0.0}


@pytest.mark.parametrize("model, message", MODEL_MISTAKES)
def test_a_model_mistake_stops_training_before_any_data_is_read(tmp_path, model, message):
    proc = run_cli(["--config", job(tmp_path, model=model, data=fatal_data(tmp_path))], timeout=300)
    assert one_line_error(proc).startswith(f"distft: error: {message}")
    assert not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.parametrize("model, message", MODEL_MISTAKES)
def test_a_model_mistake_is_reported_by_check_plan_and_bench_before_their_data(tmp_path, capsys, monkeypatch,
                                                                                 model, message):
    from distft.bench import bench
    from distft import cli

    monkeypatch.setattr(bench, "_run", lambda *args, **kwargs: pytest.fail("bench ran a job"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    checked = job(tmp_path / "a", model=model, data=fatal_data(tmp_path))
    missing = job(tmp_path / "b", model=model, data={"train": str(tmp_path / "no-such-folder")})
    for command, cfg in (("check", checked), ("plan", missing), ("bench", missing)):
        assert cli.main([command, "--config", cfg]) == 2, command
        captured = capsys.readouterr()
        assert captured.err.startswith(f"distft: error: {message}") and captured.out == "", (command, captured)


def test_the_image_size_check_leaves_no_memory_behind():
    """The check runs in every rank before training. It once ran a real forward pass of an
    initialised resnet50_v2, and MXNet's memory pool kept what it used: every rank stayed about
    240 MB larger for the whole run (the bench's peak RSS ratio showed it)."""
    import subprocess
    import sys

    code = ("import psutil, mxnet; from distft.models.inputsize import require_fits; p = psutil.Process(); "
            "before = p.memory_info().rss; require_fits('resnet50_v2', 64); "
            "print((p.memory_info().rss - before) // 2**20)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grew_mib = int(out.stdout.strip().splitlines()[-1])
    assert grew_mib < 60, f"the check left {grew_mib} MiB behind"
