"""Data and decode faults, shipped configs, resume rules and safety: a damaged prepared dir,
decode inputs that cannot work, a run whose checkpoints fail verification — one line each;
big configs refuse the embedded corpus; a changed schedule on resume is spelled out; the
held-out loss uses the β training uses; nothing is unpickled or evaluated."""

import ast
import json
import math
import os
import pathlib
import shutil

import pytest

from nvium_jax.cli import main
from nvium_jax.runs import MANIFEST, step_dirs
from nvium_jax.train.loop import train
from tests.faults.conftest import metrics_rows, small_config, write_yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def one_line_error(capsys, argv, message, code=2):
    assert main(argv) == code, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and message in err[-1], err
    assert not any(line.startswith("Traceback") for line in err)
    return err[-1]


@pytest.mark.parametrize("damage, message", [
    ("missing-shard", "lacks shard file(s) c/0"),
    ("meta", "meta.json says"),
    ("flipped", "cannot be read (DATA_LOSS"),
])
def test_a_damaged_data_dir_is_one_line(fault_data, tmp_path, capsys, damage, message):
    data = tmp_path / "data"
    shutil.copytree(fault_data, data)
    if damage == "missing-shard":
        (data / "val" / "c" / "0").unlink()
    elif damage == "meta":
        meta = json.loads((data / "meta.json").read_text())
        meta["val_tokens"] += 7
        (data / "meta.json").write_text(json.dumps(meta))
    else:
        shard = data / "val" / "c" / "0"
        raw = bytearray(shard.read_bytes())
        raw[10:40] = bytes(b ^ 0x5A for b in raw[10:40])
        shard.write_bytes(bytes(raw))
    config = write_yaml(small_config(data, tmp_path / "run"), tmp_path / "c.yaml")
    one_line_error(capsys, ["train", "--config", str(config)], message)
    assert not step_dirs(tmp_path / "run")


@pytest.fixture(scope="module")
def run8(fault_data, tmp_path_factory):
    """An 8-step run trained from another working directory (which must stay empty)."""
    root = tmp_path_factory.mktemp("run8")
    (root / "cwd").mkdir()
    here = os.getcwd()
    os.chdir(root / "cwd")
    try:
        train(small_config(fault_data, root / "elsewhere" / "run"))
    finally:
        os.chdir(here)
    return root / "elsewhere" / "run"


def test_decode_faults_are_one_line(run8, tmp_path, capsys):
    one_line_error(capsys, ["generate", "--run", str(run8), "--prompt", "the", "--max-new-tokens", "0"],
                   "max_new_tokens=0")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    one_line_error(capsys, ["generate", "--run", str(run8), "--prompts-file", str(empty)], "has no prompts")
    # every checkpoint damaged: one line; the newest damaged: the previous good one, said on stderr
    broken = tmp_path / "broken"
    shutil.copytree(run8, broken)
    (step_dirs(broken)[8] / MANIFEST).write_text("{")
    assert main(["generate", "--run", str(broken), "--prompt", "the", "--max-new-tokens", "3", "--json"]) == 0
    assert "checkpoint 8 of" in capsys.readouterr().err
    (step_dirs(broken)[4] / MANIFEST).write_text("{")
    one_line_error(capsys, ["generate", "--run", str(broken), "--prompt", "the"], "passes verification")


def test_big_configs_refuse_the_embedded_corpus(capsys, tmp_path):
    for name in ("nvium-125m", "nvium-1.5b", "baseline-760m"):
        line = one_line_error(capsys, ["train", "--config", str(ROOT / f"configs/{name}.yaml"),
                                       f"run.dir={tmp_path / name}"], "epochs of it")
        assert "nvium prepare" in line and "data.path=DIR" in line
        assert not (tmp_path / name).exists()
    # the 1.5b config says what it needs and fits a node of 8 × 80 GB as shipped
    text = (ROOT / "configs/nvium-1.5b.yaml").read_text()
    assert "grad_accum: 4" in text and "8 × 80 GB" in text


def test_resume_with_more_steps_says_what_changes(run8, fault_data, tmp_path, capfd):
    run_dir = tmp_path / "run"
    shutil.copytree(run8, run_dir)
    capfd.readouterr()
    train(small_config(fault_data, run_dir, "train.steps=40"))
    err = capfd.readouterr().err
    assert "train.steps 8 → 40 at step 8: the learning rate there goes" in err
    assert "the router warm-up ends at step 10 (was 2) — this run goes back into router warm-up" in err


def test_nothing_is_unpickled_or_evaluated():
    """No pickle/marshal/shelve/dill, eval/exec, unsafe YAML, allow_pickle or torch.load in
    the package: configs, checkpoints, tokenizers and HF weights are read as data only."""
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    problems = []
    for path in sorted((ROOT / "nvium_jax").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
                if name in ("eval", "exec") and not owner:
                    problems.append(f"{where} calls {name}")
                if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
                    problems.append(f"{where} calls yaml.{name}")
                if owner == "torch" and name == "load":
                    problems.append(f"{where} calls torch.load")
                if any(k.arg == "allow_pickle" and getattr(k.value, "value", False) for k in node.keywords):
                    problems.append(f"{where} passes allow_pickle=True")
    assert not problems, problems


def test_training_writes_only_inside_its_run_dir(run8, fault_data):
    root = run8.parent.parent
    assert not list((root / "cwd").iterdir())
    assert sorted(p.name for p in (root / "elsewhere").iterdir()) == ["run"]
    assert all(p.suffix != ".tmp" for p in fault_data.rglob("*"))  # the data dir is only read
    assert math.isfinite(metrics_rows(run8)[-1]["val_loss"])


def test_the_shipped_1_5b_config_fits_a_node_of_8_80GB_gpus(capsys):
    """`nvium plan` of configs/nvium-1.5b.yaml as shipped on its comment's mesh: under 80 GB."""
    assert main(["plan", "--config", str(ROOT / "configs/nvium-1.5b.yaml"), "--mesh",
                 "data=1,fsdp=8,tensor=1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["per_device_bytes"] < 80e9 * 0.9, record["per_device_bytes"] / 2**30
