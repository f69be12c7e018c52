"""RestoreOptions is declared once: every face (restore(), the MONAI transforms, run_batch, the CLI)
accepts exactly its fields, with its defaults, and a bad value is refused the same way everywhere."""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from napari_restore import Volume
from napari_restore.batch import run_batch
from napari_restore.cli import build_parser
from napari_restore.errors import InputError
from napari_restore.inference import restore
from napari_restore.options import OPTION_NAMES, OptionInfo, RestoreOptions, options_from_args

#: One invalid value per option: adding an option means adding its bad example here too.
BAD = {"task": "sharpen", "model": 3, "mode": "4d", "device": "no such device", "strength": 1.5,
       "batch_size": 0, "tile": (0, 5), "overlap": 1.0, "stitch_device": "??", "ensemble": 3}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(RestoreOptions)}


def _keyword_defaults(fn) -> dict[str, object]:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: sub.choices[name] for name in ("restore", "batch")}


def test_every_option_has_help_a_default_that_is_valid_and_a_bad_example():
    assert set(BAD) == set(OPTION_NAMES)
    opts = RestoreOptions()
    for name in OPTION_NAMES:
        info = RestoreOptions.info(name)
        assert isinstance(info, OptionInfo) and len(info.help) > 10, name
        assert getattr(opts, name) == DEFAULTS[name]
        assert info.flag(name) == "--" + name.replace("_", "-")


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_an_input_error_naming_the_option(name):
    with pytest.raises(InputError, match=name):
        RestoreOptions(**{name: BAD[name]})


def test_values_are_normalised_once():
    o = RestoreOptions(mode="3D", tile=64, batch_size=np.int64(4), strength="0.5", ensemble=2.0)
    assert (o.mode, o.tile, o.batch_size, o.strength, o.ensemble) == ("3d", (64, 64, 64), 4, 0.5, 2)
    assert RestoreOptions(tile=[32, 48]).tile == (32, 48)
    with pytest.raises(InputError, match="tile"):
        RestoreOptions(mode="3d", tile=(32, 48))  # 3-D needs three edges
    with pytest.raises(InputError, match="task='restore'"):
        RestoreOptions(model={"denoise": "m"})
    assert RestoreOptions(task="restore", model={"denoise": "m"}).model == {"denoise": "m"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.strength = 1.0  # type: ignore[misc]
    assert o.replace(strength=1.0).strength == 1.0 and o.strength == 0.5
    with pytest.raises(InputError, match="strength"):
        o.replace(strength=-1)
    with pytest.raises(TypeError, match="unknown restore option"):
        o.replace(sharpness=2)
    assert RestoreOptions.build({"task": "restore", "model": {"deblur": "m"}}).task == "restore"


def test_restore_takes_exactly_the_options_with_their_defaults():
    params = _keyword_defaults(restore)
    assert {n: params[n] for n in OPTION_NAMES} == DEFAULTS
    assert set(params) - set(OPTION_NAMES) == {"volume", "progress", "cancel", "options"}
    vol = Volume(np.zeros((2, 8, 8), np.float32), np.eye(4), "CT")
    for name, bad in BAD.items():
        with pytest.raises(InputError, match=name):
            restore(vol, **{name: bad})


def test_restore_options_and_keywords_merge_keywords_winning():
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(0, 20, (3, 32, 32)).astype(np.float32), np.eye(4), "CT")
    opts = RestoreOptions(task="enhance", device="cpu", strength=0.5)
    half = restore(vol, options=opts)
    assert half.meta["provenance"][-1]["strength"] == 0.5
    none = restore(vol, options=opts, strength=0.0)  # the keyword overrides the options
    np.testing.assert_array_equal(none.array, vol.array)
    assert none.meta["provenance"][-1]["task"] == "enhance"
    np.testing.assert_array_equal(restore(vol, "enhance", device="cpu", strength=0.5).array, half.array)


def test_the_transforms_take_the_options_but_task():
    from napari_restore import transforms as T

    expected = {n: d for n, d in DEFAULTS.items() if n != "task"}
    for cls in (T.Denoise, T.Deblur, T.EnhanceEdges, T.Restore):
        params = _keyword_defaults(cls.__init__)
        assert {n: params[n] for n in expected} == expected, cls
        assert set(params) - set(expected) == {"self", "options", "modality"}, cls
        t = cls(device="cpu", strength=0.5, modality="CT")
        assert t.options == RestoreOptions(task=cls.task, device="cpu", strength=0.5)
        with pytest.raises(TypeError):
            cls(task="denoise")
    for cls in (T.Denoised, T.Deblurd, T.EnhanceEdgesd, T.Restored):
        params = _keyword_defaults(cls.__init__)
        assert {n: params[n] for n in expected} == expected, cls
        assert set(params) - set(expected) == {"self", "keys", "options", "modality", "allow_missing_keys"}, cls
        d = cls("image", RestoreOptions(strength=0.25), overlap=0.5)
        assert d.transform.options == RestoreOptions(task=cls.array_cls.task, strength=0.25, overlap=0.5)
    for name, bad in BAD.items():
        if name != "task":
            with pytest.raises(InputError, match=name):
                T.Denoise(**{name: bad})
            with pytest.raises(InputError, match=name):
                T.Denoised("image", **{name: bad})


def test_run_batch_takes_the_options_and_checks_them_before_anything_else(tmp_path):
    params = _keyword_defaults(run_batch)
    assert {n: params[n] for n in OPTION_NAMES} == DEFAULTS
    assert "options" in params
    for name, bad in BAD.items():
        with pytest.raises(InputError, match=name):
            run_batch(tmp_path / "missing", tmp_path / "out", **{name: bad})
        with pytest.raises(InputError, match=name):
            run_batch(tmp_path / "missing", tmp_path / "out", {name: bad})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["restore", "batch"])
def test_the_cli_options_are_generated_from_the_fields(command):
    sub = _subparsers()[command]
    group = next(g for g in sub._action_groups if g.title == "restore options")
    actions = {a.dest: a for a in group._group_actions}
    assert tuple(actions) == OPTION_NAMES
    for name, action in actions.items():
        info = RestoreOptions.info(name)
        assert action.option_strings == [info.flag(name)]
        assert action.default == DEFAULTS[name]
        assert action.choices == info.choices
        assert "(default: " in action.help
    positional = ["in", "out"]
    assert options_from_args(sub.parse_args(positional)) == RestoreOptions()
    args = sub.parse_args(positional + ["--task", "enhance", "--mode", "3D", "--tile", "16,32,32", "--ensemble", "2",
                                        "--strength", "0.5", "--batch-size", "3", "--overlap", "0.5",
                                        "--stitch-device", "cpu", "--device", "cpu", "--model", "m"])
    assert options_from_args(args) == RestoreOptions(task="enhance", mode="3d", tile=(16, 32, 32), ensemble=2,
                                                     strength=0.5, batch_size=3, overlap=0.5, stitch_device="cpu",
                                                     device="cpu", model="m")


def test_the_cli_refuses_a_bad_option_with_exit_code_1_before_reading(tmp_path, capsys):
    from napari_restore.cli import main

    for argv in (["--strength", "2"], ["--overlap", "1"], ["--tile", "0"]):
        for command in (["restore", str(tmp_path / "missing.nii.gz"), str(tmp_path / "o.nii.gz")],
                        ["batch", str(tmp_path / "missing"), str(tmp_path / "out")]):
            assert main(command + argv) == 1
            err = capsys.readouterr().err
            assert argv[0].lstrip("-") in err and "missing" not in err, err
