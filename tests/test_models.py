"""Model registry: cards, safe loading (untrusted files refused), atomic saving, discovery."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from _engine_helpers import one_torch_thread, TINY_ARGS, save_tiny, tiny_card
from napari_restore.errors import ModelError, OutputError
from napari_restore.models import (BUNDLED_DIR, ModelCard, find_model, list_models, load_model, read_card,
                                   save_model)
from napari_restore.networks import build_network


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    folder = tmp_path / "user-models"
    folder.mkdir()
    monkeypatch.setenv("NAPARI_RESTORE_MODELS", str(folder))
    return folder


def _perturbed():
    net = build_network("ResidualUNet", TINY_ARGS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def test_no_weights_are_bundled_and_user_models_are_listed(user_dir):
    # a bundled model must be a real, documented one: a card saying what it was trained on and
    # what it measured (until trained weights land there are none)
    bundled = list_models()
    weights = sorted(p for p in BUNDLED_DIR.rglob("*") if p.suffix in (".pt", ".pth"))
    assert sorted(c.path for c in bundled) == weights
    assert all(c.source == "bundled" and c.training_data and c.metrics for c in bundled)
    save_tiny(user_dir / "tiny-a", name="tiny-a")
    # the "pair of files" form
    save_tiny(user_dir / "tmp-b", name="tiny-b", task="deblur")
    shutil.move(user_dir / "tmp-b" / "card.json", user_dir / "tiny-b.json")
    shutil.move(user_dir / "tmp-b" / "model.pt", user_dir / "tiny-b.pt")
    shutil.rmtree(user_dir / "tmp-b")
    cards = [c for c in list_models() if c.source == "user"]
    assert sorted(c.name for c in cards) == ["tiny-a", "tiny-b"]
    assert all(c.source == "user" and c.path.is_file() for c in cards)
    assert [c.name for c in list_models(task="deblur") if c.source == "user"] == ["tiny-b"]
    assert [c for c in list_models(modality="MR") if c.source == "user"] == []
    assert load_model("tiny-b").card.task == "deblur"


def test_broken_card_in_user_folder_is_skipped_with_a_warning(user_dir):
    save_tiny(user_dir / "good")
    bad = user_dir / "bad"
    bad.mkdir()
    (bad / "card.json").write_text("{not json")
    (bad / "model.pt").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="bad"):
        cards = list_models()
    assert [c.name for c in cards if c.source == "user"] == ["tiny-ct-denoise"]


def test_round_trip_by_folder_json_pt_and_name(tmp_path, user_dir):
    net = _perturbed()
    folder = save_model(net, tiny_card(metrics={"psnr_gain_db": 0.1}), tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.pt"]
    card = json.loads((folder / "card.json").read_text())
    assert card["architecture"] == {"name": "ResidualUNet", "args": {**TINY_ARGS, "context": 0}}
    assert card["intensity"]["kind"] == "ct" and card["format_version"] == 1
    x = torch.randn(1, 1, 40, 52)
    with torch.no_grad():
        expect = net(x)
        for ref in (folder, folder / "card.json", folder / "model.pt"):
            loaded = load_model(ref)
            assert loaded.card.name == "tiny-ct-denoise" and not loaded.network.training
            torch.testing.assert_close(loaded.network(x), expect)
    shutil.copytree(folder, user_dir / "m")
    assert load_model("tiny-ct-denoise").card.source == "user"
    with pytest.raises(ModelError, match="no installed model is named"):
        load_model("nonexistent-model")


def test_save_is_atomic_and_checked(tmp_path):
    net = _perturbed()
    target = save_model(net, tiny_card(), tmp_path / "m")
    with pytest.raises(OutputError, match="exists"):
        save_model(net, tiny_card(), target)
    save_model(net, ModelCard.from_dict(tiny_card(version="0.0.2")), target, overwrite=True)
    assert read_card(target).version == "0.0.2"
    other = {**tiny_card(), "architecture": {"name": "ResidualUNet", "args": {**TINY_ARGS, "channels": [4, 8]}}}
    with pytest.raises(ModelError, match="does not match"):
        save_model(net, other, tmp_path / "n")
    with pytest.raises(ModelError, match="task"):
        save_model(net, tiny_card(task="segment"), tmp_path / "n")
    assert not (tmp_path / "n").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial leftovers


def test_find_model_prefers_exact_modality_then_version(user_dir, monkeypatch):
    monkeypatch.setattr("napari_restore.models.BUNDLED_DIR", user_dir / "no-bundled-models")
    save_tiny(user_dir / "a", name="a", modality="any")
    save_tiny(user_dir / "b", name="b", version="0.0.1")
    save_tiny(user_dir / "c", name="c", version="0.10.0")
    save_tiny(user_dir / "d", name="d", version="0.9.0")
    assert find_model("denoise", "CT").name == "c"
    assert find_model("denoise", "MR").name == "a"
    assert find_model("denoise", "OT").name == "a"
    assert find_model("denoise", "CT", dims=3) is None
    assert find_model("deblur", "CT") is None
    # a model made for thin slices (max_slice_spacing_mm): preferred where it fits, never beyond
    save_tiny(user_dir / "thin", name="thin", version="0.0.1", max_slice_spacing_mm=3.0)
    assert read_card(user_dir / "thin").max_slice_spacing_mm == 3.0
    assert find_model("denoise", "CT", slice_spacing_mm=2.0).name == "thin"
    assert find_model("denoise", "CT", slice_spacing_mm=3.0).name == "thin"
    assert find_model("denoise", "CT", slice_spacing_mm=5.0).name == "c"
    assert find_model("denoise", "CT").name == "c"  # spacing unknown: the general model
    with pytest.raises(ModelError, match="max_slice_spacing_mm"):
        ModelCard.from_dict({**tiny_card(), "max_slice_spacing_mm": -1})


class _RunsCode:
    """A pickle payload: unpickling with weights_only=False would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_without_running(tmp_path):
    folder = save_tiny(tmp_path / "m")
    marker = tmp_path / "PWNED"
    with open(folder / "model.pt", "wb") as fh:
        pickle.dump({"branch.model.0.conv.weight": _RunsCode(marker)}, fh)
    with pytest.raises(ModelError, match="refused to load the weights"):
        load_model(folder)
    assert not marker.exists()
    torch.save({"w": _RunsCode(marker)}, folder / "model.pt")  # the torch zip format too
    with pytest.raises(ModelError, match="refused"):
        load_model(folder)
    assert not marker.exists()


