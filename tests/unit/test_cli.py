"""The command line explains itself, and a bare `distft` never starts a demo training."""
import pytest

from distft import __version__

from conftest import run_cli, write_config


def test_no_arguments_and_no_job_prints_help_and_exits_2(tmp_path):
    proc = run_cli([], timeout=60, env={"DISTFT_CONFIG": ""}, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: distft" in proc.stderr and "`distft --config X` alone means `distft train --config X`" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"distft: error: no command and no job: give --config, set DISTFT_CONFIG or put distft.yaml in {tmp_path}")
    assert not (tmp_path / "runs").exists() and proc.stdout == ""


def test_no_arguments_trains_distft_yaml_in_the_working_directory(tmp_path, monkeypatch, capsys):
    from distft import cli

    # a job whose config is refused proves which file was read, without training
    write_config(tmp_path / "distft.yaml", {"optimizer": {"lr": "fast"}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTFT_CONFIG", "")
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == "distft: error: optimizer.lr: expected a number, got 'fast'"


def test_no_arguments_trains_distft_config_from_the_environment(tmp_path, monkeypatch, capsys):
    from distft import cli

    path = write_config(tmp_path / "job.yaml", {"model": {"nmae": "x"}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTFT_CONFIG", path)
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == "distft: error: model.nmae: unknown key (did you mean 'model.name'?)"


def test_version_and_described_commands():
    proc = run_cli(["--version"], timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"distft {__version__}"
    for command, words in (("plan", "Trains nothing"), ("bench", "plain Horovod-MXNet loop"),
                           ("check", "max(data.max_bad_fraction x files, data.max_bad_files)"),
                           ("make-rec", "OUT.classes.json"), ("train", "resumes")):
        proc = run_cli([command, "--help"], timeout=60)
        assert proc.returncode == 0 and words in proc.stdout, (command, proc.stdout)
    top = run_cli(["--help"], timeout=60).stdout
    assert "examples:" in top and "distft --config job.yaml" in top and "make-rec" in top


@pytest.mark.parametrize("command, words", [
    ("eval", "per-class precision"), ("predict", "preprocess.json"), ("export", "onnxruntime"),
    ("demo-prepare", "pretrained backbone")])
def test_every_command_describes_itself(capsys, command, words):
    from distft import cli

    with pytest.raises(SystemExit) as done:
        cli.parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    description = out.split("\n\n")[1]  # after the usage lines
    assert not description.startswith(("options:", "positional arguments:")) and words in description, out


def test_bench_writes_its_json_and_markdown_into_new_folders(tmp_path, monkeypatch, capsys):
    from distft.bench import bench, tables
    from distft import cli

    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: {"samples_per_sec": {"distft": 1.0}, "controller": "mpi"})
    monkeypatch.setattr(tables, "markdown", lambda result: "| table |\n")
    out = tmp_path / "bench" / "nested"
    assert cli.main(["bench", "--json", str(out / "b.json"), "--markdown", str(tmp_path / "md" / "b.md")]) == 0
    assert (out / "b.json").read_text().startswith("{") and (tmp_path / "md" / "b.md").read_text() == "| table |\n"
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--markdown"])
def test_bench_refuses_an_output_it_cannot_write_before_it_runs(tmp_path, monkeypatch, capsys, flag):
    from distft.bench import bench
    from distft import cli

    ran = []
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: ran.append(1) or {})
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "b.out"  # under a file: no folder can be made there
    assert cli.main(["bench", flag, str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not ran
    assert err == [f"distft: error: {flag}: {target}: cannot write there ({tmp_path / 'a-file'} is a file, "
                   "not a folder)"]
    assert cli.main(["bench", flag, str(tmp_path)]) == 2  # a folder, not a file
    assert capsys.readouterr().err.startswith(f"distft: error: {flag}: {tmp_path}: a folder") and not ran
