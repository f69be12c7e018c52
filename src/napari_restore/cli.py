"""``napari-restore``: the command line, a thin face over the public API.

Sub-commands: ``restore`` (one file or series), ``batch`` (a whole tree), ``info`` (version, device, models; the series
in an input), ``demo`` (restore the bundled sample phantom and write a before/after picture).
Exit codes: 0 success, 1 an error we explain (bad input, bad model, unwritable output),
2 bad command-line usage, 130 cancelled (Ctrl-C; nothing is written).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import Cancelled, InputError, RestoreError
from .options import add_restore_options, options_from_args
from .terminal import progress_bar as _progress_bar
from .volume import Volume

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


# ----------------------------------------------------------------------------- helpers
def _pick_series(volumes: list[Volume], series: str | None, path: Path) -> Volume:
    """The volume chosen by ``--series`` (index, SeriesNumber or SeriesInstanceUID), else the main one."""
    if series is None:
        return volumes[0]
    for v in volumes:
        if series in (str(v.meta.get("series_number")), v.meta.get("series_uid")):
            return v
    if series.isdigit() and int(series) < len(volumes):
        return volumes[int(series)]
    listing = "; ".join(f"#{i}: {_describe(v)}" for i, v in enumerate(volumes))
    raise InputError(f"no series {series!r} here; choose an index, SeriesNumber or SeriesInstanceUID: {listing}", path)


def _describe(v: Volume) -> str:
    sp = "x".join(f"{s:.3g}" for s in v.spacing)
    tilt = v.meta.get("gantry_tilt_deg") or 0.0
    # with a gantry tilt the first spacing is the step between slice positions (the affine's sheared
    # column); the slice planes are closer: that step times cos(tilt), along the slice normal
    extra = (f", gantry tilt {tilt:.1f} deg: slice planes {v.slice_distance:.3g} mm apart along the normal, "
             f"{v.spacing[0]:.3g} mm between slice positions" if tilt > 0.05 else "")
    return (f"{v.meta.get('description', '')!s} [{v.modality}] shape {tuple(v.array.shape)} spacing {sp} mm"
            f"{extra} (SeriesNumber {v.meta.get('series_number', '-')})")


def _is_dicom_target(path: Path, fmt: str | None) -> bool:
    if fmt:
        return fmt == "dicom"
    name = path.name.lower()
    return not any(name.endswith(s) for s in (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"))


# ----------------------------------------------------------------------------- commands
def cmd_restore(args: argparse.Namespace) -> int:
    from . import load, restore, save

    src = Path(args.input)
    if str(args.input).startswith("pacs://"):  # retrieve into the cache first (resumable), then as a folder
        from .pacs import fetch_source

        bar, done = (None, lambda: None) if args.no_progress else _progress_bar("retrieve", unit="inst")
        try:
            src = fetch_source(args.input, progress=bar).folder
        finally:
            done()
    options = options_from_args(args)  # checked before the series is read
    volume = _pick_series(load(src), args.series, src)
    if args.modality and volume.modality == "OT":  # NIfTI/MHA do not say: the user does
        volume.modality = args.modality.upper()
    if volume.modality not in ("CT", "MR") and options.model is None and options.task != "enhance":
        raise InputError(f"the image's modality is unknown ({volume.modality!r}: NIfTI, MHA and NRRD files do not record "
                         "it, and its values do not look like CT Hounsfield units, which would have said CT), so no "
                         "model can be chosen for it: pass --modality CT|MR (or --model NAME)", src)
    out = Path(args.output)
    dicom_out = _is_dicom_target(out, args.format)
    deid = None
    if args.deidentify and dicom_out:
        from .deidentify import Deidentifier, check_burned_in

        check_burned_in(volume.meta.get("dicom_header"), args.accept_burned_in, out)  # before the long run
        key = args.deidentify_key or os.environ.get("NAPARI_RESTORE_DEID_KEY") or None
        deid = Deidentifier(key=key, dates=args.deidentify_dates)
    progress, close = (None, lambda: None) if args.no_progress else \
        _progress_bar(f"{options.task} {volume.meta.get('description', src.name)}")
    try:
        result = restore(volume, options=options, progress=progress)
    finally:
        close()
    kwargs = {}
    if dicom_out:
        kwargs = {"format": "dicom", "series_description": args.series_description, "modality": args.modality.upper() if args.modality else None}
        if deid is not None:
            kwargs.update(deidentify=deid, accept_burned_in=args.accept_burned_in,
                          keep_description=args.deidentify_keep_description)
    if args.resample_uniform:
        kwargs["resample"] = "uniform"
    if args.send_to and not dicom_out:
        raise InputError("--send-to needs a DICOM output (a folder, or --format dicom)", out)
    written = save(result, out, overwrite=args.overwrite, **kwargs)
    step = result.meta.get("provenance", [{}])[-1]
    print(f"wrote {written} ({step.get('model', args.task)}, {step.get('seconds', 0):.1f} s)")
    if args.send_to:
        from .pacs.cli import send_derived

        return send_derived(args.send_to, written, via=args.send_via, progress=not args.no_progress)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from .inference import resolve_device
    from .models import list_models

    if args.input:
        from . import load

        volumes = load(args.input)
        for i, v in enumerate(volumes):
            print(f"#{i}: {_describe(v)}")
            for w in dict.fromkeys(v.meta.get("warnings", [])):
                print(f"     warning: {w}")
                args.shown_warnings.add(w)  # main() does not print them again
        return EXIT_OK
    import torch

    print(f"napari-restore {__version__}  (torch {torch.__version__})")
    print(f"device: auto -> {resolve_device('auto')}")
    models = list_models()
    if not models:
        print("models: none installed")
    for c in models:
        extra = "".join([f" context={c.context}" if c.context else "",
                         f" slices<={c.max_slice_spacing_mm:g}mm" if c.max_slice_spacing_mm else "",
                         f" self-ensemble={c.self_ensemble}" if c.self_ensemble > 1 else ""])
        print(f"model: {c.name} {c.version}  task={c.task} modality={c.modality} {c.dims}D{extra}  [{c.source}]")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Restore the bundled sample phantom; write NIfTI, a DICOM series and a before/after PNG."""
    from . import restore, save
    from .figures import MissingExtraError, before_after_png
    from .geometry import largest_step
    from .models import find_model
    from .sample import make_ct_phantom

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    noisy = make_ct_phantom(seed=0)
    card = find_model("denoise", "CT", dims=2, slice_spacing_mm=largest_step(noisy))  # what restore() picks
    task = "denoise" if card is not None else "enhance"
    if card is None:
        print("no trained CT denoising model is installed: the demo runs the classical 'enhance' task instead",
              file=sys.stderr)
    progress, close = _progress_bar(f"{task} sample phantom")
    try:
        restored = restore(noisy, task=task, device=args.device, progress=progress)
    finally:
        close()
    name = card.name if card is not None else task
    save(noisy, out / "sample_input.nii.gz", overwrite=True)
    save(restored, out / f"sample_{name}.nii.gz", overwrite=True)
    save(restored, out / f"sample_{name}_dicom", format="dicom", overwrite=True)
    try:
        before_after_png(noisy, restored, out / "before_after.png", title=f"sample CT phantom: input vs {name}")
    except MissingExtraError as exc:  # the core install has no matplotlib: the volumes are written all the same
        print(f"no before/after picture: {exc}", file=sys.stderr)
    for p in sorted(out.iterdir()):
        print(f"wrote {p}")
    return EXIT_OK