def test_unknown_architecture_in_card_is_refused(tmp_path):
    folder = save_tiny(tmp_path / "m")
    card = json.loads((folder / "card.json").read_text())
    card["architecture"]["name"] = "torch.nn.Module"
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="unknown architecture") as err:
        load_model(folder)
    assert str(folder) in str(err.value)
    card["architecture"] = {"name": "ResidualUNet", "args": {**TINY_ARGS, "norm": "instance"}}
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="norm"):
        load_model(folder)


def test_truncated_and_mismatched_state_dicts_are_refused(tmp_path):
    folder = save_tiny(tmp_path / "m")
    state = torch.load(folder / "model.pt", weights_only=True)
    partial = dict(list(state.items())[:-3])
    torch.save(partial, folder / "model.pt")
    with pytest.raises(ModelError, match="do not fit.*Missing key"):
        load_model(folder)
    bigger = build_network("ResidualUNet", {**TINY_ARGS, "channels": [16, 32]}).state_dict()
    torch.save(bigger, folder / "model.pt")
    with pytest.raises(ModelError, match="size mismatch"):
        load_model(folder)
    raw = (tmp_path / "full.pt")
    torch.save(state, raw)
    (folder / "model.pt").write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])  # truncated file
    with pytest.raises(ModelError, match="refused to load"):
        load_model(folder)
    torch.save({k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()}, folder / "model.pt")
    with pytest.raises(ModelError, match="NaN"):
        load_model(folder)
    (folder / "model.pt").unlink()
    with pytest.raises(ModelError, match="not found"):
        load_model(folder)


@pytest.mark.parametrize("change,match", [
    ({"task": "segment"}, "task"), ({"dims": 4}, "dims"), ({"modality": "PET"}, "modality"),
    ({"name": "../evil"}, "name"), ({"intensity": {"kind": "magic"}}, "intensity"),
    ({"format_version": 99}, "format_version"), ({"dims": 3}, "spatial_dims"),
    ({"self_ensemble": 3}, "self_ensemble"),
])
def test_invalid_cards_are_refused_naming_the_file(tmp_path, change, match):
    folder = save_tiny(tmp_path / "m")
    card = {**json.loads((folder / "card.json").read_text()), **change}
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=match) as err:
        load_model(folder)
    assert "card.json" in str(err.value)


def test_card_repr_is_one_short_line():
    from napari_restore import list_models

    cards = list_models()
    assert cards and len(repr(cards)) < 300 * len(cards)  # no training history in the repr
    assert all("\n" not in repr(c) and c.name in repr(c) for c in cards)


def test_a_fine_tune_below_its_start_on_validation_is_auto_eligible_only_when_the_matrix_shows_less_harm():
    """The validation slices are drawn from the training range and can miss the mild conditions where
    a restorer harms (a deblurrer given a sharp image): a card whose condition matrix shows less
    summed loss below the input and a better worst cell than the version it replaces stays eligible."""
    def card(now=None, prev=None):
        metrics = {"psnr_gain_db": 1.3, "val_psnr": 27.1, "val_psnr_init": 28.0}
        if now is not None:
            metrics["condition_matrix"] = now
        if prev is not None:
            metrics["previous_version"] = {"version": "0.3.0", "condition_matrix": prev}
        return ModelCard.from_dict(tiny_card(metrics=metrics))

    old = {"cells": 45, "harm_db": 27.4, "worst_gain_over_input_db": -6.53}
    safer = {"cells": 45, "harm_db": 11.2, "worst_gain_over_input_db": -3.80}
    assert card().auto_eligible() is False  # below its start, nothing else to go on
    assert card(safer, old).auto_eligible() is True
    assert card(old, safer).auto_eligible() is False  # more harm than the version it replaces
    assert card({**safer, "worst_gain_over_input_db": -7.0}, old).auto_eligible() is False  # a worse worst cell
    assert card({**safer, "cells": 44}, old).auto_eligible() is False  # not the same matrix
    assert card({**safer, "harm_db": "less"}, old).auto_eligible() is False
    below_input = ModelCard.from_dict(tiny_card(metrics={"psnr_gain_db": -0.1, "condition_matrix": safer,
                                                         "previous_version": {"condition_matrix": old}}))
    assert below_input.auto_eligible() is False  # worse than its own input on validation: never
