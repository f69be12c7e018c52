"""The command line explains itself: every sub-command has a description, every option help text and its
default; errors speak the command line's language."""
from __future__ import annotations

import argparse

import pytest

from napari_restore.cli import HelpFormatter, build_parser, main

FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
         argparse._AppendConstAction, argparse._CountAction)


def _parsers(parser, path=("napari-restore",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_of_every_subcommand_has_help_and_a_default(capsys):
    parsers = list(_parsers(build_parser()))
    assert {p[-1] for p, _ in parsers} >= {"restore", "batch", "info", "train", "evaluate", "export-bundle", "demo",
                                           "pacs", "add", "find", "get", "send"}
    problems = []
    for path, parser in parsers:
        where = " ".join(path)
        if not parser.description:
            problems.append(f"{where}: no description")
        fmt = HelpFormatter(where)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip():
                problems.append(f"{where} {name}: no help")
            elif action.option_strings and not isinstance(action, FLAGS) and "default" not in fmt._get_help_string(action).lower():
                problems.append(f"{where} {name}: default not shown")
            if action.choices is not None and len({str(c).lower() for c in action.choices}) != len(action.choices):
                problems.append(f"{where} {name}: a choice listed twice {list(action.choices)}")
        # --help itself renders (a % in a help text would break it)
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([*path[1:], "--help"])
        assert stop.value.code == 0
        capsys.readouterr()
    assert not problems, "\n".join(problems)


def test_help_shows_defaults_and_each_choice_once(capsys):
    with pytest.raises(SystemExit):
        main(["restore", "--help"])
    out = capsys.readouterr().out
    assert "{CT,MR}" in out and "ct,mr" not in out and "--no-progress" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--epochs EPOCHS most epochs", "(default: 50)", "--lr LR peak learning rate", "(default: 0.001)",
                 "(default: supervised)", "(default: 0.1,0.5)"):
        assert text in out, text
    args = build_parser().parse_args(["restore", "a.nii.gz", "b.nii.gz", "--modality", "mr"])
    assert args.modality == "MR"


def test_unknown_nifti_modality_says_how_to_set_it(shared_data, tmp_path, capsys):
    rc = main(["restore", str(shared_data / "mr" / "nifti" / "T1.nii.gz"), str(tmp_path / "out.nii.gz"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--modality CT|MR" in err and "Train one" not in err, err
    assert not (tmp_path / "out.nii.gz").exists()


def test_nifti_ct_is_recognised_and_no_progress_draws_no_bar(shared_data, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert main(["restore", str(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"), str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "%|" not in captured.err  # no tqdm bar
    # the overwrite error in the command line's words
    rc = main(["restore", str(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"), str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--overwrite" in err and "overwrite=True" not in err, err


def test_info_prints_each_warning_once_and_explains_a_tilted_spacing(shared_data, capsys):
    assert main(["info", str(shared_data / "ct" / "philips-head-phantom" / "tilt" / "S3010")]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert text.count("gantry tilt of 16.50 deg") == 1, text
    assert "slice planes 2.4 mm apart along the normal, 2.5 mm between slice positions" in captured.out