def cmd_batch(args: argparse.Namespace) -> int:
    """Restore every image series under INPUT_ROOT into OUTPUT_ROOT (see napari_restore.batch)."""
    from .batch import run_batch

    import logging

    warnings.simplefilter("ignore", UserWarning)  # reader notes go to the manifest's warnings column
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # a corrupt file's message goes to the manifest
    if args.send_to and args.format == "nifti":
        raise InputError("--send-to needs DICOM output (--format auto or dicom)", args.output_root)
    input_root = args.input_root
    if str(input_root).startswith("pacs://"):  # retrieve into the cache first (resumable), then as a folder
        from .pacs.cli import fetch_with_bar

        input_root = fetch_with_bar(input_root, progress=not args.no_progress)
    result = run_batch(input_root, args.output_root, options_from_args(args), format=args.format,
                       deidentify=args.deidentify,
                       deidentify_key=args.deidentify_key, deidentify_dates=args.deidentify_dates,
                       accept_burned_in=args.accept_burned_in, retry_failed=args.retry_failed, dry_run=args.dry_run,
                       shard=args.shard, readers=args.readers, writers=args.writers, prefetch=args.prefetch,
                       pool=args.pool, max_voxels=args.max_voxels, progress=False if args.no_progress else "auto")
    if args.send_to and not args.dry_run:
        from .pacs.cli import send_written

        return max(result.exit_code, send_written(args.send_to, [o.output for o in result.done_now], via=args.send_via,
                                                  progress=not args.no_progress))
    return result.exit_code


