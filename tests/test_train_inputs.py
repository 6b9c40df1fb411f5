"""`cryoden train` input checks: nothing written before everything is checked, the data of a
resumed run, the two halves distinct, one-line config errors, and --help."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_subproc import write_pairs
from trainargs import affine_args

from cryoden.train import __main__ as cli
from cryoden.train import config as C
from cryoden.train import datarecord, pairs

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CRYODEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))


def parse(*argv: str) -> argparse.Namespace:
    return cli.add_args(argparse.ArgumentParser()).parse_args(list(argv))


def tiny(even: Path, odd: Path, out: Path, *more: str) -> list[str]:
    """Arguments of a one-step affine run on 48x48 halves."""
    return affine_args(even, odd, out, *more, steps=1)


def error_line(capsys) -> str:
    """The one ``cryoden train: error:`` line on stderr (asserts there is exactly one)."""
    lines = [x for x in capsys.readouterr().err.splitlines() if "error" in x.lower()]
    assert len(lines) == 1 and lines[0].startswith("cryoden train: error: "), lines
    return lines[0]


# ------------------------------------------------------------------ item 10: validate first


def test_failed_start_writes_nothing_and_the_corrected_command_runs(tmp_path, capsys):
    even, odd = write_pairs(tmp_path / "d", n=3)
    flat = tmp_path / "flat"  # a pair with a constant half: no std to normalise by
    write_pairs(flat, n=2)
    np.save(flat / "even" / "m1.npy", np.ones((48, 48), np.float32))
    out = tmp_path / "run"
    bad = {
        "crop 64 is larger": tiny(even, odd, out, "--crop", "64"),
        "is constant": tiny(flat / "even", flat / "odd", out),
        "no such": tiny(even, odd, out, "--init", str(tmp_path / "nowhere.npz")),
    }
    for why, argv in bad.items():
        try:
            rc = cli.main(parse(*argv))
        except SystemExit as e:  # argparse-level refusals count too
            rc = e.code
        assert rc == 2 and why in error_line(capsys)
        assert not out.exists(), f"{why}: the failed start wrote {sorted(out.rglob('*'))}"
    assert cli.main(parse(*tiny(even, odd, out))) == 0
    assert (out / "model.npz").is_file() and (out / datarecord.FILE).is_file()


# ------------------------------------------------------------------ item 11: the run's data


def test_resume_on_other_data_is_refused_and_moved_data_is_accepted(tmp_path, capsys):
    even, odd = write_pairs(tmp_path / "a", n=3)
    other_even, other_odd = write_pairs(tmp_path / "b", n=3, seed=1)  # same names and sizes
    out = tmp_path / "run"
    assert cli.main(parse(*tiny(even, odd, out))) == 0
    capsys.readouterr()
    before = {f: (out / f).read_bytes() for f in ("log.tsv", "run.json", "config.json")}

    assert cli.main(parse(*tiny(other_even, other_odd, out, "--steps", "2"))) == 2
    msg = error_line(capsys)
    assert "trained on other data" in msg and "another --out" in msg
    assert {f: (out / f).read_bytes() for f in before} == before  # nothing touched

    for d in (even, odd):  # a renamed pair
        (d / "m2.npy").rename(d / "m2x.npy")
    assert cli.main(parse(*tiny(even, odd, out, "--steps", "2"))) == 2
    assert "pair 3: even half m2.npy then, m2x.npy now" in error_line(capsys)

    moved = tmp_path / "elsewhere"  # the same data on other storage: resumes
    write_pairs(moved, n=3)
    assert cli.main(parse(*tiny(moved / "even", moved / "odd", out, "--steps", "2"))) == 0
    rows = (out / "log.tsv").read_text().splitlines()
    assert [r.split("\t")[1] for r in rows[1:]] == ["1", "2"]
    (out / datarecord.FILE).unlink()  # a run of an older version: the record is added
    assert cli.main(parse(*tiny(moved / "even", moved / "odd", out, "--steps", "2"))) == 0
    assert json.loads((out / datarecord.FILE).read_text())["pairs"][0]["even"] == "m0.npy"


def test_data_record_compares_names_sizes_and_sampled_content(tmp_path):
    even, odd = write_pairs(tmp_path / "d", n=2)
    found = pairs.find_pairs(even, odd)
    rec = datarecord.describe(found)
    assert [r["even"] for r in rec] == ["m0.npy", "m1.npy"]
    assert datarecord.difference(rec, datarecord.describe(found)) is None
    a = np.load(odd / "m1.npy")
    a[-1, -1] += 1  # the last bytes are sampled
    np.save(odd / "m1.npy", a)
    pairs._fingerprint_cached.cache_clear()  # rewritten within the file system's time tick
    assert "contents of m1.npy / m1.npy changed" in datarecord.difference(
        rec, datarecord.describe(found)
    )
    np.save(odd / "m1.npy", a[:40])
    assert "m1.npy was 9344 bytes" in datarecord.difference(rec, datarecord.describe(found))


# ------------------------------------------------------------------ item 13: distinct halves


def test_the_same_file_as_both_halves_is_refused(tmp_path, capsys):
    even, odd = write_pairs(tmp_path / "d", n=2)
    m = even / "m0.npy"
    (tmp_path / "link.npy").symlink_to(m)
    os.link(m, tmp_path / "hard.npy")
    shutil.copy(m, tmp_path / "copy.npy")
    for other, what in [
        (m, "the same file"),
        (tmp_path / "link.npy", "the same file"),
        (tmp_path / "hard.npy", "the same file"),
        (tmp_path / "copy.npy", "identical copies"),
    ]:
        with pytest.raises(ValueError, match=what):
            pairs.find_pairs(m, other)
    pairs.find_pairs(m, odd / "m0.npy")  # real halves pass

    # directory pairing, one folder: mic_ODD is a hard link of mic_EVN
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(m, mixed / "mic_EVN.npy")
    os.link(mixed / "mic_EVN.npy", mixed / "mic_ODD.npy")
    with pytest.raises(ValueError, match="mic_EVN.npy and odd half .*mic_ODD.npy are the same"):
        pairs.find_pairs(mixed, mixed)
    # and between two folders, odd/m1.npy a symlink to even/m1.npy
    (odd / "m1.npy").unlink()
    (odd / "m1.npy").symlink_to(even / "m1.npy")
    assert cli.main(parse(*tiny(even, odd, tmp_path / "run"))) == 2
    assert "are the same file" in error_line(capsys)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ item 14: config errors


@pytest.mark.parametrize(
    "setting, want",
    [
        ("data.crop=abc", "data.crop = 'abc': expected an integer"),
        ("optim.lr=fast", "optim.lr = 'fast': expected a number"),
        ("data.augment=3", "data.augment = 3: expected true or false"),
        ("run.steps=2.5", "run.steps = 2.5: expected an integer or null"),
        ("optim.lr=NaN", "optim.lr = nan: expected a number"),
        ("run.save_every_steps=0", "run.save_every_steps 0 must be positive"),
        ("optim.weight_decay=-1", "optim.weight_decay and momentum must be >= 0"),
    ],
)
def test_bad_set_values_are_one_line_errors(tmp_path, capsys, setting, want):
    even, odd = write_pairs(tmp_path / "d", n=2)
    assert cli.main(parse(*tiny(even, odd, tmp_path / "run", "--set", setting))) == 2
    assert error_line(capsys) == f"cryoden train: error: {want}"
    assert C.merge(C.Config(), {"run": {"steps": 3.0}}).run.steps == 3  # integral: accepted


@pytest.mark.parametrize(
    "text, want",
    [
        ("[1, 2]", "a config is a JSON object of sections .* not an array"),
        ("5", "not a number"),
        ('"train-2d"', "not a string"),
        ("{bad", "not valid JSON"),
        ('{"data": 5}', "config section 'data' must be an object"),
        ('{"data": {"crop": "big"}}', "data.crop = 'big': expected an integer"),
    ],
)
def test_config_file_that_is_not_a_config_is_a_one_line_error(tmp_path, capsys, text, want):
    even, odd = write_pairs(tmp_path / "d", n=2)
    cfg = tmp_path / "my.json"
    cfg.write_text(text)
    argv = tiny(even, odd, tmp_path / "run")
    argv[argv.index("train-2d-test")] = str(cfg)
    assert cli.main(parse(*argv)) == 2
    line = error_line(capsys)
    assert str(cfg) in line and re.search(want, line), line


# ------------------------------------------------------------------ item 20: --help


def test_help_gives_every_option_a_text_and_its_default():
    p = cli.add_args(argparse.ArgumentParser())
    for a in p._actions:
        if a.dest == "help":
            continue
        assert a.help, a.option_strings
        if not a.required and a.dest not in ("quiet", "set"):
            assert "default: " in a.help, (a.option_strings, a.help)
    crop = next(a for a in p._actions if a.dest == "crop")
    assert "default: from the preset (train-2d: 800, train-3d: 96)" in crop.help
    out = subprocess.run(
        [sys.executable, "-m", "cryoden", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), ""]), COLUMNS="200"),
    ).stdout
    for flag in ("--loss", "--optim", "--epochs"):
        block = re.search(rf"^ +{flag} .*?(?=^ +-|\Z)", out, re.M | re.S)
        assert block and "default: " in block.group(0), flag
    assert not re.search(r"``|:mod:|:func:|:class:", out)
    json.dumps(out)  # plain text


def test_ctrl_c_outside_the_training_loop_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    from cryoden.train import loop

    def interrupted(cfg, command=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    even, odd = write_pairs(tmp_path / "d", n=2)
    assert cli.main(parse(*tiny(even, odd, tmp_path / "run"))) == 130
    assert capsys.readouterr().err.splitlines() == [
        "cryoden train: interrupted; complete checkpoints are kept: run the same command to resume"
    ]


def test_init_model_is_never_replaced_by_the_exported_model(tmp_path, capsys):
    even, odd = write_pairs(tmp_path / "d", n=3)
    assert cli.main(parse(*tiny(even, odd, tmp_path / "first"))) == 0
    run = tmp_path / "second"
    run.mkdir()
    init = run / "model.npz"  # the user's model, where the new run would export its own
    shutil.copy(tmp_path / "first" / "model.npz", init)
    before = init.read_bytes()
    capsys.readouterr()
    rc = cli.main(parse(*tiny(even, odd, run, "--init", str(init))))
    assert rc == 2 and "refusing to overwrite" in error_line(capsys)
    assert init.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["model.npz"]
