"""The command as a user meets it (``mosaic-lightning`` = ``python train.py``, here ``mosaic_lightning.cli.main``
with an argv): shipped recipes and configs by name from any directory, the ``recipes`` listing, bad input ending
in one ``error:`` line, a quiet one-shot run ending in a summary table whose figures are the report's, and a wheel
that carries the recipes and the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_text_files
from safetensors.torch import load_file

import mosaic_lightning
from mosaic_lightning import load_pruned
from mosaic_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mosaic_lightning"
RECIPES = sorted(p.stem for p in (PACKAGE / "recipes").glob("*.yaml"))
CONFIGS = sorted(p.stem for p in (PACKAGE / "configs").glob("*.yaml"))


def _run(argv: list[str]) -> int:
    """``main(argv)``; the exit status (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as done:
        return 0 if done.code is None else done.code
    return 0


@pytest.mark.parametrize("form", ["name", "name.yaml", "absolute path", "checkout path"])
def test_config_takes_a_shipped_recipe_by_name_from_any_directory(tmp_path, monkeypatch, capsys, form):
    monkeypatch.chdir(tmp_path)  # not the checkout: recipes/ does not exist here
    value = {"name": "mosaic-50", "name.yaml": "mosaic-50.yaml", "absolute path": str(ROOT / "recipes/mosaic-50.yaml"),
             "checkout path": "recipes/mosaic-50.yaml"}[form]  # fmt: skip
    assert _run(["fit", "--config", value, "--config", "cpu", "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "sparsity: 0.5" in printed and "class_path: mosaic_lightning.allocation.Mosaic" in printed
    assert "class_path: mosaic_lightning.methods.SparseGPT" in printed and "precision: 32-true" in printed


def test_a_path_to_a_users_own_recipe_still_works(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mosaic-50.yaml"  # same name as a shipped recipe: the file in the working directory wins
    mine.write_text((PACKAGE / "recipes/wanda-50.yaml").read_text().replace("sparsity: 0.5", "sparsity: 0.4"))
    assert _run(["fit", "--config", "mosaic-50.yaml", "--print_config"]) == 0
    assert "sparsity: 0.4" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["mosaic-5", "wanda.yaml"])
def test_an_unknown_name_is_refused_in_one_line_with_the_names(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    assert _run(["fit", "--config", value]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --config {value!r} is neither a file nor a shipped")
    listed = err.split("shipped: ", 1)[1].split(" (")[0].split(", ")
    assert sorted(listed) == sorted(RECIPES + CONFIGS)


def test_a_missing_config_path_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run(["fit", "--config", "my/recipes/nothing.yaml"]) == 1
    assert capsys.readouterr().err == f"error: --config 'my/recipes/nothing.yaml': no such file " \
                                      f"({tmp_path / 'my/recipes/nothing.yaml'})\n"  # fmt: skip


def test_recipes_lists_every_shipped_recipe_and_config_with_its_first_comment(capsys):
    assert _run(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for kind, names in (("recipes", RECIPES), ("configs", CONFIGS)):
        for name in names:
            line = next(text for text in lines if text.split()[:1] == [name])
            first_comment = (PACKAGE / kind / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            described = line.split(None, 1)[1].removesuffix("...")
            assert first_comment.startswith(described[:40]), (line, first_comment)
    assert len([t for t in lines if t.startswith("  ")]) == len(RECIPES) + len(CONFIGS)


def _tiny_args(tmp_path: Path, model_dir: Path | str, *extra: str) -> list[str]:
    train, test = write_text_files(tmp_path)
    return ["fit", "--config", "wanda-50", "--model.pretrained", str(model_dir), "--data.train_files", str(train),
            "--data.eval_files", str(test), "--data.seq_len", "16", "--data.num_calibration_samples", "4",
            "--data.max_eval_windows", "2", "--trainer.logger", "false", *extra]  # fmt: skip


def test_bad_input_ends_in_one_error_line_and_the_traceback_on_request(tmp_path, tiny_model_dir, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    args = _tiny_args(tmp_path, tiny_model_dir, "--pruning.sparsity", "1.5")
    assert _run(args) == 1
    err = capfd.readouterr().err
    assert err.endswith("error: sparsity=1.5; allowed values: 0 <= sparsity < 1\n")
    assert "Traceback" not in err
    monkeypatch.setenv("MOSAIC_TRACEBACK", "1")
    with pytest.raises(ValueError, match=r"sparsity=1\.5; allowed values"):
        main(args)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--pruning.sparsity", "abc"], "Parser key \"pruning.sparsity\": Expected a <class 'float'>. Got value: abc"),
     (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3")],
)  # fmt: skip
def test_a_malformed_argument_ends_in_one_line_with_status_2(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert _run(["fit", "--config", "wanda-50", *extra]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_deepspeed_config_file_is_found_in_the_package_and_a_wrong_one_named(tmp_path, tiny_model_dir, monkeypatch,
                                                                             capfd):  # fmt: skip
    """configs/zero3-offload.yaml names its DeepSpeed JSON by a checkout-relative path; from another directory it
    is read from the package. On this CPU-only machine the run then stops at the accelerator check."""
    pytest.importorskip("deepspeed")
    if torch.cuda.is_available():
        pytest.skip("on a GPU this would start a DeepSpeed run")
    monkeypatch.chdir(tmp_path)
    cpu = ["--config", "zero3-offload", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
           "--trainer.precision", "32-true"]  # fmt: skip
    assert _run([*_tiny_args(tmp_path, tiny_model_dir), *cpu]) == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "error: The DeepSpeed strategy is only supported on CUDA GPUs but `CPUAccelerator` is used.")
    wrong = ["--trainer.strategy.init_args.config", "configs/deepspeed/nothing.json"]
    assert _run([*_tiny_args(tmp_path, tiny_model_dir), *cpu, *wrong]) == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "error: You passed in a path to a DeepSpeed config but the path does not exist: configs/deepspeed/nothing.json")


def test_a_missing_text_file_is_named_with_its_field(tmp_path, tiny_model_dir, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    args = _tiny_args(tmp_path, tiny_model_dir, "--data.eval_files", "missing.txt", "--export_dir", "out")
    assert _run(args) == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"error: eval_files: missing.txt: no such file ({tmp_path / 'missing.txt'}); give UTF-8 text files")
    assert not (tmp_path / "out").exists()


def test_a_pickle_only_model_folder_is_refused_with_how_to_convert(tmp_path, tiny_model_dir, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    weights = load_file(tiny_model_dir / "model.safetensors")
    (tiny_model_dir / "model.safetensors").unlink()
    torch.save(weights, tiny_model_dir / "pytorch_model.bin")
    assert _run([*_tiny_args(tmp_path, tiny_model_dir), "--export_dir", str(tmp_path / "out")]) == 1
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: pretrained='{tiny_model_dir}' holds its weights only in pickle files "
                           "(pytorch_model.bin), a format this tool refuses to load")  # fmt: skip
    assert "safe_serialization=True" in last
    assert "weights_only" not in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_one_shot_run_is_quiet_and_its_table_holds_the_reports_figures(tmp_path, tiny_model_dir, monkeypatch, capfd,
                                                                        caplog):  # fmt: skip
    """Also: an export_dir that is a link to an empty directory is written into that directory."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "disk" / "pruned"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target)
    assert _run([*_tiny_args(tmp_path, tiny_model_dir), "--export_dir", str(link)]) == 0
    out = capfd.readouterr()
    printed = "\n".join([out.out, out.err, *(r.getMessage() for r in caplog.records)])  # Lightning logs to caplog
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    for noise in ("💡", "Tip:", "Total FLOPs", "Setting accelerator to CPU", "deprecated", "`max_steps=0` reached",
                  "| requested sparsity"):  # fmt: skip
        assert noise not in printed, noise
    report = json.loads((target / "pruning_report.json").read_text())
    lines = printed.splitlines()
    rules = [i for i, line in enumerate(lines) if len(line) >= 20 and set(line) == {"-"}]
    rows = {line.split("  ")[0]: line for line in lines[rules[-2] + 1 : rules[-1]]}  # between the last two rules
    assert rows["perplexity"].split()[1:] == [f"{report['ppl_dense']:.3f}", f"{report['ppl_pruned']:.3f}"]
    zeros = report["params_export"] - report["nonzero_params_export"]
    assert zeros >= report["params_pruned"] > 0
    assert rows["parameters"].split()[1:] == [f"{report['params_dense']:,}", f"{report['params_export']:,}",
                                              f"({zeros:,}", "zero)"]  # fmt: skip
    weight_bytes = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    assert report["weights_bytes_export"] == weight_bytes
    assert report["weights_bytes_dense"] == 4 * report["params_dense"]  # float32
    assert rows["weight files"].split()[2:] == [f"{report['weights_bytes_dense'] / 1e6:.1f}", "MB",
                                                f"{weight_bytes / 1e6:.1f}", "MB"]  # fmt: skip
    assert rows["sparsity"].split()[1:5] == [f"{100 * report['achieved_sparsity']:.2f}%", "of",
                                             f"{report['params_targeted']:,}", "targeted"]  # fmt: skip
    times = report["timings_s"]
    assert set(times) >= {"profile", "prune", "export", "total"}
    phases = {**{k: v for k, v in times.items() if k != "total"}, "dense eval": report["dense_eval_s"],
              "pruned eval": report["pruned_eval_s"], "total": times["total"]}  # fmt: skip
    for phase, seconds in phases.items():
        assert f"{phase} {seconds:.1f} s" in rows["time"], phase
    assert times["total"] >= times["prune"] + times["export"]
    assert rows["peak memory"].split()[2:4] == [f"{report['peak_memory_mb']['total_rss'] / 1024:.2f}", "GiB"]
    assert rows["export"].split()[1] == str(link.absolute())


def test_load_pruned_of_a_missing_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_pruned: '/nonexistent/dir': no such directory"):
        load_pruned("/nonexistent/dir")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"a_file' is a file; give the directory save_pruned"):
        load_pruned(tmp_path / "a_file")


def test_the_package_has_a_version():
    assert mosaic_lightning.__version__.count(".") >= 2 and mosaic_lightning.__version__ != "0.0.0"


def test_the_wheel_carries_the_recipes_and_the_command(tmp_path):
    """``pip wheel`` of a copy of the source (the build writes beside its sources), then the command run from the
    unpacked wheel, outside the checkout: a bare recipe name resolves to the file inside the wheel."""
    source = tmp_path / "src"
    shutil.copytree(PACKAGE, source / "mosaic_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    try:
        import setuptools

        local = int(setuptools.__version__.split(".")[0]) >= 68  # pyproject.toml's build requirement
    except ImportError:
        local = False
    isolation = ["--no-build-isolation"] if local else []  # else pip fetches setuptools for an isolated build
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("mosaic_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        archive.extractall(tmp_path / "site")
    assert {f"mosaic_lightning/recipes/{r}.yaml" for r in RECIPES} <= names
    assert {f"mosaic_lightning/configs/{c}.yaml" for c in CONFIGS} <= names
    assert "mosaic_lightning/configs/deepspeed/zero3-offload.json" in names
    assert "[console_scripts]\nmosaic-lightning = mosaic_lightning.cli:main" in entry_points
    code = ("import sys, mosaic_lightning; print(mosaic_lightning.__file__, file=sys.stderr); "
            "from mosaic_lightning.cli import main; main()")  # what the console script runs
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code, "fit", "--config", "mosaic-50", "--print_config"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.startswith(str(tmp_path / "site" / "mosaic_lightning"))  # the unpacked wheel's copy
    assert "class_path: mosaic_lightning.allocation.Mosaic" in done.stdout and "sparsity: 0.5" in done.stdout