def cmd_train(args: argparse.Namespace) -> int:
    """Train or fine-tune a model (see napari_restore.training); also runs under torchrun."""
    import os

    from .training import train
    from .training.config import config_from_args

    result = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary(args.keep))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import run_from_args

    run_from_args(args)
    return EXIT_OK


def cmd_export_bundle(args: argparse.Namespace) -> int:
    from .models import load_model
    from .training import export_bundle

    out = export_bundle(load_model(args.model), args.out, overwrite=args.overwrite)
    print(f"wrote MONAI bundle {out}")
    return EXIT_OK


# ----------------------------------------------------------------------------- parser
class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help says it already.

    Like ``argparse.ArgumentDefaultsHelpFormatter``, but flags (``store_true``) are left alone,
    a tuple default reads ``128,128`` and ``None`` reads ``none``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                                   argparse._AppendConstAction, argparse._CountAction, argparse._HelpAction,
                                   argparse._VersionAction))
        if flag or not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        d = action.default
        shown = ("none" if d is None or d == [] else ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d))
        return f"{text} (default: {shown.replace('%', '%%')})"


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every (sub-)parser gets :class:`HelpFormatter`, and a description (its help line) when it has none."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                _finish(sub)


def _modality(text: str) -> str:
    """``--modality``: CT or MR in any case."""
    return str(text).upper()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-restore", description="Restore CT and MR volumes (denoise, deblur, "
                                "sharpen) with residual U-Nets; read and write DICOM series, NIfTI, MHA/NRRD.")
    p.add_argument("--version", action="version", version=f"napari-restore {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("restore", help="restore one series or file and write the result",
                       description="Restore one series (a DICOM file or folder, NIfTI, MHA/NRRD) and write a NIfTI/"
                                   "MHA file or a derived DICOM series (a folder).")
    r.add_argument("input", help="a DICOM file or folder (recursive), .nii/.nii.gz, .mha/.nrrd, or "
                   "pacs://SERVER/STUDY_UID/SERIES_UID (see `napari-restore pacs`)")
    r.add_argument("output", help="a .nii/.nii.gz/.mha/.nrrd file, or a folder for a derived DICOM series")
    r.add_argument("--series", default=None, help="which series when INPUT holds several: an index from "
                   "`napari-restore info INPUT`, a SeriesNumber or a SeriesInstanceUID (default: the main one)")
    add_restore_options(r)
    r.add_argument("--format", choices=("dicom", "nifti", "mha", "nrrd"), default=None,
                   help="force the output format (default: from OUTPUT's suffix; no suffix = DICOM folder)")
    r.add_argument("--series-description", default=None, help="SeriesDescription of an exported DICOM series "
                   "(default: the source's, with the restoration steps)")
    r.add_argument("--modality", default=None, type=_modality, choices=("CT", "MR"),
                   help="CT or MR (any case): the input's modality when the file does not say (NIfTI/MHA/NRRD; CT is "
                        "recognised from Hounsfield values with air in them), which picks the model and is written "
                        "into a DICOM export (default: from the file)")
    r.add_argument("--resample-uniform", action="store_true",
                   help="unevenly spaced slices: interpolate onto a uniform grid at the smallest step (linear along "
                        "the slice normal, recorded in the provenance); without it NIfTI/MHA/NRRD output of such a "
                        "series is refused, while a DICOM series keeps every slice's own position")
    r.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never done otherwise)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (the result line is still "
                   "printed)")
    r.add_argument("--deidentify", action="store_true",
                   help="DICOM output: apply the DICOM PS3.15 Annex E basic confidentiality profile (new UIDs, "
                        "no names/IDs/dates, no private tags); NIfTI/MHA/NRRD outputs carry no patient attributes")
    r.add_argument("--deidentify-keep-description", action="store_true",
                   help="with --deidentify: keep the source's SeriesDescription (PS3.15 Clean Descriptors Option: you "
                        "vouch it identifies no one); default: the series is named by its steps and models")
    r.add_argument("--accept-burned-in", action="store_true",
                   help="with --deidentify: export even if the source says BurnedInAnnotation=YES")
    r.add_argument("--deidentify-key", default=None,
                   help="secret key for a reproducible UID/date mapping across exports (default: "
                        "$NAPARI_RESTORE_DEID_KEY, else random per run)")
    r.add_argument("--deidentify-dates", choices=("remove", "shift"), default="remove",
                   help="remove dates (basic profile, default) or shift them back by a key-derived number of days")
    r.add_argument("--send-to", default=None, metavar="SERVER", help="store the derived DICOM series on this "
                   "configured PACS when it is written (with --deidentify: the de-identified series)")
    r.add_argument("--send-via", choices=("store", "stow"), default=None, help="C-STORE or STOW-RS (default: C-STORE "
                   "when the server has a DIMSE endpoint)")
    r.set_defaults(func=cmd_restore)

    i = sub.add_parser("info", help="version, compute device and installed models; or the series in INPUT",
                       description="Without INPUT: the version, the compute device 'auto' picks and the installed "
                                   "models. With INPUT: every series in it (index for --series, shape, spacing, "
                                   "gantry tilt) and the reader's notes on it, each once.")
    i.add_argument("input", nargs="?", help="list the series in this file or folder (index, shape, spacing)")
    i.set_defaults(func=cmd_info)

    from .evaluate import add_evaluate_arguments
    from .training.config import add_train_arguments

    t = sub.add_parser("train", help="train or fine-tune a model on your scans (supervised, paired, self-supervised)",
                       description="Train or fine-tune a denoising/deblurring model. Runs under `torchrun "
                                   "--nproc_per_node N napari-restore train ...` for several processes or nodes.")
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="compare methods (model, NLM, BM3D, Richardson-Lucy) on simulated degradations",
                       description="Degrade clean scans, restore them with each method and report PSNR/SSIM "
                                   "(CT on the W400/L50 window scaled to [0, 1]) and time per slice.")
    add_evaluate_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export-bundle", help="write an installed model or model folder as a MONAI bundle",
                       description="Write MODEL as a MONAI bundle folder that MONAI's own runner executes: "
                                   "python -m monai.bundle run --config_file OUT/configs/inference.json --dataset_dir IN "
                                   "--output_dir RESTORED (needs only MONAI and this package). The bundle also loads "
                                   "as a model here (--model OUT).")
    x.add_argument("model", help="an installed model's name (napari-restore info) or a model folder")
    x.add_argument("out", help="the bundle folder to write (atomically)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never done otherwise)")
    x.set_defaults(func=cmd_export_bundle)

    d = sub.add_parser("demo", help="restore the bundled sample CT phantom; write NIfTI, DICOM and a before/after PNG",
                       description="Generate the sample CT phantom, denoise it with the model restore() picks (or the "
                                   "classical enhance task when none is installed) and write the input and result as "
                                   "NIfTI, the result as a DICOM series and a before/after PNG (with the [figures] "
                                   "extra) into --out, replacing earlier demo files.")
    d.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    d.add_argument("--device", default="auto", help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N, mps")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("batch", help="restore every image series of a tree of studies (resumable, shardable)",
                       description="Walk INPUT_ROOT (DICOM folders, DICOMDIR, NIfTI/MHA files), restore every image "
                                   "series (localizers, secondary captures, reports and other non-image objects are "
                                   "skipped and counted) and write the results under OUTPUT_ROOT mirroring the input "
                                   "tree, with OUTPUT_ROOT/manifest.csv (one row per series). Rerunning the same "
                                   "command skips what is done. Exit code 0 when every series is done, 1 otherwise. "
                                   "Under torchrun each rank takes its share; --shard i/n does the same for job arrays.")
    b.add_argument("input_root", help="the input tree (never modified), or pacs://SERVER/STUDY_UID[/SERIES_UID] "
                   "(retrieved into the PACS cache first, resumable)")
    b.add_argument("output_root", help="the output tree; manifest.csv is written here")
    add_restore_options(b, help={
        "model": "an installed model's name or a model folder/.pt/.json path, loaded once",
        "device": "auto, cpu, cuda, cuda:N, mps (under torchrun: auto = one GPU per rank by LOCAL_RANK)"})
    b.add_argument("--format", choices=("auto", "dicom", "nifti"), default="auto",
                   help="output: a DICOM series per input series, or one .nii.gz each; default auto = like the input")
    b.add_argument("--deidentify", action="store_true", help="DICOM output: PS3.15 Annex E basic profile (as restore)")
    b.add_argument("--deidentify-key", default=None, help="secret key for a UID/date mapping that is the same across "
                   "runs and shards (default $NAPARI_RESTORE_DEID_KEY; under torchrun rank 0's random key is shared)")
    b.add_argument("--deidentify-dates", choices=("remove", "shift"), default="remove", help="as for restore")
    b.add_argument("--accept-burned-in", action="store_true", help="with --deidentify: export sources flagged "
                   "BurnedInAnnotation=YES")
    b.add_argument("--retry-failed", action="store_true", help="run again the series the manifest records as failed")
    b.add_argument("--dry-run", action="store_true", help="list what would be done (and what is done already); write "
                   "nothing")
    b.add_argument("--shard", default=None, metavar="I/N", help="do share I (0-based) of N, e.g. for Slurm arrays "
                   "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; every share writes its own manifest part, "
                   "merged into manifest.csv as shares finish")
    b.add_argument("--readers", type=int, default=2, help="reader processes (default 2)")
    b.add_argument("--writers", type=int, default=2, help="writer processes (default 2)")
    b.add_argument("--pool", choices=("process", "thread"), default="process",
                   help="readers and writers as processes (default; the model never waits for Python's GIL) or "
                        "threads (quicker to start, for small trees)")
    b.add_argument("--prefetch", type=int, default=1, help="series read ahead of the model (default 1)")
    b.add_argument("--max-voxels", type=int, default=None, help="record series larger than this as failed "
                   "('too large') instead of reading them")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (one line per series is still printed)")
    b.add_argument("--send-to", default=None, metavar="SERVER", help="store each derived DICOM series written by this "
                   "run on this configured PACS (with --deidentify: the de-identified series)")
    b.add_argument("--send-via", choices=("store", "stow"), default=None, help="C-STORE or STOW-RS (default: C-STORE "
                   "when the server has a DIMSE endpoint)")
    b.set_defaults(func=cmd_batch)

    from .pacs.cli import add_pacs_parser

    add_pacs_parser(sub)
    _finish(p)
    return p


def _print_warnings(caught: list, shown: set[str] | None = None) -> None:
    """Reader and restore notes (uneven spacing, duplicates, tilt, skipped files...), each once, on stderr.

    ``shown``: notes a command printed already (``info`` prints them under their series); a caught
    warning that is one of them, with or without the ``path: `` the reader puts before it, is skipped.
    """
    seen: set[str] = set()
    shown = shown or set()
    for w in caught:
        text = str(w.message)
        if not issubclass(w.category, (UserWarning, RuntimeWarning)) or text in seen:
            continue
        seen.add(text)
        if any(text == s or text.endswith(": " + s) for s in shown):
            continue
        print(f"warning: {text}", file=sys.stderr)


#: Library wording -> command-line wording in error messages.
_CLI_WORDING = (("pass overwrite=True (--overwrite)", "pass --overwrite"),)


def _cli_message(exc: BaseException) -> str:
    text = str(exc)
    for lib, cli in _CLI_WORDING:
        text = text.replace(lib, cli)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.shown_warnings = set()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            warnings.simplefilter("always", RuntimeWarning)
            try:
                code = int(args.func(args) or EXIT_OK)
            finally:
                _print_warnings(caught, args.shown_warnings)
        return code
    except (Cancelled, KeyboardInterrupt):
        print("cancelled: nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except RestoreError as exc:
        print(f"napari-restore: error: {_cli_message(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
